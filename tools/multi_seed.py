#!/usr/bin/env python
"""Runs one training command under several seeds and reports mean ± std of its eval metrics.

  python tools/multi_seed.py --seeds=0,1,2 --workdir=workdirs/rt_sweep -- \\
      --gin_file=configs/models/bert_mini.gin --gin_file=configs/runs/finetune_classification.gin \\
      --gin.INIT_CHECKPOINT="'workdirs/bert_mini'"

Each seed trains into WORKDIR/seed_<s> with --gin.SEED=<s> (a rerun resumes or skips finished
seeds, as research.train does). The reported value of a metric is the one at the best
checkpoint when the run keeps one (train.best_metric), else at the last eval. Writes
WORKDIR/summary.json and prints a table. For a grid of settings x seeds with tables and plots,
use `python -m research.sweep` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from research import cli, workdir
from research.errors import ConfigError
from research.sweep.tables import mean_std


def final_eval_metrics(run_dir: str) -> dict[str, float]:
    """Eval metrics at the best checkpoint's step (final.json "best") or the last logged eval,
    with their "step"."""
    evals = [r for r in workdir.read_metrics(run_dir) if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise ConfigError(f"{workdir.path(run_dir, workdir.METRICS_FILE)} has no eval metrics; "
                          "set EVAL_DATA (and train.eval_every) in the training arguments.")
    chosen = evals[-1]
    best = (workdir.read_final(run_dir) or {}).get("best")
    if isinstance(best, dict):
        chosen = next((r for r in evals if r["step"] == best.get("step")), chosen)
    return {k: v for k, v in chosen.items() if k.startswith("eval/")} | {"step": chosen["step"]}


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std" (ddof=1; 0.0 for one seed), "values"}} over the metrics every
    seed has."""
    names = sorted(set.intersection(*(set(m) for m in per_seed.values())) - {"step"})
    out = {}
    for name in names:
        values = [float(per_seed[s][name]) for s in sorted(per_seed)]
        mean, std, _ = mean_std(values)
        out[name] = {"mean": mean, "std": std if std is not None else 0.0, "values": values}
    return out


def parse_args(argv: list[str]) -> tuple[list[int], str, list[str]]:
    """(seeds, workdir, research.train arguments) from `--seeds=.. --workdir=.. -- ARGS`."""
    if "--" not in argv:
        raise ConfigError("usage: multi_seed.py --seeds=0,1,2 --workdir=DIR -- <research.train "
                          "args>; put the training arguments after `--`.")
    split = argv.index("--")
    parser = cli.ArgumentParser(description=__doc__, prog="tools/multi_seed.py",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--workdir", required=True, help="one sub-directory per seed goes here")
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]
    if any(a.startswith("--workdir") or a.startswith("--gin.SEED") for a in train_args):
        raise ConfigError("leave --workdir and --gin.SEED to multi_seed.py (it sets them per "
                          "seed); remove them from the training arguments.")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds={args.seeds}: give comma-separated integers, e.g. "
                          "--seeds=0,1,2.") from None
    return seeds, args.workdir, train_args


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    """Trains every seed (stopping at the first that fails), then writes and prints the summary."""
    seeds, root, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    per_seed = {}
    for seed in seeds:
        run_dir = os.path.join(root, f"seed_{seed}")
        cmd = [sys.executable, "-m", "research.train", *train_args, f"--gin.SEED={seed}",
               f"--workdir={run_dir}"]
        print(f"== seed {seed}: {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"multi_seed.py: seed {seed} failed (exit code {rc}); see its output above.",
                  file=sys.stderr)
            return rc
        per_seed[seed] = final_eval_metrics(run_dir)
    summary = summarize(per_seed)
    os.makedirs(root, exist_ok=True)
    workdir.write_text(os.path.join(root, "summary.json"), json.dumps(
        {"seeds": seeds, "per_seed": per_seed, "summary": summary}, indent=2))
    print(f"\n{'metric':<24} {'mean ± std':>20}   over seeds {seeds}")
    for name, s in summary.items():
        print(f"{name:<24} {s['mean']:>10.4f} ± {s['std']:<8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
