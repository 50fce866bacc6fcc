"""collect's figures, drawn headless on a matplotlib Figure with the Agg canvas (never through
pyplot or a GUI backend): loss_curves.png (train/loss and eval/loss against step, one line per
trial, one color per group) and, when exactly two non-seed axes vary, grid.png (a heatmap of
one metric's seed mean over the two axes), with the numbers behind it (`Grid`).

matplotlib is imported inside the drawing functions: `python -m research.sweep run` imports
this module through `collect` and never draws.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from research import storage
from research.sweep.results import CollectError, SweepResults, TrialResult
from research.sweep.tables import Table, group_key, json_key, lower_is_better, value_key
from research.sweep.values import fmt_number, fmt_value


def group_label(params: dict[str, Any], axes: Sequence[str],
                names: dict[str, str] | None = None) -> str:
    """'lr=0.001,WARMUP_STEPS=30' for a group (axes by their short sweep names when given), or
    'all trials' with no grouping axes."""
    names = names or {}
    return (",".join(f"{names.get(a, a)}={fmt_value(params.get(a))}" for a in axes)
            or "all trials")


def plot_loss_curves(sweep: SweepResults, path: str) -> None:
    """loss_curves.png: train/loss against step (and eval/loss when any trial logged it), one
    line per trial, the trials of a group sharing a color, legend by group. Headless: draws on
    a matplotlib Figure with the Agg canvas, never through pyplot or a GUI backend."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = ["train/loss"]
    if any("eval/loss" in r for t in sweep.trials for r in t.rows):
        panels.append("eval/loss")
    fig = Figure(figsize=(6.5 * len(panels), 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, len(panels), i + 1) for i in range(len(panels))]
    groups: dict[tuple, list[TrialResult]] = {}
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
    fig.suptitle(storage.basename(sweep.root) or sweep.root)
    fig.savefig(path)


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


def heatmap_grid(sweep: SweepResults, table: Table, summary: pd.DataFrame,
                 metric: str) -> Grid | None:
    """The heatmap of `metric`'s `_mean`/`_std`/`_n` in the aggregate table `summary`, or
    None unless exactly two non-seed axes vary. Rows are the first axis's distinct values,
    columns the second's, each sorted by value_key; a combination without a group, or whose
    trials all lack the value, is NaN."""
    if len(sweep.group_axes) != 2:
        return None
    row_axis, col_axis = sweep.group_axes
    fields = (table.axis_fields[row_axis], table.axis_fields[col_axis])
    # Axis values may be lists or dicts: pivot on their JSON text.
    cells = summary.assign(_row=summary[fields[0]].map(json_key),
                           _col=summary[fields[1]].map(json_key))

    def distinct(field: str) -> list[Any]:
        return sorted(dict(zip(cells[field].map(json_key), cells[field])).values(), key=value_key)

    rows, cols = distinct(fields[0]), distinct(fields[1])

    def matrix(stat: str) -> np.ndarray:
        """[rows, cols] of the `metric` statistic `stat`; NaN for a blank or missing cell."""
        return (cells.pivot(index="_row", columns="_col", values=f"{metric}_{stat}")
                .reindex(index=[json_key(v) for v in rows], columns=[json_key(v) for v in cols])
                .astype(np.float64).to_numpy())

    mean, std = matrix("mean"), matrix("std")
    n = np.nan_to_num(matrix("n"), nan=0.0).astype(int)
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
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
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
