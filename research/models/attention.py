"""Self-attention: rotary positions, the segment/causal mask, the einsum softmax kernels and the
`Attention` layer (grouped KV heads, optional KV cache). Which kernel a layer runs (einsum, XLA,
cuDNN on NVIDIA GPUs, Pallas splash on TPU) is `research.models.attention_select`'s choice.

Shapes: B batch, T query length, S key length, D d_model, N heads, K kv heads (N a multiple of
K), H head_dim. Logical axes: parameters embed, heads, kv_heads, head_dim; activations
act_batch, act_length, act_heads, act_kv_heads.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from research.errors import ConfigError
from research.models.attention_cudnn import cudnn_attention, dropout_seed
from research.models.attention_select import einsum_heads_major, query_blocks, select_impl
from research.models.attention_splash import splash_attention
from research.models.layers import Dropout, Projection, constrain
from research.models.transformer_config import TransformerConfig

Array = jax.Array


def llama3_frequencies(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                       high_freq_factor: float, original_max_len: int) -> np.ndarray:
    """Llama 3.1's scaled rotary inverse frequencies float32[H/2], computed as transformers'
    `_compute_llama3_parameters` does (float32): wavelengths 2 pi / f over original_max_len /
    low_freq_factor are divided by `factor`, those under original_max_len / high_freq_factor
    kept, the ones between interpolated smoothly."""
    f32 = np.float32
    inv_freq = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)))
    low_wavelen = original_max_len / low_freq_factor
    high_wavelen = original_max_len / high_freq_factor
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / f32(factor), inv_freq).astype(f32)
    smooth = ((f32(original_max_len) / wavelen - f32(low_freq_factor))
              / f32(high_freq_factor - low_freq_factor)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / f32(factor) + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def rope_frequencies(cfg: TransformerConfig) -> np.ndarray | None:
    """The config's rotary inverse frequencies float32[H/2] when `rope_scaling` is set; None for
    plain RoPE (`rotary` computes theta^(-i/(H/2)) itself)."""
    if cfg.rope_scaling is None:
        return None
    return llama3_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling_factor,
                              cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                              cfg.rope_original_max_len)


def rotary(x: Array, positions: Array, theta: float,
           inv_freq: np.ndarray | None = None) -> Array:
    """Rotary position embedding (rotate-half convention, as HF Llama: the first and second
    halves of each head are the pairs). x: [B, T, N, H], positions: [B, T]; `inv_freq`
    float32[H/2] replaces the frequencies theta^(-i/(H/2)) (scaled RoPE)."""
    half = x.shape[-1] // 2
    if inv_freq is None:
        freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    else:
        freqs = jnp.asarray(inv_freq, jnp.float32)
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_mask(q_segments: Array, k_segments: Array, causal: bool,
                   q_positions: Array | None = None, k_positions: Array | None = None,
                   window: int | None = None) -> Array:
    """bool[B, 1, T, S]: query t may attend key s. Segments int[B, T] / int[B, S].

    Tokens attend only within their own segment (packed documents; padding is segment 0, so
    padding attends padding and never real tokens). With `causal`, also only to keys at an
    earlier or equal index (`q_positions` [1, T] or per row [B, T] / `k_positions` [1, S] are
    absolute indices, for decoding), and with a `window` (causal only) only to the last
    `window` of those (index t - s < window, as HF Mistral's sliding window).
    """
    mask = q_segments[:, :, None] == k_segments[:, None, :]
    if causal:
        if q_positions is None:
            q_positions = jnp.arange(q_segments.shape[1])[None]
            k_positions = jnp.arange(k_segments.shape[1])[None]
        mask &= q_positions[:, :, None] >= k_positions[:, None, :]
        if window is not None:
            mask &= q_positions[:, :, None] - k_positions[:, None, :] < window
    return mask[:, None]


def check_attention_backend(impl: str | None) -> None:
    """cuDNN attention exists only on NVIDIA GPUs; elsewhere JAX fails with a bare
    "cuDNN is not detected". Say what to change instead."""
    backend = jax.default_backend() if impl == "cudnn" else None
    if impl == "cudnn" and backend != "gpu":
        raise ConfigError(f"TransformerConfig.attention_impl='cudnn' needs an NVIDIA GPU with "
                          f"cuDNN, but JAX's backend is {backend!r}; use attention_impl='auto' (the "
                          f"default: the backend's kernel) or 'einsum' instead.")


def softmax_attention(q: Array, k: Array, v: Array, mask: Array,
                      dropout: Callable[[Array], Array] | None = None, *,
                      heads_major: bool = False, queries_heads_major: bool = False) -> Array:
    """softmax(q k^T / sqrt(H), masked) v, with einsums. q [B,T,N,H], k/v [B,S,K,H] (N a multiple
    of K: grouped KV heads; with `heads_major` k/v are [B,K,S,H], the KV cache's layout; with
    `queries_heads_major` q and the result are [B,N,T,H]), mask bool[B,1,T,S] -> [B,T,N,H].

    The same computation as jax.nn.dot_product_attention's XLA implementation: scores
    accumulated in float32, scaled, masked with -0.7 * float32 max, float32 softmax,
    probabilities cast to v's dtype. `dropout` (if given) is applied to the float32
    probabilities (BERT's attention dropout). Unlike JAX's, it does not vmap over the query
    groups when there is one per KV head: on XLA:CPU that size-1 axis costs transposes of
    [B,N,T,S] tensors (gpt_small train step 4.42 -> 4.29 s on the 2-core CPU).
    """
    if queries_heads_major:
        b, n, t, h = q.shape
    else:
        b, t, n, h = q.shape
    kv = k.shape[1 if heads_major else 2]
    middle = "ns" if heads_major else "sn"  # the key/value operand's head and position axes
    query = "bnth" if queries_heads_major else "btnh"
    if kv != n:  # N = K x G: [B,T,K,G,H] (or [B,K,G,T,H]) queries, scores [B,K,G,T,S]
        middle = middle.replace("n", "k")
        query = query.replace("n", "kg")
        q = q.reshape((b, kv, n // kv, t, h) if queries_heads_major else (b, t, kv, n // kv, h))
        mask = mask[:, :, None]
    scores_axes = "bnts" if kv == n else "bkgts"
    scores = jnp.einsum(f"{query},b{middle}h->{scores_axes}", q, k,
                        preferred_element_type=jnp.float32)
    scores = scores * jnp.asarray(1.0 / h ** 0.5, jnp.float32)
    scores = jnp.where(mask, scores, jnp.asarray(-0.7 * jnp.finfo(jnp.float32).max, jnp.float32))
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum(f"{scores_axes},b{middle}h->{query}", probs.astype(v.dtype), v)
    return out.reshape((b, n, t, h) if queries_heads_major else (b, t, n, h))


def heads_major_attention(q: Array, k: Array, v: Array, mask: Array, blocks: int = 1,
                          dropout: Callable[[Array], Array] | None = None) -> Array:
    """`causal_blocked_attention` (`blocks` 1: `softmax_attention`) with every operand
    heads-major: q, k and v are taken to [B,N,T,H] / [B,K,S,H] once, so each head's products
    read contiguous [T,H] / [S,H] tiles, and the result comes back as [B,T,N,H]. The CPU's
    layout (`attention_select.einsum_heads_major`). Shapes as in `softmax_attention`."""
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    out = causal_blocked_attention(q, k, v, mask, blocks, dropout, heads_major=True)
    return out.transpose(0, 2, 1, 3)


def causal_blocked_attention(q: Array, k: Array, v: Array, mask: Array, blocks: int,
                             dropout: Callable[[Array], Array] | None = None, *,
                             heads_major: bool = False) -> Array:
    """`softmax_attention` for causal self-attention (T == S) in `blocks` query blocks, block i
    attending only the keys up to its last query. Skips the all-masked key blocks above the
    diagonal, (blocks - 1) / (2 blocks) of the score work (37.5% at 4 blocks; gpt_small train
    step 4.37 -> 4.06 s on the 2-core CPU). The result is the unblocked one: a masked key's
    softmax weight is exactly 0 there. One block is `softmax_attention` itself, for any mask.
    Shapes as in `softmax_attention`; with `heads_major` q, k, v and the result are all
    heads-major ([B,N,T,H] / [B,K,S,H])."""
    axis = 2 if heads_major else 1  # the position axis

    def positions(x: Array, lo: int, hi: int) -> Array:
        return jax.lax.slice_in_dim(x, lo, hi, axis=axis)

    t = q.shape[axis]
    bounds = sorted({round(i * t / blocks) for i in range(blocks + 1)})
    outs = [softmax_attention(positions(q, lo, hi), positions(k, 0, hi), positions(v, 0, hi),
                              mask[:, :, lo:hi, :hi], dropout, heads_major=heads_major,
                              queries_heads_major=heads_major)
            for lo, hi in zip(bounds, bounds[1:])]
    return jnp.concatenate(outs, axis=axis)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (MHA/GQA/MQA) and an optional KV cache.

    x [B, T, D] -> [B, T, D]. Parameters: query/kernel [D, N, H] ('embed', 'heads', 'head_dim');
    key/kernel and value/kernel [D, K, H] ('embed', 'kv_heads', 'head_dim'); out/kernel
    [N, H, D] ('heads', 'head_dim', 'embed'); biases take the kernels' feature axes.

    In decode mode the `cache` collection holds key/value [B, K, S, H], the key segment ids
    [B, S] and the write index; each call appends its T tokens and attends to all cached keys.
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array, *,
                 deterministic: bool, decode: bool = False) -> Array:
        """x [B, T, D]; segment_ids, positions int[B, T]. Returns [B, T, D]."""
        cfg = self.cfg
        n, k, h = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q = Projection((n, h), ("embed", "heads", "head_dim"), cfg, bias=qkv_bias,
                       name="query")(x)
        key = Projection((k, h), ("embed", "kv_heads", "head_dim"), cfg, bias=qkv_bias,
                         name="key")(x)
        value = Projection((k, h), ("embed", "kv_heads", "head_dim"), cfg, bias=qkv_bias,
                           name="value")(x)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        key = constrain(key, ("act_batch", "act_length", "act_kv_heads", None))
        value = constrain(value, ("act_batch", "act_length", "act_kv_heads", None))
        if cfg.position == "rotary":
            inv_freq = rope_frequencies(cfg)
            q = rotary(q, positions, cfg.rope_theta, inv_freq)
            key = rotary(key, positions, cfg.rope_theta, inv_freq)

        q_index = k_index = None
        k_segments = segment_ids
        if decode:
            key, value, k_segments, q_index, k_index = self._update_cache(key, value, segment_ids)
        training_dropout = bool(cfg.attention_dropout_rate) and not deterministic
        kv_len = key.shape[2] if decode else key.shape[1]  # the cache is heads-major
        impl = select_impl(cfg, q_len=q.shape[1], kv_len=kv_len, decode=decode,
                           dropout=training_dropout)
        if impl == "cudnn":
            check_attention_backend(impl)
            lengths = (jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
                       if cfg.padding_segments else None)
            out = cudnn_attention(q, key, value, segment_ids, causal=cfg.causal,
                                  dropout_rate=cfg.attention_dropout_rate if training_dropout
                                  else 0.0, seed=dropout_seed(self.scope.path), lengths=lengths)
        elif impl == "splash":
            out = splash_attention(q, key, value, segment_ids, k_segments, causal=cfg.causal,
                                   interpret=jax.default_backend() != "tpu")
        else:
            mask = attention_mask(segment_ids, k_segments, cfg.causal, q_index, k_index,
                                  cfg.sliding_window)
            dropout = None
            if training_dropout:
                dropout = functools.partial(Dropout(cfg.attention_dropout_rate,
                                                    cfg.dropout_bits),
                                            deterministic=False)
            out = self._einsum_or_xla(impl, q, key, value, mask, dropout, decode=decode)
        out = checkpoint_name(out, "attention_out")
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        out = Projection((cfg.d_model,), ("heads", "head_dim", "embed"), cfg, in_dims=2,
                         name="out")(out)
        return checkpoint_name(out, "matmul_out")

    def _einsum_or_xla(self, impl: str, q: Array, key: Array, value: Array, mask: Array,
                       dropout: Callable[[Array], Array] | None, *, decode: bool) -> Array:
        """The 'einsum' kernel (`softmax_attention`, causal self-attention in query blocks where
        `attention_select.query_blocks` says so) or 'xla' (`jax.nn.dot_product_attention`).
        q [B, T, N, H], key/value [B, S, K, H] ([B, K, S, H] from the cache with `decode`),
        mask bool[B, 1, T, S] -> [B, T, N, H]."""
        cfg = self.cfg
        if impl == "xla":
            if decode:
                key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
            return jax.nn.dot_product_attention(q, key, value, mask=mask, implementation="xla")
        blocks = query_blocks(cfg, q.shape[1]) if cfg.causal and not decode else 1
        if not decode and einsum_heads_major():
            return heads_major_attention(q, key, value, mask, blocks, dropout)
        if blocks > 1:
            return causal_blocked_attention(q, key, value, mask, blocks, dropout)
        return softmax_attention(q, key, value, mask, dropout, heads_major=decode)

    def _update_cache(self, key: Array, value: Array, segment_ids: Array
                      ) -> tuple[Array, Array, Array, Array | None, Array | None]:
        """Writes this call's key/value [B, T, K, H] and segment ids int[B, T] into the cache at
        the write index. Returns the whole cache (key/value heads-major [B, K, S, H], segments
        int[B, S]; S = max_len, or the length of a cache the caller built) and the absolute
        query [1, T] / key [1, S] indices for the causal mask.

        The cache keeps key/value heads-major, [B, K, S, H]: a decode step's attention then
        contracts them as they lie. In the token-major [B, S, K, H] layout XLA transposes the
        whole cache for every step's two einsums (on the 2-core CPU, 16 rows x 128 positions x
        4 heads x 64: 1.0 ms per layer against 0.17 ms heads-major).

        The write index `cache_index` is a scalar shared by all rows (as `init` creates it), or
        int32[B] when the caller's cache holds one index per row (continuous batching,
        `research.serving`): row b then writes at its own index (a scatter, in place under
        donation; writes past S are dropped) and the query indices are per row [B, T]."""
        b, t, k, h = key.shape
        cfg = self.cfg
        cached_key = self.variable("cache", "cached_key", jnp.zeros, (b, k, cfg.max_len, h), key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, (b, k, cfg.max_len, h), value.dtype)
        cached_seg = self.variable("cache", "cached_segment_ids", jnp.zeros, (b, cfg.max_len), jnp.int32)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if self.is_initializing():
            return key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3), segment_ids, None, None
        i = index.value
        length = cached_key.value.shape[2]
        if i.ndim == 1:  # one write index per row
            rows = jnp.arange(b)[:, None]
            cols = i[:, None] + jnp.arange(t)[None]  # [B, T]
            # [rows, :, cols] selects [B, T, K, H] (the advanced indices' dims first): key as is
            cached_key.value = cached_key.value.at[rows, :, cols].set(key, mode="drop")
            cached_value.value = cached_value.value.at[rows, :, cols].set(value, mode="drop")
            cached_seg.value = cached_seg.value.at[rows, cols].set(
                segment_ids.astype(jnp.int32), mode="drop")
            index.value = i + t
            return (cached_key.value, cached_value.value, cached_seg.value, cols,
                    jnp.arange(length)[None])
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key.transpose(0, 2, 1, 3), (0, 0, i, 0))
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value.transpose(0, 2, 1, 3), (0, 0, i, 0))
        cached_seg.value = jax.lax.dynamic_update_slice(
            cached_seg.value, segment_ids.astype(jnp.int32), (0, i))
        index.value = i + t
        q_index = (i + jnp.arange(t))[None]
        k_index = jnp.arange(length)[None]
        # Slots not yet written hold segment 0 but sit after every query: the causal test hides them.
        return cached_key.value, cached_value.value, cached_seg.value, q_index, k_index
