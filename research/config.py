"""Command-line handling shared by the entry points: gin files, `--gin.NAME=VALUE` bindings,
and multi-host flags. Every mistake in them raises a ConfigError naming the culprit (the gin
file and line, or the --gin flag) and the fix; `research.cli.entry_point` turns it into one
`error:` line."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
from typing import Any, Sequence

import gin

from research.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Multi-process runs (initialize_distributed): seconds without a heartbeat before a process is
# declared dead, and seconds a finishing process waits for the others; flags, else these
# environment variables, else these defaults.
HEARTBEAT_ENV, SHUTDOWN_ENV = "RESEARCH_HEARTBEAT_TIMEOUT_S", "RESEARCH_SHUTDOWN_TIMEOUT_S"
DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_SHUTDOWN_TIMEOUT_S = 30, 120


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
    parser.add_argument("--heartbeat_timeout_s", type=int, default=None,
                        help="multi-process runs: a process that sends the JAX distributed "
                             "service no heartbeat for this long is declared dead and every "
                             "other process stops with an error naming it (default "
                             f"${HEARTBEAT_ENV} or {DEFAULT_HEARTBEAT_TIMEOUT_S})")
    parser.add_argument("--shutdown_timeout_s", type=int, default=None,
                        help="multi-process runs: how long a finishing process waits for the "
                             f"others at exit (default ${SHUTDOWN_ENV} or "
                             f"{DEFAULT_SHUTDOWN_TIMEOUT_S})")


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
    environment says we are one of several processes. Must run before anything touches a
    JAX backend.

    With several processes, a killed process (kill -9, OOM, a lost host) never leaves the
    others waiting forever in a collective: the distributed service (in process 0) misses its
    heartbeats for `--heartbeat_timeout_s` and aborts every other process with `... The
    following tasks are unhealthy (stopped sending heartbeats): N` (N = the lost process id);
    if process 0 itself dies, the others abort at their next call to the service (`the leader
    task was preempted/died`). On the CPU backend the XLA thread pools are also enlarged
    (`_cpu_collective_threads`, the fix for the multi-process CPU hang)."""
    import jax  # see parse_gin: research.sweep imports this module without jax
    timeouts = {"heartbeat_timeout_seconds": _timeout(args, "heartbeat_timeout_s", HEARTBEAT_ENV,
                                                      DEFAULT_HEARTBEAT_TIMEOUT_S),
                "shutdown_timeout_seconds": _timeout(args, "shutdown_timeout_s", SHUTDOWN_ENV,
                                                     DEFAULT_SHUTDOWN_TIMEOUT_S)}
    if args.coordinator_address or args.num_processes:
        if args.num_processes is not None and args.num_processes > 1:
            _cpu_collective_threads()
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id,
                                   **timeouts)
    elif any(v in os.environ for v in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")):
        if int(os.environ.get("SLURM_NTASKS", "2")) > 1:
            _cpu_collective_threads()
            jax.distributed.initialize(**timeouts)


def prepare_backend_flags() -> bool:
    """After parse_gin, before JAX starts its backend: the XLA flags the configured model needs
    on an accelerator (with attention dropout bound in gin, cuDNN's kernels kept out of CUDA
    graphs so that the dropout runs inside them: `attention_cudnn.prepare_xla_flags`) and the
    CPU backend's scheduler (`prepare_cpu_xla_flags`). Returns whether XLA_FLAGS changed."""
    import gin
    from research.models import attention_cudnn
    try:
        rate = gin.query_parameter("TransformerConfig.attention_dropout_rate")
    except ValueError:  # not bound: the dataclass default (no attention dropout)
        rate = 0.0
    cudnn = attention_cudnn.prepare_xla_flags(float(rate or 0.0))
    return prepare_cpu_xla_flags() or cudnn


CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"


def prepare_cpu_xla_flags() -> bool:
    """Before JAX starts its backend: adds `--xla_cpu_enable_concurrency_optimized_scheduler=
    false` to XLA_FLAGS. XLA:CPU's default scheduler orders a program for concurrency: it
    starts independent work early (a layer's weight gradient beside its input gradient), which
    keeps more buffers alive at once. On the 2-core CPU (2026-11-27, research.benchmark's steps
    in alternating processes, 5 steps each, batch 8 x 256) the plain order gave: peak memory
    5.0 -> 4.5-4.7 GB; kernel time per step (page faults of the step's temporaries) 1.7-2.2 ->
    1.0-1.4 s; bert_base median step 12.3 / 13.3 / 14.0 / 11.4 s -> 11.4 / 10.8 / 12.1 /
    11.0 s (four pairs, at dropout 0 and 0.1); gpt_small 13.3 / 11.8 -> 11.8 / 12.5 s (within
    the host's noise). Only for runs on the CPU backend (JAX's platforms name the CPU first, or
    are unset and no GPU/TPU device node exists: `hugepages.uses_accelerator`), where it was
    measured. Nothing changes when XLA_FLAGS names the flag already or once the backend has
    started. Returns whether XLA_FLAGS changed."""
    import jax
    from jax._src import xla_bridge
    from research.training import hugepages
    flags = os.environ.get("XLA_FLAGS", "")
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or ""
    if (CPU_SCHEDULER_FLAG in flags or xla_bridge.backends_are_initialized()
            or hugepages.uses_accelerator({"JAX_PLATFORMS": platforms})):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULER_FLAG}=false".strip()
    return True


def _timeout(args: argparse.Namespace, flag: str, env: str, default: int) -> int:
    """A positive number of seconds: the flag, else the environment variable, else `default`."""
    value, source = getattr(args, flag, None), f"--{flag}"
    if value is None and os.environ.get(env, "").strip():
        value, source = os.environ[env].strip(), f"${env}"
    if value is None:
        return default
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ConfigError(f"{source}={value} is not a positive whole number of seconds; "
                          f"use e.g. --{flag}={default}.")
    return seconds


def _cpu_collective_threads() -> None:
    """Multi-process runs on the CPU backend: sizes XLA:CPU's thread pools (PJRT_NPROC, read
    when the CPU client is created, so before any computation) to the CPU count plus two
    threads per local device, unless PJRT_NPROC or NPROC is set already.

    Why (the multi-process CPU hang, issue 19): the CPU client's pool has max(CPUs, local
    devices) threads, 4 for 4 simulated devices on a 2-core machine. A program over several
    devices is launched by one pool task per device, and each device's execution then holds
    a pool thread until it ends, blocked in its gloo collectives until every participant, in
    every process, has joined. A launch task also blocks its thread while its device already
    has 32 computations in flight (XLA's per-device in-flight semaphore), which is the normal
    state when the host dispatches steps ahead. Seen in a hung run (gdb): in process 1 three
    pool threads ran three devices' step (one in an all-gather, two in an all-reduce) and the
    fourth sat in a later step's launch, waiting on that semaphore, so the fourth device's
    step, ready to run, had no thread; process 0's four devices waited in the all-reduce for
    it, forever. The collectives' order was never the problem: no thread was left to run the
    last participant. With 2 threads per device (one running it, one for a launch blocked on
    its semaphore) plus one per CPU, a device's execution always finds a thread
    (tools/stress_multihost.py). Only the CPU backend with several processes is touched: one
    process uses in-process collectives, and GPUs and TPUs run collectives on the device."""
    import jax
    platforms = [p.strip() for p in (jax.config.jax_platforms or "").split(",") if p.strip()]
    if platforms and platforms[0] != "cpu":
        return
    if not platforms and _accelerator_plugin_installed():
        return
    if "PJRT_NPROC" in os.environ or "NPROC" in os.environ:
        return
    os.environ["PJRT_NPROC"] = str((os.cpu_count() or 1) + 2 * _local_cpu_devices())


def _local_cpu_devices() -> int:
    """Devices the CPU backend will create in this process (jax_num_cpu_devices, else XLA's
    --xla_force_host_platform_device_count, else 1)."""
    import jax
    configured = jax.config.jax_num_cpu_devices
    if configured is not None and configured > 0:
        return configured
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)",
                       os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else 1


def _accelerator_plugin_installed() -> bool:
    """Whether JAX, with JAX_PLATFORMS unset, could pick a GPU or TPU backend over the CPU."""
    import importlib.util
    import pkgutil
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))
