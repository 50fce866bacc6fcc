"""cuDNN flash attention on NVIDIA GPUs, with packed segments, for training without attention
dropout and for evaluation.

`jax.nn.dot_product_attention(implementation='cudnn', is_causal=...)` with the segment mask: the
causal part is cuDNN's CAUSAL mask type (cuDNN skips the tiles above the diagonal), the
segments (packed documents and padding: segment ids int[B, T], padding 0) go in as the exact
[B, 1, T, T] segment mask, which cuDNN adds as a bias, so any segment layout is right.

Measured on an H200 (JAX 0.11.2, 2026-11-26, gpt_medium, batch 16 x 1024, bf16, dropout 0.1):
cuDNN's packed-sequence layout (`q_seqlen`/`q_offsets`, at most M segments per row) with a
`lax.cond` per layer falling back to the mask for rows of more than M segments ran at 118.7
ms/step against 111.1 ms for the plain mask (the issue's measurement): XLA:GPU reads each
conditional's predicate back on the host, 48 stalls a step (the profile had the GPU busy 92 of
the 118.7 ms), and the ragged kernels themselves were slow (attention 11.5 ms of device time
per step). The forward and gradients of this path match the einsum reference on that GPU
(tests/test_attention_backends.py, tests/test_precision_attention.py, run with
JAX_PLATFORMS=cuda).

No attention dropout here: cuDNN's fused attention has dropout (the `dropout_rate` of
`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`), but on that machine XLA
aborted the process the first time it ran it ("Check failed: local_device_ordinal.has_value()"
in cuda_dnn.cc, bert_base with attention dropout 0.1), so attention dropout runs the einsum
kernel (`research.models.attention_select`).

Shapes: B batch, T length (queries = keys: self-attention), N query heads, K kv heads (N a
multiple of K), H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# cuDNN's fused attention takes 16-bit inputs and head dims that are multiples of 8, up to 128
# (256 on Hopper and later; 128 keeps the check independent of the card).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128


def cudnn_supported(dtype: str, head_dim: int, q_len: int, kv_len: int) -> bool:
    """Whether the cuDNN kernel takes these shapes: 16-bit compute, head_dim a multiple of 8
    up to 128, self-attention (T == S) of even length."""
    return (str(jnp.dtype(dtype)) in CUDNN_DTYPES and head_dim % 8 == 0
            and head_dim <= CUDNN_MAX_HEAD_DIM and q_len == kv_len and q_len % 2 == 0)


def cuda_available() -> bool:
    """Whether JAX's default backend is an NVIDIA GPU (cuDNN present), not ROCm or CPU."""
    if jax.default_backend() != "gpu":
        return False
    try:
        return "cuda" in jax.extend.backend.get_backend().platform_version.lower()
    except Exception:  # noqa: BLE001 - an unknown plugin: not CUDA
        return False


def cudnn_attention(q: Array, k: Array, v: Array, segments: Array, *, causal: bool) -> Array:
    """softmax(q k^T / sqrt(H) + segment mask) v with cuDNN's fused kernel, causal or not.

    q [B, T, N, H], k/v [B, T, K, H] (16-bit), segments int[B, T] -> [B, T, N, H].
    """
    same_segment = segments[:, None, :, None] == segments[:, None, None, :]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=causal,
                                        implementation="cudnn")
