"""TPU attention with the Pallas splash-attention kernel
(jax.experimental.pallas.ops.tpu.splash_attention): packed-document segment ids, optional causal
masking and grouped KV heads, with the kernel's own fused backward pass (dq, dk, dv).

The same function as `research.models.attention.softmax_attention(q, k, v,
attention_mask(q_segments, kv_segments, causal))`: scale 1/sqrt(H), a query attends only the
keys of its own segment id (padding, segment 0, attends padding) and, with `causal`, only keys
at an index <= its own. `interpret=True` runs the same kernel in Pallas interpret mode, on any
backend (the CPU tests, tests/test_attention_splash.py); `interpret=False` needs a TPU.

Shapes: B batch, T query length, S key length, N query heads, K kv heads (N a multiple of K:
query head n reads kv head n // (N / K), as in the einsum attention), H head_dim. Logical axes of
the activations: q/out act_batch, act_length, act_heads, head_dim; k/v act_batch, act_length,
act_kv_heads, head_dim.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
    SplashAttentionKernel)

from research.errors import ConfigError

Array = jax.Array

# Splash tiles the query and key sequences in blocks whose length must be a multiple of the TPU
# lane width (128; the kernel checks it in interpret mode too). The largest dividing block wins:
# fewer grid steps, and 512 is what MaxText uses for its TPU default.
BLOCK_CANDIDATES = (512, 256, 128)
LANES = 128


def _block(length: int) -> int | None:
    """The largest of 512 / 256 / 128 that divides `length`, or None when none does."""
    return next((b for b in BLOCK_CANDIDATES if length % b == 0), None)


def _head_dim_supported(head_dim: int) -> bool:
    """Head dims the kernel's tiles handle: multiples of the 128-lane width (upstream's TPU
    tests use 128 and 256), and 64, which the kernel's lane-padded accumulators are sliced down to
    (`head_dim_v_repeats = cdiv(head_dim, 128)` then `[..., :head_dim]`)."""
    return head_dim == 64 or (head_dim > 0 and head_dim % LANES == 0)


def splash_supported(q_len: int, kv_len: int, head_dim: int) -> bool:
    """Whether `splash_attention` handles these shapes: a block of 512, 256 or 128 divides both
    the query length T and the key length S, and the head dim H is 64 or a multiple of 128.
    When False, use the einsum attention (`softmax_attention`) instead."""
    return (_block(q_len) is not None and _block(kv_len) is not None
            and _head_dim_supported(head_dim))


def block_sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
    """Forward and backward (dq, dkv) tile sizes for T = `q_len` queries and S = `kv_len` keys:
    the largest dividing block along each sequence. Needs `splash_supported`."""
    bq, bkv = _block(q_len), _block(kv_len)
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                             block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                             block_q_dq=bq, block_kv_dq=bkv)


def make_kernel(num_heads: int, q_len: int, kv_len: int, *, causal: bool,
                interpret: bool) -> SplashAttentionKernel:
    """The splash kernel for one batch row: q [N, T, H], k/v [K, S, H] and
    SegmentIds(q int[T], kv int[S]) -> [N, T, H]. The static mask (causal: query t sees keys
    s <= t; else every key) is one object shared by the N heads; segment ids are and-ed with it
    inside the kernel, and blocks the static mask rules out entirely are skipped."""
    shape = (q_len, kv_len)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    mask = splash.MultiHeadMask((head_mask,) * num_heads)
    return splash.make_splash_mha_single_device(
        mask, block_sizes=block_sizes(q_len, kv_len), interpret=interpret)


def _check(q: Array, k: Array, v: Array, q_segments: Array, kv_segments: Array,
           interpret: bool) -> None:
    """Raises ConfigError naming the problem for shapes or a backend the kernel cannot run."""
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ConfigError(f"splash_attention needs k and v of shape [B, S, K, H] = "
                          f"[{b}, S, K, {h}] matching q {q.shape}; got k {k.shape}, v {v.shape}.")
    if n % kv:
        raise ConfigError(f"splash_attention needs the query heads (N={n}) to be a multiple of "
                          f"the kv heads (K={kv}); change num_heads or kv_heads.")
    if q_segments.shape != (b, t) or kv_segments.shape != (b, s):
        raise ConfigError(f"splash_attention needs q_segments int[B, T] = [{b}, {t}] and "
                          f"kv_segments int[B, S] = [{b}, {s}]; got {q_segments.shape} and "
                          f"{kv_segments.shape}.")
    if not splash_supported(t, s, h):
        raise ConfigError(f"splash_attention cannot tile T={t}, S={s}, H={h}: the sequence "
                          f"lengths must be multiples of 128 and the head dim 64 or a multiple of "
                          f"128 (check splash_supported first and use the einsum attention "
                          f"otherwise).")
    if not interpret and jax.default_backend() != "tpu":
        raise ConfigError(f"splash_attention runs on TPU only, but JAX's backend is "
                          f"{jax.default_backend()!r}; use the einsum attention there (or "
                          f"interpret=True, which is slow and meant for tests).")


def splash_attention(q: Array, k: Array, v: Array, q_segments: Array, kv_segments: Array, *,
                     causal: bool, interpret: bool = False) -> Array:
    """Masked softmax attention with the splash kernel. q [B, T, N, H], k/v [B, S, K, H]
    (N a multiple of K), q_segments int[B, T], kv_segments int[B, S] -> [B, T, N, H] in q's dtype.

    Equal to `softmax_attention(q, k, v, attention_mask(q_segments, kv_segments, causal))` as
    long as every query sees at least one key (always so for self-attention, where a query sees
    itself; a query with no visible key is undefined in the kernel, whereas the einsum attention
    spreads it uniformly over all keys). The kernel does not scale q: q * 1/sqrt(H) is taken here,
    in float32 and cast back, before the kernel; its gradient flows through that product. The
    kernel runs per batch row on [N, T, H] (vmapped over B); gradients come from its custom VJP
    (dq and dk/dv kernels; dk/dv of a kv head sum over its N / K query heads).
    """
    _check(q, k, v, q_segments, kv_segments, interpret)
    n, h = q.shape[2], q.shape[3]
    kernel = make_kernel(n, q.shape[1], k.shape[1], causal=causal, interpret=interpret)
    scaled = (q.astype(jnp.float32) * jnp.float32(1.0 / h ** 0.5)).astype(q.dtype)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, heads, H] <-> [B, heads, L, H]

    def row(q_row: Array, k_row: Array, v_row: Array, q_seg: Array, kv_seg: Array) -> Array:
        """One batch row: q [N, T, H], k/v [K, S, H], segments int[T] / int[S] -> [N, T, H]."""
        return kernel(q_row, k_row, v_row, splash.SegmentIds(q=q_seg, kv=kv_seg))

    def local(q, k, v, q_seg, kv_seg):  # one device's batch rows and heads
        out = jax.vmap(row)(heads_first(q), heads_first(k), heads_first(v), q_seg, kv_seg)
        return heads_first(out)

    out = per_shard(local, scaled, k, v, q_segments.astype(jnp.int32),
                    kv_segments.astype(jnp.int32))
    return out.astype(q.dtype)


def per_shard(fn: Callable[..., Array], q: Array, k: Array, v: Array, q_segments: Array,
              kv_segments: Array) -> Array:
    """`fn(q, k, v, q_segments, kv_segments)` run on each device's shard under `jax.shard_map`
    when a mesh of several devices is in force (`jax.set_mesh`, as the train step sets it).

    A Pallas kernel is opaque to XLA's partitioner, which would otherwise gather every input onto
    every device. The shards follow the logical axis rules in force: the batch over the data
    axes ('act_batch'), query and kv heads over 'tensor' ('act_heads', 'act_kv_heads'; a
    contiguous split keeps query head h with kv head h // (N / K)). Without a mesh, `fn` runs
    as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, q_segments, kv_segments)
    q_spec = nn.logical_to_mesh_axes(("act_batch", None, "act_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("act_batch", None, "act_kv_heads", None))
    seg_spec = nn.logical_to_mesh_axes(("act_batch", None))
    return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_segments, kv_segments)
