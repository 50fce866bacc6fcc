"""Conversion between Hugging Face checkpoints (BERT, GPT-2) and this project's parameter trees.

Import (`convert_from_hf`): `DIR/config.json` + `DIR/model.safetensors` (or a sharded
`model.safetensors.index.json`) become a directory that `INIT_CHECKPOINT`,
`research.checkpoints.manager.Checkpointer.restore_params` and `research.generate` read:

  OUT/checkpoints/0/params   Orbax, the layout research.checkpoints.manager writes
  OUT/model.gin              the matching `TransformerConfig.*` bindings
  OUT/run.json               {"model_config", "objective", "vocab", "source"}

Export (`convert_to_hf`): a training workdir (or a converted directory) becomes
`config.json` + `model.safetensors` with Hugging Face key names.

Parameter trees
  BERT   (`model_type: bert`): `BertPretrainer` (research.models.bert): encoder/..., pooler/...,
         mlm_transform/..., mlm_norm/..., mlm_output_bias, nsp/... (the heads present in the
         HF file); a `BertForSequenceClassification` head becomes classifier/... as in
         `research.models.heads.SequenceClassifier`.
  GPT-2  (`model_type: gpt2`): `CausalLM` (research.models.transformer): decoder/..., lm_head/kernel when
         the embeddings are not tied.

Every tensor moves through a `Rule`: HF key <-> our slash path, an optional transpose
(torch `nn.Linear` stores [out, in]; GPT-2's `Conv1D` already stores [in, out]), a reshape
(our attention kernels keep heads apart: [D, N, H] and [N, H, D]) and, for GPT-2's fused
`c_attn`, one of three equal slices of the last axis. Transposes, reshapes, slices and
concatenations are exact, so ours -> HF -> ours is bit-identical. Arrays are float32.

Shapes: D d_model, N heads, H head_dim, F mlp width, V vocab, P max positions,
T token types, C classes, L layers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from typing import Any, Iterable

import numpy as np

from research.models.transformer import TransformerConfig

Flat = dict[str, np.ndarray]  # "encoder/layer_0/attention/query/kernel" -> array

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("bert", "gpt2")

# HF activation name -> TransformerConfig.activation (and back).
_ACT_FROM_HF = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu",
                "gelu_fast": "gelu", "relu": "relu"}
_ACT_TO_HF = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}

# Buffers some HF checkpoints carry that hold no parameters.
_BUFFER_KEYS = re.compile(r"(^|\.)(position_ids|attn\.bias|attn\.masked_bias)$")

# TransformerConfig fields model.gin leaves out when they have their default value: run-time
# choices a run config may set, and options HF BERT / GPT-2 never use.
_OMIT_WHEN_DEFAULT = ("vocab_multiple", "param_dtype", "dtype", "remat_policy",
                      "attention_impl", "attention_query_blocks", "num_kv_heads", "head_dim",
                      "rope_theta")


class ConversionError(ValueError):
    """A checkpoint or config this converter cannot translate (the message says why and how
    to proceed)."""


# ----------------------------------------------------------------------------- rules ----------


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


def _linear(hf: str, ours: str, in_shape: tuple[int, ...],
            out_shape: tuple[int, ...]) -> list[Rule]:
    """torch nn.Linear `hf.{weight [out, in], bias [out]}` <->
    `ours/{kernel [*in, *out], bias [*out]}`."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return [Rule(f"{hf}.weight", f"{ours}/kernel", (n_out, n_in), in_shape + out_shape,
                 transpose=True),
            Rule(f"{hf}.bias", f"{ours}/bias", (n_out,), out_shape)]


def _layernorm(hf: str, ours: str, d: int) -> list[Rule]:
    """HF LayerNorm `hf.{weight, bias}` [D] <-> our `Norm` `ours/LayerNorm_0/{scale, bias}`."""
    return [Rule(f"{hf}.weight", f"{ours}/LayerNorm_0/scale", (d,), (d,)),
            Rule(f"{hf}.bias", f"{ours}/LayerNorm_0/bias", (d,), (d,))]


def _copy(hf: str, ours: str, shape: tuple[int, ...]) -> Rule:
    return Rule(hf, ours, shape, shape)


def _dims(cfg: TransformerConfig) -> tuple[int, int, int, int, int]:
    """(D, N, H, F, V) of a config."""
    return cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.mlp_dim, cfg.vocab_size


def bert_rules(cfg: TransformerConfig, groups: Iterable[str], num_labels: int = 0,
               prefix: str = "bert.") -> list[Rule]:
    """Rules for a BERT checkpoint.

    groups: subset of {"pooler", "mlm", "mlm_output", "nsp", "classifier"}: which heads the
    checkpoint holds ("mlm_output" = an untied MLM output matrix). prefix: "bert." for the
    task models (BertForPreTraining, ...), "" for a bare BertModel.
    """
    d, n, h, f, v = _dims(cfg)
    groups = set(groups)
    e, p = "encoder", prefix
    rules = [_copy(f"{p}embeddings.word_embeddings.weight", f"{e}/token_embed/embedding", (v, d)),
             _copy(f"{p}embeddings.position_embeddings.weight", f"{e}/position_embed/embedding",
                   (cfg.max_len, d)),
             _copy(f"{p}embeddings.token_type_embeddings.weight", f"{e}/type_embed/embedding",
                   (cfg.type_vocab_size, d)),
             *_layernorm(f"{p}embeddings.LayerNorm", f"{e}/embedding_norm", d)]
    for i in range(cfg.num_layers):
        hl, ol = f"{p}encoder.layer.{i}", f"{e}/layer_{i}"
        for name in ("query", "key", "value"):
            rules += _linear(f"{hl}.attention.self.{name}", f"{ol}/attention/{name}", (d,), (n, h))
        rules += _linear(f"{hl}.attention.output.dense", f"{ol}/attention/out", (n, h), (d,))
        rules += _layernorm(f"{hl}.attention.output.LayerNorm", f"{ol}/attention_norm", d)
        rules += _linear(f"{hl}.intermediate.dense", f"{ol}/mlp/wi", (d,), (f,))
        rules += _linear(f"{hl}.output.dense", f"{ol}/mlp/wo", (f,), (d,))
        rules += _layernorm(f"{hl}.output.LayerNorm", f"{ol}/mlp_norm", d)
    if "pooler" in groups:
        rules += _linear(f"{p}pooler.dense", "pooler", (d,), (d,))
    if "mlm" in groups:
        rules += _linear("cls.predictions.transform.dense", "mlm_transform", (d,), (d,))
        rules += _layernorm("cls.predictions.transform.LayerNorm", "mlm_norm", d)
        rules.append(_copy("cls.predictions.bias", "mlm_output_bias", (v,)))
    if "mlm_output" in groups:
        rules.append(Rule("cls.predictions.decoder.weight", "mlm_output/kernel", (v, d), (d, v),
                          transpose=True))
    if "nsp" in groups:
        rules += _linear("cls.seq_relationship", "nsp", (d,), (2,))
    if "classifier" in groups:
        rules += _linear("classifier", "classifier", (d,), (num_labels,))
    return rules


def gpt2_rules(cfg: TransformerConfig, prefix: str = "transformer.") -> list[Rule]:
    """Rules for a GPT-2 checkpoint (GPT2LMHeadModel with prefix "transformer.", GPT2Model
    with ""). Conv1D weights are [in, out] already: no transposes."""
    d, n, h, f, v = _dims(cfg)
    o, p = "decoder", prefix
    rules = [_copy(f"{p}wte.weight", f"{o}/token_embed/embedding", (v, d)),
             _copy(f"{p}wpe.weight", f"{o}/position_embed/embedding", (cfg.max_len, d))]
    for i in range(cfg.num_layers):
        hl, ol = f"{p}h.{i}", f"{o}/layer_{i}"
        rules += _layernorm(f"{hl}.ln_1", f"{ol}/attention_norm", d)
        for j, name in enumerate(("query", "key", "value")):
            rules.append(Rule(f"{hl}.attn.c_attn.weight", f"{ol}/attention/{name}/kernel",
                              (d, 3 * n * h), (d, n, h), part=(j, 3)))
            rules.append(Rule(f"{hl}.attn.c_attn.bias", f"{ol}/attention/{name}/bias",
                              (3 * n * h,), (n, h), part=(j, 3)))
        rules += [Rule(f"{hl}.attn.c_proj.weight", f"{ol}/attention/out/kernel", (n * h, d),
                       (n, h, d)),
                  _copy(f"{hl}.attn.c_proj.bias", f"{ol}/attention/out/bias", (d,))]
        rules += _layernorm(f"{hl}.ln_2", f"{ol}/mlp_norm", d)
        rules += [_copy(f"{hl}.mlp.c_fc.weight", f"{ol}/mlp/wi/kernel", (d, f)),
                  _copy(f"{hl}.mlp.c_fc.bias", f"{ol}/mlp/wi/bias", (f,)),
                  _copy(f"{hl}.mlp.c_proj.weight", f"{ol}/mlp/wo/kernel", (f, d)),
                  _copy(f"{hl}.mlp.c_proj.bias", f"{ol}/mlp/wo/bias", (d,))]
    rules += _layernorm(f"{p}ln_f", f"{o}/final_norm", d)
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", "lm_head/kernel", (v, d), (d, v), transpose=True))
    return rules


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


# ----------------------------------------------------------------------------- configs --------


def _require(hf: dict, *keys: str) -> Any:
    """The first of `keys` present in config.json (HF aliases), or a clear error."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    raise ConversionError(f"config.json has no {keys[0]!r}; it is not a complete "
                          f"{hf.get('model_type')} config.")


def _activation_from_hf(name: Any, field: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ConversionError(f"config.json {field}={name!r} is not supported; supported: "
                              f"{sorted(_ACT_FROM_HF)}.")
    return _ACT_FROM_HF[name]


def _reject(condition: bool, message: str) -> None:
    if condition:
        raise ConversionError(message)


def bert_config_from_hf(hf: dict) -> TransformerConfig:
    """TransformerConfig of a HF BERT config.json: post-LN, embedding LayerNorm, learned
    absolute positions, token types, bidirectional, vocab_size bound exactly."""
    pos = hf.get("position_embedding_type", "absolute")
    _reject(pos not in (None, "absolute"),
            f"config.json position_embedding_type={pos!r}: relative position embeddings are not "
            "supported (TransformerStack has learned absolute positions); only 'absolute' "
            "BERT checkpoints convert.")
    _reject(bool(hf.get("is_decoder")) or bool(hf.get("add_cross_attention")),
            "config.json is_decoder/add_cross_attention: BERT as a decoder is not supported; "
            "convert an encoder checkpoint.")
    d, n = _require(hf, "hidden_size"), _require(hf, "num_attention_heads")
    _reject(d % n != 0, f"hidden_size={d} is not divisible by num_attention_heads={n}.")
    return TransformerConfig(
        vocab_size=_require(hf, "vocab_size"), num_layers=_require(hf, "num_hidden_layers"),
        d_model=d, num_heads=n, mlp_dim=_require(hf, "intermediate_size"),
        activation=_activation_from_hf(hf.get("hidden_act", "gelu"), "hidden_act"),
        norm="layernorm", norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        norm_placement="post", position="learned",
        max_len=_require(hf, "max_position_embeddings"),
        type_vocab_size=int(hf.get("type_vocab_size", 2)), embedding_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True,
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.1)),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)), causal=False)


def gpt2_config_from_hf(hf: dict) -> TransformerConfig:
    """TransformerConfig of a HF GPT-2 config.json: pre-LN, tanh GELU, causal."""
    _reject(hf.get("scale_attn_weights", True) is False,
            "config.json scale_attn_weights=false (unscaled attention) is not supported.")
    _reject(bool(hf.get("scale_attn_by_inverse_layer_idx")),
            "config.json scale_attn_by_inverse_layer_idx=true is not supported.")
    _reject(bool(hf.get("add_cross_attention")),
            "config.json add_cross_attention=true (encoder-decoder GPT-2) is not supported.")
    d, n = _require(hf, "n_embd", "hidden_size"), _require(hf, "n_head", "num_attention_heads")
    _reject(d % n != 0, f"n_embd={d} is not divisible by n_head={n}.")
    resid, embd = float(hf.get("resid_pdrop", 0.1)), float(hf.get("embd_pdrop", 0.1))
    if resid != embd:
        logging.warning("GPT-2 resid_pdrop=%s and embd_pdrop=%s differ; dropout_rate=%s is used "
                        "for both.", resid, embd, resid)
    return TransformerConfig(
        vocab_size=_require(hf, "vocab_size"),
        num_layers=_require(hf, "n_layer", "num_hidden_layers"),
        d_model=d, num_heads=n, mlp_dim=int(hf.get("n_inner") or 4 * d),
        activation=_activation_from_hf(hf.get("activation_function", "gelu_new"),
                                       "activation_function"),
        norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        norm_placement="pre", position="learned",
        max_len=_require(hf, "n_positions", "max_position_embeddings"),
        type_vocab_size=0, embedding_norm=False,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), use_bias=True,
        dropout_rate=resid, attention_dropout_rate=float(hf.get("attn_pdrop", 0.1)),
        init_std=float(hf.get("initializer_range", 0.02)), causal=True)


def _check_exportable(cfg: TransformerConfig, family: str) -> None:
    """Raises if `cfg` uses an option the HF `family` ('bert' or 'gpt2') model cannot express."""
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
    if cfg.activation not in _ACT_TO_HF:
        problems.append(f"activation={cfg.activation!r} (supported: {sorted(_ACT_TO_HF)})")
    if family == "bert":
        if cfg.norm_placement != "post":
            problems.append("norm_placement='pre' (HF BERT is post-LN)")
        if not cfg.embedding_norm:
            problems.append("embedding_norm=False (HF BERT normalises the embeddings)")
        if cfg.type_vocab_size < 1:
            problems.append("type_vocab_size=0 (HF BERT has token-type embeddings)")
    else:
        if cfg.norm_placement != "pre":
            problems.append("norm_placement='post' (HF GPT-2 is pre-LN)")
        if cfg.embedding_norm or cfg.type_vocab_size:
            problems.append("embedding_norm/type_vocab_size (HF GPT-2 has neither)")
    if problems:
        raise ConversionError(f"cannot export to HF {family}: TransformerConfig has "
                              + "; ".join(problems) + ".")


def bert_config_to_hf(cfg: TransformerConfig, architecture: str, num_labels: int = 0,
                      pad_token_id: int | None = None) -> dict:
    """HF BERT config.json for `cfg`."""
    out = {"architectures": [architecture], "model_type": "bert",
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "intermediate_size": cfg.mlp_dim, "hidden_act": _ACT_TO_HF[cfg.activation],
           "hidden_dropout_prob": cfg.dropout_rate,
           "attention_probs_dropout_prob": cfg.attention_dropout_rate,
           "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
           "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps,
           "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
           "pad_token_id": 0 if pad_token_id is None else pad_token_id,
           "torch_dtype": "float32"}
    if num_labels:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    return out


def gpt2_config_to_hf(cfg: TransformerConfig, special: dict[str, int] | None = None) -> dict:
    """HF GPT-2 config.json for `cfg`; `special` may give bos/eos/pad token ids."""
    special = special or {}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.d_model,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim,
            "activation_function": _ACT_TO_HF[cfg.activation],
            "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
            "attn_pdrop": cfg.attention_dropout_rate, "layer_norm_epsilon": cfg.norm_eps,
            "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
            "scale_attn_weights": True, "bos_token_id": special.get("bos"),
            "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
            "torch_dtype": "float32"}


# ----------------------------------------------------------------------------- HF files -------


def read_hf_dir(directory: str) -> tuple[dict, Flat]:
    """(config.json as a dict, state dict as float numpy arrays) of a HF checkpoint directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--from_hf {directory!r} is not a directory; pass the folder "
                                f"holding {CONFIG_FILE} and {WEIGHTS_FILE}.")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint directory "
                                f"needs {CONFIG_FILE} (model_type, sizes) next to {WEIGHTS_FILE}.")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return config, _read_safetensors(directory)


def _load_safetensors_file(path: str) -> Flat:
    """All tensors of one .safetensors file as numpy arrays. bfloat16 tensors, which
    `safetensors.numpy` cannot represent, are read from the raw buffer via ml_dtypes."""
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise
    import ml_dtypes
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
              "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
              "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    out: Flat = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtypes[spec["dtype"]]).reshape(spec["shape"])
    return out


def _read_safetensors(directory: str) -> Flat:
    single = os.path.join(directory, WEIGHTS_FILE)
    index = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if os.path.exists(single):
        return _load_safetensors_file(single)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: Flat = {}
        for shard in shards:
            state.update(_load_safetensors_file(os.path.join(directory, shard)))
        return state
    legacy = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
              if os.path.exists(os.path.join(directory, n))]
    hint = (f" It has {legacy[0]}: load it with transformers and re-save with "
            "model.save_pretrained(DIR, safe_serialization=True).") if legacy else ""
    raise FileNotFoundError(f"{single} not found: the converter reads safetensors weights "
                            f"({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}).{hint}")


def write_hf_dir(directory: str, config: dict, state: Flat) -> None:
    """Writes `config.json` and `model.safetensors` (metadata format=pt, as transformers writes)."""
    from safetensors.numpy import save_file
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})


def _normalise_hf_keys(state: Flat) -> Flat:
    """Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out


# ----------------------------------------------------------------------------- import ---------


@dataclasses.dataclass
class Converted:
    """A converted checkpoint: config, flat params and what run.json records."""

    cfg: TransformerConfig
    params: Flat
    objective: str
    model_type: str
    num_labels: int = 0


def _unused_keys(state: Flat, rules: list[Rule], ignorable: Iterable[str]) -> list[str]:
    used = {r.hf for r in rules} | set(ignorable)
    return sorted(k for k in state if k not in used and not _BUFFER_KEYS.search(k))


def _raise_unused(unused: list[str], model_type: str) -> None:
    if unused:
        raise ConversionError(
            f"the HF {model_type} checkpoint has {len(unused)} tensor(s) this converter does not "
            f"map, e.g. {unused[:5]}: an unsupported head or architecture variant. Supported: "
            + ("BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification."
               if model_type == "bert" else "GPT2Model, GPT2LMHeadModel."))


def bert_from_hf(hf_config: dict, state: Flat) -> Converted:
    """BERT state dict (with or without the `bert.` prefix) -> BertPretrainer-layout params."""
    state = _normalise_hf_keys(state)
    cfg = bert_config_from_hf(hf_config)
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    if "cls.predictions.bias" not in state and "cls.predictions.decoder.bias" in state:
        state = dict(state, **{"cls.predictions.bias": state["cls.predictions.decoder.bias"]})
    groups = {g for g, key in (("pooler", f"{prefix}pooler.dense.weight"),
                               ("mlm", "cls.predictions.transform.dense.weight"),
                               ("nsp", "cls.seq_relationship.weight"),
                               ("classifier", "classifier.weight")) if key in state}
    ignorable = ["cls.predictions.decoder.bias"]  # HF ties it to cls.predictions.bias
    if "mlm" in groups and "cls.predictions.decoder.weight" in state:
        if cfg.tie_embeddings:
            ignorable.append("cls.predictions.decoder.weight")  # HF ties it to the embeddings
        else:
            groups.add("mlm_output")
    elif "mlm" in groups and not cfg.tie_embeddings:
        raise ConversionError("config.json tie_word_embeddings=false but the checkpoint has no "
                              "cls.predictions.decoder.weight (the untied MLM output matrix).")
    num_labels = int(state["classifier.weight"].shape[0]) if "classifier" in groups else 0
    rules = bert_rules(cfg, groups, num_labels, prefix)
    _raise_unused(_unused_keys(state, rules, ignorable), "bert")
    if "mlm" in groups and cfg.activation != "gelu_exact":
        logging.warning("HF BERT hidden_act=%r also drives its MLM transform; BertPretrainer's MLM "
                        "head always uses exact GELU, so MLM logits will differ slightly.",
                        hf_config.get("hidden_act"))
    objective = "classification" if "classifier" in groups else "bert_pretraining"
    return Converted(cfg, apply_rules_to_ours(rules, state), objective, "bert", num_labels)


def gpt2_from_hf(hf_config: dict, state: Flat) -> Converted:
    """GPT-2 state dict (with or without the `transformer.` prefix) -> CausalLM params."""
    cfg = gpt2_config_from_hf(hf_config)
    prefix = "transformer." if "transformer.wte.weight" in state else ""
    if not cfg.tie_embeddings and "lm_head.weight" not in state:
        raise ConversionError("config.json tie_word_embeddings=false but the checkpoint has no "
                              "lm_head.weight.")
    rules = gpt2_rules(cfg, prefix)
    ignorable = ["lm_head.weight"] if cfg.tie_embeddings else []  # a copy of wte when tied
    _raise_unused(_unused_keys(state, rules, ignorable), "gpt2")
    return Converted(cfg, apply_rules_to_ours(rules, state), "causal_lm", "gpt2")


def from_hf(directory: str) -> Converted:
    """Reads and converts the HF checkpoint in `directory` (BERT or GPT-2)."""
    hf_config, state = read_hf_dir(directory)
    model_type = hf_config.get("model_type")
    if model_type == "bert":
        return bert_from_hf(hf_config, state)
    if model_type == "gpt2":
        return gpt2_from_hf(hf_config, state)
    raise ConversionError(f"{os.path.join(directory, CONFIG_FILE)} has model_type={model_type!r}; "
                          f"this converter supports {list(SUPPORTED_MODEL_TYPES)}.")


# ----------------------------------------------------------------------------- layers ---------


def _stack_root(cfg: TransformerConfig) -> str:
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


# ----------------------------------------------------------------------------- export ---------


def _bert_groups(params: Flat) -> tuple[set[str], str, int]:
    """(head groups present, HF architecture, num_labels) of our BERT-family params."""
    heads = {"pooler": "pooler/kernel", "mlm": "mlm_transform/kernel",
             "mlm_output": "mlm_output/kernel", "nsp": "nsp/kernel",
             "classifier": "classifier/kernel"}
    groups = {g for g, k in heads.items() if k in params}
    num_labels = int(params["classifier/kernel"].shape[-1]) if "classifier" in groups else 0
    if {"mlm", "nsp"} <= groups:
        arch = "BertForPreTraining"
    elif "mlm" in groups:
        arch = "BertForMaskedLM"
    elif "classifier" in groups:
        arch = "BertForSequenceClassification"
    else:
        arch = "BertModel"
    return groups, arch, num_labels


def bert_to_hf(cfg: TransformerConfig, params: Flat,
               pad_token_id: int | None = None) -> tuple[dict, Flat]:
    """Our BERT-family flat params (unstacked) -> (HF config.json, HF state dict)."""
    _check_exportable(cfg, "bert")
    groups, arch, num_labels = _bert_groups(params)
    if "mlm" in groups and cfg.activation != "gelu_exact":
        logging.warning("exporting activation=%r: HF BERT's MLM transform will use it too, "
                        "while ours uses exact GELU.", cfg.activation)
    rules = bert_rules(cfg, groups, num_labels, prefix="" if arch == "BertModel" else "bert.")
    _raise_unknown_params(params, rules)
    state = apply_rules_to_hf(rules, params)
    return bert_config_to_hf(cfg, arch, num_labels, pad_token_id), state


def gpt2_to_hf(cfg: TransformerConfig, params: Flat,
               special: dict[str, int] | None = None) -> tuple[dict, Flat]:
    """Our CausalLM flat params (unstacked) -> (HF config.json, GPT2LMHeadModel state dict,
    `lm_head.weight` included even when it is the tied token embedding)."""
    _check_exportable(cfg, "gpt2")
    rules = gpt2_rules(cfg)
    _raise_unknown_params(params, rules)
    state = apply_rules_to_hf(rules, params)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"].copy()
    return gpt2_config_to_hf(cfg, special), state


def _raise_unknown_params(params: Flat, rules: list[Rule]) -> None:
    unknown = sorted(set(params) - {r.ours for r in rules})
    if unknown:
        raise ConversionError(
            f"{len(unknown)} parameter(s) have no Hugging Face counterpart, e.g. {unknown[:5]}. "
            "Export supports BertPretrainer / SequenceClassifier (encoder) and CausalLM params.")


def to_hf(cfg: TransformerConfig, params: Flat,
          special: dict[str, int] | None = None) -> tuple[dict, Flat]:
    """Our flat params (stacked or not) -> (HF config.json, HF state dict). Bidirectional
    configs export as BERT, causal ones as GPT-2."""
    if cfg.scan_layers:
        params = unstack_layers(params, _stack_root(cfg), cfg.num_layers)
    special = special or {}
    if cfg.causal:
        if any(k.startswith("classifier/") for k in params):
            raise ConversionError("a causal SequenceClassifier (decoder + classifier) has no HF "
                                  "GPT-2 export; export a CausalLM checkpoint.")
        return gpt2_to_hf(cfg, params, special)
    return bert_to_hf(cfg, params, special.get("pad"))


# ----------------------------------------------------------------------------- our files ------


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


def model_gin(cfg: TransformerConfig, header: str = "") -> str:
    """`TransformerConfig.*` bindings that rebuild `cfg` (the `_OMIT_WHEN_DEFAULT` fields only
    when they differ from the default)."""
    defaults = TransformerConfig()
    lines = [f"# {line}" for line in header.splitlines()]
    for field in dataclasses.fields(TransformerConfig):
        value = getattr(cfg, field.name)
        if field.name in _OMIT_WHEN_DEFAULT and value == getattr(defaults, field.name):
            continue
        lines.append(f"TransformerConfig.{field.name} = {value!r}")
    return "\n".join(lines) + "\n"


def save_params(directory: str, params: Flat) -> None:
    """Writes `directory/checkpoints/0/params` as research.checkpoints.manager does (Orbax
    CheckpointManager, Composite item `params`, arrays on the host CPU)."""
    import jax
    import orbax.checkpoint as ocp
    cpu = jax.devices("cpu")[0]
    tree = jax.tree.map(lambda x: jax.device_put(x, cpu), nest(params))
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(directory), "checkpoints"),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_names=("params",))
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)), force=True)
    manager.wait_until_finished()
    manager.close()


def load_params(checkpoint: str) -> tuple[TransformerConfig, Flat, dict]:
    """(config, flat numpy params, run.json) of a training workdir, a converted directory,
    its checkpoints/ folder or one step's folder (the latest step unless one is named)."""
    import jax
    import orbax.checkpoint as ocp

    from research.checkpoints import init_from as init_checkpoint
    directory, step = init_checkpoint.resolve(checkpoint)
    info = init_checkpoint.run_info(checkpoint)
    if not info or "model_config" not in info:
        raise FileNotFoundError(f"no run.json with a model_config next to {checkpoint!r}: export "
                                "needs the directory research.train or convert_checkpoint wrote.")
    cfg = TransformerConfig(**info["model_config"])
    path = os.path.join(directory, str(step), "params")
    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return cfg, flatten(restored), info


def _vocab_info(vocab: str | None) -> dict[str, int]:
    """Special ids of the run's tokenizer for the HF config (empty if it cannot be loaded)."""
    if not vocab:
        return {}
    try:
        from research.data.tokenizer import load_tokenizer
        tok = load_tokenizer(vocab)
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        logging.warning("could not load VOCAB %r (%s); the HF config gets no special token ids.",
                        vocab, e)
        return {}
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    return {k: int(v) for k, v in ids.items() if v is not None and v >= 0}


def _check_output(out: str, marker: str, overwrite: bool) -> None:
    """Raises if OUT already holds `marker` (a checkpoint, weights) and `overwrite` is off."""
    if os.path.exists(os.path.join(out, marker)) and not overwrite:
        raise FileExistsError(f"{out} already holds {marker}; pass --overwrite to replace it "
                              "or choose an empty directory.")


def _clear_output(out: str, marker: str) -> None:
    """Removes OUT/marker (after a successful conversion, before writing the new one)."""
    path = os.path.join(out, marker)
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    os.makedirs(out, exist_ok=True)


def _write_run_files(out: str, converted: Converted, hf_dir: str) -> None:
    """OUT/run.json (model_config, objective, vocab, source) and OUT/model.gin."""
    hf_dir = os.path.abspath(hf_dir)
    vocab = os.path.join(hf_dir, "vocab.txt")
    info = {"model_config": dataclasses.asdict(converted.cfg), "objective": converted.objective,
            "vocab": vocab if os.path.exists(vocab) else None,
            "source": {"hf_dir": hf_dir, "model_type": converted.model_type}}
    if converted.num_labels:
        info["num_labels"] = converted.num_labels
    with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    header = (f"Converted from the Hugging Face {converted.model_type} checkpoint {hf_dir}\n"
              f"by tools/convert_checkpoint.py (objective: {converted.objective}).")
    with open(os.path.join(out, "model.gin"), "w", encoding="utf-8") as f:
        f.write(model_gin(converted.cfg, header))


def convert_from_hf(hf_dir: str, out: str, *, scan_layers: bool = False,
                    overwrite: bool = False) -> Converted:
    """HF checkpoint directory -> OUT/{checkpoints/0/params, model.gin, run.json}.

    scan_layers: write the layers stacked (`TransformerConfig.scan_layers = True`).
    Returns what was written (params flat, stacked if scan_layers).
    """
    _check_output(out, "checkpoints", overwrite)
    converted = from_hf(hf_dir)
    if scan_layers:
        cfg = dataclasses.replace(converted.cfg, scan_layers=True)
        params = stack_layers(converted.params, _stack_root(cfg), cfg.num_layers)
        converted = dataclasses.replace(converted, cfg=cfg, params=params)
    _clear_output(out, "checkpoints")
    save_params(out, converted.params)
    _write_run_files(out, converted, hf_dir)
    return converted


def _copy_wordpiece_files(vocab: str | None, hf_dir: str) -> None:
    """Copies a WordPiece vocab.txt (and the tokenizer_config.json beside it) into HF_DIR."""
    if not (vocab and vocab.endswith(".txt") and os.path.exists(vocab)):
        return
    shutil.copyfile(vocab, os.path.join(hf_dir, "vocab.txt"))
    config = os.path.join(os.path.dirname(vocab), "tokenizer_config.json")
    if os.path.exists(config):
        shutil.copyfile(config, os.path.join(hf_dir, "tokenizer_config.json"))


def convert_to_hf(checkpoint: str, hf_dir: str, *, overwrite: bool = False) -> dict:
    """Our workdir / converted directory -> HF_DIR/{config.json, model.safetensors} (+ the
    WordPiece vocab.txt if the run used one). Returns the written config.json."""
    _check_output(hf_dir, WEIGHTS_FILE, overwrite)
    cfg, params, info = load_params(checkpoint)
    config, state = to_hf(cfg, params, _vocab_info(info.get("vocab")))
    _clear_output(hf_dir, WEIGHTS_FILE)
    write_hf_dir(hf_dir, config, state)
    _copy_wordpiece_files(info.get("vocab"), hf_dir)
    return config
