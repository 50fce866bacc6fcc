#!/usr/bin/env python
"""Runs one training command under several seeds and reports mean ± std of its eval metrics.

  python tools/multi_seed.py --seeds=0,1,2 --workdir=workdirs/rt_sweep -- \\
      --gin_file=configs/models/bert_mini.gin --gin_file=configs/runs/finetune_classification.gin \\
      --gin.INIT_CHECKPOINT="'workdirs/bert_mini'"

Each seed trains into WORKDIR/seed_<s> with --gin.SEED=<s> (a rerun resumes or skips finished
seeds, as research.train does). The reported value of a metric is the one at the best
checkpoint when the run keeps one (train.best_metric), else at the last eval. Writes
WORKDIR/summary.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np


def final_eval_metrics(workdir: str) -> dict[str, float]:
    """Eval metrics at the best step (DIR/best/best.json) or the last logged eval."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evals:
        raise RuntimeError(f"{workdir}/metrics.jsonl has no eval metrics; set EVAL_DATA.")
    chosen = evals[-1]
    best = os.path.join(workdir, "best", "best.json")
    if os.path.exists(best):
        with open(best, encoding="utf-8") as f:
            step = json.load(f)["step"]
        chosen = next((r for r in evals if r["step"] == step), chosen)
    return {k: v for k, v in chosen.items() if k.startswith("eval/")} | {"step": chosen["step"]}


def summarize(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    names = sorted(set.intersection(*(set(m) for m in per_seed.values())) - {"step"})
    out = {}
    for name in names:
        values = np.array([per_seed[s][name] for s in sorted(per_seed)], dtype=np.float64)
        out[name] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "values": values.tolist()}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: multi_seed.py --seeds=0,1,2 --workdir=DIR -- <research.train args>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--workdir", required=True, help="one sub-directory per seed goes here")
    args = parser.parse_args(argv[:split])
    train_args = argv[split + 1:]
    if any(a.startswith("--workdir") or a.startswith("--gin.SEED") for a in train_args):
        raise SystemExit("leave --workdir and --gin.SEED to multi_seed.py")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    per_seed = {}
    for seed in seeds:
        workdir = os.path.join(args.workdir, f"seed_{seed}")
        cmd = [sys.executable, "-m", "research.train", *train_args, f"--gin.SEED={seed}",
               f"--workdir={workdir}"]
        print(f"== seed {seed}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        per_seed[seed] = final_eval_metrics(workdir)
    summary = summarize(per_seed)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"seeds": seeds, "per_seed": per_seed, "summary": summary}, f, indent=2)
    print(f"\n{'metric':<24} {'mean ± std':>20}   over seeds {seeds}")
    for name, s in summary.items():
        print(f"{name:<24} {s['mean']:>10.4f} ± {s['std']:<8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
