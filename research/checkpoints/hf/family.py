"""What a Hugging Face model family module provides (`ModelFamily`), what its import returns
(`Converted`), and the config.json helpers the families share.

A family module (research.checkpoints.hf.bert, .gpt2) defines `FAMILY = ModelFamily(...)`
(research.checkpoints.hf.llama defines one per model_type it covers: `FAMILIES`, for llama,
mistral, qwen2 and gemma); research.checkpoints.hf.convert lists the families in its `FAMILIES`
registry and dispatches on config.json's `model_type` (import) or on `can_export(cfg)`
(export, in registry order: BERT, the Llama-style ones, GPT-2 last, which takes every other
causal config).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from research.checkpoints.errors import ConversionError
from research.checkpoints.hf.rules import Flat
from research.models.transformer import TransformerConfig

# HF activation name -> TransformerConfig.activation (and back).
ACT_FROM_HF = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
               "gelu_fast": "gelu", "relu": "relu"}
ACT_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}


@dataclasses.dataclass
class Converted:
    """A converted checkpoint: config, flat params and what run.json records."""

    cfg: TransformerConfig
    params: Flat
    objective: str  # the objective whose model takes these params (run.json "objective")
    model_type: str  # the HF config.json model_type it came from
    num_labels: int = 0  # classifier outputs, 0 without a classification head


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One HF model family's conversions.

    from_hf(config.json dict, HF state dict) -> Converted (params unstacked).
    to_hf(cfg, our flat params (unstacked), special token ids {bos, eos, pad})
        -> (HF config.json dict, HF state dict).
    can_export(cfg): whether configs like `cfg` export as this family (the first family in
        the registry that says yes is used; it raises if an option does not fit).
    """

    model_type: str
    from_hf: Callable[[dict, Flat], Converted]
    to_hf: Callable[[TransformerConfig, Flat, dict[str, int]], tuple[dict, Flat]]
    can_export: Callable[[TransformerConfig], bool]


def require(hf: dict, *keys: str) -> Any:
    """The first of `keys` present in config.json (HF aliases), or a clear error."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise ConversionError(f"config.json has no {keys[0]!r}; it is not a complete "
                          f"{hf.get('model_type')} config.")


def activation_from_hf(name: Any, field: str) -> str:
    """TransformerConfig.activation for config.json's `field`=`name`."""
    if name not in ACT_FROM_HF:
        raise ConversionError(f"config.json {field}={name!r} is not supported; supported: "
                              f"{sorted(ACT_FROM_HF)}.")
    return ACT_FROM_HF[name]


def reject(condition: bool, message: str) -> None:
    """Raises ConversionError(message) if `condition` holds."""
    if condition:
        raise ConversionError(message)


def export_problems(cfg: TransformerConfig, family: str) -> list[str]:
    """The options of `cfg` that no HF `family` model this converter writes can express
    (LayerNorm, learned positions, biases, full multi-head attention, a known activation)."""
    problems = []
    if cfg.norm != "layernorm":
        problems.append(f"norm={cfg.norm!r} (HF {family} has LayerNorm)")
    if cfg.position != "learned":
        problems.append(f"position={cfg.position!r} (HF {family} has learned positions)")
    if not cfg.use_bias:
        problems.append("use_bias=False")
    if cfg.kv_heads != cfg.num_heads:
        problems.append(f"num_kv_heads={cfg.num_kv_heads} (grouped-query attention)")
    if cfg.dim_per_head * cfg.num_heads != cfg.d_model:
        problems.append(f"head_dim={cfg.head_dim} with num_heads * head_dim != d_model")
    if cfg.activation not in ACT_TO_HF:
        problems.append(f"activation={cfg.activation!r} (supported: {sorted(ACT_TO_HF)})")
    return problems


def raise_export_problems(problems: list[str], family: str) -> None:
    """Raises ConversionError listing `problems`, if any."""
    if problems:
        raise ConversionError(f"cannot export to HF {family}: TransformerConfig has "
                              + "; ".join(problems) + ".")


def raise_unmapped(unused: list[str], model_type: str, supported: str) -> None:
    """Raises if the HF checkpoint has tensors no rule maps (`unused`); `supported` lists the
    HF architectures the family converts."""
    if unused:
        raise ConversionError(
            f"the HF {model_type} checkpoint has {len(unused)} tensor(s) this converter does not "
            f"map, e.g. {unused[:5]}: an unsupported head or architecture variant. Supported: "
            f"{supported}.")
