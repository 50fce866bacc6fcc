"""Hugging Face GPT-2 (`model_type: gpt2`) <-> `CausalLM` (research.models.transformer)
parameters.

Our tree: decoder/... (pre-LN causal TransformerStack) and lm_head/kernel when the embeddings
are not tied. GPT-2's `Conv1D` weights are stored [in, out] already (no transposes); its fused
`c_attn` [D, 3*N*H] splits into query/key/value. Supported HF architectures: GPT2Model,
GPT2LMHeadModel (the export writes GPT2LMHeadModel, `lm_head.weight` included even when tied),
GPT2ForSequenceClassification: `score.weight` [C, D] (no bias) <-> classifier/kernel [D, C] of
the decoder `SequenceClassifier` (research.models.heads), both pooling the last non-pad token.
Import sets classifier/bias to zero. Export folds a nonzero classifier/bias b into the final
LayerNorm's bias (ln_f.bias += delta with kernel^T delta = b, least squares in float64; only
the score head reads ln_f there), so the HF logits equal ours; it raises if b cannot be
expressed that way (num_labels > D, or a rank-deficient kernel).

Shapes: D d_model, N heads, H head_dim, F mlp width, V vocab, P max positions.
"""

from __future__ import annotations

import logging

import numpy as np

from research.checkpoints.errors import ConversionError
from research.checkpoints.hf import family as fam
from research.checkpoints.hf.rules import (
    Flat, Rule, apply_rules_to_hf, apply_rules_to_ours, dims, layernorm, raise_unknown_params,
    unused_hf_keys, verbatim)
from research.models.transformer import TransformerConfig

SUPPORTED = "GPT2Model, GPT2LMHeadModel, GPT2ForSequenceClassification"
_FOLD_TOL = 1e-6  # relative residual allowed when folding the classifier bias into ln_f


def gpt2_rules(cfg: TransformerConfig, prefix: str = "transformer.",
               num_labels: int = 0) -> list[Rule]:
    """Rules for a GPT-2 checkpoint (GPT2LMHeadModel with prefix "transformer.", GPT2Model
    with ""; num_labels > 0: GPT2ForSequenceClassification's `score` instead of an LM head).
    Conv1D weights are [in, out] already: no transposes."""
    d, n, h, f, v = dims(cfg)
    o, p = "decoder", prefix
    rules = [verbatim(f"{p}wte.weight", f"{o}/token_embed/embedding", (v, d)),
             verbatim(f"{p}wpe.weight", f"{o}/position_embed/embedding", (cfg.max_len, d))]
    for i in range(cfg.num_layers):
        hl, ol = f"{p}h.{i}", f"{o}/layer_{i}"
        rules += layernorm(f"{hl}.ln_1", f"{ol}/attention_norm", d)
        for j, name in enumerate(("query", "key", "value")):
            rules.append(Rule(f"{hl}.attn.c_attn.weight", f"{ol}/attention/{name}/kernel",
                              (d, 3 * n * h), (d, n, h), part=(j, 3)))
            rules.append(Rule(f"{hl}.attn.c_attn.bias", f"{ol}/attention/{name}/bias",
                              (3 * n * h,), (n, h), part=(j, 3)))
        rules += [Rule(f"{hl}.attn.c_proj.weight", f"{ol}/attention/out/kernel", (n * h, d),
                       (n, h, d)),
                  verbatim(f"{hl}.attn.c_proj.bias", f"{ol}/attention/out/bias", (d,))]
        rules += layernorm(f"{hl}.ln_2", f"{ol}/mlp_norm", d)
        rules += [verbatim(f"{hl}.mlp.c_fc.weight", f"{ol}/mlp/wi/kernel", (d, f)),
                  verbatim(f"{hl}.mlp.c_fc.bias", f"{ol}/mlp/wi/bias", (f,)),
                  verbatim(f"{hl}.mlp.c_proj.weight", f"{ol}/mlp/wo/kernel", (f, d)),
                  verbatim(f"{hl}.mlp.c_proj.bias", f"{ol}/mlp/wo/bias", (d,))]
    rules += layernorm(f"{p}ln_f", f"{o}/final_norm", d)
    if num_labels:  # GPT2ForSequenceClassification: nn.Linear(D, C, bias=False)
        rules.append(Rule("score.weight", "classifier/kernel", (num_labels, d), (d, num_labels),
                          transpose=True))
    elif not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head/kernel", (v, d), (d, v), transpose=True))
    return rules


# ----------------------------------------------------------------------------- import ---------


def gpt2_config_from_hf(hf: dict) -> TransformerConfig:
    """TransformerConfig of a HF GPT-2 config.json: pre-LN, tanh GELU, causal."""
    fam.reject(hf.get("scale_attn_weights", True) is False,
               "config.json scale_attn_weights=false (unscaled attention) is not supported.")
    fam.reject(bool(hf.get("scale_attn_by_inverse_layer_idx")),
               "config.json scale_attn_by_inverse_layer_idx=true is not supported.")
    fam.reject(bool(hf.get("add_cross_attention")),
               "config.json add_cross_attention=true (encoder-decoder GPT-2) is not supported.")
    d = fam.require(hf, "n_embd", "hidden_size")
    n = fam.require(hf, "n_head", "num_attention_heads")
    fam.reject(d % n != 0, f"n_embd={d} is not divisible by n_head={n}.")
    resid, embd = float(hf.get("resid_pdrop", 0.1)), float(hf.get("embd_pdrop", 0.1))
    if resid != embd:
        logging.warning("GPT-2 resid_pdrop=%s and embd_pdrop=%s differ; dropout_rate=%s is used "
                        "for both.", resid, embd, resid)
    return TransformerConfig(
        vocab_size=fam.require(hf, "vocab_size"),
        num_layers=fam.require(hf, "n_layer", "num_hidden_layers"),
        d_model=d, num_heads=n, mlp_dim=int(hf.get("n_inner") or 4 * d),
        activation=fam.activation_from_hf(hf.get("activation_function", "gelu_new"),
                                          "activation_function"),
        norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm_placement="pre", position="learned",
        max_len=fam.require(hf, "n_positions", "max_position_embeddings"),
        type_vocab_size=0, embedding_norm=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True,
        dropout_rate=resid, attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)), causal=True)


def gpt2_from_hf(hf_config: dict, state: Flat) -> fam.Converted:
    """GPT-2 state dict (with or without the `transformer.` prefix) -> CausalLM params, or
    decoder SequenceClassifier params (classifier/bias zero) for a GPT2ForSequenceClassification."""
    cfg = gpt2_config_from_hf(hf_config)
    prefix = "transformer." if "transformer.wte.weight" in state else ""
    if "score.weight" in state:
        num_labels = int(state["score.weight"].shape[0])
        rules = gpt2_rules(cfg, prefix, num_labels)
        fam.raise_unmapped(unused_hf_keys(state, rules), "gpt2", SUPPORTED)
        params = apply_rules_to_ours(rules, state)
        params["classifier/bias"] = np.zeros((num_labels,), np.float32)
        return fam.Converted(cfg, params, "classification", "gpt2", num_labels)
    if not cfg.tie_embeddings and "lm_head.weight" not in state:
        raise ConversionError("config.json tie_word_embeddings=false but the checkpoint has no "
                              "lm_head.weight.")
    rules = gpt2_rules(cfg, prefix)
    ignorable = ["lm_head.weight"] if cfg.tie_embeddings else []  # a copy of wte when tied
    fam.raise_unmapped(unused_hf_keys(state, rules, ignorable), "gpt2", SUPPORTED)
    return fam.Converted(cfg, apply_rules_to_ours(rules, state), "causal_lm", "gpt2")


# ----------------------------------------------------------------------------- export ---------


def _check_exportable(cfg: TransformerConfig) -> None:
    """Raises if `cfg` is something HF GPT-2 cannot express."""
    problems = fam.export_problems(cfg, "gpt2")
    if cfg.norm_placement != "pre":
        problems.append("norm_placement='post' (HF GPT-2 is pre-LN)")
    if cfg.embedding_norm or cfg.type_vocab_size:
        problems.append("embedding_norm/type_vocab_size (HF GPT-2 has neither)")
    fam.raise_export_problems(problems, "gpt2")


def gpt2_config_to_hf(cfg: TransformerConfig, special: dict[str, int] | None = None,
                      num_labels: int = 0) -> dict:
    """HF GPT-2 config.json for `cfg`; `special` may give bos/eos/pad token ids; num_labels > 0
    writes a GPT2ForSequenceClassification."""
    special = special or {}
    labels = {}
    if num_labels:
        labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
                  "label2id": {f"LABEL_{i}": i for i in range(num_labels)}}
    arch = "GPT2ForSequenceClassification" if num_labels else "GPT2LMHeadModel"
    return {"architectures": [arch], "model_type": "gpt2", **labels,
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim,
            "activation_function": fam.ACT_TO_HF[cfg.activation],
            "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
            "attn_pdrop": cfg.attention_dropout_rate, "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
            "scale_attn_weights": True, "bos_token_id": special.get("bos"),
            "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
            "torch_dtype": "float32"}


def gpt2_to_hf(cfg: TransformerConfig, params: Flat,
               special: dict[str, int] | None = None) -> tuple[dict, Flat]:
    """Our CausalLM flat params (unstacked) -> (HF config.json, GPT2LMHeadModel state dict,
    `lm_head.weight` included even when it is the tied token embedding); decoder
    SequenceClassifier params -> a GPT2ForSequenceClassification (`score`, bias folded into
    ln_f, see the module docstring)."""
    _check_exportable(cfg)
    if "classifier/kernel" in params:
        return _classifier_to_hf(cfg, params, special or {})
    rules = gpt2_rules(cfg)
    raise_unknown_params(params, rules)
    state = apply_rules_to_hf(rules, params)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"].copy()
    return gpt2_config_to_hf(cfg, special), state


def _classifier_to_hf(cfg: TransformerConfig, params: Flat,
                      special: dict[str, int]) -> tuple[dict, Flat]:
    """A decoder SequenceClassifier -> GPT2ForSequenceClassification (config, state)."""
    kernel = np.asarray(params["classifier/kernel"], np.float64)  # [D, C]
    bias = np.asarray(params.get("classifier/bias", np.zeros(kernel.shape[1])), np.float64)
    rules = gpt2_rules(cfg, num_labels=kernel.shape[1])
    raise_unknown_params({k: v for k, v in params.items() if k != "classifier/bias"}, rules)
    state = apply_rules_to_hf(rules, params)
    if np.any(bias != 0):
        delta = np.linalg.lstsq(kernel.T, bias, rcond=None)[0]  # kernel^T delta = bias
        residual = np.max(np.abs(kernel.T @ delta - bias))
        if residual > _FOLD_TOL * max(1.0, float(np.max(np.abs(bias)))):
            raise ConversionError(
                f"classifier/bias cannot be folded into ln_f (residual {residual:.3g}): HF "
                "GPT2ForSequenceClassification's score has no bias, and kernel^T delta = bias "
                f"has no solution for this [D={kernel.shape[0]}, C={kernel.shape[1]}] kernel.")
        key = "transformer.ln_f.bias"
        state[key] = (state[key].astype(np.float64) + delta).astype(np.float32)
    if special.get("pad") is None:
        logging.warning("the run's tokenizer has no pad id: HF GPT2ForSequenceClassification then "
                        "pools the last token of every row, so give it config.pad_token_id "
                        "before scoring padded batches.")
    return gpt2_config_to_hf(cfg, special, kernel.shape[1]), state


def _is_decoder(cfg: TransformerConfig) -> bool:
    return cfg.causal


FAMILY = fam.ModelFamily(model_type="gpt2", from_hf=gpt2_from_hf, to_hf=gpt2_to_hf,
                         can_export=_is_decoder)
