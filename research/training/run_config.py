"""The run configuration: one typed dataclass, registered with gin as `train`.

Every `train.*` binding of configs/runs/*.gin (usually set through a macro: `train.num_steps =
%TRAIN_STEPS`) is a field of `RunConfig`, and DIR/config.gin lists them as `train.*`. Each
field's metadata holds its macro and its type/range check; `RunConfig.__post_init__` runs the
checks, so a wrong type fails on construction, before any compute, naming the macro, the
value and an override that fixes it. `RunConfig.schedule` derives the values that depend on
the training data (num_steps from num_epochs, warmup from warmup_fraction, the eval cadence).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple

import gin

from research.data.mixture import EXAMPLE as MIXTURE_EXAMPLE, mixture_problem
from research.errors import ConfigError, InvalidConfigError
from research.models.transformer import TransformerConfig
from research.objectives.base import Objective

NONFINITE_MODES = ("stop", "skip")

# init_from's default: restore everything but a classifier head.
DEFAULT_ASSIGNMENT_MAP = (("classifier/.*", None), ("(.*)", r"\1"))


class Check(NamedTuple):
    """A field's allowed values: `description` for messages, `ok(value)`, an example value."""

    description: str
    ok: Callable[[Any], bool]
    example: str


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _or_none(check: Check) -> Check:
    return Check(check.description + " or None", lambda v: v is None or check.ok(v), check.example)


POS_INT = Check("a positive int", lambda v: _is_int(v) and v > 0, "16")
NONNEG_INT = Check("a non-negative int", lambda v: _is_int(v) and v >= 0, "0")
POS_NUM = Check("a positive number", lambda v: _is_number(v) and 0 < v < math.inf, "6e-4")
FRACTION = Check("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1, "0.1")
STR = Check("a string", lambda v: isinstance(v, str), "\"'...'\"")
BOOL = Check("a bool (True/False)", lambda v: isinstance(v, bool), "True")
INT = Check("an int", _is_int, "0")
MESH = Check("a dict of axis name to int (or None)",
             lambda v: v is None or (isinstance(v, dict) and all(
                 isinstance(k, str) and _is_int(n) for k, n in v.items())),
             "\"{'data': -1}\"")
HANG_TIMEOUT = Check("a positive number of seconds, None or 'auto'",
                     lambda v: v is None or v == "auto" or POS_NUM.ok(v), "1800")
TRAIN_DATA = Check("a spec string, or for a weighted mixture a non-empty list of (spec, weight) "
                   "pairs with non-empty spec strings and positive finite weights, e.g. "
                   + MIXTURE_EXAMPLE, lambda v: isinstance(v, str) or mixture_problem(v) is None,
                   f"\"{MIXTURE_EXAMPLE}\"")
NONFINITE = Check(f"one of {NONFINITE_MODES}", lambda v: v in NONFINITE_MODES, "\"'skip'\"")


def _field(default: Any = gin.REQUIRED, *, check: Check | None = None, macro: str | None = None,
           example: str | None = None) -> Any:
    """A RunConfig field: its run-config `macro` (for messages), its `check`, and the
    `example` value the "pass --gin.NAME=..." hints show (default: the check's)."""
    return dataclasses.field(default=default,
                             metadata={"check": check, "macro": macro, "example": example})


@gin.configurable("train")
@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What `python -m research.train` trains, on what data, for how long, and how it logs,
    evaluates and checkpoints. gin.REQUIRED fields must be bound (`train.vocab = %VOCAB`).

    Fine-tuning adds: `num_epochs` (used when num_steps is None), `warmup_fraction` (used when
    warmup_steps is None), `eval_every` None (once per epoch), `init_checkpoint` +
    `assignment_map` (see research.checkpoints.init_from; vocab None = the pretraining run's),
    `best_metric` (e.g. 'eval/accuracy': the best parameters are kept in DIR/best) and
    `test_data` (predictions written to DIR/predictions.tsv). `train_data` may be a list of
    (spec, weight) pairs: a deterministic weighted mixture (research.data.mixture).
    `eval_steps` None evaluates the whole set. `microbatches` splits each step's batch for
    gradient accumulation.
    `on_nonfinite`: a NaN/Inf loss or gradient stops the run ('stop') or skips that update
    ('skip', counted as train/skipped_steps).
    `hang_timeout_s`: a train step, eval, checkpoint save/restore or cross-process sync running
    longer dumps the stacks to DIR/hang-<process>-<step>.txt and exits 75, to be rerun and
    resume (research/training/watchdog.py); None/'auto' = max(10 min, 50 x the median step).
    """

    model_config: TransformerConfig = _field(example="@TransformerConfig()")
    objective: Objective = _field(example="@CausalLMObjective()")
    train_data: str | list = _field(check=TRAIN_DATA, macro="TRAIN_DATA",
                                    example="\"'text:data/*.txt'\"")
    eval_data: str | None = _field(None, check=_or_none(STR), macro="EVAL_DATA",
                                   example="\"'text:data/*.txt'\"")
    test_data: str | None = _field(None, check=_or_none(STR), macro="TEST_DATA")
    vocab: str | None = _field(check=_or_none(STR), macro="VOCAB", example="\"'path.model'\"")
    num_steps: int | None = _field(check=_or_none(POS_INT), macro="TRAIN_STEPS", example="1000")
    num_epochs: float | None = _field(None, check=_or_none(POS_NUM), macro="EPOCHS")
    batch_size: int = _field(check=POS_INT, macro="BATCH_SIZE", example="16")
    seq_len: int = _field(check=POS_INT, macro="SEQ_LEN", example="256")
    learning_rate: float = _field(check=POS_NUM, macro="LEARNING_RATE", example="6e-4")
    warmup_steps: int | None = _field(0, check=_or_none(NONNEG_INT), macro="WARMUP_STEPS")
    warmup_fraction: float | None = _field(None, check=_or_none(FRACTION),
                                           macro="WARMUP_FRACTION")
    seed: int = _field(0, check=INT, macro="SEED")
    mesh_shape: dict | None = _field(None, check=MESH, macro="MESH_SHAPE")
    microbatches: int = _field(1, check=POS_INT)
    init_checkpoint: str | None = _field(None, check=_or_none(STR), macro="INIT_CHECKPOINT")
    assignment_map: Any = _field(DEFAULT_ASSIGNMENT_MAP)
    best_metric: str | None = _field(None, check=_or_none(STR))
    log_every: int = _field(50, check=POS_INT)
    eval_every: int | None = _field(500, check=_or_none(POS_INT))
    eval_steps: int | None = _field(20, check=_or_none(POS_INT))
    checkpoint_every: int = _field(1000, check=POS_INT)
    keep_checkpoints: int = _field(3, check=_or_none(POS_INT))
    async_checkpoints: bool = _field(True, check=BOOL)
    progress_bar: bool = _field(True, check=BOOL)
    on_nonfinite: str = _field("stop", check=NONFINITE)
    hang_timeout_s: float | str | None = _field(None, check=HANG_TIMEOUT)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def mesh_axes(self) -> dict[str, int]:
        """MESH_SHAPE, None = all devices on the data axis."""
        return self.mesh_shape or {"data": -1}

    def schedule(self, steps_per_epoch: int | None) -> "Schedule":
        """The step counts of this run, given the objective's steps per epoch of the training
        data (None for a stream); ConfigError if neither TRAIN_STEPS nor EPOCHS gives one."""
        num_steps = self.num_steps
        if not num_steps and self.num_epochs and steps_per_epoch:
            num_steps = int(math.ceil(self.num_epochs * steps_per_epoch))
        if not num_steps:
            raise ConfigError("the run has no length: set TRAIN_STEPS (train.num_steps), e.g. "
                              "--gin.TRAIN_STEPS=1000, or train.num_epochs (--gin.EPOCHS=3) for "
                              "objectives with epochs (fine-tuning).")
        warmup = self.warmup_steps
        if warmup is None:
            warmup = int(round((self.warmup_fraction or 0.0) * num_steps))
        eval_every = self.eval_every or steps_per_epoch or num_steps
        return Schedule(num_steps=num_steps, warmup_steps=warmup, eval_every=eval_every,
                        steps_per_epoch=steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The step counts a run derives from its RunConfig and its training data."""

    num_steps: int
    warmup_steps: int
    eval_every: int  # train.eval_every, or once per epoch when None (or num_steps for a stream)
    steps_per_epoch: int | None


_FIELDS = dataclasses.fields(RunConfig)

# The run-config macro of each RunConfig field that has one (for messages).
MACROS = {f.name: f.metadata["macro"] for f in _FIELDS if f.metadata["macro"]}

# Example values for the "pass --gin.NAME=..." hint of a missing required binding.
EXAMPLES = {f.name: f.metadata["example"] for f in _FIELDS if f.metadata["example"]}


def validate(config: RunConfig) -> None:
    """InvalidConfigError naming every field of the wrong type or range: the macro, the value,
    its type, what is expected and an example override."""
    problems = []
    for f in _FIELDS:
        check: Check | None = f.metadata["check"]
        value = getattr(config, f.name)
        if check is None or check.ok(value):
            continue
        macro = f.metadata["macro"]
        where = f"{macro} (train.{f.name})" if macro else f"train.{f.name}"
        example = f.metadata["example"] or check.example
        flag = f"--gin.{macro or 'train.' + f.name}={example}"
        problems.append(f"{where} = {value!r} ({type(value).__name__}) must be "
                        f"{check.description}; fix it in the run config or pass e.g. {flag}")
    if problems:
        raise InvalidConfigError("invalid run config (train.*): " + "; ".join(problems) + ".")
