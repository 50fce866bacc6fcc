"""Multiple choice (SWAG style): the jsonl reader, choice encoding against HF run_swag's
preprocessing with BertTokenizerFast (choices stay grouped, longest-first truncation), the
loss against a numpy softmax over the choices, BertForMultipleChoice and
GPT2ForSequenceClassification parity through the converter (import and export), and a CLI
fine-tune with configs/runs/finetune_multiple_choice.gin that learns."""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from research.data.local_builder import DataSourceError
from research.data.multiple_choice import (MultipleChoiceIterator, encode_choices,
                                           load_multiple_choice)
from research.data.tokenizer import load_tokenizer
from research.objectives.multiple_choice import MultipleChoiceObjective

from .conftest import ROOT, xla_flags

AUSTEN_MC = ROOT / "data" / "austen_mc"


def write_jsonl(path: pathlib.Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f"jsonl:{path}"


SWAG_ROWS = [
    {"sent1": "She opened the letter.", "sent2": "Her hands", "ending0": "shook a little.",
     "ending1": "were a carriage.", "ending2": "sang loudly.", "ending3": "are blue.",
     "label": 0},
    {"sent1": "The rain stopped.", "sent2": "They", "ending0": "drowned.",
     "ending1": "went out for a walk.", "ending2": "ate the sun.", "ending3": "said yes.",
     "label": "1"},
]


# ------------------------------------------------------------------------- reader ------------


def test_reader_swag_fields_list_fields_and_errors(tmp_path):
    ex = load_multiple_choice(write_jsonl(tmp_path / "a.jsonl", SWAG_ROWS))
    assert ex.contexts == ["She opened the letter.", "The rain stopped."]
    assert ex.endings[1] == ("They drowned.", "They went out for a walk.", "They ate the sun.",
                             "They said yes.")
    assert ex.labels.tolist() == [0, 1] and ex.num_choices == 4

    generic = write_jsonl(tmp_path / "g.jsonl", [
        {"context": "c1", "endings": ["x", "y", "z"], "answer": 2},
        {"context": "c2", "endings": ["u", "v", "w"], "answer": 0}])
    ex = load_multiple_choice(generic, context_field="context", question_field=None,
                              ending_fields=("endings",), label_field="answer")
    assert ex.endings == [("x", "y", "z"), ("u", "v", "w")] and ex.labels.tolist() == [2, 0]

    def error(rows, match, **kw):
        spec = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(DataSourceError, match=match):
            load_multiple_choice(spec, **kw)

    row = SWAG_ROWS[0]
    error([row, {**row, "label": 4}], r"bad.jsonl, line 2: label 4 is not an ending index 0..3")
    error([{k: v for k, v in row.items() if k != "ending2"}], r"line 1: field 'ending2' is missing")
    error([{**row, "label": None}], r"line 1: no label in 'label'")
    error([generic_row := {"context": "c", "endings": ["a", "b"], "label": 0},
           {**generic_row, "endings": ["a", "b", "c"]}],
          "3 endings, but the first example has 2", context_field="context",
          question_field=None, ending_fields=("endings",))
    error(["{not json"], r"line 1: invalid JSON")
    test = load_multiple_choice(write_jsonl(tmp_path / "t.jsonl", [{**row, "label": -1}]),
                                allow_unlabeled=True)
    assert test.labels.tolist() == [-1]
    with pytest.raises(DataSourceError, match="Unknown multiple-choice data spec"):
        load_multiple_choice(f"tsv:{tmp_path}/a.jsonl")
    with pytest.raises(DataSourceError, match="matches no file"):
        load_multiple_choice(f"jsonl:{tmp_path}/none*.jsonl")


def test_bundled_austen_set_reads():
    train = load_multiple_choice(f"jsonl:{AUSTEN_MC}/train.jsonl")
    dev = load_multiple_choice(f"jsonl:{AUSTEN_MC}/validation.jsonl")
    assert (len(train), len(dev), train.num_choices, dev.num_choices) == (600, 200, 4, 4)
    assert set(train.labels.tolist()) == {0, 1, 2, 3}
    assert all(len(set(e)) == 4 for e in train.endings)  # four different endings


# ------------------------------------------------------------------------- encoding ----------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PIECES = ["she", "opened", "the", "letter", ".", "her", "hands", "shook", "a", "little", "were",
          "car", "##riage", "sang", "loud", "##ly", "are", "blue", "rain", "stopped", "they",
          "drown", "##ed", "went", "out", "for", "walk", "ate", "sun", "said", "yes"]


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("wp")
    (d / "vocab.txt").write_text("\n".join(SPECIALS + PIECES) + "\n", encoding="utf-8")
    return d


@pytest.mark.parametrize("seq_len", [32, 9])
def test_choices_equal_hf_run_swag_and_stay_grouped(wordpiece_dir, tmp_path, seq_len):
    """Each row r, choice i of a (shuffled) batch equals HF run_swag's preprocessing of example
    index[r] with ending i: tokenizer(sent1, sent2 + ' ' + ending, truncation=True,
    max_length=seq_len) ids, token types and attention mask (seq_len 9 truncates)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(wordpiece_dir))
    tok = load_tokenizer(str(wordpiece_dir / "vocab.txt"))
    rows = SWAG_ROWS * 3
    ex = load_multiple_choice(write_jsonl(tmp_path / "a.jsonl", rows))
    it = MultipleChoiceIterator(ex, tok, seq_len=seq_len, global_batch_size=4, seed=3,
                                repeat=True)
    truncated = False
    for _ in range(2):
        batch = next(it)
        assert batch["input_ids"].shape == (4, 4, seq_len)
        for r, k in enumerate(batch["index"]):
            row = rows[k]
            ref = hf([row["sent1"]] * 4, [f"{row['sent2']} {row[f'ending{i}']}" for i in range(4)],
                     truncation=True, max_length=seq_len)
            for i in range(4):
                n = len(ref["input_ids"][i])
                assert batch["input_ids"][r, i, :n].tolist() == ref["input_ids"][i]
                assert batch["token_type_ids"][r, i, :n].tolist() == ref["token_type_ids"][i]
                assert batch["input_mask"][r, i].tolist() == [1] * n + [0] * (seq_len - n)
                assert (batch["input_ids"][r, i, n:] == tok.pad_id).all()
                truncated |= n == seq_len
            assert batch["label"][r] == int(row["label"]) and batch["weight"][r] == 1
    assert truncated == (seq_len == 9)
    ids, _, mask = encode_choices([7, 8, 9, 10, 11, 12], [[13], [14, 15, 16, 17]], tok, 8)
    assert ids.tolist() == [[2, 7, 8, 9, 10, 3, 13, 3], [2, 7, 8, 9, 3, 14, 15, 3]]
    assert mask.sum(1).tolist() == [8, 8]


# ------------------------------------------------------------------------- loss --------------


def test_loss_equals_numpy_softmax_over_choices(wordpiece_dir, tmp_path):
    """The objective's loss and metrics equal a numpy softmax over each example's choices
    (weighted mean, the padding row of a one-pass batch ignored), each choice's logit equals
    the model run on that choice alone, and task accuracy counts argmax == label."""
    import flax.linen as nn
    import jax

    from research.models.transformer import TransformerConfig

    tok = load_tokenizer(str(wordpiece_dir / "vocab.txt"))
    ex = load_multiple_choice(write_jsonl(tmp_path / "a.jsonl", SWAG_ROWS + SWAG_ROWS[:1]))
    cfg = TransformerConfig(vocab_size=64, num_layers=1, d_model=32, num_heads=2, mlp_dim=64,
                            max_len=32, norm_placement="post", embedding_norm=True,
                            type_vocab_size=2, causal=False, activation="gelu_exact")
    obj = MultipleChoiceObjective().with_training_data(ex).for_model(cfg)
    batch = next(obj.make_iterator(ex, tok, seq_len=16, global_batch_size=4, seed=0,
                                   repeat=False))
    assert batch["weight"].tolist() == [1, 1, 1, 0]
    model = obj.make_model(cfg)
    shapes = jax.eval_shape(lambda: nn.unbox(obj.init(
        model, {"params": jax.random.key(1), "dropout": jax.random.key(2)},
        obj.dummy_batch(2, 16))["params"]))
    rng = np.random.default_rng(3)  # N(0, 0.5) weights: logits far apart
    params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32), shapes)

    @jax.jit
    def run(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["input_mask"],
                             batch["token_type_ids"])
        alone = model.apply({"params": params}, batch["input_ids"][1:2, 2:3],
                            batch["input_mask"][1:2, 2:3], batch["token_type_ids"][1:2, 2:3])
        loss = obj.loss(model, params, batch, jax.random.key(0), obj.normalizers(batch),
                        deterministic=True)
        return logits, alone, loss, obj.predict(model, params, batch)["prediction"]

    logits, alone, (loss, metrics), pred = run(params, batch)
    logits = np.asarray(logits, np.float64)
    np.testing.assert_allclose(float(alone[0, 0]), logits[1, 2], rtol=1e-5, atol=1e-5)
    assert logits.shape == (4, 4) and np.ptp(logits[:3], axis=1).min() > 0.1

    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    nll = -logp[np.arange(4), batch["label"]][:3]
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"][0]), nll.sum(), rtol=1e-5)
    correct = (logits.argmax(1) == batch["label"])[:3]
    assert float(metrics["accuracy"][0]) == correct.sum() and float(metrics["accuracy"][1]) == 3
    pred = np.asarray(pred)
    assert pred.tolist() == logits.argmax(1).tolist()
    assert obj.task_metrics(pred[:3], batch["label"][:3]) == {"accuracy": correct.mean()}
    assert obj.format_prediction(2.0) == "2"


def test_objective_refuses_a_decoder_and_a_different_number_of_choices(tmp_path):
    from research.errors import ConfigError
    from research.models.transformer import TransformerConfig

    train = load_multiple_choice(write_jsonl(tmp_path / "a.jsonl", SWAG_ROWS))
    obj = MultipleChoiceObjective().with_training_data(train)
    assert obj.num_choices == 4 and MultipleChoiceObjective().num_choices is None
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        obj.for_model(TransformerConfig(vocab_size=64, causal=True))
    three = write_jsonl(tmp_path / "b.jsonl", [{k: v for k, v in SWAG_ROWS[0].items()
                                                if k != "ending3"}])
    with pytest.raises(ConfigError, match="has 3 choices per example but the training data has 4"):
        MultipleChoiceObjective(ending_fields=("ending0", "ending1", "ending2")
                                ).with_training_data(train).open_source(three, role="eval")


def test_converter_head_errors():
    """A config.json naming BertForMultipleChoice over a 2-label classifier is refused; a
    GPT-2 classifier bias that no ln_f shift can reproduce (a zero score kernel) is refused,
    and a zero bias exports ln_f unchanged."""
    from research.checkpoints.errors import ConversionError
    from research.checkpoints.hf import bert as hf_bert
    from research.checkpoints.hf import gpt2 as hf_gpt2

    from .test_hf_convert import BERT_KW, GPT2_KW

    hf_config = {**BERT_KW, "model_type": "bert", "architectures": ["BertForMultipleChoice"]}
    cfg = hf_bert.bert_config_from_hf(hf_config)
    state = {r.hf: np.zeros(r.hf_shape, np.float32)
             for r in hf_bert.bert_rules(cfg, {"pooler", "classifier"}, 2)}
    with pytest.raises(ConversionError, match="names BertForMultipleChoice"):
        hf_bert.bert_from_hf(hf_config, state)

    cfg = hf_gpt2.gpt2_config_from_hf({**GPT2_KW, "model_type": "gpt2"})
    params = {r.ours: np.full(r.ours_shape, 0.5, np.float32)
              for r in hf_gpt2.gpt2_rules(cfg, num_labels=2)}
    config, state = hf_gpt2.gpt2_to_hf(cfg, {**params, "classifier/bias": np.zeros(2)})
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    np.testing.assert_array_equal(state["transformer.ln_f.bias"], 0.5)
    assert state["score.weight"].shape == (2, 32) and "lm_head.weight" not in state
    params["classifier/kernel"] = np.zeros_like(params["classifier/kernel"])
    with pytest.raises(ConversionError, match="cannot be folded into ln_f"):
        hf_gpt2.gpt2_to_hf(cfg, {**params, "classifier/bias": np.array([1.0, 0.0])})


# ------------------------------------------------------------------------- HF heads ----------


def test_bert_multiple_choice_parity_import_and_export(tmp_path):
    """HF BertForMultipleChoice -> converter -> our MultipleChoiceClassifier: logits within
    1e-4; ours -> HF loads strictly as BertForMultipleChoice with the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax

    from research.models.heads import MultipleChoiceClassifier

    from .test_hf_convert import (BERT_KW, TOL, bert_batch, config_from_outputs,
                                  load_hf_strict, max_diff, randomize_hf, restore, run_tool,
                                  save_hf, save_workdir, torch_long)
    torch.manual_seed(0)
    hf = transformers.BertForMultipleChoice(transformers.BertConfig(**BERT_KW))
    randomize_hf(hf, seed=6)
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={save_hf(hf, tmp_path / 'hf')}", f"--to={out}")
    info = json.loads(pathlib.Path(out, "run.json").read_text())
    assert info["objective"] == "multiple_choice" and "num_labels" not in info
    cfg = config_from_outputs(out)
    ids, mask, types, _ = bert_batch(cfg.vocab_size, seed=7)  # 3 choices of 1 example ...
    ids2, mask2, types2, _ = bert_batch(cfg.vocab_size, seed=8)  # ... and of another
    ids, mask, types = (np.stack([a, b]) for a, b in ((ids, ids2), (mask, mask2),
                                                      (types, types2)))
    model = MultipleChoiceClassifier(cfg, head_dropout=0.5)
    params = restore(out, model, ids, mask, types)
    assert {"choice_classifier", "pooler", "encoder"} == set(params)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask, types))

    def hf_logits(m):
        with torch.no_grad():
            return m(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                     token_type_ids=torch_long(types)).logits.numpy()

    ref = hf_logits(hf)
    assert logits.shape == ref.shape == (2, 3)
    assert max_diff(logits, ref) <= TOL and np.ptp(ref) > 1.0

    workdir = save_workdir(tmp_path / "run", cfg, params, "multiple_choice")
    hf_dir = str(tmp_path / "hf_back")
    run_tool(f"--from={workdir}", f"--to_hf={hf_dir}")
    config = json.loads(pathlib.Path(hf_dir, "config.json").read_text())
    assert config["architectures"] == ["BertForMultipleChoice"]
    assert max_diff(hf_logits(load_hf_strict(transformers.BertForMultipleChoice, hf_dir)),
                    logits) <= TOL


def test_gpt2_sequence_classification_parity_import_and_export(tmp_path):
    """HF GPT2ForSequenceClassification (score, no bias, last non-pad token) -> our decoder
    SequenceClassifier: logits within 1e-4 on right-padded rows; ours with a nonzero
    classifier bias -> HF (bias folded into ln_f) loads strictly with the same logits, and
    imports back to the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax

    from research.models.heads import SequenceClassifier

    from .test_hf_convert import (GPT2_KW, TOL, config_from_outputs,
                                  load_hf_strict, max_diff, randomize_hf, restore, run_tool,
                                  save_hf, save_workdir, torch_long)
    pad = 0
    torch.manual_seed(0)
    hf = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(**GPT2_KW, num_labels=3, pad_token_id=pad))
    randomize_hf(hf, seed=9)
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={save_hf(hf, tmp_path / 'hf')}", f"--to={out}")
    info = json.loads(pathlib.Path(out, "run.json").read_text())
    assert info["objective"] == "classification" and info["num_labels"] == 3
    cfg = config_from_outputs(out)
    assert cfg.causal

    rng = np.random.default_rng(10)
    lengths = np.array([10, 7, 3])
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    ids = (rng.integers(1, cfg.vocab_size, (3, 10)) * mask).astype(np.int32)  # pad id 0 after
    types, last = np.zeros_like(ids), (lengths - 1).astype(np.int32)
    model = SequenceClassifier(cfg, num_outputs=3, head_dropout=0.5)
    params = restore(out, model, ids, mask, types, last)
    np.testing.assert_array_equal(params["classifier"]["bias"], np.zeros(3, np.float32))
    apply = jax.jit(model.apply)

    def hf_logits(m):
        with torch.no_grad():
            return m(input_ids=torch_long(ids), attention_mask=torch_long(mask)).logits.numpy()

    ref = hf_logits(hf)
    assert max_diff(apply({"params": params}, ids, mask, types, last), ref) <= TOL
    assert np.ptp(ref) > 1.0

    params = dict(params, classifier={**params["classifier"],
                                      "bias": jax.numpy.asarray([0.5, -1.0, 2.0])})
    ours = np.asarray(apply({"params": params}, ids, mask, types, last))
    workdir = save_workdir(tmp_path / "run", cfg, params, "classification")
    hf_dir, back = str(tmp_path / "hf_back"), str(tmp_path / "back")
    run_tool(f"--from={workdir}", f"--to_hf={hf_dir}")
    config = json.loads(pathlib.Path(hf_dir, "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    exported = load_hf_strict(transformers.GPT2ForSequenceClassification, hf_dir)
    exported.config.pad_token_id = pad  # the run had no tokenizer to take it from
    assert max_diff(hf_logits(exported), ours) <= TOL
    run_tool(f"--from_hf={hf_dir}", f"--to={back}")
    again = restore(back, model, ids, mask, types, last)
    assert max_diff(apply({"params": again}, ids, mask, types, last), ours) <= TOL


# ------------------------------------------------------------------------- CLI ---------------

ANIMALS = ["cat", "dog", "horse", "sheep", "cow", "bird", "fish", "mouse"]
THINGS = ["table", "chair", "house", "letter", "carriage", "window", "paper", "door"]


def animal_rows(n: int, seed: int) -> list[dict]:
    """'Which is an animal?' with one animal among four endings, at a random position."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(4)
        endings = rng.sample(THINGS, 3)
        endings.insert(label, rng.choice(ANIMALS))
        rows.append({"sent1": "which of these is an animal ?", "sent2": "it is the",
                     **{f"ending{i}": e for i, e in enumerate(endings)}, "label": label})
    return rows


def test_cli_fine_tune_learns_easy_choices(tmp_path):
    """configs/runs/finetune_multiple_choice.gin on a 1-layer bert_tiny from scratch, 24 steps:
    eval accuracy far above chance (0.25) and test predictions are ending indices. The right
    ending sits at a random position, so only choices grouped with their label can learn.
    (Measured: accuracy 1.0 at step 12 and 24.)"""
    train = write_jsonl(tmp_path / "train.jsonl", animal_rows(256, 0))
    dev_rows = animal_rows(64, 1)
    dev = write_jsonl(tmp_path / "dev.jsonl", dev_rows)
    workdir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    proc = subprocess.run(
        [sys.executable, "-m", "research.train", "--gin_file=configs/models/bert_tiny.gin",
         "--gin_file=configs/runs/finetune_multiple_choice.gin",
         "--gin.VOCAB='data/tokenizers/austen_8k.model'", "--gin.SEQ_LEN=16",
         "--gin.BATCH_SIZE=16", "--gin.TRAIN_STEPS=24", "--gin.LEARNING_RATE=1e-3",
         "--gin.train.eval_every=12", "--gin.TransformerConfig.num_layers=1",
         "--gin.TransformerConfig.d_model=64", "--gin.TransformerConfig.mlp_dim=128",
         f"--gin.TRAIN_DATA='{train}'", f"--gin.EVAL_DATA='{dev}'", f"--gin.TEST_DATA='{dev}'",
         "--gin.TransformerConfig.dropout_rate=0.0",
         "--gin.TransformerConfig.attention_dropout_rate=0.0",
         "--gin.MultipleChoiceObjective.head_dropout=0.0",
         "--gin.train.progress_bar=False", f"--workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [12, 24]
    assert evals[-1]["eval/accuracy"] >= 0.9 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    preds = (workdir / "predictions.tsv").read_text().splitlines()
    assert preds[0] == "index\tprediction" and len(preds) == 65
    chosen = [int(line.split("\t")[1]) for line in preds[1:]]
    assert set(chosen) <= {0, 1, 2, 3}
    assert np.mean([c == r["label"] for c, r in zip(chosen, dev_rows)]) >= 0.9
