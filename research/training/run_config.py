"""Types and ranges of the `train` arguments (the run-config macros), checked before any compute."""

from __future__ import annotations

import numbers
from typing import Any

from research.errors import InvalidConfigError


# Example values for the "pass --gin.NAME=..." hint of a missing required binding.
EXAMPLES = {
    "vocab": "\"'path.model'\"", "train_data": "\"'text:data/*.txt'\"",
    "eval_data": "\"'text:data/*.txt'\"", "num_steps": "1000", "batch_size": "16",
    "seq_len": "256", "learning_rate": "6e-4", "model_config": "@TransformerConfig()",
    "objective": "@CausalLMObjective()",
}

# The run-config macro of each train() parameter (for messages).
MACROS = {
    "num_steps": "TRAIN_STEPS", "batch_size": "BATCH_SIZE", "seq_len": "SEQ_LEN",
    "learning_rate": "LEARNING_RATE", "warmup_steps": "WARMUP_STEPS", "seed": "SEED",
    "mesh_shape": "MESH_SHAPE", "train_data": "TRAIN_DATA", "eval_data": "EVAL_DATA",
    "test_data": "TEST_DATA", "vocab": "VOCAB", "num_epochs": "EPOCHS",
    "warmup_fraction": "WARMUP_FRACTION", "init_checkpoint": "INIT_CHECKPOINT",
}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_POS_INT = ("a positive int", lambda v: _is_int(v) and v > 0, "16")
_NONNEG_INT = ("a non-negative int", lambda v: _is_int(v) and v >= 0, "0")
_POS_NUM = ("a positive number", lambda v: _is_number(v) and v > 0 and v == v and v != float("inf"), "6e-4")
_STR = ("a string", lambda v: isinstance(v, str), "\"'...'\"")


def _or_none(rule):
    desc, ok, ex = rule
    return (desc + " or None", lambda v: v is None or ok(v), ex)


_TRAIN_RULES = {
    "num_steps": _or_none(_POS_INT),
    "batch_size": _POS_INT,
    "seq_len": _POS_INT,
    "learning_rate": _POS_NUM,
    "warmup_steps": _or_none(_NONNEG_INT),
    "warmup_fraction": ("a number in [0, 1] or None",
                        lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "0.1"),
    "num_epochs": _or_none(_POS_NUM),
    "seed": ("an int", _is_int, "0"),
    "mesh_shape": ("a dict of axis name to int (or None)",
                   lambda v: v is None or (isinstance(v, dict) and all(
                       isinstance(k, str) and _is_int(n) for k, n in v.items())),
                   "\"{'data': -1}\""),
    "train_data": _STR,
    "eval_data": _or_none(_STR),
    "test_data": _or_none(_STR),
    "vocab": _or_none(_STR),
    "init_checkpoint": _or_none(_STR),
    "best_metric": _or_none(_STR),
    "microbatches": _POS_INT,
    "log_every": _POS_INT,
    "eval_every": _or_none(_POS_INT),
    "eval_steps": _or_none(_POS_INT),
    "checkpoint_every": _POS_INT,
    "keep_checkpoints": _or_none(_POS_INT),
    "async_checkpoints": ("a bool (True/False)", lambda v: isinstance(v, bool), "True"),
    "progress_bar": ("a bool (True/False)", lambda v: isinstance(v, bool), "True"),
}


def validate_train_args(args: dict[str, Any]) -> None:
    """TypeError/ValueError naming every train() argument of the wrong type or range: the
    macro, the value, its type, what is expected and an example override."""
    problems = []
    for param, (desc, ok, example) in _TRAIN_RULES.items():
        if param not in args or ok(args[param]):
            continue
        value = args[param]
        macro = MACROS.get(param)
        where = f"{macro} (train.{param})" if macro else f"train.{param}"
        flag = f"--gin.{macro or 'train.' + param}={EXAMPLES.get(param, example)}"
        problems.append(f"{where} = {value!r} ({type(value).__name__}) must be {desc}; "
                        f"fix it in the run config or pass e.g. {flag}")
    if problems:
        raise InvalidConfigError("invalid train() arguments: " + "; ".join(problems) + ".")
