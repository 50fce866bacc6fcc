"""`python -m research.sweep status ROOT`: one line per trial (status, attempts, exit code,
a failed trial's reason, e.g. `hang` (trial_state.failure_reason), time, step), read from
ROOT/sweep.json, trial.json and the run files (local or on object storage); starts nothing."""

from __future__ import annotations

import sys
from typing import IO

from research import storage, workdir
from research.sweep.spec import SweepError
from research.sweep.trial_state import STATUS_ORDER, effective_status, read_object, read_state
from research.sweep.values import fmt_duration


def last_step(trial_dir: str) -> str:
    """'step/num_steps' from final.json, else the last metrics.jsonl step, else ''."""
    final = workdir.read_final(trial_dir)
    if isinstance(final, dict) and "step" in final:
        return f"{final['step']}/{final.get('num_steps', final['step'])}"
    records = workdir.read_metrics(trial_dir)
    return str(records[-1]["step"]) if records else ""


def status_table(root: str) -> tuple[list[list[str]], dict[str, int]]:
    """Rows (trial, status, attempts, returncode, reason, wall time, step) and counts per
    status."""
    info = read_object(storage.join(root, "sweep.json"))
    if info is None or "trials" not in info:
        raise SweepError(f"no sweep.json in {root}; give the --root of a `python -m research.sweep "
                         "run`.")
    rows, counts = [], {}
    for entry in info["trials"]:
        tdir = storage.join(root, entry["name"])
        state = read_state(tdir)
        status, updates, _ = effective_status(tdir, state, query_slurm=False)
        merged = {**(state or {}), **updates}
        counts[status] = counts.get(status, 0) + 1
        rc = merged.get("returncode")
        wall = merged.get("wall_time_s")
        rows.append([entry["name"], status, str(merged.get("attempts", 0)),
                     "" if rc is None else str(rc),
                     (merged.get("reason") or "") if status == "failed" else "",
                     fmt_duration(wall) if wall else "",
                     last_step(tdir)])
    return rows, counts


def print_status(root: str, out: IO[str] | None = None) -> int:
    """`python -m research.sweep status DIR`: one line per trial."""
    out = out or sys.stdout
    root = storage.resolve(root)
    rows, counts = status_table(root)
    header = ["trial", "status", "attempts", "rc", "reason", "time", "step"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if counts.get(s)]
    print(f"\n{len(rows)} trials: {', '.join(parts)}", file=out)
    return 0
