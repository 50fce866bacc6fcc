"""collect's tables, as pandas DataFrames: one row per trial (`build_table`), and one row per
group of non-seed axis values with the mean, sample std (ddof=1) and count of every numeric
column over the group's trials (`aggregate`); their columns, sorting and `mean_std`, which
tools/multi_seed.py shares.

Cells hold the raw values: None for a blank (a value the trial does not have), so that a NaN
a diverged trial logged still counts as a value (its group's mean is then NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from research.sweep.results import CollectError, SweepResults, TrialResult
from research.sweep.values import as_float

LOWER_IS_BETTER = ("loss", "perplexity", "error")
BASE_FIELDS = ("trial", "status", "step", "total_steps", "best_ckpt_metric", "best_ckpt_value",
               "best_ckpt_step", "tokens_per_sec", "wall_time_s", "git_commit", "config_hash")
STATS = ("mean", "std", "n")


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of `metric` are better (its name mentions loss/perplexity/error)."""
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def found_metrics(trials: Sequence[TrialResult]) -> list[str]:
    """Default metric columns: train/loss, then every eval/* metric logged by any trial."""
    names = set()
    for trial in trials:
        for row in trial.rows + [trial.final]:
            names.update(k for k in row if k.startswith("eval/"))
    return ["train/loss"] + sorted(names)


def final_value(trial: TrialResult, metric: str) -> float | None:
    """final.json's value of `metric`, else its last logged value."""
    if metric in trial.final:
        return trial.final[metric]
    for row in reversed(trial.rows):
        if metric in row:
            return row[metric]
    return None


def best_value(trial: TrialResult, metric: str) -> tuple[float | None, int | None]:
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


def tokens_per_sec(trial: TrialResult) -> float | None:
    """Mean train/tokens_per_sec over the logged rows after the first (compilation)."""
    values = [r["train/tokens_per_sec"] for r in trial.rows[1:] if "train/tokens_per_sec" in r]
    return float(np.mean(values)) if values else None


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample std with ddof=1 or None for fewer than two values, count): one column's
    seed statistics as `aggregate` reports them per group (tools/multi_seed.py's summary)."""
    if not values:
        return None, None, 0
    arr = np.asarray(values, dtype=np.float64)
    std = float(np.std(arr, ddof=1)) if len(arr) > 1 else None
    return float(np.mean(arr)), std, len(arr)


@dataclasses.dataclass
class Table:
    """The per-trial table and what its columns are."""
    fields: list[str]             # the columns, in results.csv order
    axis_fields: dict[str, str]   # axis name -> its column
    metrics: list[str]
    best_metrics: list[str]       # the eval/* metrics with best:/best_step: columns
    numeric_fields: list[str]     # the columns the aggregate table averages
    frame: pd.DataFrame           # one row per trial (sweep order), object cells, None = blank


def axis_field(axis: str) -> str:
    """The column of an axis: the axis name, unless it collides with a built-in column."""
    return f"axis:{axis}" if axis in BASE_FIELDS or axis.startswith(("best:", "best_step:")) \
        else axis


def _trial_record(trial: TrialResult, axes: dict[str, str], metrics: Sequence[str],
                  best_metrics: Sequence[str], has_ckpt: bool) -> dict[str, Any]:
    """One trial's row of the per-trial table."""
    record: dict[str, Any] = {"trial": trial.name, "status": trial.status, "step": trial.step,
                              "total_steps": trial.total_steps}
    record.update({field: trial.params.get(axis) for axis, field in axes.items()})
    record.update({m: final_value(trial, m) for m in metrics})
    for m in best_metrics:
        record[f"best:{m}"], record[f"best_step:{m}"] = best_value(trial, m)
    if has_ckpt:
        ckpt = trial.best_ckpt or {}
        record.update(best_ckpt_metric=ckpt.get("metric"), best_ckpt_value=ckpt.get("value"),
                      best_ckpt_step=ckpt.get("step"))
    record.update(tokens_per_sec=tokens_per_sec(trial), wall_time_s=trial.wall_time_s,
                  git_commit=trial.git_commit, config_hash=trial.config_hash)
    return record


def build_table(sweep: SweepResults, metrics: Sequence[str] | None = None) -> Table:
    """The per-trial table: one row (column -> raw value) per trial."""
    metrics = list(metrics) if metrics else found_metrics(sweep.trials)
    best_metrics = [m for m in metrics if m.startswith("eval/")]
    axis_fields = {a: axis_field(a) for a in sweep.axes}
    has_ckpt = any(t.best_ckpt for t in sweep.trials)
    ckpt = ["best_ckpt_metric", "best_ckpt_value", "best_ckpt_step"] if has_ckpt else []
    fields = (["trial", *axis_fields.values(), "status", "step", "total_steps", *metrics]
              + [f for m in best_metrics for f in (f"best:{m}", f"best_step:{m}")]
              + ckpt + ["tokens_per_sec", "wall_time_s", "git_commit", "config_hash"])
    numeric = (list(metrics) + [f"best:{m}" for m in best_metrics]
               + (["best_ckpt_value"] if has_ckpt else []) + ["tokens_per_sec", "wall_time_s"])
    records = [_trial_record(t, axis_fields, metrics, best_metrics, has_ckpt)
               for t in sweep.trials]
    frame = pd.DataFrame(records, columns=fields, dtype=object)
    return Table(fields, axis_fields, metrics, best_metrics, numeric, frame)


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


def json_key(value: Any) -> str:
    """An axis value as hashable text (values may be lists or dicts): its JSON."""
    return json.dumps(value, sort_keys=True, default=str)


def group_key(params: dict[str, Any], axes: Sequence[str]) -> tuple:
    """A hashable key of a trial's values on `axes`."""
    return tuple(json_key(params.get(a)) for a in axes)


def summary_fields(sweep: SweepResults, table: Table) -> list[str]:
    """The columns of results_summary.csv."""
    return ([table.axis_fields[a] for a in sweep.group_axes] + ["trials", "done"]
            + [f"{f}_{s}" for f in table.numeric_fields for s in STATS])


def aggregate(sweep: SweepResults, table: Table) -> pd.DataFrame:
    """One row per group of non-seed axis values (sorted by them): the axis values, `trials`,
    `done`, and for each numeric column `<column>_mean`, `<column>_std`, `<column>_n` over the
    group's trials that have a value (None for no value; std None for fewer than two)."""
    frame = table.frame
    axis_columns = [table.axis_fields[a] for a in sweep.group_axes]
    keys = [frame[c].map(json_key) for c in axis_columns] or [pd.Series(0, index=frame.index)]
    numeric = frame[table.numeric_fields]
    present = numeric.map(lambda v: v is not None)
    values = numeric.astype(np.float64)                      # None -> NaN
    logged_nan = (present & values.isna()).groupby(keys, sort=False).any()

    def stat(name: str, valid: pd.DataFrame) -> pd.DataFrame:
        """`name` ('mean', or 'std' with ddof=1) of each group's values: NaN where a member
        logged NaN, None where not `valid`."""
        out = getattr(values.groupby(keys, sort=False), name)().mask(logged_nan, np.nan)
        return out.astype(object).where(valid, None).add_suffix(f"_{name}")

    n = present.groupby(keys, sort=False).sum()
    groups = frame.groupby(keys, sort=False)
    summary = pd.concat([
        groups.head(1)[axis_columns].set_axis(n.index),
        groups.size().rename("trials"),
        (frame["status"] == "done").groupby(keys, sort=False).sum().rename("done"),
        stat("mean", n > 0), stat("std", n > 1), n.add_suffix("_n"),
    ], axis=1)
    summary = summary[summary_fields(sweep, table)].astype(object).reset_index(drop=True)
    if not axis_columns:
        return summary
    return summary.sort_values(axis_columns, key=lambda c: c.map(value_key), kind="stable",
                               ignore_index=True)


def resolve_sort(column: str, table: Table) -> tuple[str, bool]:
    """(column name, descending) for a --sort value; raises CollectError for unknown columns."""
    descending = column.startswith("-")
    name = column[1:] if descending else column
    if name not in table.fields and name in table.axis_fields:
        name = table.axis_fields[name]
    if name not in table.fields:
        raise CollectError(f"--sort={column}: no such column; use one of "
                           f"{', '.join(table.fields)} (a leading '-' sorts descending).")
    return name, descending


def sort_rows(frame: pd.DataFrame, column: str, descending: bool) -> pd.DataFrame:
    """`frame` sorted by `column` (stable); blanks stay last in either direction."""
    blank = frame[column].map(lambda v: v is None or v == "")
    ordered = frame[~blank].sort_values(column, key=lambda c: c.map(value_key),
                                        ascending=not descending, kind="stable")
    return pd.concat([ordered, frame[blank]], ignore_index=True)
