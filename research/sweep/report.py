"""collect's text: results.md (status counts, a legend, the per-trial table, the seed-mean
table, a link to grid.png) and the CSV files, from the tables of `tables.py`."""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import pandas as pd

from research import storage
from research.sweep.plots import Grid
from research.sweep.results import SweepResults, TrialResult
from research.sweep.tables import Table
from research.sweep.values import as_float, fmt_duration, fmt_number, fmt_value


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


def trial_rows_md(sweep: SweepResults, table: Table) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the per-trial Markdown table."""
    headers = (["trial", *sweep.axes, "status", "steps", *table.metrics]
               + [f"best {m} @step" for m in table.best_metrics]
               + (["best ckpt"] if "best_ckpt_value" in table.fields else [])
               + ["tok/s", "wall", "commit", "config"])
    rows = []
    for r in table.frame.to_dict("records"):
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


def summary_rows_md(sweep: SweepResults, table: Table, summary: pd.DataFrame
                    ) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the aggregate Markdown table."""
    axes = sweep.group_axes
    headers = [*axes, "trials", "done", *[numeric_header(f) for f in table.numeric_fields]]
    rows = []
    for r in summary.to_dict("records"):
        cells = [fmt_value(r[table.axis_fields[a]]) for a in axes]
        cells += [str(r["trials"]), str(r["done"])]
        cells += [fmt_mean(r[f"{f}_mean"], r[f"{f}_std"], r[f"{f}_n"], numeric_formatter(f))
                  for f in table.numeric_fields]
        rows.append(cells)
    return headers, rows


def status_counts(trials: Sequence[TrialResult]) -> str:
    """'6 trials: 4 done, 1 failed, 1 pending' (done first, then by count)."""
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    order = sorted(counts, key=lambda s: (s != "done", -counts[s], s))
    parts = ", ".join(f"{counts[s]} {s}" for s in order)
    return f"{len(trials)} trial{'s' if len(trials) != 1 else ''}: {parts}"


def render_markdown(sweep: SweepResults, table: Table, summary: pd.DataFrame,
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
    parts = [f"# Sweep results: {storage.resolve(sweep.root)}", "", status_counts(sweep.trials),
             "", *legend, "", "## Trials", "", md_table(*trial_rows_md(sweep, table)), "",
             f"## Mean ± sample std (ddof=1) {over}", "",
             "Each cell averages the trials of the group that have the value; n = their "
             "number.", "", md_table(*summary_rows_md(sweep, table, summary)), ""]
    if grid is not None:
        what = f"the {grid.metric} mean {over}" if seeds else grid.metric
        parts += [f"Heatmap of {what} by {grid.row_label} (rows) × {grid.col_label} "
                  "(columns), best cell outlined: [grid.png](grid.png)", ""]
    return "\n".join(parts)


def render_csv(frame: pd.DataFrame, columns: Sequence[str]) -> str:
    """CSV text of `columns` of `frame` with a header row: strings as they are, numbers at
    full precision, blanks for None."""
    return frame[list(columns)].map(csv_value).to_csv(index=False, lineterminator="\n")
