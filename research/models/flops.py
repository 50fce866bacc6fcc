"""Analytic model FLOPs per training step (for MFU).

Counts only matrix multiplications, 2 FLOPs per multiply-add, from the config alone:

  per token and layer (forward)
    attention projections   2 * (D*N*H + 2*D*K*H + N*H*D)       (query, key, value, output)
    MLP                     2 * m * D*F                          (m = 2; 3 for swiglu/geglu)
  per sequence and layer (forward)
    attention scores+values 2 * 2 * T*T*N*H * c                  (c = 1/2 causal, 1 bidirectional)
  output projection (forward)
    causal LM               2 * D*V per token (all B*T positions)
    BERT pretraining        per gathered MLM prediction (B*P): 2*D*D (transform) + 2*D*V;
                            per sequence: 2*D*D (pooler) + 2*D*2 (NSP), the latter only with NSP

  training step = 3 * forward  (backward = 2 * forward: gradients w.r.t. inputs and weights)

Not counted: embedding lookups, norms, activations, softmax, biases, the optimizer update,
and recomputation from rematerialisation (`remat_policy`), so MFU measures useful work
(the PaLM-paper convention; the causal half for decoders as in Megatron/PaLM's 6N + 12LTD*c).

Each objective picks its heads in `Objective.training_flops` (research/objectives/).
"""

from __future__ import annotations

from research.models.transformer import TransformerConfig


def _layer_matmul_flops_per_token(cfg: TransformerConfig) -> int:
    d, f, n, k, h = cfg.d_model, cfg.mlp_dim, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    mats = 3 if cfg.activation in ("swiglu", "geglu") else 2
    return 2 * (d * n * h + 2 * d * k * h + n * h * d) + 2 * mats * d * f


def attention_flops_per_sequence(cfg: TransformerConfig, seq_len: int, *,
                                 causal_half: bool | None = None) -> float:
    """Forward FLOPs of QK^T and PV for one sequence and one layer.

    `causal_half` None = halve when `cfg.causal` (only the lower triangle is useful work)."""
    half = cfg.causal if causal_half is None else causal_half
    full = 2 * 2 * seq_len * seq_len * cfg.num_heads * cfg.dim_per_head
    return full / 2 if half else float(full)


def forward_flops(cfg: TransformerConfig, batch_size: int, seq_len: int, *,
                  mlm_predictions: int | None = None, next_sentence: bool = False,
                  causal_half: bool | None = None) -> float:
    """Forward matmul FLOPs for a [batch_size, seq_len] batch.

    `mlm_predictions` None: causal-LM head over every position; an int P: BERT's pretraining
    heads (MLM transform + projection at P gathered positions per sequence, pooler, NSP when
    `next_sentence`)."""
    if cfg.vocab_size is None:
        raise ValueError("TransformerConfig.vocab_size is unset; use cfg.with_vocab(...) first.")
    b, t, d, v = batch_size, seq_len, cfg.d_model, cfg.vocab_size
    tokens = b * t
    total = cfg.num_layers * (tokens * _layer_matmul_flops_per_token(cfg)
                              + b * attention_flops_per_sequence(cfg, t, causal_half=causal_half))
    if mlm_predictions is None:
        total += tokens * 2 * d * v
    else:
        total += b * mlm_predictions * (2 * d * d + 2 * d * v)
        total += b * 2 * d * d  # pooler
        if next_sentence:
            total += b * 2 * d * 2
    return float(total)


def training_flops(cfg: TransformerConfig, batch_size: int, seq_len: int, **kwargs) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward); see module doc."""
    return 3.0 * forward_flops(cfg, batch_size, seq_len, **kwargs)
