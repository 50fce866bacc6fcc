"""The loss curve of one run: `python -m research.plots DIR` draws train/loss and eval/loss
against step from DIR/metrics.jsonl into DIR/loss.png (or --out FILE) and prints one line
saying where it went and how the loss moved.

Drawn headless on a matplotlib Figure with the Agg canvas (never through pyplot or a GUI
backend), like the sweep's figures (research/sweep/plots.py). Metrics are read only through
research.workdir.read_metrics.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from research import cli, workdir
from research.errors import ConfigError

LOSS_METRICS = ("train/loss", "eval/loss")
PNG_NAME = "loss.png"


@dataclasses.dataclass(frozen=True)
class Series:
    """One plotted line: the values of `metric` at the logged steps that have it."""
    metric: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


def metric_series(rows: Sequence[dict[str, Any]],
                  metrics: Sequence[str] = LOSS_METRICS) -> list[Series]:
    """The series of each of `metrics` that appears in `rows` (metrics.jsonl records, in
    order); a metric no row logged is left out."""
    out = []
    for metric in metrics:
        points = [(int(r["step"]), float(r[metric])) for r in rows if metric in r]
        if points:
            steps, values = zip(*points)
            out.append(Series(metric, steps, values))
    return out


def plot_series(series: Sequence[Series], path: str, title: str = "") -> Figure:
    """Draws `series` on one axes (loss against step; a marker per point when a series has
    few), writes a PNG to `path` and returns the figure (one axes, one line per series)."""
    fig = Figure(figsize=(6.5, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for s in series:
        ax.plot(s.steps, s.values, label=s.metric, linewidth=1.5,
                marker="o" if len(s.steps) < 20 else None, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_title(title)
    fig.savefig(path)
    return fig


def write_loss_png(run_dir: str, path: str | None = None) -> tuple[str, list[Series]]:
    """Draws the loss curves of the run in `run_dir` (DIR/metrics.jsonl) into `path`
    (default DIR/loss.png); returns (the PNG's path, the series drawn). ConfigError if the
    run has logged no metrics."""
    rows = workdir.read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir} has no metrics.jsonl records to plot; pass the "
                          "--workdir of a run that has logged at least one step.")
    path = path or os.path.join(run_dir, PNG_NAME)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"cannot write {path}: its folder does not exist; create it or pass "
                          "another --out.")
    series = metric_series(rows)
    plot_series(series, path, title=os.path.basename(os.path.abspath(run_dir)))
    return path, series


def describe(series: Sequence[Series]) -> str:
    """'train/loss 9.012 (step 20) -> 5.431 (step 200); eval/loss ...' for one console line."""
    def fmt(x: float) -> str:
        return f"{x:.3f}" if math.isfinite(x) else str(x)

    def span(s: Series) -> str:
        last = f"{fmt(s.values[-1])} (step {s.steps[-1]})"
        return last if len(s.steps) == 1 else f"{fmt(s.values[0])} (step {s.steps[0]}) -> {last}"

    return "; ".join(f"{s.metric} {span(s)}" for s in series)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m research.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a training run's --workdir (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help=f"the PNG to write (default DIR/{PNG_NAME})")
    args = parser.parse_args(argv)
    path, series = write_loss_png(args.workdir, args.out)
    print(f"loss curve: {path} ({describe(series) or 'no loss metrics logged'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
