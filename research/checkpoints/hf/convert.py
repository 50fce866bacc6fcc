"""Conversion between Hugging Face checkpoints and this project's checkpoints: the model-family
registry and the directory-to-directory functions tools/convert_checkpoint.py calls.

Import (`convert_from_hf`): `DIR/config.json` + `DIR/model.safetensors` (or a sharded
`model.safetensors.index.json`) become a directory that `INIT_CHECKPOINT`,
`research.checkpoints.manager.Checkpointer.restore_params` and `research.generate` read:

  OUT/checkpoints/0/params   Orbax, the layout research.checkpoints.manager writes
  OUT/model.gin              the matching `TransformerConfig.*` bindings
  OUT/run.json               {"model_config", "objective", "vocab", "source"}

Export (`convert_to_hf`): a training workdir (or a converted directory) becomes
`config.json` + `model.safetensors` with Hugging Face key names.

Model families (`FAMILIES`, one module each): research.checkpoints.hf.bert (`model_type: bert`,
BertPretrainer / SequenceClassifier params) and research.checkpoints.hf.gpt2 (`model_type:
gpt2`, CausalLM params). Import dispatches on config.json's model_type, export on the first
family whose `can_export(cfg)` holds (bidirectional configs: BERT, causal ones: GPT-2). Adding
a family means adding its module and one entry here. How tensors move: research.checkpoints.hf.rules.

Every directory may be local or an object-store URL (`gs://bkt/hf/bert`, through
`research.storage`; Orbax writes and reads the checkpoint at the URL itself).
"""

from __future__ import annotations

import dataclasses
import json
import logging

from research import storage
from research.checkpoints import manager
from research.checkpoints.errors import (
    CheckpointNotFoundError, ConversionError, OutputExistsError)
from research.checkpoints.hf import bert, gpt2, llama
from research.checkpoints.hf.family import Converted, ModelFamily
from research.checkpoints.hf.rules import Flat, flatten, nest, stack_layers, stack_root, unstack_layers
from research.checkpoints.hf.safetensors_io import (
    CONFIG_FILE, DEFAULT_MAX_SHARD_SIZE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, read_hf_dir, write_hf_dir)
from research.checkpoints.init_from import resolve, run_info
from research.data.tokenizer import load_tokenizer
from research.data.tokenizer_base import VocabNotFoundError, find_tokenizer_file
from research.models.transformer import TransformerConfig
from research.workdir import write_run_info, write_text

# HF config.json model_type -> its family; in export order (see `to_hf`).
FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in (bert.FAMILY, *llama.FAMILIES,
                                                                gpt2.FAMILY)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

MODEL_GIN_FILE = "model.gin"

# TransformerConfig fields model.gin leaves out when they have their default value: run-time
# choices a run config may set, and options HF BERT / GPT-2 never use.
_OMIT_WHEN_DEFAULT = ("vocab_multiple", "param_dtype", "dtype", "remat_policy",
                      "attention_impl", "attention_query_blocks", "num_kv_heads", "head_dim",
                      "rope_theta", "rope_scaling", "rope_scaling_factor",
                      "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
                      "qkv_bias", "sliding_window", "scale_embeddings", "norm_scale_offset")


def from_hf(directory: str) -> Converted:
    """Reads and converts the HF checkpoint in `directory` (any family in FAMILIES)."""
    hf_config, state = read_hf_dir(directory)
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConversionError(f"{storage.join(directory, CONFIG_FILE)} has "
                              f"model_type={model_type!r}; this converter supports "
                              f"{list(SUPPORTED_MODEL_TYPES)}.")
    return FAMILIES[model_type].from_hf(hf_config, state)


def to_hf(cfg: TransformerConfig, params: Flat,
          special: dict[str, int] | None = None) -> tuple[dict, Flat]:
    """Our flat params (stacked or not) -> (HF config.json, HF state dict), by the first
    family that exports `cfg` (bidirectional configs as BERT, causal ones as GPT-2).
    `special` may give the tokenizer's bos/eos/pad ids."""
    if cfg.scan_layers:
        params = unstack_layers(params, stack_root(cfg), cfg.num_layers)
    family = next((f for f in FAMILIES.values() if f.can_export(cfg)), None)
    if family is None:
        raise ConversionError(f"no Hugging Face model family exports this TransformerConfig "
                              f"(supported: {list(SUPPORTED_MODEL_TYPES)}).")
    return family.to_hf(cfg, params, special or {})


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


def load_params(checkpoint: str) -> tuple[TransformerConfig, Flat, dict]:
    """(config, flat numpy params, run.json) of a training workdir, a converted directory,
    its checkpoints/ folder or one step's folder (the latest step unless one is named)."""
    directory, step = resolve(checkpoint, flag="--from")
    info = run_info(checkpoint, flag="--from")
    if not info or "model_config" not in info:
        raise CheckpointNotFoundError(
            f"no run.json with a model_config next to {checkpoint!r}: export needs the "
            "directory research.train or convert_checkpoint wrote.")
    cfg = TransformerConfig(**info["model_config"])
    return cfg, flatten(manager.restore_params_on_host(directory, step)), info


def _vocab_info(vocab: str | None) -> dict[str, int]:
    """Special ids of the run's tokenizer for the HF config (empty if it cannot be loaded)."""
    if not vocab:
        return {}
    try:
        tok = load_tokenizer(vocab)
    except (OSError, ImportError, ValueError, RuntimeError) as e:
        logging.warning("could not load VOCAB %r (%s); the HF config gets no special token ids.",
                        vocab, e)
        return {}
    ids = {"bos": tok.bos_id, "eos": tok.eos_id}
    if getattr(tok, "pad_is_special", True):  # not a fallback to an ordinary piece
        ids["pad"] = tok.pad_id
    return {k: int(v) for k, v in ids.items() if v is not None and v >= 0}


def _check_output(out: str, markers: str | tuple[str, ...], overwrite: bool) -> None:
    """Raises if OUT already holds one of `markers` (a checkpoint, weights) and `overwrite` is
    off."""
    for marker in (markers,) if isinstance(markers, str) else markers:
        if storage.exists(storage.join(out, marker)) and not overwrite:
            raise OutputExistsError(f"{out} already holds {marker}; pass --overwrite to replace "
                                    "it or choose an empty directory.")


def _clear_output(out: str, marker: str) -> None:
    """Removes OUT/marker (after a successful conversion, before writing the new one)."""
    path = storage.join(out, marker)
    if storage.isdir(path):
        storage.rmtree(path)
    elif storage.exists(path):
        storage.remove(path)
    storage.makedirs(out)


# Files that travel with a tokenizer file (special tokens, normaliser options) on export.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def hf_tokenizer_file(hf_dir: str) -> str | None:
    """The tokenizer file of an HF checkpoint directory that run.json's `vocab` records, or
    None: BERT's vocab.txt (the WordPiece tokenizer, as before), else the first of
    `tokenizer_base.TOKENIZER_FILES` (tokenizer.json, tokenizer.model, spiece.model, ...)."""
    vocab_txt = storage.join(hf_dir, "vocab.txt")
    if storage.isfile(vocab_txt):
        return vocab_txt
    try:
        return find_tokenizer_file(hf_dir)
    except VocabNotFoundError:
        return None


def _write_run_files(out: str, converted: Converted, hf_dir: str) -> None:
    """OUT/run.json (model_config, objective, vocab, source) and OUT/model.gin. `vocab` points
    at HF_DIR's tokenizer file (`hf_tokenizer_file`; None, with a warning, if it has none), so
    research.generate and INIT_CHECKPOINT runs need no VOCAB."""
    hf_dir = storage.resolve(hf_dir)
    vocab = hf_tokenizer_file(hf_dir)
    if vocab is None:
        logging.warning("%s has no tokenizer file (tokenizer.json, tokenizer.model, vocab.txt, "
                        "...); run.json records vocab: null, so pass --gin.VOCAB to train on "
                        "the conversion.", hf_dir)
    info = {"model_config": dataclasses.asdict(converted.cfg), "objective": converted.objective,
            "vocab": vocab,
            "source": {"hf_dir": hf_dir, "model_type": converted.model_type}}
    if converted.num_labels:
        info["num_labels"] = converted.num_labels
    write_run_info(out, info)
    header = (f"Converted from the Hugging Face {converted.model_type} checkpoint {hf_dir}\n"
              f"by tools/convert_checkpoint.py (objective: {converted.objective}).")
    write_text(storage.join(out, MODEL_GIN_FILE), model_gin(converted.cfg, header))


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
        params = stack_layers(converted.params, stack_root(cfg), cfg.num_layers)
        converted = dataclasses.replace(converted, cfg=cfg, params=params)
    _clear_output(out, "checkpoints")
    manager.save_params(storage.join(storage.resolve(out), "checkpoints"), nest(converted.params))
    _write_run_files(out, converted, hf_dir)
    return converted


def _hf_tokenizer_names(vocab: str) -> list[tuple[str, str]]:
    """(source path, name in the HF directory) of the files that make up tokenizer file
    `vocab`: the file under the name transformers looks for (vocab.txt, tokenizer.json,
    vocab.json + merges.txt, tokenizer.model / spiece.model), and its side files that exist."""
    directory, name = storage.dirname(vocab), storage.basename(vocab)
    if name.endswith(".txt"):
        files = [(vocab, "vocab.txt")]
    elif name == "vocab.json":
        files = [(vocab, name), (storage.join(directory, "merges.txt"), "merges.txt")]
    elif name.endswith(".json"):
        files = [(vocab, "tokenizer.json")]
    else:  # SentencePiece
        keep = name in ("tokenizer.model", "spiece.model")
        files = [(vocab, name if keep else "tokenizer.model")]
    side = [(storage.join(directory, n), n) for n in TOKENIZER_SIDE_FILES]
    return files + [(src, n) for src, n in side if storage.isfile(src)]


def _copy_tokenizer_files(vocab: str | None, hf_dir: str, model_type: str) -> None:
    """Copies the run's tokenizer (any kind `load_tokenizer` reads; a directory VOCAB: its
    tokenizer file) and its tokenizer_config.json / special_tokens_map.json into HF_DIR; a
    decoder's bare SentencePiece model gets a tokenizer_config.json
    (`sentencepiece_tokenizer_config`)."""
    if not vocab or not storage.exists(vocab):
        return
    if storage.isdir(vocab):
        try:
            vocab = find_tokenizer_file(vocab)
        except VocabNotFoundError:
            return
    names = _hf_tokenizer_names(vocab)
    for src, name in names:
        storage.write_bytes(storage.join(hf_dir, name), storage.read_bytes(src))
    written = {name for _, name in names}
    if (model_type != "bert" and written & {"tokenizer.model", "spiece.model"}
            and "tokenizer_config.json" not in written):
        storage.write_text(storage.join(hf_dir, "tokenizer_config.json"),
                           json.dumps(sentencepiece_tokenizer_config(vocab), indent=2) + "\n")


def sentencepiece_tokenizer_config(vocab: str) -> dict:
    """tokenizer_config.json for a decoder exported with this project's SentencePiece model
    `vocab` and no config of its own. Without one, transformers' AutoTokenizer follows
    config.json's model_type (gpt2: a byte-level BPE of other ids); with it, AutoTokenizer
    builds its fast tokenizer from tokenizer.model, whose ids equal sentencepiece's, with the
    run's special pieces, and starts a text with BOS as research.generate does."""
    tok = load_tokenizer(vocab)
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "add_bos_token": bool(tok.add_bos_token and tok.bos_id >= 0),
              "add_eos_token": False}
    for name in ("bos", "eos", "unk", "pad", "cls", "sep", "mask"):
        pid = getattr(tok, f"{name}_id", -1)
        if pid >= 0 and (name != "pad" or tok.pad_is_special):
            config[f"{name}_token"] = tok.id_to_piece(pid)
    return config


def convert_to_hf(checkpoint: str, hf_dir: str, *, overwrite: bool = False,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Our workdir / converted directory -> HF_DIR/{config.json, model.safetensors, or shards of
    at most `max_shard_size` bytes with model.safetensors.index.json} (+ the run's tokenizer
    files, `_copy_tokenizer_files`). Returns the written config.json."""
    _check_output(hf_dir, (WEIGHTS_FILE, WEIGHTS_INDEX_FILE), overwrite)
    cfg, params, info = load_params(checkpoint)
    config, state = to_hf(cfg, params, _vocab_info(info.get("vocab")))
    _clear_output(hf_dir, WEIGHTS_FILE)
    write_hf_dir(hf_dir, config, state, max_shard_size=max_shard_size)
    _copy_tokenizer_files(info.get("vocab"), hf_dir, config.get("model_type", ""))
    return config
