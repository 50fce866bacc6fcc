"""Stress test of multi-process CPU runs (2 processes x 4 simulated devices, gloo collectives):
runs a collective-heavy program K times, the 2-process training N times and the 2 <-> 1
process checkpoint tests M times, one after another, each under a timeout, and prints how many
were ok, hung or failed. Not part of CI.

  .venv/bin/python tools/stress_multihost.py [--dispatch_runs 5] [--runs 30]
      [--checkpoint_runs 10] [--timeout_s 240] [--steps 40] [--pjrt_nproc N] [--out DIR]

A dispatch run is DISPATCH_PROGRAM below in 2 processes: the hang in miniature (300 steps of
a small FSDP + data-parallel program with all-gathers and all-reduces, dispatched without
host syncs), which hung every time with XLA's default pools.

A training run is `python -m research.train` on gpt_tiny with MESH_SHAPE={'data': 4, 'fsdp': 2},
--steps steps with a checkpoint halfway and evals (a healthy run takes ~30 s on an idle 2-core
machine). A checkpoint run is `pytest tests/test_multihost.py -k resumes_in` (a checkpoint
written by 2 processes resumed by 1 and the other way round). A run still going at its timeout
is a hang: each of its processes gets SIGABRT, so faulthandler writes its Python stacks (all
threads) to its stderr, then SIGKILL. Every run's output is kept in DIR/<kind>-<i>/.

--pjrt_nproc sets PJRT_NPROC for every process, overriding the thread-pool size that
research.config.initialize_distributed picks (`--pjrt_nproc 1` gives XLA's default pools, as
before the fix, to reproduce the hang). Exit code 0 only if every run was ok.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
MESH = "{'data': 4, 'fsdp': 2}"
# The hang in miniature: a jitted FSDP + data-parallel MLP step (all-gathers, all-reduces) on
# a {'data': 4, 'fsdp': 2} mesh, dispatched 300 times without a host sync, so each device has
# many computations in flight. With XLA's default pools (--pjrt_nproc 1) it hung within the
# first steps every time; research.config sizes the pools for research.train, and this script
# is given the same PJRT_NPROC unless --pjrt_nproc says otherwise.
DISPATCH_PROGRAM = """
import sys
import numpy as np
import jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
rng = np.random.default_rng(0)
ws = [rng.standard_normal((256, 256), np.float32) * 0.05 for _ in range(6)]
params = [jax.make_array_from_callback(w.shape, NamedSharding(mesh, P("fsdp", None)),
                                       lambda i, w=w: w[i]) for w in ws]
xs = rng.standard_normal((64, 256), np.float32)
x = jax.make_array_from_callback(xs.shape, NamedSharding(mesh, P(("data", "fsdp"), None)),
                                 lambda i: xs[i])
def loss(params, x):
    for w in params:
        x = jnp.tanh(x @ w)
    return jnp.mean(x ** 2)
@jax.jit
def step(params, x):
    value, grads = jax.value_and_grad(loss)(params, x)
    return [p - 0.01 * g for p, g in zip(params, grads)], value
for _ in range(300):
    params, value = step(params, x)
print("loss", float(value))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def train_commands(workdir: pathlib.Path, steps: int) -> list[list[str]]:
    """Both processes' command lines (process 0 first)."""
    port = _free_port()
    return [[sys.executable, "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
             "--gin_file=configs/runs/pretrain_causal.gin", f"--workdir={workdir}",
             f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64",
             "--gin.WARMUP_STEPS=1", "--gin.train.log_every=1", "--gin.train.eval_every=10",
             "--gin.train.eval_steps=2", "--gin.train.progress_bar=False",
             f"--gin.train.checkpoint_every={max(steps // 2, 1)}",
             "--gin.train.async_checkpoints=False", f"--gin.MESH_SHAPE={MESH}",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}"] for i in range(2)]


def dispatch_commands() -> list[list[str]]:
    """Both processes of the DISPATCH_PROGRAM run."""
    address = f"127.0.0.1:{_free_port()}"
    return [[sys.executable, "-c", DISPATCH_PROGRAM, address, str(i)] for i in range(2)]


def run_group(commands: list[list[str]], env: dict[str, str], out: pathlib.Path,
              timeout: float) -> tuple[str, float]:
    """Runs the commands at once; ('ok' | 'hang' | 'fail', seconds). Output in out/."""
    out.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    start = time.monotonic()
    for i, command in enumerate(commands):
        stdout = open(out / f"stdout-{i}.txt", "wb")
        stderr = open(out / f"stderr-{i}.txt", "wb")
        files += [stdout, stderr]
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr,
                                      start_new_session=True, preexec_fn=_no_core_dumps))
    while any(p.poll() is None for p in procs) and time.monotonic() - start < timeout:
        time.sleep(0.5)
    hung = [p for p in procs if p.poll() is None]
    for p in hung:
        os.kill(p.pid, signal.SIGABRT)  # faulthandler: Python stacks to stderr
    grace = time.monotonic() + 10
    while any(p.poll() is None for p in hung) and time.monotonic() < grace:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for f in files:
        f.close()
    seconds = time.monotonic() - start
    if hung:
        return "hang", seconds
    return ("ok" if all(p.returncode == 0 for p in procs) else "fail"), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="2-process training runs")
    parser.add_argument("--dispatch_runs", type=int, default=5,
                        help="2-process runs of the collective-heavy program dispatched ahead "
                             "(the hang in miniature, ~30 s each)")
    parser.add_argument("--checkpoint_runs", type=int, default=10,
                        help="runs of the 2 <-> 1 process checkpoint tests")
    parser.add_argument("--timeout_s", type=float, default=240,
                        help="seconds before a training run counts as hung (a checkpoint-test "
                             "run gets 3x)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--pjrt_nproc", type=int, default=None,
                        help="PJRT_NPROC for the training processes (1: XLA's default pools)")
    parser.add_argument("--out", default="/tmp/stress_multihost", help="where output is kept")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONFAULTHANDLER="1")
    if args.pjrt_nproc is not None:
        env["PJRT_NPROC"] = str(args.pjrt_nproc)
    counts: dict[str, collections.Counter] = {"dispatch": collections.Counter(),
                                              "train": collections.Counter(),
                                              "checkpoint": collections.Counter()}
    dispatch_env = dict(env, PJRT_NPROC=env.get("PJRT_NPROC", str((os.cpu_count() or 1) + 8)))
    for i in range(args.dispatch_runs):
        status, seconds = run_group(dispatch_commands(), dispatch_env, out / f"dispatch-{i}",
                                    args.timeout_s)
        counts["dispatch"][status] += 1
        print(f"dispatch {i + 1}/{args.dispatch_runs}: {status} ({seconds:.0f} s)", flush=True)
    for i in range(args.runs):
        run_dir = out / f"train-{i}"
        status, seconds = run_group(train_commands(run_dir / "workdir", args.steps), env,
                                    run_dir, args.timeout_s)
        counts["train"][status] += 1
        print(f"train {i + 1}/{args.runs}: {status} ({seconds:.0f} s)", flush=True)
    pytest_env = {k: v for k, v in env.items() if k != "XLA_FLAGS"}
    for i in range(args.checkpoint_runs):
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                   "tests/test_multihost.py", "-k", "resumes_in"]
        status, seconds = run_group([command], pytest_env, out / f"checkpoint-{i}",
                                    3 * args.timeout_s)
        if status == "fail" and "a hang" in (out / f"checkpoint-{i}" / "stdout-0.txt").read_text(
                errors="replace"):
            status = "hang"  # the test's own timeout (tests/conftest.py ChildProcesses) fired
        counts["checkpoint"][status] += 1
        print(f"checkpoint tests {i + 1}/{args.checkpoint_runs}: {status} ({seconds:.0f} s)",
              flush=True)
    for kind, counter in counts.items():
        print(f"{kind}: " + ", ".join(f"{k} {counter[k]}" for k in ("ok", "hang", "fail")))
    return 0 if all(set(c) <= {"ok"} for c in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
