"""Collects a sweep's results into tables, a loss plot and (two axes) a heatmap.

  python -m research.sweep collect ROOT [--metrics=eval/accuracy,eval/loss]
      [--seed_axes=SEED] [--out=DIR] [--sort=COLUMN] [--grid_metric=NAME]

ROOT is the `--root` of `python -m research.sweep run`, local or on object storage (gs://...),
and so may --out be (plots are drawn to a temporary file, then uploaded). The trials are the
ones ROOT/sweep.json lists (its axis order and seed axes are used); without sweep.json, every
subdirectory holding trial.json, metrics.jsonl or final.json is a trial (a plain
`research.train` workdir gets a row named by its directory), and ROOT itself is the one trial
when it is such a workdir.

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
import os
import sys
import tempfile
from typing import Callable, Sequence

from research import cli, storage
from research.sweep.plots import grid_metric, heatmap_grid, plot_grid, plot_loss_curves
from research.sweep.report import render_csv, render_markdown
from research.sweep.results import load_sweep
from research.sweep.tables import aggregate, build_table, resolve_sort, sort_rows, summary_fields

PROG = "python -m research.sweep collect"


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
        table.frame = sort_rows(table.frame, field, descending)
        columns = summary_fields(sweep, table)
        if f"{field}_mean" in columns:
            summary = sort_rows(summary, f"{field}_mean", descending)
        elif field in columns:
            summary = sort_rows(summary, field, descending)
    missing = [m for m in table.metrics
               if m != "train/loss" and table.frame[m].map(lambda v: v is None).all()]
    if missing:
        print(f"collect: no trial has {', '.join(missing)}", file=sys.stderr)
    out = out or root
    storage.makedirs(out)
    markdown = render_markdown(sweep, table, summary, grid)
    files = {"results.md": markdown,
             "results.csv": render_csv(table.frame, table.fields),
             "results_summary.csv": render_csv(summary, summary_fields(sweep, table))}
    for name, text in files.items():
        if storage.is_remote(out):
            storage.write_text(storage.join(out, name), text)
        else:
            with open(os.path.join(out, name), "w", encoding="utf-8", newline="") as f:
                f.write(text)
    save_plot(out, "loss_curves.png", lambda path: plot_loss_curves(sweep, path))
    written = [*files, "loss_curves.png"]
    if grid is not None:
        save_plot(out, "grid.png", lambda path: plot_grid(
            grid, path, storage.basename(sweep.root) or sweep.root,
            [a for a in sweep.seed_axes if a in sweep.axes]))
        written.append("grid.png")
    return markdown, written


def save_plot(out: str, name: str, draw: Callable[[str], None]) -> None:
    """Calls draw(path) to save OUT/name: the path itself when OUT is local, else a temporary
    file that is then uploaded to OUT/name."""
    if not storage.is_remote(out):
        draw(os.path.join(out, name))
        return
    with tempfile.TemporaryDirectory(prefix="research-collect-") as tmp:
        local = os.path.join(tmp, name)
        draw(local)
        storage.upload(local, storage.join(out, name))


def split_list(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [item.strip() for item in text.split(",") if item.strip()]


def make_parser() -> argparse.ArgumentParser:
    """The collect command line."""
    parser = cli.ArgumentParser(prog=PROG, description=__doc__,
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


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m research.sweep collect DIR ...`: prints results.md, returns the exit status
    (2 with one `error:` line for a missing or empty DIR, an unusable --out or an unknown
    --sort or --grid_metric column: a CollectError; 1 when writing the files fails)."""
    args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.out is not None:
        storage.check_writable(args.out, "--out")
    try:
        markdown, written = collect_files(args.root, metrics=args.metrics,
                                          seed_axes=args.seed_axes, out=args.out,
                                          sort=args.sort, grid_metric_name=args.grid_metric)
    except OSError as e:
        print(f"error: {PROG}: {e}", file=sys.stderr)
        return 1
    print(markdown, end="")
    print(f"wrote {', '.join(written)} to {storage.resolve(args.out or args.root)}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
