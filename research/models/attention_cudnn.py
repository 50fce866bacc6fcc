"""cuDNN flash attention on NVIDIA GPUs, with packed segments, for training without attention
dropout and for evaluation.

`jax.nn.dot_product_attention(implementation='cudnn', is_causal=...)` with the segment mask: the
causal part is cuDNN's CAUSAL mask type (cuDNN skips the tiles above the diagonal), the
segments (packed documents and padding: segment ids int[B, T], padding 0) go in as the exact
[B, 1, T, T] segment mask, which cuDNN adds as a bias, so any segment layout is right; its
backward kernel computes no gradient for that bias (`_no_mask_gradient`). Where the segments
are a right-padding mask (`TransformerConfig.padding_segments`: BERT's input_mask), cuDNN takes
each row's length instead (its PADDING mask types), with no [B, 1, T, T] tensor at all.

Measured on an H200 (JAX 0.11.2, 2026-11-26, gpt_medium, batch 16 x 1024, bf16, dropout 0.1):
cuDNN's packed-sequence layout (`q_seqlen`/`q_offsets`, at most M segments per row) with a
`lax.cond` per layer falling back to the mask for rows of more than M segments ran at 118.7
ms/step against 111.1 ms for the plain mask (the issue's measurement): XLA:GPU reads each
conditional's predicate back on the host, 48 stalls a step (the profile had the GPU busy 92 of
the 118.7 ms), and the ragged kernels themselves were slow (attention 11.5 ms of device time
per step). The forward and gradients of this path match the einsum reference on that GPU
(tests/test_attention_backends.py, tests/test_precision_attention.py, run with
JAX_PLATFORMS=cuda).

Attention dropout: `cudnn_attention(dropout_rate=...)` runs cuDNN's fused dropout (the
`dropout_rate` of `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`, with cuDNN's
own generator: a fixed seed per layer, `dropout_seed`, and an offset XLA advances on each run,
so the masks are fresh every step but are not a function of the run's seed: a resumed run does
not replay them). On an H200 with JAX 0.11.2 (2026-11-26) it ran correctly on its own
(experiments/cudnn_dropout_probe.py under default flags and without command buffers;
tests/test_attention_backends.py's GPU tests: fresh masks per run, finite gradients, the mean
of 64 runs near the dropout-free output), but inside the jitted BERT-base train step
(research.benchmark, attention_impl='cudnn') XLA aborted the process ("Check failed:
local_device_ordinal.has_value()" in cuda_dnn.cc, where XLA advances that offset) while cuDNN's
kernels were captured in CUDA graphs (XLA's command buffers). With XLA's command buffers for
everything but cuDNN (`--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL`) the
same step ran, at 31.6 ms against 44.2 ms on the einsum kernel (bert_base, batch 32 x 512).

So models send attention dropout to cuDNN only where cuDNN stays out of the command buffers
(`dropout_in_models`, read by `research.models.attention_select`): the training CLIs call
`prepare_xla_flags` with the configured attention dropout before JAX starts its backend, which
adds that flag unless XLA_FLAGS already names `--xla_gpu_enable_command_buffer` (the user's
choice: then the flag decides). RESEARCH_CUDNN_ATTENTION_DROPOUT=0 keeps attention dropout on
the einsum kernel.

Shapes: B batch, T length (queries = keys: self-attention), N query heads, K kv heads (N a
multiple of K), H head dim.
"""

from __future__ import annotations

import contextlib
import os
import re
import zlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp

Array = jax.Array

# cuDNN's fused attention takes 16-bit inputs and head dims that are multiples of 8, up to 128
# (256 on Hopper and later; 128 keeps the check independent of the card).
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128
# Whether models may run attention dropout in training through cuDNN ('auto' and 'cudnn'),
# where the command buffers allow it (`dropout_in_models`); False: always the einsum kernel.
DROPOUT_IN_MODELS = os.environ.get("RESEARCH_CUDNN_ATTENTION_DROPOUT", "1") != "0"
COMMAND_BUFFER_FLAG = "--xla_gpu_enable_command_buffer"
# XLA's command buffer types without CUDNN (measured on an H200 with JAX 0.11.2: see above).
COMMAND_BUFFERS_WITHOUT_CUDNN = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"


def command_buffer_types(xla_flags: str) -> list[str] | None:
    """The command buffer types XLA_FLAGS sets (the last --xla_gpu_enable_command_buffer), [] for
    none (CUDA graphs off), None when the flag is absent (XLA's defaults, which include CUDNN)."""
    found = re.findall(COMMAND_BUFFER_FLAG + r"=(\S*)", xla_flags)
    if not found:
        return None
    return [t.strip().upper() for t in found[-1].split(",") if t.strip()]


def dropout_in_models(xla_flags: str | None = None) -> bool:
    """Whether training runs attention dropout inside cuDNN's kernel: DROPOUT_IN_MODELS and
    XLA_FLAGS keep cuDNN's kernels out of command buffers (where JAX 0.11.2 aborts)."""
    types = command_buffer_types(os.environ.get("XLA_FLAGS", "") if xla_flags is None
                                 else xla_flags)
    return DROPOUT_IN_MODELS and types is not None and "CUDNN" not in types


def prepare_xla_flags(attention_dropout_rate: float) -> bool:
    """Before JAX starts its backend: with attention dropout configured, adds
    `--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL` to XLA_FLAGS (cuDNN's
    kernels out of CUDA graphs), so that `dropout_in_models` holds on an NVIDIA GPU. Nothing
    changes when dropout is off or switched off, when XLA_FLAGS names the flag already, when
    JAX is set to the CPU, or when the backend has started (then the flags would not apply and
    attention dropout stays on the einsum kernel). Returns whether XLA_FLAGS changed."""
    from jax._src import xla_bridge
    flags = os.environ.get("XLA_FLAGS", "")
    platforms = (jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or "").lower()
    if (not attention_dropout_rate or not DROPOUT_IN_MODELS
            or command_buffer_types(flags) is not None or platforms.startswith("cpu")
            or xla_bridge.backends_are_initialized()):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {COMMAND_BUFFER_FLAG}={COMMAND_BUFFERS_WITHOUT_CUDNN}".strip()
    return True


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


def dropout_seed(module_path: tuple[str, ...]) -> int:
    """A fixed cuDNN dropout seed per attention layer, from its module path ('decoder/layer_3/
    attention'): every layer draws its own masks; XLA advances each call's offset per run."""
    return zlib.crc32("/".join(module_path).encode()) & 0x7FFFFFFF


def cudnn_attention(q: Array, k: Array, v: Array, segments: Array, *, causal: bool,
                    dropout_rate: float = 0.0, seed: int = 0,
                    lengths: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(H) + segment mask) v with cuDNN's fused kernel, causal or not, with
    dropout on the probabilities when `dropout_rate` > 0 (cuDNN's own generator: `seed` and an
    offset XLA advances each run, see the module docstring).

    `lengths` int32[B]: the segments are a right-padding mask (row b's first lengths[b] tokens
    real, the rest padding; `TransformerConfig.padding_segments`), so cuDNN masks by length
    (its PADDING mask types) and reads no [B, 1, T, T] mask. The real queries' outputs are the
    segment mask's; padding queries attend nothing and output zeros.

    q [B, T, N, H], k/v [B, T, K, H] (16-bit), segments int[B, T] -> [B, T, N, H].
    """
    from jax._src.cudnn import fused_attention_stablehlo as fused

    if lengths is not None:
        if not dropout_rate:
            return jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                query_seq_lengths=lengths,
                                                key_value_seq_lengths=lengths,
                                                implementation="cudnn")
        mask_type = fused.MaskType.PADDING_CAUSAL if causal else fused.MaskType.PADDING
        return fused.dot_product_attention(q, k, v, None, None, q_seqlen=lengths,
                                           kv_seqlen=lengths, scale=q.shape[-1] ** -0.5,
                                           mask_type=mask_type, seed=seed,
                                           dropout_rate=float(dropout_rate))
    same_segment = segments[:, None, :, None] == segments[:, None, None, :]  # [B, 1, T, T]
    with _no_mask_gradient(fused):
        if not dropout_rate:
            return jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=causal,
                                                implementation="cudnn")
        mask_type = fused.MaskType.CAUSAL if causal else fused.MaskType.NO_MASK
        return fused.dot_product_attention(q, k, v, None, same_segment,
                                           scale=q.shape[-1] ** -0.5, mask_type=mask_type,
                                           seed=seed, dropout_rate=float(dropout_rate))


@contextlib.contextmanager
def _no_mask_gradient(fused) -> Iterator[None]:
    """While tracing: JAX's cuDNN attention up to 0.11.1 turns a mask into a bias and has the
    backward kernel export that bias's gradient, [B, 1, T, T] per layer, whenever there is a
    bias (`should_export_dbias` answers True). A segment mask has no gradient: the backward
    kernel skips it here. (JAX 0.11.2 skips it for boolean masks itself and has no
    `should_export_dbias`: nothing to do.)"""
    export = getattr(fused, "should_export_dbias", None)
    if export is None:
        yield
        return
    fused.should_export_dbias = lambda *args, **kwargs: False
    try:
        yield
    finally:
        fused.should_export_dbias = export
