"""Bad input fails early and clearly: missing required values, wrong types, a full disk during a
checkpoint save (the previous checkpoint stays intact and restorable)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from research import errors
from research.checkpoints.manager import TMP_MARKER, Checkpointer
from research.data.tokenizer import train_sentencepiece
from research.models.transformer import TransformerConfig
from research.objectives.causal_lm import CausalLMObjective
from research.training.loop import train
from research.training.setup import build_setup

from .conftest import ROOT, austen_paragraphs, xla_flags
from .test_error_path import assert_one_line_error, train_cli

RUN = ROOT / "configs/runs/pretrain_causal.gin"


def run_config_without(tmp_path, *prefixes):
    lines = [ln for ln in RUN.read_text().splitlines() if not ln.startswith(prefixes)]
    path = tmp_path / "run.gin"
    path.write_text("\n".join(lines) + "\n")
    return f"--gin_file={path}"


@pytest.mark.parametrize("case", ["macro undefined", "macro REQUIRED", "binding missing"])
def test_missing_required_value_names_the_binding_and_macro(tmp_path, case):
    if case == "macro undefined":  # a run config without VOCAB (train.vocab = %VOCAB stays)
        proc = train_cli([run_config_without(tmp_path, "VOCAB", "TRAIN_DATA")], tmp_path)
        line = assert_one_line_error(
            proc, "train.vocab is required: set VOCAB in the run config or pass "
                  "--gin.VOCAB=\"'path.model'\"", "train.train_data is required: set TRAIN_DATA")
    elif case == "macro REQUIRED":
        proc = train_cli([f"--gin_file={RUN}", "--gin.VOCAB=%gin.REQUIRED"], tmp_path)
        line = assert_one_line_error(proc, "train.vocab is required: set VOCAB",
                                     "--gin.VOCAB=\"'path.model'\"")
    else:  # no train.vocab binding at all
        proc = train_cli([run_config_without(tmp_path, "VOCAB", "train.vocab")], tmp_path)
        line = assert_one_line_error(proc, "train.vocab is required",
                                     "--gin.train.vocab=\"'path.model'\"")
    assert "config string" not in line  # not gin's dump of the whole config
    assert not (tmp_path / "run").exists()  # failed before the run started


def _tiny_kwargs():
    return dict(model_config=TransformerConfig(num_layers=1, d_model=32, num_heads=4,
                                               mlp_dim=64, max_len=64),
                objective=CausalLMObjective(), train_data="text:data/austen/persuasion.txt",
                vocab=str(ROOT / "data/tokenizers/austen_8k.model"), num_steps=2, batch_size=8,
                seq_len=32, learning_rate=1e-3, progress_bar=False)


@pytest.mark.parametrize("param, value, expected", [
    ("num_steps", "100", "TRAIN_STEPS (train.num_steps) = '100' (str) must be a positive int"),
    ("batch_size", 0, "BATCH_SIZE (train.batch_size) = 0 (int) must be a positive int"),
    ("seq_len", 32.0, "SEQ_LEN (train.seq_len) = 32.0 (float) must be a positive int"),
    ("learning_rate", "1e-3", "LEARNING_RATE (train.learning_rate) = '1e-3' (str) must be a "
                              "positive number"),
    ("seed", True, "SEED (train.seed) = True (bool) must be an int"),
    ("mesh_shape", [2, 4], "MESH_SHAPE (train.mesh_shape) = [2, 4] (list) must be a dict"),
    ("vocab", 8000, "VOCAB (train.vocab) = 8000 (int) must be a string or None"),
    ("eval_data", ["a.txt"], "EVAL_DATA (train.eval_data) = ['a.txt'] (list) must be a string"),
])
def test_wrong_types_for_train_fail_before_compute(tmp_path, param, value, expected):
    gin.clear_config()
    workdir = tmp_path / "run"
    with pytest.raises(errors.InvalidConfigError) as info:
        train(str(workdir), **{**_tiny_kwargs(), param: value})
    assert expected in str(info.value)
    assert "--gin." in str(info.value)  # says how to fix it
    assert not workdir.exists()


def test_wrong_type_through_the_cli(tmp_path):
    proc = train_cli([f"--gin_file={RUN}", "--gin.BATCH_SIZE='8'", "--gin.LEARNING_RATE=-1.0"],
                     tmp_path)
    assert_one_line_error(proc, "BATCH_SIZE (train.batch_size) = '8' (str) must be a positive int",
                          "LEARNING_RATE (train.learning_rate) = -1.0 (float) must be a positive",
                          "--gin.BATCH_SIZE=16")
    assert proc.returncode == 2


@pytest.fixture(scope="module")
def setup():
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=4, mlp_dim=64, max_len=64,
                            vocab_multiple=8)
    return build_setup(model_config=cfg, objective=CausalLMObjective(),
                       vocab=str(ROOT / "data/tokenizers/austen_8k.model"), seq_len=32,
                       batch_size=8, seed=0, mesh_shape={"data": -1}, learning_rate=1e-2,
                       num_steps=10, warmup_steps=0)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, setup,
                                                             async_save):
    directory = tmp_path / "checkpoints"
    state = setup.init_state()
    saved = jax.tree.map(np.asarray, state["params"])

    write = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def full_disk(self, item, path):  # the second save's last file hits a full disk
        if item.get("step") == 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return await write(self, item, path)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
    ckpt = Checkpointer(str(directory), save_every=10, async_save=async_save)
    assert ckpt.save(10, state, {"position": 10})
    with pytest.raises(errors.CheckpointSaveError) as info:
        ckpt.save(20, {**state, "params": jax.tree.map(lambda x: x + 1, state["params"])},
                  {"position": 20})
        ckpt.close()  # async: the background commit's error surfaces here
    msg = str(info.value)
    assert "checkpoint save at step 20 failed: OSError: [Errno 28] No space left on device" in msg
    assert "the previous checkpoint at step 10 is intact" in msg
    assert "free space" in msg and "re-run the same command to resume" in msg
    assert "20" not in os.listdir(directory)  # nothing of the failed save can be restored
    monkeypatch.undo()

    again = Checkpointer(str(directory), save_every=10, async_save=False)
    try:
        assert not [n for n in os.listdir(directory) if TMP_MARKER in n]
        assert again.latest_step() == 10
        restored, data_state = again.restore(10, setup.abstract_state)
    finally:
        again.close()
    assert data_state == {"position": 10} and int(restored["step"]) == 10
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(restored["params"])):
        np.testing.assert_array_equal(np.asarray(b), a)


# ------------------------------------------------------- resuming with another tokenizer ------

def test_resume_refuses_a_tokenizer_replaced_at_the_same_path(tmp_path, sp_model):
    """DIR/run.json records the tokenizer's size and special ids; resuming with a different
    .model at the same VOCAB path is refused before any compute, naming what changed."""
    vocab = tmp_path / "vocab.model"
    shutil.copy(sp_model, vocab)
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
            "--gin_file=configs/runs/pretrain_causal.gin", "--gin.TRAIN_STEPS=2",
            "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.EVAL_DATA=None",
            "--gin.train.progress_bar=False", f"--gin.VOCAB='{vocab}'",
            "--gin.TRAIN_DATA='text:data/austen/persuasion.txt'", f"--workdir={workdir}"]
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((workdir / "run.json").read_text())["tokenizer"]["vocab_size"] == 1000

    other = train_sentencepiece(austen_paragraphs(2000), str(tmp_path / "other"), vocab_size=700)
    shutil.copy(other.path, vocab)
    again = subprocess.run([*args[:5], "--gin.TRAIN_STEPS=4", *args[6:]], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode != 0
    assert "different tokenizer" in again.stderr and "vocab_size: 1000  ->  700" in again.stderr
    assert json.loads((workdir / "run.json").read_text())["tokenizer"]["vocab_size"] == 1000
