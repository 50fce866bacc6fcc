"""The hang watchdog (research/training/watchdog.py): a phase or train step past its limit
writes the stacks of all threads, prints one `error:` line and exits with HangError's code;
phases that finish never trip it; the automatic limit follows the median step; and through
the real CLI a hung run exits, then the same command resumes and ends with the losses of an
uninterrupted run."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from research.errors import HangError, InvalidConfigError
from research.training import watchdog as wd

from .conftest import ROOT, ChildProcesses, xla_flags


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def wait_until(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def make(tmp_path, timeout_s, **kwargs):
    """A watchdog whose exit and error line are recorded instead of ending the test."""
    codes, lines = [], []
    dog = wd.Watchdog(str(tmp_path), timeout_s, host=0, exit_fn=codes.append,
                      error_fn=lines.append, poll_s=0.01, **kwargs)
    return dog, codes, lines


def stuck_helper(event):
    event.wait(30)


def test_an_overdue_phase_dumps_all_threads_prints_one_error_and_exits(tmp_path):
    release = threading.Event()
    helper = threading.Thread(target=stuck_helper, args=(release,), daemon=True)
    helper.start()
    dog, codes, lines = make(tmp_path, 0.2)
    try:
        with dog.phase("eval", 7):
            assert wait_until(lambda: codes), "the watchdog did not fire"
    finally:
        release.set()
        dog.close()
    path = wd.hang_file(str(tmp_path), 0, 7)
    assert codes == [HangError.exit_code] and dog.fired == path
    assert len(lines) == 1 and lines[0].startswith("error: hang: the eval of step 7 ")
    assert path in lines[0] and "train.hang_timeout_s" in lines[0]
    text = pathlib.Path(path).read_text()
    assert text.startswith("hang: eval of step 7 ran ")
    assert "native stacks are not available" in text
    # faulthandler's dump of every thread: the stuck helper, this test's thread, the monitor.
    assert text.count("Thread 0x") >= 3
    assert "stuck_helper" in text and "test_an_overdue_phase_dumps_all_threads" in text
    assert "_monitor" in text


def test_phases_and_steps_that_finish_never_fire(tmp_path):
    dog, codes, lines = make(tmp_path, 0.3, wait_fn=lambda outputs: None)
    try:
        for step in range(1, 21):
            dog.begin_step(step)
            dog.end_step(object())
            with dog.phase("checkpoint save", step):
                time.sleep(0.01)
        time.sleep(0.6)  # twice the limit with nothing running
        assert dog.steps_done == 20
    finally:
        dog.close()
    assert codes == [] and lines == [] and not list(tmp_path.glob("hang-*"))


def test_a_step_whose_outputs_never_become_ready_fires_after_the_compile_steps(tmp_path):
    clock, ready = FakeClock(), {}
    hung = wd.COMPILE_STEPS + 1

    def wait_fn(step):  # a step is done when the test sets its event
        ready[step].wait(30)

    dog, codes, lines = make(tmp_path, 10, clock=clock, wait_fn=wait_fn)
    try:
        for step in range(1, hung + 1):
            ready[step] = threading.Event()
        dog.begin_step(1)
        dog.end_step(1)
        clock.t = 500.0  # the first steps compile: far past 10 s, within the allowance
        time.sleep(0.2)
        assert codes == []
        for step in range(1, hung):
            if step > 1:
                dog.begin_step(step)
                dog.end_step(step)
            ready[step].set()
            assert wait_until(lambda: dog.steps_done == step)
        dog.begin_step(hung)
        dog.end_step(hung)
        clock.t = 509.0
        time.sleep(0.2)
        assert codes == []
        clock.t = 511.0
        assert wait_until(lambda: codes)
    finally:
        for event in ready.values():
            event.set()
        dog.close()
    assert codes == [HangError.exit_code]
    assert lines[0].startswith(f"error: hang: the train step of step {hung} ran 11.0s, "
                               "past its 10s limit")
    assert os.path.exists(wd.hang_file(str(tmp_path), 0, hung))


def test_the_first_step_is_only_bounded_by_the_compile_allowance(tmp_path):
    clock = FakeClock()
    never = threading.Event()
    dog, codes, _ = make(tmp_path, 10, clock=clock, wait_fn=lambda outputs: never.wait(30))
    try:
        dog.begin_step(1)
        dog.end_step("outputs")
        clock.t = wd.COMPILE_ALLOWANCE_S - 1
        time.sleep(0.2)
        assert codes == []
        clock.t = wd.COMPILE_ALLOWANCE_S + 1
        assert wait_until(lambda: codes)
    finally:
        never.set()
        dog.close()


def test_auto_limit_is_the_larger_of_the_floor_and_50_median_steps(tmp_path):
    clock = FakeClock()

    def wait_fn(seconds):  # the step "runs" for `seconds` of the fake clock
        clock.t += seconds

    dog, codes, _ = make(tmp_path, None, clock=clock, wait_fn=wait_fn)
    try:
        assert dog.limit("train step") == wd.COMPILE_ALLOWANCE_S  # no median yet
        compiling = [300.0] * wd.COMPILE_STEPS  # not measured
        measured = [2.0, 3.0, 2.0, 1.0, 2.0]
        for step, seconds in enumerate(compiling + measured, 1):
            dog.begin_step(step)
            dog.end_step(seconds)
            assert wait_until(lambda: not dog._steps)
        median = sorted(measured)[len(measured) // 2]
        assert dog.median_step_s() == median
        assert dog.limit("train step") == max(wd.AUTO_MIN_S, wd.STEP_MULTIPLE * median)
        assert dog.limit("eval", scale=20) == wd.STEP_MULTIPLE * median * 20
        # A phase's first run may compile: at least the allowance, then the normal limit.
        assert dog.limit("eval", compiles=True) == wd.COMPILE_ALLOWANCE_S
        with dog.phase("eval", 8, compiles=True):
            pass
        assert dog.limit("eval", compiles=True) == wd.AUTO_MIN_S
        for step, seconds in enumerate([40.0] * 10, 9):
            dog.begin_step(step)
            dog.end_step(seconds)
            assert wait_until(lambda: not dog._steps)
        assert dog.limit("train step") == wd.STEP_MULTIPLE * 40.0
    finally:
        dog.close()
    assert codes == []


def test_hang_timeout_must_be_seconds_none_or_auto():
    from research.training.run_config import RunConfig
    required = dict(model_config=None, objective=None, train_data="text:x", vocab=None,
                    num_steps=1, batch_size=8, seq_len=8, learning_rate=1e-3)
    for value in (None, "auto", 5, 2.5):
        assert RunConfig(**required, hang_timeout_s=value).hang_timeout_s == value
    for value in ("soon", 0, -1, True):
        with pytest.raises(InvalidConfigError, match=r"train\.hang_timeout_s = .* must be a "
                                                     r"positive number of seconds, None or 'auto'"):
            RunConfig(**required, hang_timeout_s=value)


# ------------------------------------------------------------------ through the real CLI -----

STEPS = 8
HANG_STEP = 5
ARGS = [
    "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
    "--gin_file=configs/runs/pretrain_causal.gin", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
    "--gin.WARMUP_STEPS=2", "--gin.train.log_every=1", "--gin.train.progress_bar=False",
    "--gin.train.checkpoint_every=2", "--gin.train.keep_checkpoints=20",
    "--gin.train.eval_every=1000", "--gin.train.eval_steps=1", "--gin.MESH_SHAPE={'data': -1}",
    "--gin.TRAIN_DATA='text:data/austen/northangerabbey.txt'", f"--gin.TRAIN_STEPS={STEPS}",
    "--gin.train.hang_timeout_s=15",
]


def env(cache_dir, sleep_at=None):
    """The CLI runs' environment, with the watchdog's test hook `sleep_at` ("K:SECONDS") or
    without. The runs share a JAX compilation cache in `cache_dir`: the resumed run loads the
    executables the first runs compiled (the same programs, so the same bits) instead of
    compiling them again."""
    out = dict(os.environ, XLA_FLAGS=xla_flags(2),
               TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    out.pop(wd.TEST_SLEEP_ENV, None)
    if sleep_at:
        out[wd.TEST_SLEEP_ENV] = sleep_at
    return out


def command(workdir):
    return [sys.executable, *ARGS, f"--workdir={workdir}"]


def run(workdir, cache_dir):
    """research.train into `workdir` (see `env`); subprocess.run kills the child if it outlives
    the timeout."""
    return subprocess.run(command(workdir), cwd=ROOT, env=env(cache_dir), capture_output=True,
                          text=True, timeout=300)


def losses(workdir):
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train/loss"]) for r in map(json.loads, lines)]


def test_a_hung_step_exits_with_stacks_and_the_rerun_resumes_exactly(tmp_path):
    hung, straight, cache = tmp_path / "hung", tmp_path / "straight", tmp_path / "jax_cache"
    # The uninterrupted reference run goes alongside the hung one (it uses the CPU while the
    # hung run sleeps out its watchdog limit); each is bounded (ChildProcesses: a hang fails
    # the test with its stacks).
    with ChildProcesses([command(hung)], env=env(cache, f"{HANG_STEP}:120")) as hung_child, \
            ChildProcesses([command(straight)], env=env(cache)) as straight_child:
        proc, = hung_child.wait(300)
        reference, = straight_child.wait(300)
    assert proc.returncode == HangError.exit_code, proc.stderr[-4000:]
    path = wd.hang_file(str(hung), 0, HANG_STEP)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-4000:]
    assert f"the train step of step {HANG_STEP} ran" in errors[0] and path in errors[0]
    stacks = pathlib.Path(path).read_text()
    assert f"train step of step {HANG_STEP}" in stacks
    assert "_test_sleep" in stacks and "in _step" in stacks  # the main thread, stuck in step 5
    assert not (hung / "final.json").exists()
    saved = sorted(int(p.name) for p in (hung / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < HANG_STEP

    resumed = run(hung, cache)  # the same command, without the hang: resumes and finishes
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from step" in resumed.stderr
    assert reference.returncode == 0, reference.stderr[-4000:]
    # Bitwise: same program, same restored bits (params, optimizer, RNG, data position).
    assert losses(hung) == losses(straight)
    assert [s for s, _ in losses(hung)] == list(range(1, STEPS + 1))
