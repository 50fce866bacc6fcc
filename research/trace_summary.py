"""Where the device time of a profiled run went: a table of kernels from a `jax.profiler` trace.

  python -m research.trace_summary DIR [--top 25]

DIR is a directory that `--profile_steps` (research.train, research.benchmark) or any
`jax.profiler.start_trace` wrote; the newest `*.trace.json.gz` under it is read. Events on the
accelerators' streams (processes named `/device:...`) are summed by kernel name and by kind
(matmul, attention, collective, copy, fusion); on a CPU-only trace the XLA client threads'
events are used instead. The same trace opens in TensorBoard's profile plugin or in Perfetto
(ui.perfetto.dev) for the timeline.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys

# Kernel-name patterns of each kind, first match wins (cuBLAS/cuDNN/XLA/TPU names).
KINDS = (
    ("attention", r"fmha|sdpa|flash|splash|cudnn.*attn|attention"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|matmul|convolution|\bdot\b|dot_"),
    ("collective", r"all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|nccl|collective"),
    ("copy", r"memcpy|memset|copy|transpose"),
    ("fusion", r"fusion|triton|loop_|input_|reduce"),
)


def kind_of(name: str) -> str:
    """The kind of a kernel by its name (see KINDS), 'other' if none matches."""
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def newest_trace(directory: str) -> str:
    """Path of the newest *.trace.json.gz under `directory` (FileNotFoundError if none)."""
    found = [os.path.join(root, f) for root, _, files in os.walk(directory) for f in files
             if f.endswith(".trace.json.gz")]
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {directory}")
    return max(found, key=os.path.getmtime)


def kernel_times(path: str) -> tuple[dict[str, float], str]:
    """({kernel name: total microseconds}, where the events came from) of one trace file."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device_pids = {pid for pid, name in procs.items() if name.startswith("/device:")}
    if device_pids:
        keep = lambda e: e["pid"] in device_pids  # noqa: E731
        source = ", ".join(sorted(procs[p] for p in device_pids))
    else:  # CPU: the XLA client's worker threads run the ops
        keep = lambda e: "XLA" in threads.get((e["pid"], e.get("tid")), "")  # noqa: E731
        source = "XLA CPU client threads"
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and keep(e) and not e["name"].startswith("end: "):
            totals[e["name"]] += float(e.get("dur", 0.0))
    return dict(totals), source


def summary(totals: dict[str, float], top: int = 25) -> str:
    """Markdown: time by kind, then the `top` kernels by total time."""
    total = sum(totals.values()) or 1.0
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, us in totals.items():
        by_kind[kind_of(name)] += us
    lines = [f"device time {total / 1e3:.2f} ms in {len(totals)} kernels", "",
             "| kind | ms | % |", "|---|---|---|"]
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {us / 1e3:.2f} | {100 * us / total:.1f} |")
    lines += ["", "| kernel | kind | ms | % |", "|---|---|---|---|"]
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| {short} | {kind_of(name)} | {us / 1e3:.2f} | {100 * us / total:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.trace_summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="a profile directory (e.g. WORKDIR/profile)")
    parser.add_argument("--top", type=int, default=25, help="kernels to list")
    args = parser.parse_args(argv)
    try:
        path = newest_trace(args.directory)
    except FileNotFoundError as e:
        print(f"error: {e}; pass the directory a --profile_steps run wrote", file=sys.stderr)
        return 2
    totals, source = kernel_times(path)
    print(f"trace: {path} ({source})")
    print(summary(totals, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
