"""Reading and writing Hugging Face checkpoint directories: `config.json` plus the weights as
one `model.safetensors` or shards listed in `model.safetensors.index.json` (read either way;
written as shards above `max_shard_size` bytes, 5 GB by default).

State dicts are flat {HF key: numpy array}. bfloat16 tensors (which `safetensors.numpy`
cannot represent) are read via ml_dtypes; writing stores what it is given (float32 here).

A directory may be local or an object-store URL (`gs://...`, through `research.storage`); a
remote weights file is read into memory whole (as loading it locally does anyway).
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
from safetensors.numpy import load, load_file, save, save_file

from research import storage
from research.checkpoints.errors import CheckpointNotFoundError, ConversionError
from research.checkpoints.hf.rules import Flat

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Weights larger than this are written as shards (transformers 4's save_pretrained default).
DEFAULT_MAX_SHARD_SIZE = 5 * 10 ** 9

# safetensors dtype names -> numpy dtypes, for reading a file's raw buffer.
_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
           "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_hf_dir(directory: str) -> tuple[dict, Flat]:
    """(config.json as a dict, state dict as numpy arrays) of a HF checkpoint directory."""
    if not storage.isdir(directory):
        storage.check_bucket(directory)
        raise CheckpointNotFoundError(
            f"--from_hf {directory!r} is not a directory; pass the folder holding {CONFIG_FILE} "
            f"and {WEIGHTS_FILE}.")
    config_path = storage.join(directory, CONFIG_FILE)
    if not storage.exists(config_path):
        raise CheckpointNotFoundError(
            f"{config_path} not found: a Hugging Face checkpoint directory needs {CONFIG_FILE} "
            f"(model_type, sizes) next to {WEIGHTS_FILE}.")
    config = json.loads(storage.read_text(config_path))
    return config, read_safetensors(directory)


def load_safetensors_file(path: str) -> Flat:
    """All tensors of one .safetensors file (local or a URL) as numpy arrays. bfloat16
    tensors, which `safetensors.numpy` cannot represent, are read from the raw buffer via
    ml_dtypes."""
    raw = storage.read_bytes(path) if storage.is_remote(path) else None
    try:
        return dict(load(raw) if raw is not None else load_file(path))
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise
    if raw is None:
        raw = storage.read_bytes(path)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    data = raw[8 + header_len:]
    out: Flat = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        out[name] = np.frombuffer(data[start:end], _DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return out


def read_safetensors(directory: str) -> Flat:
    """The state dict of `directory/model.safetensors`, or of the shards its index lists."""
    single = storage.join(directory, WEIGHTS_FILE)
    index = storage.join(directory, WEIGHTS_INDEX_FILE)
    if storage.exists(single):
        return load_safetensors_file(single)
    if storage.exists(index):
        shards = sorted(set(json.loads(storage.read_text(index))["weight_map"].values()))
        state: Flat = {}
        for shard in shards:
            state.update(load_safetensors_file(storage.join(directory, shard)))
        return state
    legacy = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
              if storage.exists(storage.join(directory, n))]
    hint = (f" It has {legacy[0]}: load it with transformers and re-save with "
            "model.save_pretrained(DIR, safe_serialization=True).") if legacy else ""
    raise CheckpointNotFoundError(f"{single} not found: the converter reads safetensors weights "
                                  f"({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}).{hint}")


def shard_tensors(tensors: Flat, max_shard_size: int) -> list[Flat]:
    """Tensors split, in key order, into groups of at most `max_shard_size` bytes each (a
    tensor larger than that gets a group of its own)."""
    shards: list[Flat] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    return shards


def _write_safetensors(path: str, tensors: Flat) -> None:
    """One .safetensors file (metadata format=pt, as transformers writes), local or remote."""
    if storage.is_remote(path):
        storage.write_bytes(path, save(tensors, metadata={"format": "pt"}))
    else:
        save_file(tensors, path, metadata={"format": "pt"})


def _remove_weights(directory: str) -> None:
    """Removes `directory`'s model.safetensors, its index and the shards the index lists, so
    that old weights of the other layout are not read instead of the new ones."""
    index = storage.join(directory, WEIGHTS_INDEX_FILE)
    old = [WEIGHTS_FILE]
    if storage.exists(index):
        old += sorted(set(json.loads(storage.read_text(index)).get("weight_map", {}).values()))
        old.append(WEIGHTS_INDEX_FILE)
    for name in old:
        path = storage.join(directory, name)
        if storage.exists(path):
            storage.remove(path)


def write_hf_dir(directory: str, config: dict, state: Flat,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Writes `config.json` and the weights into a local directory or a URL prefix: one
    `model.safetensors` when they take at most `max_shard_size` bytes, else shards
    `model-00001-of-0000N.safetensors` of at most that size (a larger tensor alone) listed in
    `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {key: file}}),
    as transformers' `save_pretrained(max_shard_size=...)` writes them. Weights of an earlier
    write in either layout are removed."""
    if max_shard_size < 1:
        raise ConversionError(f"max_shard_size must be a positive number of bytes, got "
                         f"{max_shard_size}.")
    storage.makedirs(directory)
    _remove_weights(directory)
    storage.write_text(storage.join(directory, CONFIG_FILE),
                       json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
    shards = shard_tensors(tensors, max_shard_size)
    if len(shards) == 1:
        _write_safetensors(storage.join(directory, WEIGHTS_FILE), tensors)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(storage.join(directory, name), shard)
        weight_map.update({key: name for key in shard})
    total = sum(t.nbytes for t in tensors.values())
    storage.write_text(storage.join(directory, WEIGHTS_INDEX_FILE),
                       json.dumps({"metadata": {"total_size": total},
                                   "weight_map": dict(sorted(weight_map.items()))}, indent=2))
