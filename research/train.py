"""Trains any gin-configured run: `python -m research.train --gin_file=... --workdir=DIR`.

Model configs live in configs/models/, run configs in configs/runs/; pass both (model first),
as in T5X. Re-running the same command with the same DIR resumes from its last checkpoint.

Example:
  python -m research.train \\
      --gin_file=configs/models/gpt_tiny.gin --gin_file=configs/runs/pretrain_causal.gin \\
      --gin.TRAIN_STEPS=200 --gin.MESH_SHAPE="{'data': 2, 'fsdp': 2, 'tensor': 2}" --workdir=/tmp/run

Writes DIR/config.gin (operative config), DIR/run.json, DIR/metrics.jsonl, DIR/checkpoints/
(Orbax) and DIR/tensorboard/. SIGTERM/SIGINT save a checkpoint and exit 0 (re-run to resume);
a second run on a DIR in use, or with a different config, is refused (exit 1).

On Linux the process re-executes itself once with huge-page malloc
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1; ~1.6x faster CPU steps); RESEARCH_HUGEPAGES=0 turns
that off (research/hugepages.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from research.config import (add_common_flags, check_required, initialize_distributed, parse_gin,
                             split_gin_bindings)


def main(argv: list[str] | None = None) -> int:
    bindings, rest = split_gin_bindings(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m research.train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Override any gin binding or macro with --gin.NAME=VALUE (VALUE a gin literal, "
               "strings quoted: --gin.TRAIN_DATA=\"'text:data/*.txt'\").")
    parser.add_argument("--workdir", required=True,
                        help="run directory: config.gin, metrics.jsonl, checkpoints/, tensorboard/")
    add_common_flags(parser)
    args = parser.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    initialize_distributed(args)
    from research.training.loop import train
    try:
        parse_gin(args.gin_file, bindings)
        check_required(train, "train", args.gin_file, bindings)  # before any compute
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    import jax

    from research.errors import EXPECTED
    from research.gin_checks import explain_required_runtime

    try:
        metrics = train(args.workdir)
    except EXPECTED as err:  # refused or stopped to protect the run: no traceback needed
        text = str(err).split("\n  In call to configurable")[0]  # gin's note: noise here
        logging.error("%s", text)
        print(f"error: {text}", file=sys.stderr, flush=True)
        return err.exit_code
    except RuntimeError as err:  # gin: a REQUIRED parameter unbound (check_required missed it)
        better = explain_required_runtime(err)
        if better is None:
            raise
        print(f"error: {better}", file=sys.stderr, flush=True)
        return 2
    if jax.process_index() == 0:
        print(json.dumps({"final": metrics}))
    return 0


if __name__ == "__main__":
    from research.training import hugepages
    hugepages.reexec_module("research.train")
    sys.exit(main())
