"""Hugging Face Llama-style decoders (`model_type`: llama, mistral, qwen2, gemma) <-> `CausalLM`
(research.models.transformer) parameters.

All four are pre-RMSNorm decoders with rotary positions (rotate-half on the whole head, as
`research.models.attention.rotary`: no q/k permutation), grouped KV heads and a gated MLP
(`gate_proj` -> our `wg`, `up_proj` -> `wi`, `down_proj` -> `wo`). What differs, and the
TransformerConfig fields that carry it:

  llama    attention_bias + mlp_bias -> use_bias; Llama 3 `rope_scaling` -> rope_scaling='llama3'
  mistral  sliding_window -> sliding_window (None: full causal attention)
  qwen2    q/k/v biases only -> qkv_bias; a sliding window only if every layer has it
  gemma    embeddings times sqrt(d_model) -> scale_embeddings; the `(1 + weight)` RMSNorm ->
           norm_scale_offset=1.0 (the HF weight is stored as it is, so both directions are
           exact); GeGLU with tanh GELU -> activation='geglu'

RoPE: `rope_theta` and, for every type, `rope_scaling` / `rope_parameters` of type llama3 (the
one these checkpoints use); other scaling types are refused. Supported HF architectures:
{Llama,Mistral,Qwen2,Gemma}ForCausalLM and the bare {...}Model (no `model.` prefix). Export
writes the ForCausalLM, without `lm_head.weight` when the embeddings are tied (as
transformers saves it).

Shapes: D d_model, N heads, K kv heads, H head_dim, F mlp width, V vocab.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from research.checkpoints.errors import ConversionError
from research.checkpoints.hf import family as fam
from research.checkpoints.hf.rules import (
    Flat, Rule, apply_rules_to_hf, apply_rules_to_ours, raise_unknown_params, unused_hf_keys,
    verbatim)
from research.models.transformer import TransformerConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}
SUPPORTED = ", ".join(f"{a}, {a.removesuffix('ForCausalLM')}Model" for a in ARCHITECTURES.values())

# hidden_act -> our gated activation. Gemma's legacy "gelu" means the tanh GELU (transformers
# rewrites it to gelu_pytorch_tanh), elsewhere "gelu" is the exact one, which we do not have.
_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu",
          "gelu_fast": "geglu"}
_GATED_TO_HF = {"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}
_TIED_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma": True}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")


def _linear(hf: str, ours: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            bias: bool) -> list[Rule]:
    """torch nn.Linear `hf.weight` [out, in] (+ `hf.bias` [out]) <-> `ours/kernel`
    [*in, *out] (+ `ours/bias` [*out])."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    rules = [Rule(f"{hf}.weight", f"{ours}/kernel", (n_out, n_in), in_shape + out_shape,
                  transpose=True)]
    if bias:
        rules.append(Rule(f"{hf}.bias", f"{ours}/bias", (n_out,), out_shape))
    return rules


def llama_rules(cfg: TransformerConfig, prefix: str = "model.") -> list[Rule]:
    """Rules for a Llama-style checkpoint (ForCausalLM with prefix "model.", the bare Model
    with "")."""
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    f, v, o, p = cfg.mlp_dim, cfg.vocab_size, "decoder", prefix
    qkv_bias = cfg.use_bias or cfg.qkv_bias
    rules = [verbatim(f"{p}embed_tokens.weight", f"{o}/token_embed/embedding", (v, d))]
    for i in range(cfg.num_layers):
        hl, ol = f"{p}layers.{i}", f"{o}/layer_{i}"
        rules.append(verbatim(f"{hl}.input_layernorm.weight",
                              f"{ol}/attention_norm/RMSNorm_0/scale", (d,)))
        rules += _linear(f"{hl}.self_attn.q_proj", f"{ol}/attention/query", (d,), (n, h), qkv_bias)
        rules += _linear(f"{hl}.self_attn.k_proj", f"{ol}/attention/key", (d,), (k, h), qkv_bias)
        rules += _linear(f"{hl}.self_attn.v_proj", f"{ol}/attention/value", (d,), (k, h),
                         qkv_bias)
        rules += _linear(f"{hl}.self_attn.o_proj", f"{ol}/attention/out", (n, h), (d,),
                         cfg.use_bias)
        rules.append(verbatim(f"{hl}.post_attention_layernorm.weight",
                              f"{ol}/mlp_norm/RMSNorm_0/scale", (d,)))
        rules += _linear(f"{hl}.mlp.gate_proj", f"{ol}/mlp/wg", (d,), (f,), cfg.use_bias)
        rules += _linear(f"{hl}.mlp.up_proj", f"{ol}/mlp/wi", (d,), (f,), cfg.use_bias)
        rules += _linear(f"{hl}.mlp.down_proj", f"{ol}/mlp/wo", (f,), (d,), cfg.use_bias)
    rules.append(verbatim(f"{p}norm.weight", f"{o}/final_norm/RMSNorm_0/scale", (d,)))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head/kernel", (v, d), (d, v), transpose=True))
    return rules


# ----------------------------------------------------------------------------- import ---------


def rope_from_hf(hf: dict) -> dict[str, Any]:
    """TransformerConfig rope fields of a config.json: `rope_theta` (top level or in
    `rope_parameters`) and Llama 3 scaling (`rope_scaling` or, as transformers 5 writes it,
    `rope_parameters` with rope_type llama3). Other scaling types raise."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    fam.reject(not isinstance(rope, dict) or any(isinstance(x, dict) for x in rope.values()),
               f"config.json rope parameters {rope!r} (per layer type) are not supported.")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None and isinstance(hf.get("rope_parameters"), dict):
        theta = hf["rope_parameters"].get("rope_theta")
    out: dict[str, Any] = {"rope_theta": float(10_000.0 if theta is None else theta)}
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    fam.reject(partial not in (None, 1, 1.0),
               f"config.json partial_rotary_factor={partial} (rotary on part of each head) is "
               "not supported.")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return out
    if kind != "llama3":
        raise ConversionError(f"config.json rope scaling type {kind!r} is not supported; "
                              "supported: none (rope_type 'default') and 'llama3'.")
    missing = [key for key in _LLAMA3_KEYS[:3] if rope.get(key) is None]
    fam.reject(bool(missing), f"config.json llama3 rope scaling lacks {missing}.")
    original = rope.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    out.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
               rope_low_freq_factor=float(rope["low_freq_factor"]),
               rope_high_freq_factor=float(rope["high_freq_factor"]),
               rope_original_max_len=int(original))
    return out


def _window_from_hf(hf: dict, model_type: str) -> int | None:
    """TransformerConfig.sliding_window of a config.json (Mistral: `sliding_window`; Qwen2:
    only with use_sliding_window, and only if every layer slides)."""
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return int(window) if window else None
    if model_type != "qwen2" or not hf.get("use_sliding_window") or not window:
        return None
    layers = int(fam.require(hf, "num_hidden_layers"))
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention"
        for i in range(layers)]
    if all(t == "full_attention" for t in types):
        return None
    fam.reject(any(t != "sliding_attention" for t in types),
               f"config.json mixes sliding-window and full-attention layers ({types}); only "
               "one kind for all layers is supported.")
    return int(window)


def _biases_from_hf(hf: dict, model_type: str) -> dict[str, bool]:
    """use_bias / qkv_bias of a config.json (Llama's attention_bias and mlp_bias must agree:
    our use_bias covers every projection)."""
    if model_type == "qwen2":
        return {"use_bias": False, "qkv_bias": True}
    attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    fam.reject(model_type != "llama" and attention,
               f"config.json attention_bias=true is not supported for {model_type}.")
    fam.reject(attention != mlp, f"config.json attention_bias={attention} with mlp_bias={mlp} "
               "is not supported (biases on all projections or none).")
    return {"use_bias": attention, "qkv_bias": False}


def llama_config_from_hf(hf: dict) -> TransformerConfig:
    """TransformerConfig of a Llama / Mistral / Qwen2 / Gemma config.json."""
    model_type = hf.get("model_type")
    d = int(fam.require(hf, "hidden_size"))
    n = int(fam.require(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim") or d // n
    act = hf.get("hidden_act") or "silu"
    if model_type == "gemma":  # transformers 4 read hidden_activation, ignoring hidden_act
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"
    if act not in _GATED:
        raise ConversionError(f"config.json hidden_act={act!r} is not supported; supported: "
                              f"{sorted(_GATED)}.")
    fam.reject(model_type == "gemma" and bool(hf.get("use_bidirectional_attention")),
               "config.json use_bidirectional_attention=true is not supported.")
    tied = hf.get("tie_word_embeddings")
    return TransformerConfig(
        vocab_size=int(fam.require(hf, "vocab_size")),
        num_layers=int(fam.require(hf, "num_hidden_layers")), d_model=d, num_heads=n,
        num_kv_heads=(None if hf.get("num_key_value_heads") in (None, n)
                      else int(hf["num_key_value_heads"])),
        head_dim=None if head_dim * n == d else int(head_dim),
        mlp_dim=int(fam.require(hf, "intermediate_size")), activation=_GATED[act],
        norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm_placement="pre",
        position="rotary", max_len=int(fam.require(hf, "max_position_embeddings")),
        **rope_from_hf(hf), type_vocab_size=0, embedding_norm=False,
        tie_embeddings=bool(_TIED_DEFAULT[model_type] if tied is None else tied),
        **_biases_from_hf(hf, model_type), sliding_window=_window_from_hf(hf, model_type),
        scale_embeddings=model_type == "gemma",
        norm_scale_offset=1.0 if model_type == "gemma" else 0.0, dropout_rate=0.0,
        attention_dropout_rate=float(hf.get("attention_dropout") or 0.0),
        init_std=float(hf.get("initializer_range", 0.02)), causal=True)


def llama_from_hf(hf_config: dict, state: Flat) -> fam.Converted:
    """A Llama-style state dict (with or without the `model.` prefix) -> CausalLM params."""
    model_type = hf_config.get("model_type")
    cfg = llama_config_from_hf(hf_config)
    prefix = "model." if "model.embed_tokens.weight" in state else ""
    if not cfg.tie_embeddings and "lm_head.weight" not in state:
        raise ConversionError("config.json tie_word_embeddings=false but the checkpoint has no "
                              "lm_head.weight.")
    rules = llama_rules(cfg, prefix)
    ignorable = ["lm_head.weight"] if cfg.tie_embeddings else []  # a copy of the embedding
    ignorable += [k for k in state if k.endswith("rotary_emb.inv_freq")]  # old buffers
    fam.raise_unmapped(unused_hf_keys(state, rules, ignorable), model_type, SUPPORTED)
    return fam.Converted(cfg, apply_rules_to_ours(rules, state), "causal_lm", model_type)


# ----------------------------------------------------------------------------- export ---------


def export_model_type(cfg: TransformerConfig) -> str | None:
    """The HF model_type a causal RMSNorm + rotary config exports as (None: not Llama-style):
    gemma with scaled embeddings or a norm offset, qwen2 with q/k/v-only biases, mistral with a
    sliding window, llama otherwise."""
    if not cfg.causal or cfg.norm != "rmsnorm" or cfg.position != "rotary":
        return None  # GPT-2 (or its error saying what it cannot express)
    if cfg.scale_embeddings or cfg.norm_scale_offset:
        return "gemma"
    if cfg.qkv_bias and not cfg.use_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


def _export_problems(cfg: TransformerConfig, params: Flat, model_type: str) -> list[str]:
    """What HF `model_type` cannot express of `cfg` / `params`."""
    problems = []
    if any(k.startswith("classifier/") for k in params):
        problems.append("a classifier head (export a CausalLM checkpoint)")
    if cfg.norm_placement != "pre" or cfg.embedding_norm or cfg.type_vocab_size:
        problems.append("post-norm, embedding_norm or token types")
    if cfg.activation not in _GATED_TO_HF:
        problems.append(f"activation={cfg.activation!r} (a gated MLP: swiglu or geglu)")
    gemma = model_type == "gemma"
    if gemma != (cfg.scale_embeddings and cfg.norm_scale_offset == 1.0):
        problems.append("scale_embeddings and norm_scale_offset=1.0 go together (Gemma) or not "
                        f"at all (got {cfg.scale_embeddings}, {cfg.norm_scale_offset})")
    if gemma and cfg.activation != "geglu":
        problems.append(f"activation={cfg.activation!r} (HF gemma is geglu)")
    if model_type == "qwen2":
        if cfg.use_bias:
            problems.append("use_bias=True (HF qwen2 has q/k/v biases only)")
    elif cfg.qkv_bias and not cfg.use_bias:
        problems.append(f"qkv_bias without use_bias (HF {model_type} has none)")
    if model_type != "llama" and cfg.use_bias:
        problems.append(f"use_bias=True (HF {model_type} has no output/MLP biases)")
    if cfg.sliding_window is not None and model_type in ("llama", "gemma"):
        problems.append(f"sliding_window={cfg.sliding_window} (HF {model_type} has none)")
    return problems


def rope_to_hf(cfg: TransformerConfig) -> dict:
    """config.json rope entries: `rope_parameters` (transformers 5) and the older top-level
    `rope_theta` / `rope_scaling` (transformers 4), the same values."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = None
    if cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
        params = {**scaling, "rope_theta": cfg.rope_theta}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def llama_config_to_hf(cfg: TransformerConfig, model_type: str,
                       special: dict[str, int] | None = None) -> dict:
    """HF config.json of `model_type` for `cfg`; `special` may give bos/eos/pad token ids."""
    special = special or {}
    config = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
              "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
              "head_dim": cfg.dim_per_head, "hidden_act": _GATED_TO_HF[cfg.activation],
              "max_position_embeddings": cfg.max_len, "rms_norm_eps": cfg.norm_eps,
              "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
              "attention_dropout": cfg.attention_dropout_rate, **rope_to_hf(cfg),
              "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
              "pad_token_id": special.get("pad"), "torch_dtype": "float32"}
    if model_type == "llama":
        config.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    elif model_type == "gemma":
        config.update(attention_bias=False)
    elif model_type == "mistral":
        config.update(sliding_window=cfg.sliding_window)
    elif model_type == "qwen2":
        window = cfg.sliding_window is not None
        config.update(use_sliding_window=window, sliding_window=cfg.sliding_window,
                      max_window_layers=0 if window else cfg.num_layers,
                      layer_types=[("sliding_attention" if window else "full_attention")] *
                      cfg.num_layers)
    return config


def llama_to_hf(cfg: TransformerConfig, params: Flat,
                special: dict[str, int] | None = None) -> tuple[dict, Flat]:
    """Our CausalLM flat params (unstacked) -> (HF config.json, ForCausalLM state dict) of the
    model type `export_model_type(cfg)` names."""
    model_type = export_model_type(cfg) or "llama"
    fam.raise_export_problems(_export_problems(cfg, params, model_type), model_type)
    if cfg.dropout_rate:
        logging.warning("dropout_rate=%s has no HF %s counterpart; the export drops it.",
                        cfg.dropout_rate, model_type)
    rules = llama_rules(cfg)
    raise_unknown_params(params, rules)
    return llama_config_to_hf(cfg, model_type, special), apply_rules_to_hf(rules, params)


def _family(model_type: str) -> fam.ModelFamily:
    return fam.ModelFamily(model_type=model_type, from_hf=llama_from_hf, to_hf=llama_to_hf,
                           can_export=lambda cfg: export_model_type(cfg) == model_type)


# Export order matters only in that `convert.FAMILIES` lists these before GPT-2 (whose
# can_export takes every causal config).
FAMILIES = tuple(_family(t) for t in MODEL_TYPES)
