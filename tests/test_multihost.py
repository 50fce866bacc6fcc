"""Multi-host training on one machine: 2 processes x 4 CPU devices (jax.distributed over gloo)
train the same losses as 1 process x 8 devices, with `python -m research.train` end to end."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from .conftest import ROOT

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, *extra):
    return [sys.executable, "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
            "--gin_file=configs/runs/pretrain_causal.gin", f"--workdir={workdir}",
            f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64",
            "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'tensor': 2}", "--gin.train.log_every=1",
            "--gin.train.eval_steps=2", "--gin.train.progress_bar=False",
            "--gin.train.async_checkpoints=False", *extra]


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_two_processes_equal_one(tmp_path):
    single = tmp_path / "single"
    proc = subprocess.run(_command(single), cwd=ROOT, env=_env(8), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [subprocess.Popen(
        _command(multi, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                 f"--process_id={i}"),
        cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    one, two = _losses(single), _losses(multi)
    assert len(one) == STEPS and len(two) == STEPS
    np.testing.assert_allclose(two, one, rtol=1e-5)
