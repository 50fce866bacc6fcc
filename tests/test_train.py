"""The training loop: sharding, gradient accumulation, resume, and the CLIs end to end."""

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from research import errors
from research.training import partitioning
from research.data.causal_lm import make_causal_lm_iterator
from research.data.sources import DocumentList
from research.models.transformer import TransformerConfig
from research.objectives.causal_lm import CausalLMObjective
from research.training.run_config import EXAMPLES, MACROS, RunConfig, Schedule
from research.training.setup import build_setup, check_batch_size
from research.training.steps import make_train_step

from .conftest import ROOT, austen_paragraphs, xla_flags
from .test_metrics_writer import read_with_tensorflow

TINY = TransformerConfig(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                         max_len=64, dropout_rate=0.1, vocab_multiple=8)
SEQ, BATCH = 32, 8


def run_steps(sp_model, mesh_shape, devices, steps=3, microbatches=1, cfg=TINY):
    setup = build_setup(model_config=cfg, objective=CausalLMObjective(), vocab=sp_model,
                        seq_len=SEQ, batch_size=BATCH, seed=0, mesh_shape=mesh_shape,
                        learning_rate=1e-2, num_steps=10, warmup_steps=2, devices=devices)
    it = make_causal_lm_iterator(DocumentList(austen_paragraphs(300)), setup.tokenizer,
                                 seq_len=SEQ, global_batch_size=BATCH, seed=0)
    step = make_train_step(setup, microbatches)
    losses = []
    state = setup.init_state()
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        for _ in range(steps):
            state, metrics = step(state, partitioning.global_batch(next(it), setup.mesh))
            num, den = jax.device_get(metrics["loss"])
            losses.append(float(num) / float(den))
    return setup, state, losses


def test_sharded_training_equals_single_device(sp_model):
    _, single_state, single = run_steps(sp_model, {"data": 1}, jax.devices()[:1])
    setup, state, sharded = run_steps(sp_model, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
    assert sharded[-1] < sharded[0]  # it learns
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(single_state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)

    # The live arrays carry the fsdp_tensor layout: embed over fsdp, heads/mlp/vocab over tensor.
    layer = state["params"]["decoder"]["layer_0"]
    assert layer["mlp"]["wi"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert layer["mlp"]["wo"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert layer["attention"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert state["params"]["decoder"]["token_embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    mu = state["opt_state"][1][0].mu["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")  # optimizer state sharded like its parameter
    wi = layer["mlp"]["wi"]["kernel"]
    assert wi.addressable_shards[0].data.shape == (32 // 2, 64 // 2)  # really split, not replicated


def test_gradient_accumulation_equals_full_batch(sp_model):
    # Without dropout: microbatches draw their own dropout masks, so only then is it exact.
    cfg = dataclasses.replace(TINY, dropout_rate=0.0)
    _, state1, full = run_steps(sp_model, {"data": -1}, jax.devices(), 2, microbatches=1, cfg=cfg)
    _, state2, accum = run_steps(sp_model, {"data": -1}, jax.devices(), 2, microbatches=2, cfg=cfg)
    np.testing.assert_allclose(accum, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state1["params"]), jax.tree.leaves(state2["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bad_batch_and_mesh_are_explained(sp_model):
    with pytest.raises(ValueError, match="needs 16 devices"):
        partitioning.resolve_mesh_shape({"data": 4, "fsdp": 4}, 8)
    assert partitioning.resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8) == {
        "data": 1, "fsdp": 4, "tensor": 2}
    setup = build_setup(model_config=TINY, objective=CausalLMObjective(), vocab=sp_model,
                        seq_len=SEQ, batch_size=6, seed=0, mesh_shape={"data": 8},
                        learning_rate=1e-3, num_steps=1, warmup_steps=0)
    with pytest.raises(errors.ConfigError, match="BATCH_SIZE=6 must be divisible"):
        check_batch_size(6, setup.mesh, 1)


# ----------------------------------------------------------------- the run config ----------

def _run_config(**overrides):
    base = dict(model_config=TINY, objective=CausalLMObjective(),
                train_data="text:data/austen/persuasion.txt", vocab=None, num_steps=4,
                batch_size=BATCH, seq_len=SEQ, learning_rate=1e-3, progress_bar=False)
    return RunConfig(**{**base, **overrides})


def test_run_config_derives_the_schedule_once():
    assert _run_config().schedule(None) == Schedule(num_steps=4, warmup_steps=0, eval_every=500,
                                                    steps_per_epoch=None)
    # Fine-tuning: EPOCHS x steps per epoch, WARMUP_FRACTION of them, eval once per epoch.
    finetune = _run_config(num_steps=None, num_epochs=2.5, warmup_steps=None,
                           warmup_fraction=0.1, eval_every=None)
    assert finetune.schedule(4) == Schedule(num_steps=10, warmup_steps=1, eval_every=4,
                                            steps_per_epoch=4)
    with pytest.raises(errors.ConfigError, match="set TRAIN_STEPS"):
        finetune.schedule(None)  # a stream has no epochs
    assert _run_config(num_steps=None, eval_every=None, num_epochs=1).schedule(3).eval_every == 3
    assert MACROS["num_steps"] == "TRAIN_STEPS" and EXAMPLES["vocab"] == "\"'path.model'\""


def test_run_config_checks_every_field_on_construction():
    with pytest.raises(errors.InvalidConfigError) as info:
        _run_config(on_nonfinite="ignore", microbatches=0)
    assert "train.on_nonfinite = 'ignore' (str) must be one of ('stop', 'skip')" in str(info.value)
    assert "train.microbatches = 0 (int) must be a positive int" in str(info.value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        _run_config().num_steps = 5


def test_user_mistakes_in_the_loop_are_config_errors(tmp_path, sp_model):
    """Each names the culprit and the fix; the CLI prints them as one `error:` line."""
    from research.training.loop import train
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(errors.ConfigError, match="is an existing file, not a directory"):
        train(str(a_file), _run_config(vocab=sp_model))
    with pytest.raises(errors.ConfigError, match="VOCAB is None"):
        train(str(tmp_path / "a"), _run_config())
    with pytest.raises(errors.ConfigError, match="set TRAIN_STEPS"):
        train(str(tmp_path / "b"), _run_config(vocab=sp_model, num_steps=None))
    with pytest.raises(errors.ConfigError, match="SEQ_LEN=128 exceeds TransformerConfig.max_len=64"):
        build_setup(model_config=TINY, objective=CausalLMObjective(), vocab=sp_model,
                    seq_len=128, batch_size=BATCH, seed=0, mesh_shape={"data": -1},
                    learning_rate=1e-3, num_steps=1, warmup_steps=0)


# ----------------------------------------------------------------- CLI end to end ----------

def cli(args, cwd=ROOT, timeout=600):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_metrics(workdir):
    return [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]


TRAIN_ARGS = [
    "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
    "--gin_file=configs/runs/pretrain_causal.gin", "--gin.TRAIN_STEPS=8", "--gin.BATCH_SIZE=8",
    "--gin.SEQ_LEN=32", "--gin.WARMUP_STEPS=2", "--gin.train.log_every=1",
    "--gin.train.eval_every=4", "--gin.train.eval_steps=2", "--gin.train.checkpoint_every=4",
    "--gin.train.keep_checkpoints=5", "--gin.train.progress_bar=False",
    "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'tensor': 2}",
    "--gin.TRAIN_DATA='text:data/austen/northangerabbey.txt'",
]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run") / "gpt"
    cli([*TRAIN_ARGS, f"--workdir={workdir}"])
    return workdir


def test_cli_writes_the_run_directory(trained_workdir):
    w = trained_workdir
    metrics = read_metrics(w)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert {"train/loss", "train/tokens_per_sec", "train/accuracy", "train/learning_rate"} <= set(metrics[0])
    assert {"eval/loss", "eval/accuracy", "eval/perplexity"} <= set(metrics[3])
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"]
    assert sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    config = (w / "config.gin").read_text()
    assert "TRAIN_STEPS = 8" in config and "TransformerConfig.d_model = 64" in config
    # TensorBoard holds every logged metric at its step, as metrics.jsonl (float32 there).
    events, = (w / "tensorboard").iterdir()
    board = read_with_tensorflow(str(events))
    assert board == {(m["step"], k): pytest.approx(v, rel=1e-6)
                     for m in metrics for k, v in m.items() if k != "step"}
    assert json.loads((w / "run.json").read_text())["objective"] == "causal_lm"
    final = json.loads((w / "final.json").read_text())  # the completion marker research.sweep reads
    assert final["step"] == final["num_steps"] == 8
    assert final["metrics"]["train/loss"] == metrics[-1]["train/loss"]


def test_resume_reproduces_the_uninterrupted_run(trained_workdir, tmp_path):
    """Drop the last checkpoint and rerun: training resumes at step 4 (params, optimizer,
    data position, RNG) and ends with the same losses and parameters as the straight run."""
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    proc = cli([*TRAIN_ARGS, f"--workdir={resumed}"])
    straight = read_metrics(trained_workdir)
    again = read_metrics(resumed)
    assert [m["step"] for m in again] == list(range(1, 9))
    for a, b in zip(straight, again):
        np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-6)
    assert "final" in proc.stdout

    from research.checkpoints.manager import Checkpointer
    params = []
    for w in (trained_workdir, resumed):
        c = Checkpointer(str(w / "checkpoints"), save_every=1, async_save=False)
        restored = c.manager.restore(8, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
        params.append(restored["params"])
        c.close()
    for a, b in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_generate_cli(trained_workdir):
    proc = cli(["-m", "research.generate", f"--workdir={trained_workdir}",
                "--prompt=It is a truth", "--prompt=Catherine", "--max_new_tokens=8",
                "--temperature=0.8", "--top_k=20", "--top_p=0.9", "--seed=1"])
    assert proc.stdout.count("--- ") == 2
    assert "It is a truth" in proc.stdout


def test_train_help_lists_the_flags():
    out = cli(["-m", "research.train", "--help"]).stdout
    for flag in ("--gin_file", "--workdir", "--coordinator_address", "--num_processes",
                 "--process_id", "--gin.NAME=VALUE", "RESEARCH_HUGEPAGES=0"):
        assert flag in out


_COMPILE_ON_3_AXIS_MESH = """
from research.config import parse_gin
import gin
from research import benchmark
from research.training import partitioning
from research.training.run_config import RunConfig
from research.training.setup import build_setup
from research.training.steps import make_train_step
parse_gin(["configs/models/{model}.gin", "configs/runs/{run}.gin"], ["BATCH_SIZE=8", "SEQ_LEN=64"])
run = gin.get_bindings(RunConfig)
setup = build_setup(model_config=run["model_config"], objective=run["objective"], vocab=run["vocab"],
                    seq_len=64, batch_size=8, seed=0, mesh_shape={{"data": 2, "fsdp": 2, "tensor": 2}},
                    learning_rate=1e-3, num_steps=10, warmup_steps=0)
batch = benchmark.synthetic_batch(setup.objective, 8, 64, setup.cfg.vocab_size)
with partitioning.mesh_rules(setup.mesh, setup.rules):
    state = setup.init_state()
    make_train_step(setup).lower(state, partitioning.global_batch(batch, setup.mesh)).compile()
print("compiled")
"""


@pytest.mark.parametrize("model,run", [("gpt_tiny", "pretrain_causal"),
                                       ("bert_tiny", "pretrain_mlm_nsp")])
def test_no_involuntary_rematerialization_on_a_3_axis_mesh(model, run):
    """GSPMD replicates a tensor it cannot reshard ("Involuntary full rematerialization"); the
    embedding lookups used to trigger it on data x fsdp x tensor meshes (10 times for BERT)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               TF_CPP_MIN_LOG_LEVEL="0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ON_3_AXIS_MESH.format(model=model, run=run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]
