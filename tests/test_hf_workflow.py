"""A Llama checkpoint saved by `transformers` through the whole workflow: converted with
tools/convert_checkpoint.py --from_hf, then `python -m research.train` (subprocesses, bounded
in time) with no tokenizer flag (run.json points at its tokenizer.json):

  - continued pretraining (configs/runs/pretrain_causal.gin): the first step's loss equals the
    loss transformers' LlamaForCausalLM computes on the same packed batch, and the run starts
    from the converted parameters, bit for bit;
  - sequence classification (configs/runs/finetune_classification.gin, the decoder head on the
    last real token): the converted decoder plus a fresh head fits its training sentences
    well above the majority-class rate.

The model is a tiny Llama 3-style one (GQA, untied embeddings, rotary with theta 500000, a
byte-level BPE tokenizer.json with <|begin_of_text|> / <|end_of_text|> and no pad), built
offline from a random config; the tokenizer is trained here on the bundled Austen text.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from research.checkpoints import manager  # noqa: E402
from research.data.causal_lm import make_causal_lm_iterator_from_spec  # noqa: E402
from research.data.tokenizer import load_tokenizer  # noqa: E402
from research.data.tokenizer_base import VocabError  # noqa: E402
from research.models.transformer import TransformerConfig  # noqa: E402
from research.objectives.classification import ClassificationObjective  # noqa: E402
from tests.conftest import ROOT, austen_paragraphs, xla_flags  # noqa: E402
from tests.test_hf_convert import run_tool  # noqa: E402
from tests.test_hf_tokenizer import _byte_level_bpe  # noqa: E402

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SEQ_LEN, BATCH = 48, 4
TIMEOUT = 300  # seconds per research.train process
CLS_EPOCHS, CLS_BATCH = 6, 16  # 64 training sentences: 4 steps an epoch
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(HF directory, converted directory): the Llama saved by transformers, then converted."""
    root = tmp_path_factory.mktemp("hf_llama")
    hf_dir, ours = root / "hf", root / "ours"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_bpe(384, [BOS, EOS]), bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(str(hf_dir))
    config = transformers.LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.1,  # far from uniform outputs: theta 10000 moves the loss 8e-4
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(hf_dir))
    run_tool(f"--from_hf={hf_dir}", f"--to={ours}")
    return hf_dir, ours


@pytest.fixture(scope="module")
def workflow(hf_llama, tmp_path_factory) -> dict:
    """The tiny datasets and each training run's arguments (a test starts its own run: under
    pytest-xdist the two tests may land on different workers)."""
    hf_dir, ours = hf_llama
    root = tmp_path_factory.mktemp("hf_workflow")
    # Short documents (Austen's dialogue lines), so rows pack several segments.
    lines = [p for p in austen_paragraphs(3000)[1500:] if 20 < len(p) < 120][:400]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    rows = (ROOT / "data" / "rotten_tomatoes" / "train.tsv").read_text().splitlines()[:65]
    (root / "train.tsv").write_text("\n".join(rows) + "\n")

    common = [f"--gin_file={ours / 'model.gin'}", f"--gin.INIT_CHECKPOINT='{ours}'",
              "--gin.train.progress_bar=False", "--gin.tokenize_workers.workers=0"]
    causal = [*common, "--gin_file=configs/runs/pretrain_causal.gin", "--gin.VOCAB=None",
              "--gin.TRAIN_STEPS=1", f"--gin.BATCH_SIZE={BATCH}", f"--gin.SEQ_LEN={SEQ_LEN}",
              "--gin.EVAL_DATA=None", "--gin.train.log_every=1",
              f"--gin.TRAIN_DATA='jsonl:{root / 'docs.jsonl'}'", f"--workdir={root / 'cpt'}"]
    classify = [*common, "--gin_file=configs/runs/finetune_classification.gin",
                "--gin.SEQ_LEN=32", f"--gin.BATCH_SIZE={CLS_BATCH}", f"--gin.EPOCHS={CLS_EPOCHS}",
                "--gin.LEARNING_RATE=1e-3", "--gin.train.log_every=4",
                f"--gin.TRAIN_DATA='tsv:{root / 'train.tsv'}'",
                f"--gin.EVAL_DATA='tsv:{root / 'train.tsv'}'", "--gin.TEST_DATA=None",
                f"--workdir={root / 'cls'}"]
    return {"root": root, "hf": hf_dir, "ours": ours, "causal": causal, "classify": classify}


def train(workflow: dict, name: str) -> str:
    """Runs one `python -m research.train` (bounded in time); its stderr."""
    env = dict(ENV, RESEARCH_DATA_DIR=str(workflow["root"] / "cache"))
    try:
        proc = subprocess.run([sys.executable, "-m", "research.train", *workflow[name]], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"research.train ({name}) ran past {TIMEOUT}s:\n{str(err.stderr)[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def metrics(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def hf_packed_loss(hf_dir: pathlib.Path, batch: dict[str, np.ndarray]) -> float:
    """transformers' mean next-token loss over the batch's weighted targets, each packed segment
    attending only to itself (a 4D mask) at its own positions."""
    hf = transformers.LlamaForCausalLM.from_pretrained(str(hf_dir), attn_implementation="eager")
    hf.float().eval()
    seg = torch.tensor(batch["segment_ids"])
    t = seg.shape[1]
    allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
               & torch.tril(torch.ones(t, t, dtype=torch.bool))) | torch.eye(t, dtype=torch.bool)
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(batch["inputs"]).long(), attention_mask=mask,
                    position_ids=torch.tensor(batch["positions"]).long()).logits
    logp = torch.log_softmax(logits.double(), -1)
    target_logp = logp.gather(-1, torch.tensor(batch["targets"]).long()[..., None])[..., 0]
    weights = torch.tensor(batch["weights"]).double()
    return float(-(target_logp * weights).sum() / weights.sum())


def test_continued_pretraining_starts_from_the_hf_model(workflow):
    train(workflow, "causal")
    root, hf_dir, ours = workflow["root"], workflow["hf"], workflow["ours"]
    info = json.loads((root / "cpt" / "run.json").read_text())
    assert info["vocab"] == str(hf_dir / "tokenizer.json")  # --gin.VOCAB=None: the checkpoint's
    assert info["model_config"]["rope_theta"] == 500000.0
    first = metrics(root / "cpt")[0]
    assert first["step"] == 1 and first["train/learning_rate"] == 0.0  # warmup: step 1 is lr 0

    # Step 0's parameters are the converted ones: with learning rate 0, step 1 keeps them.
    converted = manager.restore_params_on_host(str(ours / "checkpoints"), 0)
    trained = manager.restore_params_on_host(str(root / "cpt" / "checkpoints"), 1)
    np.testing.assert_equal(trained, converted)

    # The same first batch, packed again here; transformers' loss on it.
    tokenizer = load_tokenizer(info["vocab"])
    it = make_causal_lm_iterator_from_spec(f"jsonl:{root / 'docs.jsonl'}", tokenizer,
                                           data_dir=str(root / "cache"), seq_len=SEQ_LEN,
                                           global_batch_size=BATCH, seed=0, prefetch=0,
                                           tokenize_workers=0)
    batch = next(it)
    it.close()
    assert batch["segment_ids"].max() >= 2 and batch["inputs"][0, 0] == tokenizer.bos_id
    np.testing.assert_allclose(first["train/loss"], hf_packed_loss(hf_dir, batch), rtol=2e-6)


def test_classification_fine_tuning_from_the_hf_model_learns(workflow):
    err = train(workflow, "classify")
    workdir = workflow["root"] / "cls"
    assert "initialised 20 of 22 parameters from" in err  # the decoder; the head is fresh
    evals = [r for r in metrics(workdir) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [4 * e for e in range(1, CLS_EPOCHS + 1)]
    labels = [line.split("\t", 1)[0] for line in
              (workflow["root"] / "train.tsv").read_text().splitlines()[1:]]
    majority = max(labels.count(label) for label in set(labels)) / len(labels)
    # Measured: 0.67 (majority) -> 0.72 at step 4, 0.97 at step 24; eval loss 0.56 -> 0.24.
    assert max(r["eval/accuracy"] for r in evals) >= majority + 0.2, (evals, majority)
    assert evals[-1]["eval/loss"] < 0.6 * evals[0]["eval/loss"]


def test_decoder_classification_needs_a_separator_only_for_pairs(hf_llama, tmp_path):
    """Llama's tokenizer has BOS and EOS but no separator: single texts ([BOS] a [EOS]) are
    accepted, a pair ([BOS] a [SEP] b [EOS]) is refused naming the missing piece."""
    hf_dir, _ = hf_llama
    tokenizer = load_tokenizer(str(hf_dir / "tokenizer.json"))
    cfg = TransformerConfig(vocab_size=tokenizer.vocab_size, num_layers=1, d_model=16,
                            num_heads=2, mlp_dim=32, max_len=16, causal=True)
    (tmp_path / "pairs.tsv").write_text("label\ta\tb\n1\tTo be sure.\tShe smiled.\n")
    kwargs = dict(seq_len=16, global_batch_size=1, seed=0)
    single = ClassificationObjective(text_fields=("a",)).for_model(cfg)
    single = single.with_training_data(single.open_source(f"tsv:{tmp_path / 'pairs.tsv'}"))
    batch = next(iter(single.make_iterator(single.open_source(f"tsv:{tmp_path / 'pairs.tsv'}"),
                                           tokenizer, **kwargs)))
    ids = tokenizer.encode("To be sure.")
    assert batch["input_ids"][0, :len(ids) + 2].tolist() == \
        [tokenizer.bos_id, *ids, tokenizer.eos_id]
    pair = ClassificationObjective(text_fields=("a", "b")).for_model(cfg)
    pair = pair.with_training_data(pair.open_source(f"tsv:{tmp_path / 'pairs.tsv'}"))
    with pytest.raises(VocabError, match="has no sep token"):
        pair.make_iterator(pair.open_source(f"tsv:{tmp_path / 'pairs.tsv'}"), tokenizer, **kwargs)
