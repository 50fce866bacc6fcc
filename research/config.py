"""Command-line handling shared by the entry points: gin files, `--gin.NAME=VALUE` bindings,
and multi-host flags. Every mistake in them raises a ConfigError naming the culprit (the gin
file and line, or the --gin flag) and the fix; `research.cli.entry_point` turns it into one
`error:` line."""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any, Sequence

import gin

from research.errors import ConfigError

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
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                name, value = body, args[i + 1]
                i += 1
            else:
                raise ConfigError(f"{arg} has no value; write --gin.NAME=VALUE (strings quoted "
                                  "as gin literals: --gin.TRAIN_DATA=\"'text:x/*.txt'\").")
            if not name or not value.strip():
                raise ConfigError(f"{arg}: write --gin.NAME=VALUE with a name and a value, e.g. "
                                  "--gin.TRAIN_STEPS=100.")
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
    raise ConfigError(f"gin file {path!r} not found (looked in the current directory and "
                      f"{REPO_ROOT}). Model configs are in configs/models/, run configs in "
                      "configs/runs/.")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], *,
              finalize: bool = True) -> None:
    """Parses files then bindings (bindings override files, including macros).

    Any mistake raises a ConfigError naming the gin file and line (or the --gin flag): a syntax
    error, an unknown configurable or parameter (with the closest names), a macro override
    (`--gin.TRAIN_STEPZ=5`) that no gin file defines or uses, a required value left unset."""
    # Imported here, not at the top: registering every configurable imports jax, flax and
    # tensorflow, and research.sweep uses this module's flag helpers without them.
    import research.configurables  # noqa: F401
    from research import gin_checks

    gin.add_config_file_search_path(str(REPO_ROOT))
    files = [resolve_gin_file(f) for f in gin_files]
    gin_checks.check_gin_bindings(files, bindings, str(REPO_ROOT))
    # One source at a time (as gin.parse_config_files_and_bindings does), so an error that
    # carries no location (an unclosed bracket) still names its file or flag.
    sources = [(f"gin file {f}", gin.parse_config_file, f) for f in files]
    sources += [(_flag(b), gin.parse_config, b) for b in bindings]
    for source, parse, text in sources:
        try:
            parse(text)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is about the config text
            message = gin_checks.explain_parse_error(err, source)
            if message is None:
                raise
            raise ConfigError(message) from err
    if not finalize:
        return
    try:
        gin.finalize()
    except ValueError as err:  # a macro used but never defined, a value left %gin.REQUIRED
        message = gin_checks.explain_missing_required(err, files, bindings, str(REPO_ROOT))
        raise ConfigError(message or f"gin config: {str(err).splitlines()[0]}") from err


def _flag(binding: str) -> str:
    """The --gin flag a "NAME = VALUE" binding came from."""
    name, _, value = binding.partition("=")
    return f"--gin.{name.strip()}={value.strip()}"


def check_required(fn: Any, name: str, gin_files: Sequence[str], bindings: Sequence[str]) -> None:
    """After `parse_gin`: ConfigError naming every gin.REQUIRED parameter of configurable
    `name` (the function or class `fn`) left unbound, and the macro or binding to set."""
    from research import gin_checks  # imports jax, like parse_gin's configurables
    files = [resolve_gin_file(f) for f in gin_files]
    gin_checks.check_required_bindings(fn, name, files, bindings, str(REPO_ROOT))


def initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed.initialize from flags, or auto-detected (Cloud TPU, SLURM) when the
    environment says we are one of several processes."""
    import jax  # see parse_gin: research.sweep imports this module without jax
    if args.coordinator_address or args.num_processes:
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
        if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
            jax.distributed.initialize()
