"""Which attention kernel a layer runs: `TransformerConfig.attention_impl`, resolved per backend.

`attention_impl='auto'` (the default) picks, at trace time, by JAX's default backend:

| backend | kernel | falls back to einsum when |
|---|---|---|
| NVIDIA GPU | cuDNN flash attention (`attention_cudnn`) with packed segments | attention dropout in training (see `attention_cudnn`), float32 compute, head dim not a multiple of 8 or over 128, KV-cache decoding |
| TPU | Pallas splash attention (`attention_splash`) with segment ids | attention dropout in training (splash has none), lengths no block size divides, decoding |
| CPU | einsums (`attention.softmax_attention`), heads-major, causal attention in query blocks | - |

A sliding window (`TransformerConfig.sliding_window`, Mistral) always runs the einsum kernel,
also when 'cudnn' or 'splash' is named ('xla' takes the window's mask as it is).

Explicit choices: 'einsum' (None is the same), 'xla' (`jax.nn.dot_product_attention`'s XLA
implementation), 'cudnn', 'splash' (on a backend other than TPU it runs in Pallas interpret
mode: slow, for tests). 'xla', 'splash' and 'cudnn' run no attention dropout, so attention
dropout in training runs the einsum kernel for them.

Query blocks (`attention_query_blocks`, causal einsum attention split into query blocks that
skip the masked keys) were measured to help on the CPU only. None (the default) means
`isqrt(seq_len / 64)` blocks on CPU (at least 1: 2 at 256 tokens, 4 at 1024) and 1 block
elsewhere, where XLA's fused kernels gain nothing from the split. The skipped score work grows
as T^2 (1/2 - 1/(2 blocks) of it), while each block costs slices of K/V and pads of their
gradients, which grow as T, so the best count grows as sqrt(T). Measured: gpt_small train step
on the 2-core CPU, in-process A/B, dropout 0, medians of 4-10 steps (at 256 tokens two runs:
1/2/4 blocks, then 2/4 blocks with 10 steps each):

| tokens (batch) | 1 block | 2 | 4 | 8 | 16 |
|---|---|---|---|---|---|
| 256 (8) | 13.92 s | **12.95 s**, 12.63 s | 14.61 s, 13.25 s | | |
| 512 (4) | | 13.86 s | **13.66 s** | 15.08 s | |
| 1024 (2) | | | **16.08 s** | 16.66 s | 19.85 s |
"""

from __future__ import annotations

import math

import jax

from research.errors import ConfigError
from research.models import attention_cudnn
from research.models.transformer_config import TransformerConfig

CPU_QUERY_BLOCK_SCALE = 64  # CPU query blocks: isqrt(seq_len / 64)


def einsum_heads_major(backend: str | None = None) -> bool:
    """Whether the einsum kernel computes training/prefill attention heads-major
    (`attention.heads_major_attention`): on CPU, where it was measured to help (in-process A/B
    on the 2-core CPU, dropout 0, medians of 6 steps: gpt_small 11.32 -> 11.07 s and 11.61 ->
    11.04 s, bert_base 12.99 -> 12.20 s; attention alone, forward + backward of one gpt_small
    layer, 106 -> 88 ms). Elsewhere XLA's layout assignment places the operands of its own
    kernels."""
    return (backend or jax.default_backend()) == "cpu"


def query_blocks(cfg: TransformerConfig, seq_len: int, backend: str | None = None) -> int:
    """Query blocks for causal einsum attention over `seq_len` queries: the configured number,
    or on CPU `isqrt(seq_len // CPU_QUERY_BLOCK_SCALE)` (at least 1), 1 elsewhere."""
    if cfg.attention_query_blocks is not None:
        return cfg.attention_query_blocks
    if (backend or jax.default_backend()) != "cpu":
        return 1
    return max(1, math.isqrt(seq_len // CPU_QUERY_BLOCK_SCALE))


def select_impl(cfg: TransformerConfig, *, q_len: int, kv_len: int, decode: bool,
                dropout: bool, backend: str | None = None, cuda: bool | None = None) -> str:
    """The kernel one attention call runs: 'einsum', 'xla', 'cudnn' or 'splash'.

    `dropout`: attention dropout is active (training with attention_dropout_rate > 0).
    `backend`/`cuda` default to JAX's default backend and whether it is an NVIDIA GPU.
    """
    from research.models import attention_splash

    backend = backend or jax.default_backend()
    impl = cfg.attention_impl or "einsum"
    if impl in ("auto", "cudnn", "splash") and cfg.sliding_window is not None:
        return "einsum"  # the sliding-window mask runs through the einsum kernel only
    if impl == "auto":
        if decode:
            return "einsum"
        if cuda is None:
            cuda = attention_cudnn.cuda_available()
        fused_ok = not dropout or attention_cudnn.dropout_in_models()
        if cuda and fused_ok and attention_cudnn.cudnn_supported(
                cfg.compute_dtype, cfg.dim_per_head, q_len, kv_len):
            return "cudnn"
        if (backend == "tpu" and not dropout
                and attention_splash.splash_supported(q_len, kv_len, cfg.dim_per_head)):
            return "splash"
        return "einsum"
    if impl in ("xla", "splash") and dropout:
        return "einsum"
    if impl == "cudnn" and dropout and not attention_cudnn.dropout_in_models():
        return "einsum"
    if impl in ("cudnn", "splash") and decode:
        return "einsum"  # the KV cache's query/key lengths differ; einsums handle any shapes
    if impl == "cudnn" and not attention_cudnn.cudnn_supported(cfg.compute_dtype, cfg.dim_per_head,
                                                               q_len, kv_len):
        raise ConfigError(f"TransformerConfig.attention_impl='cudnn' does not take head_dim="
                          f"{cfg.dim_per_head}, length {q_len}: cuDNN needs a head dim that is a "
                          f"multiple of 8 up to {attention_cudnn.CUDNN_MAX_HEAD_DIM} and an even "
                          f"length; use attention_impl='auto' or 'einsum'.")
    if impl == "splash" and not attention_splash.splash_supported(q_len, kv_len, cfg.dim_per_head):
        raise ConfigError(f"TransformerConfig.attention_impl='splash' does not take length "
                          f"{q_len} with head_dim {cfg.dim_per_head}: splash needs a length that "
                          f"128, 256 or 512 divides and a head dim of 64 or a multiple of 128; "
                          f"use attention_impl='auto' or 'einsum'.")
    return impl
