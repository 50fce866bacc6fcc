"""Multi-host training and resuming under another process count or mesh, through
`python -m research.train` end to end on one machine (8 simulated CPU devices):

* 2 processes x 4 devices (jax.distributed over gloo) train the same losses as 1 process x 8;
* a checkpoint written by 2 processes resumes in 1 process and the other way round;
* a checkpoint saved under one MESH_SHAPE resumes under another (resharding), while a real
  config change is still refused.

Every straight run trains STEPS = 2K steps with a checkpoint at K; a "first leg" is a copy of
its directory without the step-2K checkpoint (exactly what a run stopped after step K leaves:
the LR schedule depends on TRAIN_STEPS, so stopping a shorter run would change the math).
"""

import argparse
import json
import os
import re
import shutil
import socket
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research import errors
from research import workdir as workdir_lib
from research.data import causal_lm

from .conftest import ROOT, ChildProcesses, run_processes, xla_flags

K = 2
STEPS = 2 * K
MESH = "{'data': 2, 'fsdp': 2, 'tensor': 2}"
GIN_FILES = ["configs/models/gpt_tiny.gin", "configs/runs/pretrain_causal.gin"]
# WARMUP_STEPS=1 and a larger LR: every step moves the parameters visibly, so a wrong
# optimizer state, RNG or data position on resume shows in the losses and parameters.
ARGS = [f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64",
        "--gin.LEARNING_RATE=3e-3", "--gin.WARMUP_STEPS=1", "--gin.train.log_every=1",
        "--gin.train.eval_steps=2", "--gin.train.progress_bar=False",
        f"--gin.train.checkpoint_every={K}", "--gin.train.async_checkpoints=False"]
# Tolerances (float32). Same mesh, other process count: the same program, but the gloo
# all-reduce sums in another order than the in-process one (~1e-7 relative seen). Other mesh:
# sharded matmuls and reductions sum in another order too. Parameters and optimizer state
# also get an absolute 1e-5: the attention key bias has an exactly zero gradient, so Adam
# turns rounding noise (~1e-12) into updates of ~1e-6 (seen 9e-7 between two straight runs).
# A wrong optimizer state, step or data position moves parameters by ~LR = 3e-3 per step.
RTOL_PROCESSES, RTOL_MESH, ATOL_STATE = 1e-5, 3e-5, 1e-5
# A healthy run here takes ~30 s (2 processes) on an idle 2-core machine. Past this, a run is
# a hang: its stacks are printed and it is killed (tests/conftest.py ChildProcesses).
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, *extra, mesh=MESH):
    return [sys.executable, "-m", "research.train", *(f"--gin_file={f}" for f in GIN_FILES),
            f"--workdir={workdir}", *ARGS, f"--gin.MESH_SHAPE={mesh}", *extra]


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                XLA_FLAGS=xla_flags(devices),
                TF_CPP_MIN_LOG_LEVEL="3")


def run_single(workdir, mesh=MESH) -> str:
    """1 process x 8 devices; returns its stderr (the log)."""
    proc, = run_processes([_command(workdir, mesh=mesh)], TIMEOUT_S, env=_env(8))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def multi_commands(workdir, *extra) -> list[list[str]]:
    """The commands of a 2-process run (process 0 first) on a fresh coordinator port."""
    port = _free_port()
    return [_command(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                     f"--process_id={i}", *extra) for i in range(2)]


def run_multi(workdir) -> str:
    """2 processes x 4 devices; returns process 0's stderr."""
    procs = run_processes(multi_commands(workdir), TIMEOUT_S, env=_env(4))
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    return procs[0].stderr


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(workdir):
    rows = [r for r in _metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["train/loss"] for r in rows]


def _saved(workdir, step, item="params"):
    """A checkpoint item as host numpy arrays (whatever mesh or process count saved it)."""
    path = os.path.join(workdir, "checkpoints", str(step), item)
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _data_states(workdir, step):
    with open(os.path.join(workdir, "checkpoints", str(step), "extra", "metadata"),
              encoding="utf-8") as f:
        return json.load(f)["data_state"]


def first_leg(straight, dst):
    """`straight`'s directory as a run stopped right after its checkpoint at step K left it."""
    shutil.copytree(straight, dst)
    shutil.rmtree(dst / "checkpoints" / str(STEPS))
    os.remove(dst / "final.json")
    return dst


def assert_same_run(workdir, straight, rtol, atol=ATOL_STATE):
    np.testing.assert_allclose(_losses(workdir), _losses(straight), rtol=rtol)
    for item in ("params", "opt_state"):
        got, want = _saved(workdir, STEPS, item), _saved(straight, STEPS, item)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single") / "run"
    run_single(workdir)
    return workdir


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multi") / "run"
    run_multi(workdir)
    return workdir


# ----------------------------------------------------------------- process count -------

def test_two_processes_equal_one(single, multi):
    np.testing.assert_allclose(_losses(multi), _losses(single), rtol=RTOL_PROCESSES)
    assert _losses(single)[-1] < _losses(single)[0]  # it learns
    states = _data_states(multi, K)
    assert [s["process_index"] for s in states] == [0, 1]  # one data state per process
    # Merged, the two processes' states are the single process's state.
    assert causal_lm.merge_states(states) == _data_states(single, K)[0]


def test_two_process_checkpoint_resumes_in_one_process(single, multi, tmp_path):
    workdir = first_leg(multi, tmp_path / "run")
    log = run_single(workdir)
    assert "resumed from step 2" in log and "written by 2 process(es), this run has 1" in log
    assert_same_run(workdir, single, RTOL_PROCESSES)


def test_one_process_checkpoint_resumes_in_two_processes(single, tmp_path):
    workdir = first_leg(single, tmp_path / "run")
    log = run_multi(workdir)
    assert "resumed from step 2" in log and "written by 1 process(es), this run has 2" in log
    assert_same_run(workdir, single, RTOL_PROCESSES)
    assert len(_data_states(workdir, STEPS)) == 2  # saved per process again


# ----------------------------------------------------------------- a dead peer ---------

HEARTBEAT_S = 10
DEAD_PEER_BOUND_S = 60  # the heartbeat timeout (seen: stopped 10.5 s after the kill) + margin


def test_a_killed_process_stops_the_other_naming_it(tmp_path):
    """kill -9 of process 1 mid-run: process 0 (which hosts the JAX distributed service) must not
    wait for it forever in its next collective, but stop within the bound, non-zero, with the
    service's error naming the lost process. (Killing process 0 instead stops process 1 at
    once: its next call to the service fails, `the leader task was preempted/died`.)"""
    workdir = tmp_path / "run"
    commands = multi_commands(workdir, "--gin.TRAIN_STEPS=100000", "--gin.train.eval_every=100000",
                              "--gin.train.checkpoint_every=100000",
                              f"--heartbeat_timeout_s={HEARTBEAT_S}", "--shutdown_timeout_s=10")
    with ChildProcesses(commands, env=_env(4)) as children:
        deadline = time.monotonic() + TIMEOUT_S
        while _logged_train_steps(workdir) < 3:
            assert children.running() == [0, 1], children.report()
            assert time.monotonic() < deadline, "no training progress:\n" + children.report()
            time.sleep(0.2)
        children.kill(1)
        killed = time.monotonic()
        survivor, _ = children.wait(DEAD_PEER_BOUND_S)
        took = time.monotonic() - killed
    assert survivor.returncode != 0, survivor.stderr[-3000:]
    assert took < DEAD_PEER_BOUND_S
    lost = re.search(r"stopped sending heartbeats\):\s*1\b", survivor.stderr)
    assert lost, survivor.stderr[-3000:]
    print(f"survivor stopped {took:.1f} s after the kill (heartbeat timeout {HEARTBEAT_S} s)")


def _logged_train_steps(workdir) -> int:
    """Train steps in metrics.jsonl so far (read while it is being written)."""
    path = workdir / "metrics.jsonl"
    return path.read_text(encoding="utf-8").count('"train/loss"') if path.exists() else 0


def test_hung_children_fail_the_test_fast_with_their_stacks():
    """tests/conftest.py ChildProcesses: children still running at the timeout are a hang; the
    test fails within seconds, with every child's Python stacks (faulthandler on SIGABRT)."""
    hang = [sys.executable, "-c",
            "import time\ndef stuck_here():\n    time.sleep(600)\nstuck_here()"]
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_processes([hang, hang], timeout=3)
    assert time.monotonic() - start < 30
    message = str(failure.value)
    assert "child process(es) [0, 1] still running after 3 s" in message
    assert message.count("line 3 in stuck_here") == 2, message


def test_distributed_timeouts_come_from_flags_or_the_environment(monkeypatch):
    from research import config
    args = argparse.Namespace(heartbeat_timeout_s=None)
    assert config._timeout(args, "heartbeat_timeout_s", config.HEARTBEAT_ENV, 30) == 30
    monkeypatch.setenv(config.HEARTBEAT_ENV, "45")
    assert config._timeout(args, "heartbeat_timeout_s", config.HEARTBEAT_ENV, 30) == 45
    args.heartbeat_timeout_s = 7  # the flag wins over the environment
    assert config._timeout(args, "heartbeat_timeout_s", config.HEARTBEAT_ENV, 30) == 7
    args.heartbeat_timeout_s = 0
    with pytest.raises(errors.ConfigError, match="--heartbeat_timeout_s=0 is not a positive"):
        config._timeout(args, "heartbeat_timeout_s", config.HEARTBEAT_ENV, 30)
    args.heartbeat_timeout_s = None
    monkeypatch.setenv(config.HEARTBEAT_ENV, "soon")
    with pytest.raises(errors.ConfigError, match="RESEARCH_HEARTBEAT_TIMEOUT_S=soon"):
        config._timeout(args, "heartbeat_timeout_s", config.HEARTBEAT_ENV, 30)


def test_multi_process_cpu_runs_get_a_thread_per_device_to_spare(monkeypatch):
    """research.config._cpu_collective_threads (the hang fix, tools/stress_multihost.py):
    PJRT_NPROC = CPUs + 2 x local devices, unless the user set PJRT_NPROC or NPROC."""
    from research import config
    monkeypatch.delenv("PJRT_NPROC", raising=False)
    monkeypatch.delenv("NPROC", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    config._cpu_collective_threads()
    assert os.environ["PJRT_NPROC"] == str(os.cpu_count() + 2 * 4)
    monkeypatch.setenv("PJRT_NPROC", "3")
    config._cpu_collective_threads()
    assert os.environ["PJRT_NPROC"] == "3"


def test_data_state_restores_under_any_process_count():
    docs = [" ".join(["w"] * (3 + 7 * i % 40)) for i in range(29)]

    class Tok:
        bos_id, eos_id, pad_id = 1, 2, 0

        def encode(self, text):
            return [3 + len(w) for w in text.split()]

    def make(p, n):
        return causal_lm.make_causal_lm_iterator(docs, Tok(), seq_len=8, global_batch_size=4,
                                                 seed=3, process_index=p, process_count=n,
                                                 prefetch=0)

    full = make(0, 1)
    batches = [next(full) for _ in range(9)]
    for saved_by, resumed_by in [(2, 1), (1, 2), (4, 2), (2, 4)]:
        hosts = [make(p, saved_by) for p in range(saved_by)]
        for _ in range(5):
            for h in hosts:
                next(h)
        merged = causal_lm.merge_states([json.loads(json.dumps(h.get_state()))
                                         for h in reversed(hosts)])
        for p in range(resumed_by):
            it = make(p, resumed_by)
            it.set_state(merged)
            per = 4 // resumed_by
            for want in batches[5:]:
                got = next(it)
                for key in want:
                    np.testing.assert_array_equal(got[key], want[key][p * per:(p + 1) * per])
    # A single host's state does not cover another host's rows: refused, not mis-restored.
    with pytest.raises(ValueError, match="covers global rows"):
        make(1, 2).set_state(make(0, 2).get_state())
    with pytest.raises(ValueError, match="tile"):
        causal_lm.merge_states([make(0, 2).get_state()] * 2)


def test_merge_data_states_per_kind():
    from research.checkpoints.manager import merge_data_states
    # Layout-free states (classification) are equal on every process: taken as they are.
    same = {"kind": "classification", "position": 7}
    assert merge_data_states([same, dict(same)]) == same
    bert = {"kind": "bert_pretraining", "version": 1, "config": {"global_batch_size": 4}}
    merged = merge_data_states([{**bert, "row_offset": 2, "rows": [[0, 3], [8, 1]]},
                                {**bert, "row_offset": 0, "rows": [[0, 1], [0, 2]]}])
    assert merged == {**bert, "row_offset": 0, "rows": [[0, 1], [0, 2], [0, 3], [8, 1]]}
    # A state that cannot be split is refused with what to do, never silently restarted.
    with pytest.raises(errors.ConfigMismatchError, match="Resume with 2 processes"):
        merge_data_states([{"kind": "custom", "i": 0}, {"kind": "custom", "i": 1}])


# ----------------------------------------------------------------- mesh (resharding) ---

@pytest.mark.parametrize("mesh", ["{'fsdp': 4, 'tensor': 2}", "{'data': 8}"])
def test_checkpoint_resumes_under_another_mesh_shape(single, tmp_path, mesh):
    workdir = first_leg(single, tmp_path / "run")
    log = run_single(workdir, mesh=mesh)
    assert "resumed from step 2" in log
    assert "with a different layout" in log and f"MESH_SHAPE: {MESH} -> {mesh}" in log
    assert_same_run(workdir, single, RTOL_MESH)
    assert f"MESH_SHAPE = {mesh}" in (workdir / "config.gin").read_text()


def test_restore_lands_on_the_new_shardings(single, multi, clean_gin):
    """In process: the 2-process checkpoint restored onto an fsdp=4 x tensor=2 mesh."""
    from jax.sharding import PartitionSpec as P

    from research.checkpoints.manager import Checkpointer
    from research.config import parse_gin
    from research.models.transformer import TransformerConfig
    from research.objectives.causal_lm import CausalLMObjective
    from research.training.loop import build_setup

    parse_gin(GIN_FILES, [])
    setup = build_setup(model_config=TransformerConfig(), objective=CausalLMObjective(),
                        vocab=str(ROOT / "data/tokenizers/austen_8k.model"), seq_len=64,
                        batch_size=8, seed=0, mesh_shape={"fsdp": 4, "tensor": 2},
                        learning_rate=3e-3, num_steps=STEPS, warmup_steps=1)
    ckpt = Checkpointer(str(multi / "checkpoints"), save_every=K, async_save=False)
    try:
        state, data_state = ckpt.restore(K, setup.abstract_state)
    finally:
        ckpt.close()
    wi = state["params"]["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert wi.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
    assert wi.sharding.spec == P("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (wi.shape[0] // 4, wi.shape[1] // 2)
    mu = state["opt_state"][1][0].mu["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")
    saved = _saved(multi, K)["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    np.testing.assert_array_equal(np.asarray(wi), saved)
    assert int(state["step"]) == K
    assert data_state == _data_states(single, K)[0]  # 2 processes' states, merged for 1


def test_layout_bindings_may_change_on_resume_but_nothing_else(single, caplog):
    text = (single / "config.gin").read_text()
    assert f"MESH_SHAPE = {MESH}" in text and "LEARNING_RATE = 0.003" in text
    mesh = text.replace(f"MESH_SHAPE = {MESH}", "MESH_SHAPE = {'fsdp': 8}")
    layout = mesh.replace("logical_axis_rules.preset = 'fsdp_tensor'",
                          "logical_axis_rules.preset = 'fsdp'")
    layout = layout.replace("remat_policy = 'none'", "remat_policy = 'full'")
    with caplog.at_level("WARNING"):
        changed = workdir_lib.check_resume_config(str(single), layout)
    assert set(changed) == {"MESH_SHAPE", "logical_axis_rules.preset",
                            "TransformerConfig.remat_policy"}
    assert "with a different layout" in caplog.text
    assert f"MESH_SHAPE: {MESH} -> {{'fsdp': 8}}" in caplog.text
    assert "TransformerConfig.remat_policy: 'none' -> 'full'" in caplog.text
    # A real change next to a layout change is still refused, naming only the real one.
    lr = mesh.replace("LEARNING_RATE = 0.003", "LEARNING_RATE = 0.001")
    with pytest.raises(errors.ConfigMismatchError,
                       match="LEARNING_RATE: 0.003  ->  0.001") as err:
        workdir_lib.check_resume_config(str(single), lr)
    assert "MESH_SHAPE" not in str(err.value).split("Only TRAIN_STEPS")[0]
    # scan_layers changes the parameter tree, microbatches the math: not layout.
    for name, a, b in [("TransformerConfig.scan_layers", "False", "True"),
                       ("train.microbatches", "1", "2")]:
        assert f"{name} = {a}\n" in mesh
        with pytest.raises(errors.ConfigMismatchError, match=f"{name}: {a}  ->  {b}"):
            workdir_lib.check_resume_config(str(single),
                                            mesh.replace(f"{name} = {a}\n", f"{name} = {b}\n"))
