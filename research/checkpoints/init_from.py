"""Initialising a new model from a pretrained checkpoint (fine-tuning, new heads).

An *assignment map* decides, for every parameter of the new model, where its value comes
from. It is a sequence of `(target_regex, source)` rules over slash-separated parameter paths
(`encoder/layer_0/attention/query/kernel`); the first rule whose regex matches the whole path
wins. `source` is a replacement template for `re.sub` (e.g. `r"\\1"`) naming the checkpoint
parameter, or None to keep the fresh initialisation. A path no rule matches keeps its fresh
initialisation too. Only the mapped parameters are read (Orbax partial restore), directly
onto the new model's shardings, so a checkpoint saved under one mesh initialises a model on
another.

The default map restores every parameter the new model shares with the checkpoint and
nothing else is needed for the usual case (pretrained encoder → encoder + fresh task head):
`(("(classifier)/.*", None), ("(.*)", r"\\1"))`.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any, Sequence

import jax
import numpy as np

from research import storage
from research.checkpoints.errors import (
    CheckpointMismatchError, CheckpointNotFoundError, MissingParameterError)
from research.checkpoints.manager import param_shapes, path_str, restore_param_subset
from research.workdir import read_run_info

AssignmentMap = Sequence[tuple[str, str | None]]


_WHAT_TO_PASS = ("Pass a training workdir (with checkpoints/), its checkpoints/ folder, one "
                 "step's folder (checkpoints/1000), or a directory written by "
                 "tools/convert_checkpoint.py.")


def resolve(init_checkpoint: str, flag: str = "INIT_CHECKPOINT") -> tuple[str, int]:
    """(Orbax manager directory, step) for a workdir, a checkpoints dir or one step's dir;
    `flag` names the setting the path came from in the error messages."""
    path = storage.resolve(init_checkpoint)
    if not storage.isdir(path):
        problem = "is a file, not a directory" if storage.exists(path) else "does not exist"
        raise CheckpointNotFoundError(
            f"{flag} {init_checkpoint!r} {problem}. {_WHAT_TO_PASS}")
    if storage.isdir(storage.join(path, "checkpoints")):
        path = storage.join(path, "checkpoints")
    name = storage.basename(path)
    if name.isdigit() and storage.isdir(storage.join(path, "params")):
        return storage.dirname(path), int(name)
    steps = sorted(int(d) for d in storage.listdir(path)
                   if d.isdigit() and storage.isdir(storage.join(path, d, "params")))
    if not steps:
        raise CheckpointNotFoundError(
            f"{flag} {init_checkpoint!r} holds no complete checkpoint (no "
            f"<step>/params folder). {_WHAT_TO_PASS}")
    return path, steps[-1]


def run_info(init_checkpoint: str, flag: str = "INIT_CHECKPOINT") -> dict | None:
    """The run.json next to a checkpoint (model config, vocab), if there is one."""
    directory, _ = resolve(init_checkpoint, flag)
    for candidate in (storage.dirname(directory), directory):
        info = read_run_info(candidate)
        if info is not None:
            return info
    return None


def plan(target_abstract: Any, source_shapes: dict, assignment_map: AssignmentMap) -> dict[str, str]:
    """{target path: source path} for the parameters to restore; raises on missing/mismatched."""
    rules = [(re.compile(regex), source) for regex, source in assignment_map]
    mapping = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(target_abstract)[0]:
        target = path_str(p)
        for regex, source in rules:
            m = regex.fullmatch(target)
            if m is None:
                continue
            if source is not None:
                mapping[target] = m.expand(source)
            break
        else:
            continue
        if target not in mapping:
            continue
        src = mapping[target]
        if src not in source_shapes:
            close = difflib.get_close_matches(src, list(source_shapes), n=3)
            raise MissingParameterError(
                f"parameter {target!r} maps to {src!r}, which the checkpoint does not have"
                + (f" (closest: {close})" if close else "")
                + ". Fix the assignment map (a rule `(regex, None)` keeps a parameter freshly "
                "initialised) or use a checkpoint of the same architecture.")
        shape = source_shapes[src][0]
        if tuple(shape) != tuple(leaf.shape):
            raise CheckpointMismatchError(
                f"parameter {target!r} has shape {tuple(leaf.shape)} in the model but "
                f"{src!r} has shape {tuple(shape)} in the checkpoint. The model config must match "
                "the pretrained one (layers, d_model, heads, MLP, vocab size, max_len, scan_layers).")
    return mapping


def restore_into(params: Any, init_checkpoint: str, assignment_map: AssignmentMap) -> tuple[Any, list[str]]:
    """Returns (params with the mapped leaves replaced by the checkpoint's, restored paths).

    `params` is the freshly initialised, sharded parameter tree of the new model; restored
    leaves keep its shardings and dtypes.
    """
    directory, step = resolve(init_checkpoint)
    shapes = param_shapes(directory, step)
    mapping = plan(params, shapes, assignment_map)
    if not mapping:
        raise CheckpointMismatchError(
            f"the assignment map restores nothing from {init_checkpoint!r}; check its regexes "
            "against the parameter paths.")
    targets = dict((path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0])
    item: dict = {}
    for target, source in mapping.items():
        leaf = targets[target]
        node = item
        *parents, last = source.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = jax.ShapeDtypeStruct(leaf.shape, shapes[source][1], sharding=leaf.sharding)
    restored = restore_param_subset(directory, step, item)
    flat_restored = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(restored)[0]}

    def pick(p, leaf):
        target = path_str(p)
        if target in mapping:
            return flat_restored[mapping[target]].astype(leaf.dtype)
        return leaf

    new_params = jax.tree_util.tree_map_with_path(pick, params)
    logging.info("initialised %d of %d parameters from %s step %d", len(mapping), len(targets),
                 directory, step)
    return new_params, sorted(mapping)


def check_vocab(init_checkpoint: str, tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """The tokenizer must fit the checkpoint's embedding table (same vocab as pretraining)."""
    info = run_info(init_checkpoint)
    if info is None:
        return
    ckpt_vocab = info.get("model_config", {}).get("vocab_size")
    if ckpt_vocab is not None and ckpt_vocab != model_vocab_size:
        raise CheckpointMismatchError(
            f"VOCAB has {tokenizer_vocab_size} pieces (model vocab {model_vocab_size}) but "
            f"INIT_CHECKPOINT was trained with vocab size {ckpt_vocab} ({info.get('vocab')}). "
            "Use the pretraining run's tokenizer: --gin.VOCAB=\"'" + str(info.get("vocab")) + "'\".")
    if tokenizer_vocab_size > (ckpt_vocab or np.inf):
        raise CheckpointMismatchError(
            f"VOCAB has {tokenizer_vocab_size} pieces, more than the checkpoint's "
            f"{ckpt_vocab}-row embedding. Use the pretraining run's tokenizer: "
            f"--gin.VOCAB=\"'{info.get('vocab')}'\".")
