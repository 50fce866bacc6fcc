"""Reading and writing Hugging Face checkpoint directories: `config.json` plus the weights as
one `model.safetensors` or shards listed in `model.safetensors.index.json`.

State dicts are flat {HF key: numpy array}. bfloat16 tensors (which `safetensors.numpy`
cannot represent) are read via ml_dtypes; writing stores what it is given (float32 here).
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from research.checkpoints.errors import CheckpointNotFoundError
from research.checkpoints.hf.rules import Flat

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype names -> numpy dtypes, for reading a file's raw buffer.
_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
           "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_hf_dir(directory: str) -> tuple[dict, Flat]:
    """(config.json as a dict, state dict as numpy arrays) of a HF checkpoint directory."""
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(
            f"--from_hf {directory!r} is not a directory; pass the folder holding {CONFIG_FILE} "
            f"and {WEIGHTS_FILE}.")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise CheckpointNotFoundError(
            f"{config_path} not found: a Hugging Face checkpoint directory needs {CONFIG_FILE} "
            f"(model_type, sizes) next to {WEIGHTS_FILE}.")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return config, read_safetensors(directory)


def load_safetensors_file(path: str) -> Flat:
    """All tensors of one .safetensors file as numpy arrays. bfloat16 tensors, which
    `safetensors.numpy` cannot represent, are read from the raw buffer via ml_dtypes."""
    try:
        return dict(load_file(path))
    except TypeError as e:
        if "bfloat16" not in str(e):
            raise
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        data = f.read()
    out: Flat = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        out[name] = np.frombuffer(data[start:end], _DTYPES[spec["dtype"]]).reshape(spec["shape"])
    return out


def read_safetensors(directory: str) -> Flat:
    """The state dict of `directory/model.safetensors`, or of the shards its index lists."""
    single = os.path.join(directory, WEIGHTS_FILE)
    index = os.path.join(directory, WEIGHTS_INDEX_FILE)
    if os.path.exists(single):
        return load_safetensors_file(single)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: Flat = {}
        for shard in shards:
            state.update(load_safetensors_file(os.path.join(directory, shard)))
        return state
    legacy = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
              if os.path.exists(os.path.join(directory, n))]
    hint = (f" It has {legacy[0]}: load it with transformers and re-save with "
            "model.save_pretrained(DIR, safe_serialization=True).") if legacy else ""
    raise CheckpointNotFoundError(f"{single} not found: the converter reads safetensors weights "
                                  f"({WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}).{hint}")


def write_hf_dir(directory: str, config: dict, state: Flat) -> None:
    """Writes `config.json` and `model.safetensors` (metadata format=pt, as transformers writes)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
