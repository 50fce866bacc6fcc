"""Command-line handling shared by the entry points: gin files, `--gin.NAME=VALUE` bindings,
and multi-host flags."""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Sequence

import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) from the other arguments.

    Returns (gin binding strings "NAME = VALUE", remaining argv).
    """
    bindings, rest = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--gin.") and not arg.startswith("--gin_file"):
            body = arg[len("--gin."):]
            if "=" in body:
                name, value = body.split("=", 1)
            elif i + 1 < len(args):
                name, value = body, args[i + 1]
                i += 1
            else:
                raise SystemExit(f"error: {arg} has no value; write --gin.NAME=VALUE "
                                 "(strings quoted as gin literals: --gin.TRAIN_DATA=\"'text:x/*.txt'\").")
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
        i += 1
    return bindings, rest


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable; model config then run config, as in T5X)")
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0 for multi-host jax.distributed.initialize")
    parser.add_argument("--num_processes", type=int, default=None, help="total processes (hosts)")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index")


def resolve_gin_file(path: str) -> str:
    """A gin file path as given, or relative to the repository root."""
    if os.path.exists(path):
        return path
    candidate = REPO_ROOT / path
    if candidate.exists():
        return str(candidate)
    raise SystemExit(f"error: gin file {path!r} not found (looked in the current directory and "
                     f"{REPO_ROOT}). Model configs are in configs/models/, run configs in configs/runs/.")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], *, finalize: bool = True) -> None:
    """Parses files then bindings (bindings override files, including macros).

    Misspellings fail with the closest names: an unknown configurable or parameter, and a
    macro override (`--gin.TRAIN_STEPZ=5`) that no gin file defines or uses."""
    import research.configurables  # noqa: F401 - registers every configurable before parsing
    gin.add_config_file_search_path(str(REPO_ROOT))
    from research.gin_checks import check_gin_bindings, explain_gin_error, explain_missing_required
    files = [resolve_gin_file(f) for f in gin_files]
    check_gin_bindings(files, bindings, str(REPO_ROOT))
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=finalize)
    except ValueError as err:
        better = explain_gin_error(err) or explain_missing_required(err, files, bindings,
                                                                      str(REPO_ROOT))
        if better is None:
            raise
        raise ValueError(better) from err


def check_required(fn, name: str, gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """After `parse_gin`: ValueError naming every gin.REQUIRED parameter of configurable
    `name` (the function `fn`) left unbound, and the macro or binding to set."""
    from research.gin_checks import check_required_bindings
    files = [resolve_gin_file(f) for f in gin_files]
    check_required_bindings(fn, name, files, bindings, str(REPO_ROOT))


def initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from flags, or auto-detected (Cloud TPU, SLURM) when the
    environment says we are one of several processes."""
    import jax
    if args.coordinator_address or args.num_processes:
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
        if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
            jax.distributed.initialize()
