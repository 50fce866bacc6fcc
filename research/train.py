"""Trains any gin-configured run: `python -m research.train --gin_file=... --workdir=DIR`.

Model configs live in configs/models/, run configs in configs/runs/; pass both (model first),
as in T5X. Re-running the same command with the same DIR resumes from its last checkpoint.

Example:
  python -m research.train \\
      --gin_file=configs/models/gpt_tiny.gin --gin_file=configs/runs/pretrain_causal.gin \\
      --gin.TRAIN_STEPS=200 --gin.MESH_SHAPE="{'data': 2, 'fsdp': 2, 'tensor': 2}" --workdir=/tmp/run

Writes DIR/config.gin (operative config), DIR/run.json, DIR/metrics.jsonl, DIR/checkpoints/
(Orbax) and DIR/tensorboard/; with --profile_steps=N:M also a jax.profiler trace of the steps
that take the step counter from N to M (metrics.jsonl steps N+1..M) in DIR/profile (view it
with `tensorboard --logdir DIR/profile`, profile plugin, or XProf; research/profiling.py).
SIGTERM/SIGINT save a checkpoint and exit 0 (re-run to resume); a second run on a DIR in use,
or with a different config, is refused. A mistake in the input (config, flags, data,
tokenizer, checkpoint, workdir) ends with one `error:` line and exit code 2; a run stopped to
protect its work (NaN/Inf loss, failed checkpoint save) with exit 1.

On Linux the process re-executes itself once with huge-page malloc
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1; ~1.6x faster CPU steps); RESEARCH_HUGEPAGES=0 turns
that off, RESEARCH_HUGEPAGES=keep also keeps freed memory in malloc's heap (CPU steps ~13%
faster again, peak memory up to 2x; research/training/hugepages.py). CPU runs also get
--xla_cpu_enable_concurrency_optimized_scheduler=false in XLA_FLAGS unless XLA_FLAGS names that
flag (less memory per step; research.config.prepare_cpu_xla_flags).
"""

from __future__ import annotations

import argparse
import sys

from research import cli, logs, profiling
from research import workdir as workdir_lib
from research.config import (add_common_flags, check_required, initialize_distributed, parse_gin,
                             prepare_backend_flags, split_gin_bindings)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    logs.setup()
    bindings, rest = split_gin_bindings(sys.argv[1:] if argv is None else argv)
    parser = cli.ArgumentParser(
        prog="python -m research.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Override any gin binding or macro with --gin.NAME=VALUE (VALUE a gin literal, "
               "strings quoted: --gin.TRAIN_DATA=\"'text:data/*.txt'\").")
    parser.add_argument("--workdir", required=True,
                        help="run directory: config.gin, metrics.jsonl, checkpoints/, tensorboard/")
    parser.add_argument("--profile_steps", type=profiling.parse_steps, default=None,
                        metavar="N:M",
                        help="jax.profiler trace of the steps N..M-1 (0-based: the M-N steps "
                             "after the first N, metrics.jsonl steps N+1..M) into DIR/profile")
    add_common_flags(parser)
    args = parser.parse_args(rest)
    cli.check_output_dir(args.workdir, "--workdir")
    initialize_distributed(args)
    # Imported after jax.distributed.initialize, and not at the top: `__main__` re-executes
    # the process (huge-page malloc) before main runs, so top-level jax imports would run twice.
    import jax

    from research.training.loop import train
    from research.training.run_config import RunConfig
    parse_gin(args.gin_file, bindings)
    prepare_backend_flags()
    check_required(RunConfig, "train", args.gin_file, bindings)  # before any compute
    metrics = train(args.workdir, profile_steps=args.profile_steps)
    if jax.process_index() == 0 and metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                          if k.endswith(("loss", "accuracy", "perplexity", "f1")))
        print(f"final: {shown} ({workdir_lib.path(args.workdir, workdir_lib.METRICS_FILE)})")
    return 0


if __name__ == "__main__":
    from research.training import hugepages
    hugepages.reexec_module("research.train")
    sys.exit(main())
