"""Collects a sweep's results into tables, a loss plot and (two axes) a heatmap.

  python -m research.sweep collect ROOT [--metrics=eval/accuracy,eval/loss]
      [--seed_axes=SEED] [--out=DIR] [--sort=COLUMN] [--grid_metric=NAME]

ROOT is the `--root` of `python -m research.sweep run`. The trials are the ones ROOT/sweep.json
lists (its axis order and seed axes are used); without sweep.json, every subdirectory holding
trial.json, metrics.jsonl or final.json is a trial (a plain `research.train` workdir gets a row
named by its directory), and ROOT itself is the one trial when it is such a workdir.

Writes, under --out (default ROOT):
  results.md           per-trial table, then means over the seed axes, as Markdown (also printed)
  results.csv          per-trial rows, raw numbers, one column per field
  results_summary.csv  one row per group of non-seed axis values: <field>_mean/_std/_n columns
  loss_curves.png      train/loss (and eval/loss, when logged) against step, one line per
                       trial, one color per group
  grid.png             only when exactly two non-seed axes vary: a heatmap of one metric's
                       seed mean, rows = the first axis's values, columns = the second's,
                       each cell annotated `mean` (`±std` when n>1), the best cell outlined,
                       missing cells grey; linked from results.md

Per trial: the varied axis values (trial.json "params"); status (done iff final.json exists,
else trial.json's status; `incomplete` for metrics without final.json and no runner status,
`pending` for nothing at all); the last logged step out of TRAIN_STEPS; the final value of each
metric (final.json "metrics", else the last logged value); for each eval/* metric the best
logged value and its step (min for names containing loss/perplexity/error, max otherwise);
final.json's best-checkpoint record; mean train/tokens_per_sec over the logged rows after the
first (which includes compilation); trial.json's wall time and git commit (short, `+` when
dirty); and the first 12 hex digits of the sha256 of config.gin without its comment lines.

Means are over the trials of a group that have the value, with the sample standard deviation
(ddof=1). Unreadable lines (a line cut short by a running or killed trial), non-numeric values
and missing files are skipped. `--sort=COLUMN` sorts both tables by a results.csv column (a
metric name means its final value; a leading `-` sorts descending; blanks go last).
`--grid_metric=NAME` picks grid.png's metric (any averaged column: a metric, `best:<metric>`,
tokens_per_sec); by default eval/loss when it is a column, else the first eval/* column, else
train/loss. Best is the minimum for loss/perplexity/error metrics, the maximum otherwise.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import numpy as np

PROG = "python -m research.sweep collect"
MARKERS = ("trial.json", "metrics.jsonl", "final.json")
LOWER_IS_BETTER = ("loss", "perplexity", "error")
BASE_FIELDS = ("trial", "status", "step", "total_steps", "best_ckpt_metric", "best_ckpt_value",
               "best_ckpt_step", "tokens_per_sec", "wall_time_s", "git_commit", "config_hash")


class CollectError(Exception):
    """A problem with the command line or ROOT, reported as one line with exit status 2."""


@dataclasses.dataclass
class Trial:
    """What collect reads from one trial directory."""
    name: str
    path: str
    params: dict[str, Any]
    status: str
    rows: list[dict[str, float]]
    final: dict[str, float]
    step: int | None = None
    total_steps: int | None = None
    best_ckpt: dict[str, Any] | None = None
    wall_time_s: float | None = None
    git_commit: str | None = None
    config_hash: str | None = None


@dataclasses.dataclass
class Sweep:
    """The trials of one sweep root, its varied axes (in order) and its seed axes."""
    root: str
    axes: list[str]
    seed_axes: list[str]
    trials: list[Trial]
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # short axis names (plot legend)

    @property
    def group_axes(self) -> list[str]:
        """The varied axes that are not seed axes: what the aggregate table groups by."""
        return [a for a in self.axes if a not in self.seed_axes]


# ----------------------------------------------------------------------------- reading


def as_float(value: Any) -> float | None:
    """`value` as a float if it is a number (or a numeric string), else None. Booleans are not."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def as_int(value: Any) -> int | None:
    """`value` as an int if it is an integral number (or such a numeric string), else None."""
    x = as_float(value)
    if x is None or not math.isfinite(x) or not x.is_integer():
        return None
    return int(x)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def numeric_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics record, "step" left out."""
    out = {}
    for key, value in record.items():
        x = as_float(value)
        if key != "step" and x is not None:
            out[str(key)] = x
    return out


def read_metrics(path: str) -> list[dict[str, float]]:
    """Rows of metrics.jsonl sorted by step, each {"step": int, name: float, ...}.

    Lines that do not parse (a last line still being written) or have no integral step are
    skipped; when a step appears twice the later line wins; non-numeric values are dropped.
    """
    by_step: dict[int, dict[str, float]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        step = as_int(record.get("step"))
        if step is None:
            continue
        by_step[step] = {"step": step, **numeric_metrics(record)}
    return [by_step[s] for s in sorted(by_step)]


def config_hash(path: str) -> str | None:
    """First 12 hex digits of the sha256 of a config.gin with its comment lines dropped
    (lines whose first non-blank character is '#'), the kept lines joined by '\\n'."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    kept = [line for line in lines if not line.lstrip().startswith("#")]
    return hashlib.sha256("\n".join(kept).encode("utf-8")).hexdigest()[:12]


def steps_from_config(path: str) -> int | None:
    """TRAIN_STEPS (or train.num_steps) as an integer literal in an operative config.gin."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    for pattern in (r"^\s*train\.num_steps\s*=\s*(\d+)\s*$", r"^\s*TRAIN_STEPS\s*=\s*(\d+)\s*$"):
        match = re.search(pattern, text, flags=re.MULTILINE)
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


def read_trial(path: str, name: str, params: dict[str, Any], fixed: dict[str, Any]) -> Trial:
    """Reads one trial directory (which may not exist yet). `params` and `fixed` come from
    sweep.json; trial.json's params take precedence over `params`."""
    info = read_json(os.path.join(path, "trial.json")) or {}
    final = read_json(os.path.join(path, "final.json"))
    rows = read_metrics(os.path.join(path, "metrics.jsonl"))
    if isinstance(info.get("params"), dict):
        params = {**params, **info["params"]}
    trial = Trial(name=name, path=path, params=dict(params),
                  status=trial_status(final, info, bool(rows)), rows=rows, final={})
    if final is not None and isinstance(final.get("metrics"), dict):
        trial.final = numeric_metrics(final["metrics"])
    steps = [r["step"] for r in rows] + ([as_int(final.get("step"))] if final else [])
    steps = [s for s in steps if s is not None]
    trial.step = max(steps) if steps else None
    config = os.path.join(path, "config.gin")
    for candidate in ((final or {}).get("num_steps"), params.get("TRAIN_STEPS"),
                      fixed.get("TRAIN_STEPS")):
        if as_int(candidate) is not None:
            trial.total_steps = as_int(candidate)
            break
    else:
        trial.total_steps = steps_from_config(config)
    best = (final or {}).get("best")
    if isinstance(best, dict) and as_float(best.get("value")) is not None:
        trial.best_ckpt = {"metric": str(best.get("metric", "")), "value": as_float(best["value"]),
                           "step": as_int(best.get("step"))}
    # Wall time counts finished attempts only: none yet (pending, first attempt running) is blank.
    wall = as_float(info.get("wall_time_s"))
    trial.wall_time_s = wall if wall or info.get("finished_at") else None
    trial.git_commit = short_commit(info)
    trial.config_hash = config_hash(config)
    return trial


def discover_dirs(root: str) -> list[str]:
    """Subdirectories of `root` (sorted) holding one of trial.json, metrics.jsonl, final.json."""
    names = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in MARKERS):
            names.append(entry)
    return names


def ordered_union(lists: Iterable[Iterable[str]]) -> list[str]:
    """The distinct items of several sequences, in order of first appearance."""
    out: dict[str, None] = {}
    for items in lists:
        out.update((item, None) for item in items)
    return list(out)


def load_sweep(root: str, seed_axes: Sequence[str] | None = None) -> Sweep:
    """Reads every trial of the sweep at `root`. `seed_axes` overrides sweep.json's."""
    if not os.path.isdir(root):
        raise CollectError(f"{root} is not a directory: pass the --root of a `python -m "
                           "research.sweep run` (or a directory of research.train workdirs).")
    spec = read_json(os.path.join(root, "sweep.json"))
    if spec is not None and not isinstance(spec.get("trials"), list):
        print(f"collect: {os.path.join(root, 'sweep.json')} has no trial list; looking for trial "
              "directories instead.", file=sys.stderr)
        spec = None
    fixed = (spec or {}).get("fixed")
    fixed = fixed if isinstance(fixed, dict) else {}
    if spec is not None:
        listed = [t for t in spec["trials"] if isinstance(t, dict) and t.get("name")]
        trials = [read_trial(os.path.join(root, str(t["name"])), str(t["name"]),
                             t.get("params") if isinstance(t.get("params"), dict) else {}, fixed)
                  for t in listed]
    elif discover_dirs(root):
        trials = [read_trial(os.path.join(root, d), d, {}, {}) for d in discover_dirs(root)]
    elif any(os.path.exists(os.path.join(root, m)) for m in MARKERS):
        name = os.path.basename(os.path.abspath(root))
        trials = [read_trial(root, name, {}, {})]
    else:
        trials = []
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
    return Sweep(root=root, axes=[str(a) for a in axes], seed_axes=[str(a) for a in seed_axes],
                 trials=trials, names=names)


# ----------------------------------------------------------------------------- tables


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of `metric` are better (its name mentions loss/perplexity/error)."""
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def found_metrics(trials: Sequence[Trial]) -> list[str]:
    """Default metric columns: train/loss, then every eval/* metric logged by any trial."""
    names = set()
    for trial in trials:
        for row in trial.rows + [trial.final]:
            names.update(k for k in row if k.startswith("eval/"))
    return ["train/loss"] + sorted(names)


def final_value(trial: Trial, metric: str) -> float | None:
    """final.json's value of `metric`, else its last logged value."""
    if metric in trial.final:
        return trial.final[metric]
    for row in reversed(trial.rows):
        if metric in row:
            return row[metric]
    return None


def best_value(trial: Trial, metric: str) -> tuple[float | None, int | None]:
    """The best finite logged value of `metric` and its step (the first step on ties)."""
    best, best_step = None, None
    lower = lower_is_better(metric)
    for row in trial.rows:
        x = row.get(metric)
        if x is None or not math.isfinite(x):
            continue
        if best is None or (x < best if lower else x > best):
            best, best_step = x, int(row["step"])
    return best, best_step


def tokens_per_sec(trial: Trial) -> float | None:
    """Mean train/tokens_per_sec over the logged rows after the first (compilation)."""
    values = [r["train/tokens_per_sec"] for r in trial.rows[1:] if "train/tokens_per_sec" in r]
    return float(np.mean(values)) if values else None


@dataclasses.dataclass
class Table:
    """Per-trial records and the fields (CSV columns) that describe them."""
    fields: list[str]
    axis_fields: dict[str, str]   # axis name -> its field name
    metrics: list[str]
    best_metrics: list[str]
    numeric_fields: list[str]     # the fields the aggregate table averages
    records: list[dict[str, Any]]


def axis_field(axis: str) -> str:
    """The field name of an axis: the axis name, unless it collides with a built-in field."""
    return f"axis:{axis}" if axis in BASE_FIELDS or axis.startswith(("best:", "best_step:")) \
        else axis


def build_table(sweep: Sweep, metrics: Sequence[str] | None = None) -> Table:
    """One record (field -> raw value) per trial."""
    metrics = list(metrics) if metrics else found_metrics(sweep.trials)
    best_metrics = [m for m in metrics if m.startswith("eval/")]
    axis_fields = {a: axis_field(a) for a in sweep.axes}
    has_ckpt = any(t.best_ckpt for t in sweep.trials)
    fields = (["trial", *axis_fields.values(), "status", "step", "total_steps", *metrics]
              + [f for m in best_metrics for f in (f"best:{m}", f"best_step:{m}")]
              + (["best_ckpt_metric", "best_ckpt_value", "best_ckpt_step"] if has_ckpt else [])
              + ["tokens_per_sec", "wall_time_s", "git_commit", "config_hash"])
    numeric = (list(metrics) + [f"best:{m}" for m in best_metrics]
               + (["best_ckpt_value"] if has_ckpt else []) + ["tokens_per_sec", "wall_time_s"])
    records = []
    for trial in sweep.trials:
        record: dict[str, Any] = {"trial": trial.name, "status": trial.status, "step": trial.step,
                                  "total_steps": trial.total_steps}
        record.update({axis_fields[a]: trial.params.get(a) for a in sweep.axes})
        record.update({m: final_value(trial, m) for m in metrics})
        for m in best_metrics:
            record[f"best:{m}"], record[f"best_step:{m}"] = best_value(trial, m)
        if has_ckpt:
            ckpt = trial.best_ckpt or {}
            record.update(best_ckpt_metric=ckpt.get("metric"), best_ckpt_value=ckpt.get("value"),
                          best_ckpt_step=ckpt.get("step"))
        record.update(tokens_per_sec=tokens_per_sec(trial), wall_time_s=trial.wall_time_s,
                      git_commit=trial.git_commit, config_hash=trial.config_hash)
        records.append(record)
    return Table(fields, axis_fields, metrics, best_metrics, numeric, records)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample std with ddof=1 or None for fewer than two values, count)."""
    if not values:
        return None, None, 0
    arr = np.asarray(values, dtype=np.float64)
    std = float(np.std(arr, ddof=1)) if len(arr) > 1 else None
    return float(np.mean(arr)), std, len(arr)


def value_key(value: Any) -> tuple:
    """A sort key that orders numbers numerically, then strings, then other values; None last."""
    if value is None or value == "":
        return (3, 0, "")
    x = as_float(value) if not isinstance(value, str) else None
    if x is not None:
        return (0, x if not math.isnan(x) else math.inf, "")
    if isinstance(value, str):
        return (1, 0, value)
    return (2, 0, json.dumps(value, sort_keys=True, default=str))


def group_key(params: dict[str, Any], axes: Sequence[str]) -> tuple:
    """A hashable key of a trial's values on `axes`."""
    return tuple(json.dumps(params.get(a), sort_keys=True, default=str) for a in axes)


def aggregate(sweep: Sweep, table: Table) -> list[dict[str, Any]]:
    """One record per group of non-seed axis values: the axis values, `trials`, `done`, and
    for each numeric field `<field>_mean`, `<field>_std`, `<field>_n` over the trials that
    have it. Sorted by the axis values."""
    axes = sweep.group_axes
    groups: dict[tuple, list[int]] = {}
    for i, trial in enumerate(sweep.trials):
        groups.setdefault(group_key(trial.params, axes), []).append(i)
    out = []
    for members in groups.values():
        params = sweep.trials[members[0]].params
        record: dict[str, Any] = {table.axis_fields[a]: params.get(a) for a in axes}
        record["trials"] = len(members)
        record["done"] = sum(sweep.trials[i].status == "done" for i in members)
        for field in table.numeric_fields:
            values = [table.records[i][field] for i in members
                      if table.records[i][field] is not None]
            record[f"{field}_mean"], record[f"{field}_std"], record[f"{field}_n"] = \
                mean_std(values)
        out.append(record)
    out.sort(key=lambda r: tuple(value_key(r[table.axis_fields[a]]) for a in axes))
    return out


def summary_fields(sweep: Sweep, table: Table) -> list[str]:
    """The columns of results_summary.csv."""
    return ([table.axis_fields[a] for a in sweep.group_axes] + ["trials", "done"]
            + [f"{f}_{s}" for f in table.numeric_fields for s in ("mean", "std", "n")])


def resolve_sort(column: str, table: Table) -> tuple[str, bool]:
    """(field name, descending) for a --sort value; raises CollectError for unknown columns."""
    descending = column.startswith("-")
    name = column[1:] if descending else column
    if name not in table.fields and name in table.axis_fields:
        name = table.axis_fields[name]
    if name not in table.fields:
        raise CollectError(f"--sort={column}: no such column; use one of "
                           f"{', '.join(table.fields)} (a leading '-' sorts descending).")
    return name, descending


def sort_records(records: list[dict[str, Any]], field: str, descending: bool) -> None:
    """Sorts records in place by `field`; blanks stay last in either direction."""
    present = [r for r in records if r.get(field) not in (None, "")]
    missing = [r for r in records if r.get(field) in (None, "")]
    present.sort(key=lambda r: value_key(r[field]), reverse=descending)
    records[:] = present + missing


# ----------------------------------------------------------------------------- formatting


def fmt_number(x: Any, digits: int = 4) -> str:
    """A compact rendering: integers as such, large values without exponent, else %.{digits}g."""
    if x is None:
        return ""
    if isinstance(x, int) and not isinstance(x, bool):
        return str(x)
    x = as_float(x)
    if x is None:
        return ""
    if not math.isfinite(x):
        return str(x)
    if 1e4 <= abs(x) < 1e15:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def fmt_duration(seconds: Any) -> str:
    """Seconds as '42s', '3m07s' or '2h05m'."""
    x = as_float(seconds)
    if x is None:
        return ""
    if not math.isfinite(x):
        return str(x)
    s = int(round(abs(x)))
    sign = "-" if x < 0 else ""
    if s < 60:
        return f"{sign}{x:.3g}s" if abs(x) < 10 else f"{sign}{s}s"
    if s < 3600:
        return f"{sign}{s // 60}m{s % 60:02d}s"
    return f"{sign}{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_value(value: Any) -> str:
    """An axis value or text for a Markdown cell."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return fmt_number(value) if isinstance(value, int) else f"{value:.4g}"
    return json.dumps(value, default=str)


def fmt_mean(mean: float | None, std: float | None, n: int,
             fmt: Callable[[Any], str] = fmt_number) -> str:
    """`mean ± std (n=K)`, or the value alone for a single trial, or blank for none."""
    if n == 0 or mean is None:
        return ""
    if n == 1 or std is None:
        return fmt(mean)
    spread = fmt(std) if fmt is not fmt_number else fmt_number(std, 2)
    return f"{fmt(mean)} ± {spread} (n={n})"


def csv_value(value: Any) -> str:
    """A raw CSV cell: strings as they are, numbers at full precision, blanks for None."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, default=str)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table ('|' in cells escaped)."""
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ")
                                 for c in cells) + " |"
    return "\n".join([line(headers), line(["---"] * len(headers))] + [line(r) for r in rows])


def numeric_formatter(field: str) -> Callable[[Any], str]:
    """How a numeric field is shown in Markdown."""
    if field == "wall_time_s":
        return fmt_duration
    if field == "tokens_per_sec":
        return lambda x: "" if x is None else f"{as_float(x):.0f}"
    return fmt_number


def numeric_header(field: str) -> str:
    """The Markdown header of a numeric field."""
    return {"tokens_per_sec": "tok/s", "wall_time_s": "wall", "best_ckpt_value": "best ckpt"
            }.get(field, field.replace("best:", "best ", 1))


def trial_rows_md(sweep: Sweep, table: Table) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the per-trial Markdown table."""
    headers = (["trial", *sweep.axes, "status", "steps", *table.metrics]
               + [f"best {m} @step" for m in table.best_metrics]
               + (["best ckpt"] if "best_ckpt_value" in table.fields else [])
               + ["tok/s", "wall", "commit", "config"])
    rows = []
    for r in table.records:
        steps = "" if r["step"] is None and r["total_steps"] is None else \
            f"{'' if r['step'] is None else r['step']}/{r['total_steps'] or '?'}"
        best = [f"{fmt_number(r[f'best:{m}'])} @{r[f'best_step:{m}']}"
                if r[f"best:{m}"] is not None else "" for m in table.best_metrics]
        ckpt = []
        if "best_ckpt_value" in table.fields:
            ckpt = [f"{r['best_ckpt_metric']} {fmt_number(r['best_ckpt_value'])} "
                    f"@{r['best_ckpt_step']}" if r["best_ckpt_value"] is not None else ""]
        rows.append([r["trial"], *[fmt_value(r[table.axis_fields[a]]) for a in sweep.axes],
                     r["status"], steps, *[fmt_number(r[m]) for m in table.metrics], *best,
                     *ckpt, numeric_formatter("tokens_per_sec")(r["tokens_per_sec"]),
                     fmt_duration(r["wall_time_s"]), r["git_commit"] or "",
                     r["config_hash"] or ""])
    return headers, rows


def summary_rows_md(sweep: Sweep, table: Table, summary: Sequence[dict[str, Any]]
                    ) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the aggregate Markdown table."""
    axes = sweep.group_axes
    headers = [*axes, "trials", "done", *[numeric_header(f) for f in table.numeric_fields]]
    rows = []
    for r in summary:
        cells = [fmt_value(r[table.axis_fields[a]]) for a in axes]
        cells += [str(r["trials"]), str(r["done"])]
        cells += [fmt_mean(r[f"{f}_mean"], r[f"{f}_std"], r[f"{f}_n"], numeric_formatter(f))
                  for f in table.numeric_fields]
        rows.append(cells)
    return headers, rows


def status_counts(trials: Sequence[Trial]) -> str:
    """'6 trials: 4 done, 1 failed, 1 pending' (done first, then by count)."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    order = sorted(counts, key=lambda s: (s != "done", -counts[s], s))
    parts = ", ".join(f"{counts[s]} {s}" for s in order)
    return f"{len(trials)} trial{'s' if len(trials) != 1 else ''}: {parts}"


def render_markdown(sweep: Sweep, table: Table, summary: Sequence[dict[str, Any]],
                    grid: Grid | None = None) -> str:
    """results.md: heading, status counts, legend, per-trial table, aggregate table, and a
    line linking grid.png when `grid` is given."""
    seeds = [a for a in sweep.seed_axes if a in sweep.axes]
    legend = [
        "Columns: **steps** last logged step / TRAIN_STEPS; "
        f"**{'**, **'.join(table.metrics)}** final values (final.json, else the last logged "
        "value)"
        + ("; **best M @step** best logged value of eval metric M (min for loss/perplexity/"
           "error, max otherwise) and its step" if table.best_metrics else "")
        + ("; **best ckpt** final.json's best-checkpoint metric, value and step"
           if "best_ckpt_value" in table.fields else "")
        + "; **tok/s** mean train/tokens_per_sec over logged rows after the first (compile); "
        "**wall** wall time summed over attempts; **commit** git commit (+ = uncommitted "
        "changes); **config** sha256[:12] of config.gin without comment lines.",
        "Status: done = final.json written; failed = nonzero exit; interrupted = stopped "
        "before TRAIN_STEPS (re-run to resume); incomplete = metrics but no final.json; "
        "pending = not started.",
    ]
    over = f"over {', '.join(seeds)}" if seeds else "(no seed axis varied: groups by all axes)"
    parts = [f"# Sweep results: {os.path.abspath(sweep.root)}", "", status_counts(sweep.trials),
             "", *legend, "", "## Trials", "", md_table(*trial_rows_md(sweep, table)), "",
             f"## Mean ± sample std (ddof=1) {over}", "",
             "Each cell averages the trials of the group that have the value; n = their "
             "number.", "", md_table(*summary_rows_md(sweep, table, summary)), ""]
    if grid is not None:
        what = f"the {grid.metric} mean {over}" if seeds else grid.metric
        parts += [f"Heatmap of {what} by {grid.row_label} (rows) × {grid.col_label} "
                  "(columns), best cell outlined: [grid.png](grid.png)", ""]
    return "\n".join(parts)


def render_csv(fields: Sequence[str], records: Iterable[dict[str, Any]]) -> str:
    """CSV text with a header row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    for r in records:
        writer.writerow([csv_value(r.get(f)) for f in fields])
    return buf.getvalue()


# ----------------------------------------------------------------------------- plot


def group_label(params: dict[str, Any], axes: Sequence[str],
                names: dict[str, str] | None = None) -> str:
    """'lr=0.001,WARMUP_STEPS=30' for a group (axes by their short sweep names when given), or
    'all trials' with no grouping axes."""
    names = names or {}
    return (",".join(f"{names.get(a, a)}={fmt_value(params.get(a))}" for a in axes)
            or "all trials")


def plot_loss_curves(sweep: Sweep, path: str) -> None:
    """loss_curves.png: train/loss against step (and eval/loss when any trial logged it), one
    line per trial, the trials of a group sharing a color, legend by group. Headless: draws on
    a matplotlib Figure with the Agg canvas, never through pyplot or a GUI backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    panels = ["train/loss"]
    if any("eval/loss" in r for t in sweep.trials for r in t.rows):
        panels.append("eval/loss")
    fig = Figure(figsize=(6.5 * len(panels), 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    groups: dict[tuple, list[Trial]] = {}
    for t in sweep.trials:
        groups.setdefault(group_key(t.params, sweep.group_axes), []).append(t)
    order = sorted(groups, key=lambda k: tuple(value_key(groups[k][0].params.get(a))
                                               for a in sweep.group_axes))
    cmap = colormaps["tab10" if len(order) <= 10 else "tab20"]
    drawn = False
    for ax, metric in zip(axes, panels):
        labelled: set[tuple] = set()
        for i, key in enumerate(order):
            for t in groups[key]:
                points = [(r["step"], r[metric]) for r in t.rows if metric in r]
                if not points:
                    continue
                label = group_label(t.params, sweep.group_axes, sweep.names) if key not in labelled else None
                labelled.add(key)
                ax.plot(*zip(*points), color=cmap(i % cmap.N), label=label, linewidth=1.2,
                        marker="." if len(points) < 3 else None)
                drawn = True
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
        if labelled:
            ax.legend(fontsize="small" if len(labelled) <= 10 else "x-small")
    if not drawn:
        axes[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.suptitle(os.path.basename(os.path.abspath(sweep.root)) or sweep.root)
    fig.savefig(path)


# ----------------------------------------------------------------------------- grid


@dataclasses.dataclass
class Grid:
    """grid.png's numbers: one metric's seed statistics over the two non-seed axes."""
    metric: str
    row_axis: str
    col_axis: str
    row_label: str               # the axes' short sweep names when given
    col_label: str
    row_values: list[Any]        # sorted like the aggregate table
    col_values: list[Any]
    mean: np.ndarray             # [rows, cols]; NaN where no trial of the cell has the value
    std: np.ndarray              # NaN where n < 2
    n: np.ndarray                # int
    best: tuple[int, int] | None  # (row, col) of the best mean (min if lower_is_better)


def grid_metric(table: Table, requested: str | None = None) -> str:
    """grid.png's metric: `requested` (a column the aggregate table averages; raises
    CollectError otherwise), else eval/loss when selected, else the first selected eval/*
    metric, else train/loss (else the first selected metric)."""
    if requested:
        if requested in table.numeric_fields:
            return requested
        raise CollectError(f"--grid_metric={requested}: not an averaged column; use one of "
                           f"{', '.join(table.numeric_fields)}.")
    evals = [m for m in table.metrics if m.startswith("eval/")]
    if "eval/loss" in evals:
        return "eval/loss"
    if evals:
        return evals[0]
    return "train/loss" if "train/loss" in table.metrics or not table.metrics \
        else table.metrics[0]


def heatmap_grid(sweep: Sweep, table: Table, summary: Sequence[dict[str, Any]],
                 metric: str) -> Grid | None:
    """The heatmap of `metric`'s `_mean`/`_std`/`_n` in the aggregate records `summary`, or
    None unless exactly two non-seed axes vary. Rows are the first axis's distinct values,
    columns the second's, each sorted by value_key; a combination without a group, or whose
    trials all lack the value, is NaN."""
    if len(sweep.group_axes) != 2:
        return None
    row_axis, col_axis = sweep.group_axes
    fields = (table.axis_fields[row_axis], table.axis_fields[col_axis])

    def key(value: Any) -> str:  # axis values may be lists or dicts: compare them as JSON
        return json.dumps(value, sort_keys=True, default=str)

    def distinct(field: str) -> list[Any]:
        return sorted({key(r[field]): r[field] for r in summary}.values(), key=value_key)

    rows, cols = distinct(fields[0]), distinct(fields[1])
    index = [{key(v): i for i, v in enumerate(values)} for values in (rows, cols)]
    mean = np.full((len(rows), len(cols)), np.nan)
    std = np.full_like(mean, np.nan)
    n = np.zeros(mean.shape, dtype=int)
    for r in summary:
        i, j = (idx[key(r[f])] for idx, f in zip(index, fields))
        if r.get(f"{metric}_n") and r[f"{metric}_mean"] is not None:
            mean[i, j] = r[f"{metric}_mean"]
            n[i, j] = r[f"{metric}_n"]
            if r[f"{metric}_std"] is not None:
                std[i, j] = r[f"{metric}_std"]
    best = None
    finite = np.isfinite(mean)
    if finite.any():
        score = np.where(finite, mean if lower_is_better(metric) else -mean, np.inf)
        best = tuple(int(k) for k in np.unravel_index(np.argmin(score), score.shape))
    return Grid(metric=metric, row_axis=row_axis, col_axis=col_axis,
                row_label=sweep.names.get(row_axis, row_axis),
                col_label=sweep.names.get(col_axis, col_axis),
                row_values=rows, col_values=cols, mean=mean, std=std, n=n, best=best)


def plot_grid(grid: Grid, path: str, title: str = "", seeds: Sequence[str] = ()) -> None:
    """grid.png: the heatmap of `grid` (better is brighter: viridis, reversed for
    lower-is-better metrics), each cell annotated with its mean (and ±std when n>1), a
    colorbar, the best cell outlined in red, missing cells grey. Headless, like
    plot_loss_curves."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    nrows, ncols = grid.mean.shape
    fig = Figure(figsize=(max(5.0, 2.6 + 1.3 * ncols), max(3.5, 1.7 + 0.8 * nrows)), dpi=100,
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lower = lower_is_better(grid.metric)
    cmap = colormaps["viridis_r" if lower else "viridis"].with_extremes(bad="#d0d0d0")
    finite = grid.mean[np.isfinite(grid.mean)]
    norm = Normalize(float(finite.min()), float(finite.max())) if finite.size \
        else Normalize(0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid.mean), cmap=cmap, norm=norm, aspect="auto")
    fontsize = 9 if ncols <= 6 else 7
    for i in range(nrows):
        for j in range(ncols):
            x = grid.mean[i, j]
            if not math.isfinite(x):
                if grid.n[i, j]:  # a diverged trial's nan/inf: grey, but say so
                    ax.text(j, i, str(float(x)), ha="center", va="center", fontsize=fontsize)
                continue
            text = fmt_number(float(x))
            if grid.n[i, j] > 1 and math.isfinite(grid.std[i, j]):
                text += f"\n±{fmt_number(float(grid.std[i, j]), 2)}"
            r, g, b, _ = cmap(norm(x))
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
    if grid.best is not None:
        i, j = grid.best
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red",
                               linewidth=3))
    if not finite.size:
        ax.text(0.5, 0.5, "no values yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(range(ncols), [fmt_value(v) for v in grid.col_values])
    ax.set_yticks(range(nrows), [fmt_value(v) for v in grid.row_values])
    ax.set_xlabel(grid.col_label)
    ax.set_ylabel(grid.row_label)
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, label=grid.metric)
    over = f"mean over {', '.join(seeds)}" if seeds else "one trial per cell"
    ax.set_title(f"{title}{chr(10) if title else ''}{grid.metric}, {over} "
                 f"({'min' if lower else 'max'} outlined)", fontsize="medium")
    fig.savefig(path)


# ----------------------------------------------------------------------------- CLI


def collect(root: str, *, metrics: Sequence[str] | None = None,
            seed_axes: Sequence[str] | None = None, out: str | None = None,
            sort: str | None = None, grid_metric_name: str | None = None) -> str:
    """Reads the sweep at `root`, writes results.md, results.csv, results_summary.csv,
    loss_curves.png and (with exactly two non-seed axes) grid.png under `out` (default
    `root`) and returns the Markdown."""
    return collect_files(root, metrics=metrics, seed_axes=seed_axes, out=out, sort=sort,
                         grid_metric_name=grid_metric_name)[0]


def collect_files(root: str, *, metrics: Sequence[str] | None = None,
                  seed_axes: Sequence[str] | None = None, out: str | None = None,
                  sort: str | None = None, grid_metric_name: str | None = None
                  ) -> tuple[str, list[str]]:
    """collect(), also returning the names of the files it wrote."""
    sweep = load_sweep(root, seed_axes)
    table = build_table(sweep, metrics)
    summary = aggregate(sweep, table)
    grid = heatmap_grid(sweep, table, summary, grid_metric(table, grid_metric_name))
    if sort:
        field, descending = resolve_sort(sort, table)
        sort_records(table.records, field, descending)
        if f"{field}_mean" in summary_fields(sweep, table):
            sort_records(summary, f"{field}_mean", descending)
        elif field in summary_fields(sweep, table):
            sort_records(summary, field, descending)
    missing = [m for m in table.metrics
               if all(r[m] is None for r in table.records) and m != "train/loss"]
    if missing:
        print(f"collect: no trial has {', '.join(missing)}", file=sys.stderr)
    out = out or root
    os.makedirs(out, exist_ok=True)
    markdown = render_markdown(sweep, table, summary, grid)
    files = {"results.md": markdown,
             "results.csv": render_csv(table.fields, table.records),
             "results_summary.csv": render_csv(summary_fields(sweep, table), summary)}
    for name, text in files.items():
        with open(os.path.join(out, name), "w", encoding="utf-8", newline="") as f:
            f.write(text)
    plot_loss_curves(sweep, os.path.join(out, "loss_curves.png"))
    written = [*files, "loss_curves.png"]
    if grid is not None:
        plot_grid(grid, os.path.join(out, "grid.png"),
                  os.path.basename(os.path.abspath(sweep.root)) or sweep.root,
                  [a for a in sweep.seed_axes if a in sweep.axes])
        written.append("grid.png")
    return markdown, written


def split_list(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def make_parser() -> argparse.ArgumentParser:
    """The collect command line."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", metavar="DIR", help="the sweep root (run's --root)")
    parser.add_argument("--metrics", type=split_list, default=None,
                        help="comma-separated metric columns (default: train/loss and every "
                             "eval/* metric found)")
    parser.add_argument("--seed_axes", type=split_list, default=None,
                        help="comma-separated axes to average over (default: sweep.json's "
                             "seed_axes, else SEED; empty for none)")
    parser.add_argument("--out", default=None, help="output directory (default: DIR)")
    parser.add_argument("--sort", default=None,
                        help="a results.csv column to sort by (a metric name = its final "
                             "value); a leading '-' sorts descending: --sort=-eval/accuracy")
    parser.add_argument("--grid_metric", default=None, metavar="NAME",
                        help="grid.png's metric, with exactly two non-seed axes (default: "
                             "eval/loss, else the first eval/* column, else train/loss)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m research.sweep collect DIR ...`: prints results.md, returns the exit status
    (2 with a one-line message for a missing or empty DIR or an unknown --sort or
    --grid_metric column)."""
    args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        markdown, written = collect_files(args.root, metrics=args.metrics,
                                          seed_axes=args.seed_axes, out=args.out,
                                          sort=args.sort, grid_metric_name=args.grid_metric)
    except CollectError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    print(markdown, end="")
    print(f"wrote {', '.join(written)} to {os.path.abspath(args.out or args.root)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
