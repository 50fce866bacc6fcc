"""--profile_steps=N:M (research/profiling.py) on research.train and research.benchmark: the
window's parsing, which steps the trace covers, the trace files the CLIs write, and one
`error:` line (exit 2) for a bad value."""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from research import profiling
from research.errors import ConfigError

from .test_error_path import MODEL, RUN, TINY, TRAIN, assert_one_line_error, run_cli, train_cli

BENCH = ["-m", "research.benchmark", MODEL, RUN, "--gin.BATCH_SIZE=2", "--gin.SEQ_LEN=32",
         "--steps", "2", "--warmup", "0"]


@pytest.mark.parametrize("text,window", [("0:1", (0, 1)), ("10:15", (10, 15)), ("3:100", (3, 100))])
def test_parse_steps(text, window):
    assert profiling.parse_steps(text) == window


@pytest.mark.parametrize("text", ["5:3", "3:3", "x", "-1:2", "1:-2", "1", "1:2:3", "a:b", ":4", ""])
def test_parse_steps_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected N:M with integers 0 <= N < M"):
        profiling.parse_steps(text)


def test_check_window():
    profiling.check_window(None, 3, "--steps=3")
    profiling.check_window((0, 3), 3, "--steps=3")
    with pytest.raises(ConfigError, match=r"--profile_steps=2:4 reaches past the run's 3 steps"):
        profiling.check_window((2, 4), 3, "--steps=3")


def _loop(profiler: profiling.StepProfiler, start: int, stop: int, record: list) -> None:
    """A loop of steps start..stop-1 that records, per step, whether a trace was running."""
    f = jax.jit(lambda x: x @ x)
    x = jnp.eye(8)
    try:
        for step in range(start, stop):
            profiler.before(step, x)
            x = f(x)
            record.append((step, profiler.active))
            profiler.after(step, x)
    finally:
        profiler.close()


@pytest.mark.parametrize("window,start,traced", [
    ((2, 4), 0, [2, 3]),  # N:M traces the 0-based steps N..M-1
    ((0, 1), 0, [0]),
    ((2, 5), 3, [3, 4]),  # a run resumed inside the window: traced from its first step
    ((1, 2), 3, []),  # a run resumed past the window: nothing
])
def test_step_profiler_traces_the_window(tmp_path, window, start, traced):
    said, record = [], []
    profiler = profiling.StepProfiler(window, str(tmp_path / "p"), announce=said.append)
    _loop(profiler, start, 6, record)
    assert [s for s, active in record if active] == traced
    files = profiling.trace_files(str(tmp_path / "p"))
    assert len(files) == (1 if traced else 0)
    assert len(said) == 1
    if traced:
        assert f"steps {traced[0]}:{traced[-1] + 1} traced to {pathlib.Path(files[0]).parent}" \
            in said[0]
    else:
        assert "nothing traced" in said[0]


def test_step_profiler_stops_on_an_early_exit(tmp_path):
    """A loop left inside the window (an error, a preemption) still ends with a trace."""
    said = []
    profiler = profiling.StepProfiler((1, 5), str(tmp_path / "p"), announce=said.append)
    with pytest.raises(RuntimeError):
        try:
            profiler.before(1, None)
            profiler.after(1, None)
            raise RuntimeError("stop")
        finally:
            profiler.close()
    assert not profiler.active and len(profiling.trace_files(str(tmp_path / "p"))) == 1
    assert "steps 1:2 (stopped early; asked for 5)" in said[0]


def test_train_profile_steps_writes_a_trace(tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli([*TRAIN, *TINY, "--gin.TRAIN_STEPS=3",
                    "--gin.TRAIN_DATA='text:data/austen/northangerabbey.txt'",
                    "--profile_steps=1:3", f"--workdir={workdir}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = profiling.trace_files(str(workdir / "profile"))
    assert len(files) == 1 and files[0].endswith(".xplane.pb"), files
    assert f"profile: steps 1:3 traced to {pathlib.Path(files[0]).parent}" in proc.stderr


@pytest.mark.parametrize("value,expected", [
    ("5:3", "argument --profile_steps: '5:3': expected N:M"),
    ("x", "argument --profile_steps: 'x': expected N:M"),
    ("-1:2", "argument --profile_steps: '-1:2': expected N:M"),
])
def test_train_bad_profile_steps(tmp_path, value, expected):
    proc = train_cli([RUN, "--gin.TRAIN_STEPS=2", f"--profile_steps={value}"], tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "run").exists()


def test_train_profile_steps_past_the_run(tmp_path):
    proc = train_cli([*TINY[1:], "--profile_steps=1:9"], tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc, "--profile_steps=1:9 reaches past the run's 2 steps (TRAIN_STEPS)")
    assert not (tmp_path / "run" / "profile").exists()


@pytest.mark.parametrize("value,expected", [
    ("5:3", "argument --profile_steps: '5:3': expected N:M"),
    ("x", "argument --profile_steps: 'x': expected N:M"),
    ("-1:2", "argument --profile_steps: '-1:2': expected N:M"),
    ("1:3", "--profile_steps=1:3 reaches past the run's 2 steps (--steps=2)"),
])
def test_benchmark_bad_profile_steps(tmp_path, value, expected):
    proc = run_cli([sys.executable, *BENCH, f"--profile_steps={value}",
                    f"--profile_dir={tmp_path / 'p'}"], timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, expected)
    assert not (tmp_path / "p").exists()
