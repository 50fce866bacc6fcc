"""Trains any gin-configured run: `python -m research.train --gin_file=... --workdir=DIR`.

Model configs live in configs/models/, run configs in configs/runs/; pass both (model first),
as in T5X. Re-running the same command with the same DIR resumes from its last checkpoint.

Example:
  python -m research.train \\
      --gin_file=configs/models/gpt_tiny.gin --gin_file=configs/runs/pretrain_causal.gin \\
      --gin.TRAIN_STEPS=200 --gin.MESH_SHAPE="{'data': 2, 'fsdp': 2, 'tensor': 2}" --workdir=/tmp/run

Writes DIR/config.gin (operative config), DIR/run.json, DIR/metrics.jsonl, DIR/checkpoints/
(Orbax) and DIR/tensorboard/.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from research.config import add_common_flags, initialize_distributed, parse_gin, split_gin_bindings


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
    parse_gin(args.gin_file, bindings)
    import jax

    from research.trainer import train

    metrics = train(args.workdir)
    if jax.process_index() == 0:
        print(json.dumps({"final": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
