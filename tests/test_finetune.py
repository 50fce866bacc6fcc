"""Fine-tuning end to end: pretrain → fine-tune with a fresh head (several seeds) → metrics,
best checkpoint and test predictions; and the error cases of INIT_CHECKPOINT."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from .conftest import ROOT

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


def run(args, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def write_tsv(path, rows):
    path.write_text("label\ttext\n" + "".join(f"{lab}\t{text}\n" for lab, text in rows))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A small sentiment task cut from the bundled Rotten Tomatoes files."""
    d = tmp_path_factory.mktemp("task")
    src = (ROOT / "data" / "rotten_tomatoes")
    for split, n in (("train", 64), ("validation", 40), ("test", 24)):
        lines = (src / f"{split}.tsv").read_text().splitlines()[1:n + 1]
        rows = [line.split("\t", 1) for line in lines]
        write_tsv(d / f"{split}.tsv", rows)
    return d


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pre") / "gpt"
    run(["-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
         "--gin_file=configs/runs/pretrain_causal.gin", "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8",
         "--gin.SEQ_LEN=32", "--gin.EVAL_DATA=None", "--gin.train.progress_bar=False",
         "--gin.TRAIN_DATA='text:data/austen/persuasion.txt'", f"--workdir={workdir}"])
    return workdir


FINETUNE = ["--gin_file=configs/models/gpt_tiny.gin",
            "--gin_file=configs/runs/finetune_classification.gin", "--gin.SEQ_LEN=32",
            "--gin.BATCH_SIZE=16", "--gin.EPOCHS=2", "--gin.LEARNING_RATE=1e-3",
            "--gin.train.progress_bar=False", "--gin.train.log_every=2"]


def test_finetune_several_seeds_from_a_pretrained_checkpoint(task, pretrained, tmp_path):
    out = tmp_path / "sweep"
    proc = run(["tools/multi_seed.py", "--seeds=0,1", f"--workdir={out}", "--", *FINETUNE,
                f"--gin.INIT_CHECKPOINT='{pretrained}'",
                f"--gin.TRAIN_DATA='tsv:{task}/train.tsv'",
                f"--gin.EVAL_DATA='tsv:{task}/validation.tsv'",
                f"--gin.TEST_DATA='tsv:{task}/test.tsv'"])
    assert "mean ± std" in proc.stdout and "eval/accuracy" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    acc = summary["summary"]["eval/accuracy"]
    assert len(acc["values"]) == 2 and 0.0 <= acc["mean"] <= 1.0
    np.testing.assert_allclose(acc["std"], np.std(acc["values"], ddof=1))
    for seed in (0, 1):
        w = out / f"seed_{seed}"
        rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == 8  # 2 epochs x ceil(64 / 16)
        evals = [r for r in rows if "eval/accuracy" in r]
        assert [r["step"] for r in evals] == [4, 8]  # once per epoch
        assert {"eval/f1", "eval/mcc", "eval/loss"} <= set(evals[0])
        best = json.loads((w / "best" / "best.json").read_text())
        assert best["value"] == max(r["eval/accuracy"] for r in evals)
        preds = (w / "predictions.tsv").read_text().splitlines()
        assert preds[0] == "index\tprediction" and len(preds) == 25
        assert [int(p.split("\t")[0]) for p in preds[1:]] == list(range(24))
        assert {p.split("\t")[1] for p in preds[1:]} <= {"0", "1"}


def test_scratch_training_needs_a_vocab_and_bad_checkpoints_are_named(task, tmp_path):
    data = [f"--gin.TRAIN_DATA='tsv:{task}/train.tsv'", f"--gin.EVAL_DATA='tsv:{task}/validation.tsv'",
            "--gin.TEST_DATA=None"]
    proc = run(["-m", "research.train", *FINETUNE, *data, f"--workdir={tmp_path / 'a'}"], check=False)
    assert proc.returncode != 0 and "VOCAB is None" in proc.stderr
    proc = run(["-m", "research.train", *FINETUNE, *data, "--gin.INIT_CHECKPOINT='/no/such/run'",
                f"--workdir={tmp_path / 'b'}"], check=False)
    assert proc.returncode != 0 and "INIT_CHECKPOINT '/no/such/run' does not exist" in proc.stderr
