"""`TransformerConfig`: the architecture hyper-parameters of the transformer stack, checked.

Its own module so that the layers (`research.models.layers`, `research.models.attention`) and the
stack that assembles them (`research.models.transformer`, which re-exports it) all read it
without an import circle. The gin name is `TransformerConfig`: model gin files bind
`TransformerConfig.num_layers = 12` and so on.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from research.errors import ConfigError

ROPE_SCALINGS = (None, "llama3")
ACTIVATIONS = ("gelu", "gelu_exact", "relu", "swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary", "none")
REMAT_POLICIES = ("none", "full", "save_matmuls", "save_attention", "offload")
ATTENTION_IMPLS = ("auto", "einsum", None, "xla", "cudnn", "splash")  # None = "einsum"
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


# Registered under the module that defined it before the split, so both gin selectors stay:
# `TransformerConfig` and `research.models.transformer.TransformerConfig`.
@gin.configurable(module="research.models.transformer")
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture hyper-parameters. Model gin files bind these (`TransformerConfig.num_layers = 12`).

    `vocab_size=None` takes the tokenizer's size (rounded up to `vocab_multiple`) at run time.
    """

    vocab_size: int | None = None
    vocab_multiple: int = 128
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (MHA); 1 = MQA; in between = GQA
    head_dim: int | None = None  # None = d_model // num_heads
    mlp_dim: int = 512
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # "pre" (GPT-2) or "post" (BERT, original Transformer)
    position: str = "learned"
    max_len: int = 1024
    rope_theta: float = 10_000.0
    # rotary frequency scaling: None, or "llama3" (Llama 3.1's: frequencies with wavelengths
    # over rope_original_max_len / rope_low_freq_factor divided by rope_scaling_factor, under
    # rope_original_max_len / rope_high_freq_factor kept, smoothly interpolated in between)
    rope_scaling: str | None = None
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    type_vocab_size: int = 0  # >0 adds token-type (segment) embeddings, as BERT does
    embedding_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    tie_embeddings: bool = True
    use_bias: bool = True
    # biases on the query/key/value projections even when use_bias is False (Qwen2)
    qkv_bias: bool = False
    # causal attention to the last `sliding_window` keys only (query t sees keys t-W+1..t;
    # Mistral); None: all earlier keys. Runs the einsum/xla kernels (cuDNN and splash fall back)
    sliding_window: int | None = None
    # token embeddings multiplied by sqrt(d_model) on input (not in the tied output projection;
    # Gemma)
    scale_embeddings: bool = False
    # RMSNorm multiplies by (norm_scale_offset + scale), scale initialised to 1 - offset: 1.0
    # is Gemma's `(1 + weight)` norm, stored as HF stores it
    norm_scale_offset: float = 0.0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    init_std: float = 0.02
    causal: bool = True
    param_dtype: str = "float32"
    # compute dtype; "auto": bfloat16 on GPU and TPU (float32 parameters and optimizer state:
    # mixed precision), float32 on CPU
    dtype: str = "auto"
    scan_layers: bool = False
    remat_policy: str = "none"
    # the attention kernel (research/models/attention_select.py): "auto" picks cuDNN flash
    # attention on NVIDIA GPUs, Pallas splash on TPU and einsums on CPU; "einsum" (or None),
    # "xla", "cudnn" or "splash" force one
    attention_impl: str | None = "auto"
    # causal self-attention through the einsum kernel runs in this many query blocks, each
    # attending only the keys up to its last query (1 = one block; KV-cache decoding always uses
    # one); None: on CPU, where it was measured to help, isqrt(seq_len / 64) blocks (2 at 256
    # tokens, 4 at 1024), 1 elsewhere
    attention_query_blocks: int | None = None
    # random bits per dropout decision: 16 (two per threefry word) or 32; None: 16 on CPU, where
    # halving the bits was measured to help, 32 elsewhere
    dropout_bits: int | None = None
    # segment_ids are a right-padding mask (1 for each row's real tokens, then 0) rather than
    # packed documents: cuDNN then masks by each row's length instead of reading a [B, 1, T, T]
    # mask (the other kernels take the segment mask either way, the same for real tokens).
    # research.models.bert sets it (its input_mask is such a mask); wrong for packed rows.
    padding_segments: bool = False

    def __post_init__(self):
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("norm_placement", self.norm_placement, ("pre", "post"))
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("dtype", self.dtype, COMPUTE_DTYPES)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.sliding_window is not None and not (
                isinstance(self.sliding_window, int) and self.sliding_window >= 1
                and self.causal):
            raise ConfigError(f"TransformerConfig.sliding_window must be None or an integer >= 1 "
                              f"with causal=True, got {self.sliding_window!r} "
                              f"(causal={self.causal}).")
        if self.norm_scale_offset and self.norm != "rmsnorm":
            raise ConfigError(f"TransformerConfig.norm_scale_offset={self.norm_scale_offset} "
                              f"needs norm='rmsnorm', got norm={self.norm!r}.")
        if self.rope_scaling == "llama3" and not (
                self.rope_high_freq_factor > self.rope_low_freq_factor > 0
                and self.rope_scaling_factor > 0 and self.rope_original_max_len > 0):
            raise ConfigError("TransformerConfig.rope_scaling='llama3' needs rope_high_freq_factor"
                              " > rope_low_freq_factor > 0, rope_scaling_factor > 0 and "
                              "rope_original_max_len > 0.")
        if self.attention_impl == "cudnn" and self.dtype not in ("auto", "bfloat16", "float16"):
            raise ConfigError(f"TransformerConfig.attention_impl='cudnn' needs a 16-bit compute "
                              f"dtype (dtype='bfloat16' or 'auto'), got dtype={self.dtype!r}; or "
                              f"use attention_impl='auto' or 'einsum'.")
        blocks = self.attention_query_blocks
        if blocks is not None and not (isinstance(blocks, int) and blocks >= 1):
            raise ConfigError(f"TransformerConfig.attention_query_blocks must be an integer >= 1 "
                              f"(1 = no blocking) or None (by backend), got {blocks!r}.")
        if self.dropout_bits not in (None, 16, 32):
            raise ConfigError(f"TransformerConfig.dropout_bits must be 16, 32 or None (by "
                              f"backend), got {self.dropout_bits!r}.")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"TransformerConfig.num_heads={self.num_heads} must be a multiple "
                              f"of num_kv_heads={self.kv_heads}.")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(f"TransformerConfig.d_model={self.d_model} is not divisible by "
                              f"num_heads={self.num_heads}; set head_dim explicitly.")

    @property
    def kv_heads(self) -> int:
        """K, the number of key/value heads (N for MHA, 1 for MQA)."""
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        """H, the width of one attention head."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The compute dtype; "auto" resolves by JAX's default backend (`resolved_dtype`)."""
        return jnp.dtype(resolved_dtype(self.dtype))

    def resolved(self) -> TransformerConfig:
        """This config with `dtype="auto"` replaced by the backend's dtype, as runs record it."""
        return dataclasses.replace(self, dtype=resolved_dtype(self.dtype))

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def with_vocab(self, tokenizer_vocab_size: int) -> TransformerConfig:
        """Fills `vocab_size` from the tokenizer (padded up to `vocab_multiple`) when unset."""
        if self.vocab_size is not None:
            if self.vocab_size < tokenizer_vocab_size:
                raise ConfigError(
                    f"TransformerConfig.vocab_size={self.vocab_size} is smaller than the tokenizer's "
                    f"{tokenizer_vocab_size} pieces; remove the binding to size it from VOCAB.")
            return self
        m = max(1, self.vocab_multiple)
        return dataclasses.replace(self, vocab_size=-(-tokenizer_vocab_size // m) * m)


def resolved_dtype(dtype: str, backend: str | None = None) -> str:
    """`dtype`, with "auto" replaced by bfloat16 on GPU/TPU and float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if (backend or jax.default_backend()) in ("gpu", "tpu") else "float32"


def _check_choice(name: str, value: str | None, choices: tuple[str | None, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"TransformerConfig.{name}={value!r} is not one of {choices}.")
