"""How one Hugging Face tensor becomes one of our parameters and back, and the flat
parameter dicts both sides are handled as.

Every tensor moves through a `Rule`: HF key <-> our slash path, an optional transpose
(torch `nn.Linear` stores [out, in]; GPT-2's `Conv1D` already stores [in, out]), a reshape
(our attention kernels keep heads apart: [D, N, H] and [N, H, D]) and, for a fused tensor such
as GPT-2's `c_attn`, one of n equal slices of the last axis. Transposes, reshapes, slices and
concatenations are exact, so ours -> HF -> ours is bit-identical. Arrays are float32.

Our parameters are handled flat (`Flat`, {"encoder/layer_0/attention/query/kernel": array});
`nest` / `flatten` convert to and from the nested trees the models and Orbax use, and
`stack_layers` / `unstack_layers` to and from the `scan_layers` layout (one [L, ...] array per
layer parameter under `ROOT/layers/block/`).

Shapes: D d_model, N heads, H head_dim, F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

import numpy as np

from research.checkpoints.errors import ConversionError
from research.models.transformer import TransformerConfig

Flat = dict[str, np.ndarray]  # "encoder/layer_0/attention/query/kernel" -> array

# Buffers some HF checkpoints carry that hold no parameters.
_BUFFER_KEYS = re.compile(r"(^|\.)(position_ids|attn\.bias|attn\.masked_bias)$")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor (or one slice of it) <-> one of our parameters.

    hf_shape: the full HF tensor's shape; ours_shape: our parameter's shape.
    transpose: HF stores the 2-D transpose of our (flattened) kernel (torch nn.Linear).
    part: (i, n) = this parameter is the i-th of n equal slices of the HF tensor's last axis.
    """

    hf: str
    ours: str
    hf_shape: tuple[int, ...]
    ours_shape: tuple[int, ...]
    transpose: bool = False
    part: tuple[int, int] = (0, 1)

    def piece_shape(self) -> tuple[int, ...]:
        """Shape of this rule's slice of the HF tensor."""
        i, n = self.part
        return self.hf_shape[:-1] + (self.hf_shape[-1] // n,)

    def to_ours(self, hf_value: np.ndarray) -> np.ndarray:
        i, n = self.part
        x = np.split(hf_value, n, axis=-1)[i] if n > 1 else hf_value
        if self.transpose:
            x = x.T
        return np.ascontiguousarray(x.reshape(self.ours_shape))

    def to_hf_piece(self, ours_value: np.ndarray) -> np.ndarray:
        shape = self.piece_shape()
        if self.transpose:
            return np.ascontiguousarray(ours_value.reshape(shape[::-1]).T)
        return np.ascontiguousarray(ours_value.reshape(shape))


def linear(hf: str, ours: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[Rule]:
    """torch nn.Linear `hf.{weight [out, in], bias [out]}` <->
    `ours/{kernel [*in, *out], bias [*out]}`."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return [Rule(f"{hf}.weight", f"{ours}/kernel", (n_out, n_in), in_shape + out_shape,
                 transpose=True),
            Rule(f"{hf}.bias", f"{ours}/bias", (n_out,), out_shape)]


def layernorm(hf: str, ours: str, d: int) -> list[Rule]:
    """HF LayerNorm `hf.{weight, bias}` [D] <-> our `Norm` `ours/LayerNorm_0/{scale, bias}`."""
    return [Rule(f"{hf}.weight", f"{ours}/LayerNorm_0/scale", (d,), (d,)),
            Rule(f"{hf}.bias", f"{ours}/LayerNorm_0/bias", (d,), (d,))]


def verbatim(hf: str, ours: str, shape: tuple[int, ...]) -> Rule:
    """A tensor stored the same way on both sides."""
    return Rule(hf, ours, shape, shape)


def dims(cfg: TransformerConfig) -> tuple[int, int, int, int, int]:
    """(D, N, H, F, V) of a config."""
    return cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size


def apply_rules_to_ours(rules: list[Rule], state: Flat) -> Flat:
    """HF state dict -> our flat params (float32). Raises on missing keys or wrong shapes."""
    missing = sorted({r.hf for r in rules if r.hf not in state})
    if missing:
        raise ConversionError(
            f"the HF checkpoint lacks {len(missing)} tensor(s) its config.json implies, e.g. "
            f"{missing[:5]}. Check that config.json belongs to these weights (num_hidden_layers, "
            "heads present).")
    out: Flat = {}
    for r in rules:
        value = state[r.hf]
        if tuple(value.shape) != r.hf_shape:
            raise ConversionError(
                f"HF tensor {r.hf!r} has shape {tuple(value.shape)}, but config.json implies "
                f"{r.hf_shape}. The config does not match the weights.")
        out[r.ours] = r.to_ours(np.asarray(value, np.float32))
    return out


def apply_rules_to_hf(rules: list[Rule], params: Flat) -> Flat:
    """Our flat params -> HF state dict (fused tensors concatenated from their parts)."""
    missing = sorted({r.ours for r in rules if r.ours not in params})
    if missing:
        raise ConversionError(f"the checkpoint lacks parameter(s) {missing[:5]} that its "
                              "run.json model_config implies; the config does not match the "
                              "params.")
    pieces: dict[str, list[tuple[int, np.ndarray]]] = {}
    for r in rules:
        value = np.asarray(params[r.ours], np.float32)
        if tuple(value.shape) != r.ours_shape:
            raise ConversionError(f"parameter {r.ours!r} has shape {tuple(value.shape)}, but the "
                                  f"run.json model_config implies {r.ours_shape}.")
        pieces.setdefault(r.hf, []).append((r.part[0], r.to_hf_piece(value)))
    return {k: np.concatenate([p for _, p in sorted(v, key=lambda t: t[0])], axis=-1)
            if len(v) > 1 else v[0][1] for k, v in pieces.items()}


def unused_hf_keys(state: Flat, rules: list[Rule], ignorable: Iterable[str] = ()) -> list[str]:
    """HF tensors no rule reads, other than `ignorable` ones and parameter-free buffers."""
    used = {r.hf for r in rules} | set(ignorable)
    return sorted(k for k in state if k not in used and not _BUFFER_KEYS.search(k))


def raise_unknown_params(params: Flat, rules: list[Rule]) -> None:
    """Raises if some of our parameters have no rule (a model export does not support)."""
    unknown = sorted(set(params) - {r.ours for r in rules})
    if unknown:
        raise ConversionError(
            f"{len(unknown)} parameter(s) have no Hugging Face counterpart, e.g. {unknown[:5]}. "
            "Export supports BertPretrainer / SequenceClassifier (encoder) and CausalLM params.")


# ----------------------------------------------------------------------------- layouts --------


def stack_root(cfg: TransformerConfig) -> str:
    """Name of the TransformerStack in our trees: `decoder` (causal) or `encoder`."""
    return "decoder" if cfg.causal else "encoder"


def stack_layers(flat: Flat, root: str, num_layers: int) -> Flat:
    """`root/layer_{i}/X` -> `root/layers/block/X` with a leading [L] axis (scan_layers layout)."""
    pattern = re.compile(rf"^{root}/layer_(\d+)/(.*)$")
    out: Flat = {}
    per_layer: dict[str, dict[int, np.ndarray]] = {}
    for k, v in flat.items():
        m = pattern.match(k)
        if m:
            per_layer.setdefault(m.group(2), {})[int(m.group(1))] = v
        else:
            out[k] = v
    for name, layers in per_layer.items():
        out[f"{root}/layers/block/{name}"] = np.stack([layers[i] for i in range(num_layers)])
    return out


def unstack_layers(flat: Flat, root: str, num_layers: int) -> Flat:
    """Inverse of `stack_layers`."""
    prefix = f"{root}/layers/block/"
    out: Flat = {}
    for k, v in flat.items():
        if not k.startswith(prefix):
            out[k] = v
            continue
        if v.shape[0] != num_layers:
            raise ConversionError(f"stacked parameter {k!r} has {v.shape[0]} layers, the model "
                                  f"config says num_layers={num_layers}.")
        for i in range(num_layers):
            out[f"{root}/layer_{i}/{k[len(prefix):]}"] = v[i]
    return out


def nest(flat: Flat) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def flatten(tree: Any, prefix: str = "") -> Flat:
    """Inverse of `nest` (leaves become numpy arrays)."""
    if not isinstance(tree, dict):
        return {prefix: np.asarray(tree)}
    out: Flat = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
