"""A Markdown table of `python -m research.benchmark` results, one row per run.

  python -m research.benchmark_table DIR NAME [NAME ...]

Reads DIR/NAME.json (the JSON line a benchmark run prints last, as experiments/gpu_benchmark.sh
saves it) for each NAME and prints: our step time, tokens/s, MFU and peak memory, then each peer
(`--compare`) as step time, MFU and our speed-up over it. A run that failed (no JSON) gets a row
saying so.
"""

from __future__ import annotations

import json
import os
import sys

PEERS = ("hf_torch", "hf_torch_compile")
PEER_TITLES = {"hf_torch": "HF eager", "hf_torch_compile": "HF + torch.compile"}


def load(directory: str, name: str) -> dict | None:
    """The result DIR/NAME.json, None when missing or empty (the run failed)."""
    path = os.path.join(directory, f"{name}.json")
    try:
        with open(path) as f:
            text = f.read().strip()
        return json.loads(text) if text else None
    except (OSError, json.JSONDecodeError):
        return None


def row(name: str, result: dict | None) -> str:
    """One Markdown row for a run (see the module docstring)."""
    if result is None:
        return f"| {name} | failed (see its .log) |" + " |" * (3 + len(PEERS))
    dropout = result.get("dropout_rate")
    drop = f", dropout {dropout:g}/{result.get('attention_dropout_rate', 0):g}" if dropout is not None else ""
    cells = [f"{name}, B{result['batch_size']} x {result['seq_len']}{drop}",
             f"{result['step_time_s'] * 1e3:.1f} ms", f"{result['tokens_per_sec'] / 1e3:.1f}k",
             f"{100 * result['mfu']:.1f}%", f"{result['peak_memory_bytes'] / 2 ** 30:.1f} GiB"]
    peers = result.get("peers", {})
    for peer in PEERS:
        p = peers.get(peer)
        if p is None:
            cells.append("-")
            continue
        mfu = f", MFU {100 * p['mfu']:.1f}%" if p.get("mfu") is not None else ""
        cells.append(f"{p['step_time_s'] * 1e3:.1f} ms{mfu} (ours {p['ratio_tokens_per_sec']:.2f}x)")
    return "| " + " | ".join(cells) + " |"


def table(directory: str, names: list[str]) -> str:
    """The Markdown table (header, rows) for the named runs in `directory`."""
    results = {name: load(directory, name) for name in names}
    first = next((r for r in results.values() if r), None)
    device = f"{first['devices']} x {first['device_kind']}, {first['dtype']}" if first else "?"
    head = ["run", "ours: step", "tokens/s", "MFU", "peak memory"]
    head += [PEER_TITLES[p] for p in PEERS]
    lines = [f"Device: {device}. Median step of the timed steps; MFU against the peak of the "
             "compute dtype.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [row(name, results[name]) for name in names]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print("usage: python -m research.benchmark_table DIR NAME [NAME ...]", file=sys.stderr)
        return 2
    print(table(args[0], args[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
