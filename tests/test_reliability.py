"""Preemption, kill -9, divergence, workdir safety and misspelled gin bindings never lose work."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research import errors
from research import workdir as workdir_lib
from research.training import preemption
from research.config import parse_gin

from .conftest import ROOT, run_processes, xla_flags

STEPS = 60
BASE_ARGS = [
    "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
    "--gin_file=configs/runs/pretrain_causal.gin", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
    "--gin.WARMUP_STEPS=2", "--gin.train.log_every=1", "--gin.train.progress_bar=False",
    "--gin.train.checkpoint_every=10", "--gin.train.keep_checkpoints=20",
    "--gin.MESH_SHAPE={'data': -1}", "--gin.TRAIN_DATA='text:data/austen/northangerabbey.txt'",
]
# Evaluating every step makes a run slow enough to interrupt; eval never touches training
# numerics (own iterator, no training RNG), so the losses match the straight run's.
SLOW = ["--gin.train.eval_every=1", "--gin.train.eval_steps=8"]
FAST = ["--gin.train.eval_every=1000", "--gin.train.eval_steps=1"]


def _env():
    return dict(os.environ, XLA_FLAGS=xla_flags(2),
                TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


def run(args, check=True, timeout=300):
    """`python ARGS` to the end; past `timeout` s its stacks are printed and the test fails."""
    proc, = run_processes([[sys.executable, *args]], timeout, env=_env())
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start(args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def metrics(workdir):
    path = pathlib.Path(workdir, "metrics.jsonl")
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def wait_for(predicate, proc, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoint_steps(workdir):
    d = pathlib.Path(workdir, "checkpoints")
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def restore_params(workdir, step):
    from research.checkpoints.manager import Checkpointer
    c = Checkpointer(str(pathlib.Path(workdir, "checkpoints")), save_every=1, async_save=False)
    try:
        return c.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))["params"]
    finally:
        c.close()


def assert_same_losses(workdir, straight):
    again = metrics(workdir)
    assert [m["step"] for m in again] == list(range(1, STEPS + 1))
    # Bitwise: same program, same restored bits (params, optimizer, RNG, data position).
    assert [m["train/loss"] for m in again] == [m["train/loss"] for m in straight]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    run([*BASE_ARGS, *FAST, f"--gin.TRAIN_STEPS={STEPS}", f"--workdir={workdir}"])
    return workdir


def test_sigterm_saves_and_resumes_exactly_and_the_workdir_is_locked(straight, tmp_path):
    workdir = tmp_path / "run"
    args = [*BASE_ARGS, *SLOW, f"--gin.TRAIN_STEPS={STEPS}", f"--workdir={workdir}"]
    first = start(args)
    try:
        lock = workdir / ".lock"
        wait_for(lambda: lock.exists() and f"pid={first.pid}" in lock.read_text(), first,
                 what="the lock")
        second = run(args, check=False)  # same DIR while the first run holds it
        assert first.poll() is None, "the first run ended too early for the lock test"
        assert second.returncode == 2
        assert "in use by another training run" in second.stderr
        assert f"pid={first.pid}" in second.stderr and "pick a new --workdir" in second.stderr

        wait_for(lambda: len(metrics(workdir)) >= 3, first, what="training progress")
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-4000:]
    reached = metrics(workdir)[-1]["step"]
    assert 3 <= reached < STEPS
    assert reached in checkpoint_steps(workdir)
    assert "Resume by re-running the same command" in out and "--workdir=" in out
    assert not (workdir / "final.json").exists()  # not finished: research.sweep resumes it

    run(args)  # the same command resumes and finishes
    assert_same_losses(workdir, metrics(straight))
    assert json.loads((workdir / "final.json").read_text())["step"] == STEPS


def test_kill_9_resumes_from_the_last_complete_checkpoint(straight, tmp_path):
    workdir = tmp_path / "run"
    args = [*BASE_ARGS, *SLOW, f"--gin.TRAIN_STEPS={STEPS}", f"--workdir={workdir}"]
    proc = start(args)
    try:
        wait_for(lambda: checkpoint_steps(workdir), proc, what="the first checkpoint")
        time.sleep(random.Random(os.getpid()).uniform(0.0, 1.0))
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert max(checkpoint_steps(workdir)) < STEPS, "the run finished before it was killed"
    # What a kill during a save leaves behind: a half-written step directory.
    leftover = workdir / "checkpoints" / f"{STEPS - 1}.orbax-checkpoint-tmp-1234"
    (leftover / "params").mkdir(parents=True)
    (leftover / "params" / "junk").write_text("partial")
    run(args)
    assert not leftover.exists()
    assert_same_losses(workdir, metrics(straight))


def test_divergence_stops_naming_the_step_then_skip_mode_continues(tmp_path):
    workdir = tmp_path / "run"
    args = [*BASE_ARGS, *FAST, "--gin.TRAIN_STEPS=6", "--gin.LEARNING_RATE=1e30",
            "--gin.train.checkpoint_every=1", f"--workdir={workdir}"]
    proc = run(args, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    msg = proc.stderr
    assert "non-finite loss or gradient (NaN/Inf) at step" in msg, msg[-3000:]
    bad = int(msg.split("(NaN/Inf) at step ")[1].split()[0])
    good = checkpoint_steps(workdir)
    assert good and max(good) == bad - 1
    assert f"the last good checkpoint is step {bad - 1}" in msg
    for leaf in jax.tree.leaves(restore_params(workdir, bad - 1)):
        assert np.isfinite(np.asarray(leaf)).all()

    # Same command with on_nonfinite='skip': resumes and skips the bad updates.
    run([*args, "--gin.train.on_nonfinite='skip'"])
    final = metrics(workdir)
    assert final[-1]["step"] == 6 and final[-1]["train/skipped_steps"] >= 1
    for leaf in jax.tree.leaves(restore_params(workdir, 6)):
        assert np.isfinite(np.asarray(leaf)).all()


def test_a_different_config_is_refused_before_any_compute(straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    before = (workdir / "config.gin").read_text()
    proc = run([*BASE_ARGS, *FAST, f"--gin.TRAIN_STEPS={STEPS}", "--gin.LEARNING_RATE=0.001",
                f"--workdir={workdir}"], check=False)
    assert proc.returncode == 2
    assert "LEARNING_RATE: 0.0006  ->  0.001" in proc.stderr, proc.stderr[-3000:]
    assert "Resume with the same command, or pick a new --workdir" in proc.stderr
    assert (workdir / "config.gin").read_text() == before
    assert len(metrics(workdir)) == STEPS and checkpoint_steps(workdir) == checkpoint_steps(straight)


def test_resume_config_allows_cadence_and_length():
    old = "TRAIN_STEPS = 8\ntrain.log_every = 1\ntrain.seed = 0\nf.x = [1,\n    2]\n"
    ok = "TRAIN_STEPS = 9\ntrain.log_every = 5\ntrain.seed = 0\nf.x = [1, 2]\n"
    assert workdir_lib.parse_operative_config(old)["f.x"] == "[1, 2]"
    d = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"reliability-{os.getpid()}"
    d.mkdir(exist_ok=True)
    try:
        (d / "config.gin").write_text(old)
        workdir_lib.check_resume_config(str(d), ok)
        with pytest.raises(errors.ConfigMismatchError, match=r"train.seed: 0  ->  1"):
            workdir_lib.check_resume_config(str(d), ok.replace("seed = 0", "seed = 1"))
    finally:
        shutil.rmtree(d)


def test_lock_names_the_holder(tmp_path):
    with workdir_lib.WorkdirLock(str(tmp_path)):
        with pytest.raises(errors.WorkdirLockedError, match=f"pid={os.getpid()}"):
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    with workdir_lib.WorkdirLock(str(tmp_path)):  # released: free again
        pass


def test_preemption_guard_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert guard.requested and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


FILES = ["configs/models/gpt_tiny.gin", "configs/runs/pretrain_causal.gin"]


@pytest.mark.parametrize("binding, expected", [
    ("TRAIN_STEPZ = 5", "Did you mean 'TRAIN_STEPS'"),
    ("train.num_stepz = 5", "Did you mean 'num_steps'"),
    ("trian.num_steps = 5", "Did you mean 'train'"),
    ("TransformerConfig.d_modle = 64", "Did you mean 'd_model'"),
])
def test_misspelled_gin_bindings_suggest_the_right_name(clean_gin, binding, expected):
    with pytest.raises(ValueError, match=expected):
        parse_gin(FILES, [binding], finalize=False)


def test_correct_macro_override_parses(clean_gin):
    parse_gin(FILES, ["TRAIN_STEPS = 5"], finalize=False)
    assert gin.query_parameter("%TRAIN_STEPS") == 5


@pytest.mark.parametrize("guard", ["cond", "select"])
def test_a_nonfinite_step_leaves_params_and_optimizer_unchanged(guard):
    from research.training import partitioning
    from research.data.causal_lm import make_causal_lm_iterator
    from research.data.sources import DocumentList
    from research.models.transformer import TransformerConfig
    from research.objectives.causal_lm import CausalLMObjective
    from research.training.loop import build_setup, make_train_step

    from .conftest import austen_paragraphs
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                            max_len=64, vocab_multiple=8)
    setup = build_setup(model_config=cfg, objective=CausalLMObjective(),
                        vocab=str(ROOT / "data/tokenizers/austen_8k.model"), seq_len=32,
                        batch_size=8, seed=0, mesh_shape={"data": -1}, learning_rate=1e-2,
                        num_steps=10, warmup_steps=0)
    it = make_causal_lm_iterator(DocumentList(austen_paragraphs(100)), setup.tokenizer,
                                 seq_len=32, global_batch_size=8, seed=0)
    step = make_train_step(setup, guard=guard)
    state = setup.init_state()
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        first = partitioning.global_batch(next(it), setup.mesh)
        # the select guard leaves no conditional for XLA:GPU to read back to the host
        assert ("stablehlo.case" in step.lower(state, first).as_text()) == (guard == "cond")
        state, m = step(state, first)  # a good step
        assert float(m["nonfinite"][0]) == 0.0
        leaves, treedef = jax.tree.flatten(state["params"])
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.inf)  # poison one weight
        poisoned = {**state, "params": jax.tree.unflatten(treedef, leaves)}
        before = jax.tree.map(np.asarray, {k: poisoned[k] for k in ("params", "opt_state")})
        after, m = step(poisoned, partitioning.global_batch(next(it), setup.mesh))
    assert float(m["nonfinite"][0]) == 1.0
    assert int(after["step"]) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(
            {k: after[k] for k in ("params", "opt_state")})):
        np.testing.assert_array_equal(np.asarray(b), a)


def test_update_guard_is_a_branch_on_cpu_and_a_select_on_accelerators(clean_gin):
    from research.training.steps import update_guard

    assert update_guard(backend="cpu") == "cond"
    assert update_guard(backend="gpu") == update_guard(backend="tpu") == "select"
    assert update_guard("select", backend="cpu") == "select"
    gin.bind_parameter("update_guard.kind", "cond")
    assert update_guard(backend="gpu") == "cond"
    with pytest.raises(errors.ConfigError, match="update_guard.kind='where' is not one of"):
        update_guard("where")
