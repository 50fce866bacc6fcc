"""What a sweep is, before it is expanded into trials: `SweepSpec`, one `Trial`, and the
`SweepError` every mistake in a sweep's input raises.

A sweep file binds parameters of one configurable, `sweep` (read with gin's own parser in the
sweep process by `sweep_file.py`; nothing is registered in the training configurables):

    sweep.gin_files = ['configs/models/gpt_tiny.gin', 'configs/runs/pretrain_causal.gin']
    sweep.fixed = {'TRAIN_STEPS': 300}                     # passed to every trial
    sweep.grid = {'LEARNING_RATE': [1e-3, 3e-3], 'WARMUP_STEPS': [0, 30]}      # product
    sweep.zip = {'pos': ['learned', 'rotary'],
                 'TransformerConfig.position': ['learned', 'rotary']}          # zipped
    sweep.random = {'SEED': ('int_uniform', 0, 1000)}     # drawn num_samples times
    sweep.num_samples = 2
    sweep.random_seed = 0
    sweep.names = {'LEARNING_RATE': 'lr', 'TransformerConfig.position': ''}
    sweep.seed_axes = ['SEED']

Trials are grid product x zip rows x random samples (`expansion.py`). A name with a '.'
(configurable.param) or an UPPERCASE macro name becomes `--gin.NAME=<gin literal>` for
research.train, `gin_file` adds `--gin_file=VALUE`, and any other name is a label (names the
trial only). String values may hold `{AXIS}` / `{root}` templates, filled per trial.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Iterable

from research.errors import ConfigError

# The parameters of `sweep` a sweep file may bind.
PARAMS = ("gin_files", "fixed", "grid", "zip", "random", "num_samples", "random_seed", "names",
          "seed_axes")
# Random-axis distributions and their number of arguments.
DISTRIBUTIONS = {"log_uniform": 2, "uniform": 2, "int_uniform": 2, "choice": 1}
MACRO_RE = re.compile(r"[A-Z][A-Z0-9_]*")


class SweepError(ConfigError):
    """A sweep specification problem (file, flags, root); the message names it and the fix."""


def suggest(name: str, options: Iterable[str]) -> str:
    """' Did you mean X?' for the closest of `options`, or ''."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def kind_of(name: str) -> str:
    """'gin_file', 'binding' (configurable.param or UPPERCASE macro), or 'label'."""
    if name == "gin_file":
        return "gin_file"
    if "." in name or MACRO_RE.fullmatch(name):
        return "binding"
    return "label"


@dataclasses.dataclass
class SweepSpec:
    """Everything that defines a sweep, before expansion."""
    sweep_file: str | None = None
    gin_files: list[str] = dataclasses.field(default_factory=list)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    grid: dict[str, list] = dataclasses.field(default_factory=dict)
    zip: dict[str, list] = dataclasses.field(default_factory=dict)
    random: dict[str, tuple] = dataclasses.field(default_factory=dict)
    num_samples: int | None = None
    random_seed: int = 0
    names: dict[str, str] = dataclasses.field(default_factory=dict)
    seed_axes: list[str] = dataclasses.field(default_factory=lambda: ["SEED"])

    def axes(self) -> list[str]:
        """Swept names in naming order: grid, zip, random."""
        return [*self.grid, *self.zip, *self.random]

    def short_name(self, axis: str) -> str:
        """The axis's name inside trial names ('' = left out)."""
        if axis in self.names:
            return self.names[axis]
        return axis.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One point of the sweep: its name, axis values and what research.train gets."""
    name: str
    params: dict[str, Any]
    gin_files: tuple[str, ...]
    bindings: tuple[tuple[str, str], ...]  # (NAME, gin literal)

    def train_args(self, workdir: str) -> list[str]:
        """research.train's arguments for this trial (after `python -m research.train`)."""
        return ([f"--gin_file={f}" for f in self.gin_files]
                + [f"--gin.{name}={literal}" for name, literal in self.bindings]
                + [f"--workdir={workdir}"])
