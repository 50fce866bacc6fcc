"""Reads what `collect` reports from a sweep root: the trials ROOT/sweep.json lists (or, without
it, every subdirectory holding trial.json, metrics.jsonl or final.json; or ROOT itself when it
is such a workdir), each from its trial.json and research.train's run files (read through
`research.workdir`). ROOT may be local or on object storage (gs://...; research/storage.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import sys
from typing import Any, Iterable, Sequence

from research import storage, workdir
from research.errors import ConfigError
from research.sweep.trial_state import TRIAL_FILE, read_object
from research.sweep.values import as_float, as_int

MARKERS = (TRIAL_FILE, workdir.METRICS_FILE, workdir.FINAL_FILE)


class CollectError(ConfigError):
    """A problem with collect's command line or ROOT; the message names it and the fix."""


@dataclasses.dataclass
class TrialResult:
    """What collect reads from one trial directory."""
    name: str
    path: str
    params: dict[str, Any]
    status: str
    rows: list[dict[str, float]]   # metrics.jsonl by step: {"step": int, metric: float, ...}
    final: dict[str, float]        # final.json's numeric "metrics"
    step: int | None = None
    total_steps: int | None = None
    best_ckpt: dict[str, Any] | None = None
    wall_time_s: float | None = None
    git_commit: str | None = None
    config_hash: str | None = None


@dataclasses.dataclass
class SweepResults:
    """The trials of one sweep root, its varied axes (in order) and its seed axes."""
    root: str
    axes: list[str]
    seed_axes: list[str]
    trials: list[TrialResult]
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # short axis names (plot legend)

    @property
    def group_axes(self) -> list[str]:
        """The varied axes that are not seed axes: what the aggregate table groups by."""
        return [a for a in self.axes if a not in self.seed_axes]


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record, "step" left out."""
    out = {}
    for key, value in record.items():
        x = as_float(value)
        if key != "step" and x is not None:
            out[str(key)] = x
    return out


def metric_rows(trial_dir: str) -> list[dict[str, float]]:
    """Rows of DIR/metrics.jsonl sorted by step, each {"step": int, name: float, ...}.

    Lines that do not parse (a last line still being written) or have no integral step are
    skipped; when a step appears twice the later line wins; non-numeric values are dropped.
    """
    by_step: dict[int, dict[str, float]] = {}
    for record in workdir.read_metrics(trial_dir):
        step = as_int(record["step"])
        if step is not None:
            by_step[step] = {"step": step, **numeric_metrics(record)}
    return [by_step[s] for s in sorted(by_step)]


def config_hash(config_text: str | None) -> str | None:
    """First 12 hex digits of the sha256 of a config.gin's text with its comment lines dropped
    (lines whose first non-blank character is '#'), the kept lines joined by '\\n'; None for
    no config."""
    if config_text is None:
        return None
    kept = [line for line in config_text.splitlines() if not line.lstrip().startswith("#")]
    return hashlib.sha256("\n".join(kept).encode("utf-8")).hexdigest()[:12]


def steps_from_config(config_text: str | None) -> int | None:
    """TRAIN_STEPS (or train.num_steps) as an integer literal in an operative config.gin."""
    for pattern in (r"^\s*train\.num_steps\s*=\s*(\d+)\s*$", r"^\s*TRAIN_STEPS\s*=\s*(\d+)\s*$"):
        match = re.search(pattern, config_text or "", flags=re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def short_commit(info: dict[str, Any]) -> str | None:
    """trial.json's git commit, 7 hex digits, with '+' when the tree was dirty."""
    commit = info.get("git_commit")
    if not isinstance(commit, str) or not commit:
        return None
    return commit[:7] + ("+" if info.get("git_dirty") is True else "")


def trial_status(final: dict[str, Any] | None, info: dict[str, Any], has_rows: bool) -> str:
    """done iff final.json exists; else trial.json's status ('done' without final.json reads
    as 'incomplete'); else 'incomplete' when metrics were logged, 'pending' when nothing was."""
    if final is not None:
        return "done"
    status = info.get("status")
    if isinstance(status, str) and status and status != "done":
        return status
    return "incomplete" if has_rows or status == "done" else "pending"


def _total_steps(final: dict[str, Any], params: dict[str, Any], fixed: dict[str, Any],
                 config_text: str | None) -> int | None:
    """The run's length: final.json's num_steps, else TRAIN_STEPS of the trial's axes or of
    sweep.json's fixed bindings, else from config.gin."""
    for candidate in (final.get("num_steps"), params.get("TRAIN_STEPS"), fixed.get("TRAIN_STEPS")):
        if as_int(candidate) is not None:
            return as_int(candidate)
    return steps_from_config(config_text)


def read_trial(path: str, name: str, params: dict[str, Any], fixed: dict[str, Any]) -> TrialResult:
    """Reads one trial directory (which may not exist yet). `params` and `fixed` come from
    sweep.json; trial.json's params take precedence over `params`."""
    info = read_object(storage.join(path, TRIAL_FILE)) or {}
    final = workdir.read_final(path)
    final = final if isinstance(final, dict) else None
    rows = metric_rows(path)
    config_text = workdir.read_config(path)
    if isinstance(info.get("params"), dict):
        params = {**params, **info["params"]}
    trial = TrialResult(name=name, path=path, params=dict(params),
                        status=trial_status(final, info, bool(rows)), rows=rows, final={})
    if final is not None and isinstance(final.get("metrics"), dict):
        trial.final = numeric_metrics(final["metrics"])
    steps = [r["step"] for r in rows] + ([as_int(final.get("step"))] if final else [])
    steps = [s for s in steps if s is not None]
    trial.step = max(steps) if steps else None
    trial.total_steps = _total_steps(final or {}, params, fixed, config_text)
    best = (final or {}).get("best")
    if isinstance(best, dict) and as_float(best.get("value")) is not None:
        trial.best_ckpt = {"metric": str(best.get("metric", "")), "value": as_float(best["value"]),
                           "step": as_int(best.get("step"))}
    # Wall time counts finished attempts only: none yet (pending, first attempt running) is blank.
    wall = as_float(info.get("wall_time_s"))
    trial.wall_time_s = wall if wall or info.get("finished_at") else None
    trial.git_commit = short_commit(info)
    trial.config_hash = config_hash(config_text)
    return trial


def discover_dirs(root: str) -> list[str]:
    """Subdirectories of `root` (sorted) holding one of trial.json, metrics.jsonl, final.json."""
    names = []
    for entry in storage.listdir(root):
        path = storage.join(root, entry)
        if storage.isdir(path) and any(storage.exists(storage.join(path, m)) for m in MARKERS):
            names.append(entry)
    return names


def ordered_union(lists: Iterable[Iterable[str]]) -> list[str]:
    """The distinct items of several sequences, in order of first appearance."""
    out: dict[str, None] = {}
    for items in lists:
        out.update((item, None) for item in items)
    return list(out)


def _read_sweep_json(root: str) -> dict[str, Any] | None:
    """ROOT/sweep.json when it lists trials; None (with a note when it exists) otherwise."""
    spec = read_object(storage.join(root, "sweep.json"))
    if spec is not None and not isinstance(spec.get("trials"), list):
        print(f"collect: {storage.join(root, 'sweep.json')} has no trial list; looking for trial "
              "directories instead.", file=sys.stderr)
        return None
    return spec


def _read_trials(root: str, spec: dict[str, Any] | None) -> list[TrialResult]:
    """The trials sweep.json lists, else the trial subdirectories, else ROOT as one trial."""
    if spec is not None:
        fixed = spec.get("fixed") if isinstance(spec.get("fixed"), dict) else {}
        listed = [t for t in spec["trials"] if isinstance(t, dict) and t.get("name")]
        return [read_trial(storage.join(root, str(t["name"])), str(t["name"]),
                           t.get("params") if isinstance(t.get("params"), dict) else {}, fixed)
                for t in listed]
    dirs = discover_dirs(root)
    if dirs:
        return [read_trial(storage.join(root, d), d, {}, {}) for d in dirs]
    if any(storage.exists(storage.join(root, m)) for m in MARKERS):
        return [read_trial(root, storage.basename(root), {}, {})]
    return []


def load_sweep(root: str, seed_axes: Sequence[str] | None = None) -> SweepResults:
    """Reads every trial of the sweep at `root`. `seed_axes` overrides sweep.json's."""
    if not storage.isdir(root):
        raise CollectError(f"{root} is not a directory: pass the --root of a `python -m "
                           "research.sweep run` (or a directory of research.train workdirs).")
    spec = _read_sweep_json(root)
    trials = _read_trials(root, spec)
    if not trials:
        raise CollectError(f"{root} holds no trials (no sweep.json listing trials, and no "
                           "subdirectory with trial.json or metrics.jsonl): pass the --root of "
                           "a `python -m research.sweep run`, after running it.")
    axes = spec.get("axes") if spec is not None else None
    if not isinstance(axes, list):
        axes = ordered_union(t.params for t in trials)
    if seed_axes is None:
        seed_axes = (spec or {}).get("seed_axes", ["SEED"])
        seed_axes = seed_axes if isinstance(seed_axes, list) else ["SEED"]
    names = (spec or {}).get("names")
    names = {str(k): str(v) for k, v in names.items() if v} if isinstance(names, dict) else {}
    return SweepResults(root=root, axes=[str(a) for a in axes],
                        seed_axes=[str(a) for a in seed_axes], trials=trials, names=names)
