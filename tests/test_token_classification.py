"""Token classification: the conll: reader, sub-word label alignment (against HF run_ner's
alignment with BertTokenizerFast), seqeval-equal entity scores, the objective's word-level
metrics, BertForTokenClassification parity through the converter, and a CLI fine-tune of a
BERT encoder on the bundled CoNLL-2000 chunking sample that learns."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

from research.data.conll import load_conll, parse_conll
from research.data.local_builder import DataSourceError
from research.data.token_classification import (IGNORE, align_labels,
                                                make_token_classification_iterator,
                                                word_predictions)
from research.data.tokenizer import load_tokenizer
from research.objectives.seqeval_metrics import entity_scores, get_entities, is_entity_scheme
from research.objectives.token_classification import TokenClassificationObjective

from .conftest import ROOT, xla_flags

CHUNKS = ROOT / "data" / "conll2000_chunking"

# ------------------------------------------------------------------------- reader ------------


def test_conll_reader_docstart_blank_lines_columns_and_label_vocabulary(tmp_path):
    (tmp_path / "a.conll").write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-ORG\nrejects\tVBZ\tO\nGerman JJ B-MISC\n\n\n"
        "Peter NNP B-PER\nBlackburn NNP I-PER\n"
        "-DOCSTART- -X- O\n"            # a marker also ends a sentence
        "BRUSSELS NNP B-LOC\n   \n")    # whitespace-only line = blank
    (tmp_path / "b.conll").write_text("x O\n")
    train = load_conll(f"conll:{tmp_path}/*.conll")
    assert train.words == [("EU", "rejects", "German"), ("Peter", "Blackburn"), ("BRUSSELS",),
                           ("x",)]
    assert train.label_names == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER", "O"]
    assert [lab.tolist() for lab in train.labels] == [[2, 5, 1], [3, 4], [0], [5]]
    assert train.texts[0] == ("EU rejects German",)

    (tmp_path / "dev.txt").write_text("Paris B-LOC\nis O\n\nBerlin B-PER\n")
    dev = load_conll(f"conll:{tmp_path}/dev.txt", label_names=train.label_names)
    assert [lab.tolist() for lab in dev.labels] == [[0, 5], [3]]
    (tmp_path / "bad.txt").write_text("Paris B-LOC\nis B-XYZ\n")
    with pytest.raises(DataSourceError, match=r"bad.txt, line 2: label 'B-XYZ'"):
        load_conll(f"conll:{tmp_path}/bad.txt", label_names=train.label_names)
    (tmp_path / "test.txt").write_text("Paris\nis\n\nBerlin O\n")
    with pytest.raises(DataSourceError, match=r"test.txt, line 1: the word 'Paris' has no label"):
        load_conll(f"conll:{tmp_path}/test.txt", label_names=train.label_names)
    test = load_conll(f"conll:{tmp_path}/test.txt", label_names=train.label_names,
                      allow_unlabeled=True)
    assert [lab.tolist() for lab in test.labels] == [[IGNORE, IGNORE], [5]]
    (tmp_path / "empty.txt").write_text("-DOCSTART- O\n\n")
    with pytest.raises(DataSourceError, match="has no sentences"):
        load_conll(f"conll:{tmp_path}/empty.txt")
    with pytest.raises(DataSourceError, match="Unknown token-classification data spec"):
        load_conll(f"tsv:{tmp_path}/dev.txt")
    with pytest.raises(DataSourceError, match="matches no file"):
        load_conll(f"conll:{tmp_path}/none*.txt")


def test_bundled_chunking_sample_reads():
    train = load_conll(f"conll:{CHUNKS}/train.conll")
    dev = load_conll(f"conll:{CHUNKS}/validation.conll", label_names=train.label_names)
    assert (len(train), train.num_words, len(dev), dev.num_words) == (30, 720, 10, 241)
    assert is_entity_scheme(train.label_names) and "I-NP" in train.label_names


# ------------------------------------------------------------------------- alignment ---------

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PIECES = ["the", "eu", "rock", "##well", "international", "corp", "'", "s", "un", "##aff",
          "##able", "tul", "##sa", "unit", "said", ".", ",", "-", "a", "b", "##b"]
SENTENCES = [  # (words, labels): punctuation inside words, multi-piece and unknown words
    (["Rockwell", "International", "Corp.", "'s", "Tulsa", "unit", "said", "."],
     ["B-ORG", "I-ORG", "I-ORG", "O", "B-LOC", "O", "O", "O"]),
    (["The", "unaffable", "EU", "zzz", ",", "a-b", "bb"],
     ["O", "O", "B-ORG", "O", "O", "B-MISC", "I-MISC"]),
    (["said"], ["O"]),
]


@pytest.fixture(scope="module")
def wordpiece_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("wp")
    (d / "vocab.txt").write_text("\n".join(SPECIALS + PIECES) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    d = tmp_path_factory.mktemp("tagged")
    (d / "s.conll").write_text("".join(
        "".join(f"{w} X {lab}\n" for w, lab in zip(ws, ls)) + "\n" for ws, ls in SENTENCES))
    return load_conll(f"conll:{d}/s.conll")


@pytest.mark.parametrize("seq_len", [32, 8])
def test_alignment_equals_hf_run_ner_and_round_trips(wordpiece_dir, tagged, seq_len):
    """Our batches equal HF run_ner's `tokenize_and_align_labels` (label_all_tokens=False) on
    BertTokenizerFast: the same ids, the word's label on its first piece, -100 (our -1)
    elsewhere; and word_predictions maps the labels back to the (visible) words."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(str(wordpiece_dir))
    tok = load_tokenizer(str(wordpiece_dir / "vocab.txt"))
    it = make_token_classification_iterator(tagged, tok, seq_len=seq_len, global_batch_size=4,
                                            seed=0, repeat=False)
    batch = next(it)
    for row, (words, labels) in enumerate(SENTENCES):
        enc = hf(words, is_split_into_words=True, truncation=True, max_length=seq_len)
        ref_labels, previous = [], None
        for w in enc.word_ids():
            first = w is not None and w != previous
            ref_labels.append(tagged.label_names.index(labels[w]) if first else IGNORE)
            previous = w
        n = len(enc["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == enc["input_ids"]
        assert batch["label"][row, :n].tolist() == ref_labels
        assert (batch["label"][row, n:] == IGNORE).all() and batch["input_mask"][row].sum() == n
        # Round trip: pieces -> words.
        back = word_predictions(batch["label"][row], batch["word_start"][row])
        visible = len(back)
        assert [tagged.label_names[i] for i in back] == labels[:visible]
        assert visible > 0 and (seq_len < 32 or visible == len(words))
    assert batch["weight"].tolist() == [1, 1, 1, 0] and batch["index"].tolist() == [0, 1, 2, -1]
    if seq_len == 8:  # 6 pieces fit: rock ##well international corp . ' -> 4 words start
        assert len(word_predictions(batch["label"][0], batch["word_start"][0])) == 4


def test_align_labels_first_piece_only():
    pieces, labels, starts = align_labels([[5, 6, 7], [8], [9, 10]], [2, 0, -1], budget=5)
    assert (pieces, labels, starts) == ([5, 6, 7, 8, 9], [2, -1, -1, 0, -1], [1, 0, 0, 1, 1])
    assert word_predictions(np.array(labels), np.array(starts)).tolist() == [2, 0, -1]


# ------------------------------------------------------------------------- seqeval -----------

HAND_MADE = [  # (y_true, y_pred, precision, recall, f1), values worked out by hand
    ([["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]],
     [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]],
     0.5, 0.5, 0.5),
    # I- without B- opens an entity (IOB1 style); a type change splits one.
    ([["I-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "I-LOC"]], 1.0, 1.0, 1.0),
    ([["B-PER", "I-LOC"]], [["B-PER", "I-PER"]], 0.0, 0.0, 0.0),
    # IOBES: E closes, S is a one-word entity.
    ([["B-ORG", "E-ORG", "S-PER", "O"]], [["B-ORG", "I-ORG", "S-PER", "O"]], 1.0, 1.0, 1.0),
    # Entities never cross sentences.
    ([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]], 1.0, 1.0, 1.0),
    ([["O", "O"]], [["B-X", "O"]], 0.0, 0.0, 0.0),
    ([["B-X", "O"]], [["O", "O"]], 0.0, 0.0, 0.0),
    ([["B-A", "B-B", "O"]], [["B-A", "O", "B-B"]], 0.5, 0.5, 0.5),
]


@pytest.mark.parametrize("case", range(len(HAND_MADE)), ids=lambda i: f"case{i}")
def test_entity_scores_on_hand_made_sequences(case):
    y_true, y_pred, p, r, f = HAND_MADE[case]
    assert entity_scores(y_true, y_pred) == pytest.approx({"precision": p, "recall": r, "f1": f})
    seqeval = pytest.importorskip("seqeval.metrics")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert entity_scores(y_true, y_pred) == {
            "precision": seqeval.precision_score(y_true, y_pred),
            "recall": seqeval.recall_score(y_true, y_pred),
            "f1": seqeval.f1_score(y_true, y_pred)}


def test_get_entities_examples_from_seqeval_docs():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert get_entities(["O", "B", "I", "I", "O", "B", "I", "O"]) == [("_", 1, 3), ("_", 5, 6)]


def test_entity_scores_equal_seqeval_on_random_and_malformed_sequences():
    """Random label sequences over BIO, IOBES, bare and odd labels ('I-' first, type switches,
    'B'/'I' without a type, '.', a label without prefix): precision, recall and F1 equal
    seqeval's default mode exactly, and per-word accuracy equals its accuracy_score."""
    sm = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities as ref_entities
    rng = np.random.default_rng(0)
    pools = [["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
             ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B"],
             ["O", "B", "I", "E", "S", "I-X", "B-X-Y", "I-X-Y", ".", "NP", "B-", "O-X", "x"]]
    tested = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trial in range(300):
            pool = pools[trial % 3]
            n = int(rng.integers(1, 6))
            lengths = rng.integers(1, 9, n)
            y_true = [list(rng.choice(pool, k)) for k in lengths]
            y_pred = [list(rng.choice(pool, k)) if rng.random() < 0.5 else
                      [t if rng.random() < 0.7 else str(rng.choice(pool)) for t in s]
                      for s, k in zip(y_true, lengths)]
            flat = [lab for s in y_true for lab in s]
            assert get_entities(flat) == ref_entities(flat), flat
            ours = entity_scores(y_true, y_pred)
            assert ours == {"precision": sm.precision_score(y_true, y_pred),
                            "recall": sm.recall_score(y_true, y_pred),
                            "f1": sm.f1_score(y_true, y_pred)}, (y_true, y_pred)
            tested += ours["f1"] not in (0.0, 1.0)
    assert tested > 50  # most cases are neither all wrong nor all right


def test_objective_word_metrics_equal_seqeval():
    """task_metrics on predict-style arrays (labels on first pieces, -1 elsewhere) reads the
    words back and scores them as seqeval does."""
    obj = TokenClassificationObjective()._replace(label_names=["B-PER", "I-PER", "O"],
                                                  read_training_data=True)
    labels = np.array([[-1, 0, 1, -1, 2, -1], [-1, 2, -1, 0, -1, -1]])
    preds = np.array([[-1, 0, 2, -1, 2, -1], [-1, 2, -1, 1, -1, -1]])  # same word positions
    out = obj.task_metrics(preds, labels)
    y_true = [["B-PER", "I-PER", "O"], ["O", "B-PER"]]
    y_pred = [["B-PER", "O", "O"], ["O", "I-PER"]]
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert {k: out[k] for k in ("precision", "recall", "f1")} == entity_scores(y_true, y_pred)
    assert out["f1"] == pytest.approx(0.5)  # PER(0,1) missed as PER(0,0); a lone I-PER is PER
    assert obj.format_prediction(preds[1]) == "O I-PER"
    pos = obj._replace(label_names=["DT", "NN", "VBZ"])
    assert set(pos.task_metrics(preds, labels)) == {"accuracy"}



def test_objective_loss_counts_first_pieces_only_and_state_resumes(wordpiece_dir, tagged):
    """The loss is the mean cross-entropy over the first pieces of the words (numpy reference
    from the same logits); resuming the iterator from its state gives the same next batch."""
    import jax

    from research.errors import ConfigError
    from research.models.transformer import TransformerConfig
    tok = load_tokenizer(str(wordpiece_dir / "vocab.txt"))
    cfg = TransformerConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=2, mlp_dim=32,
                            max_len=32, causal=False, norm_placement="post",
                            embedding_norm=True, type_vocab_size=2, dropout_rate=0.0)
    obj = TokenClassificationObjective(head_dropout=0.0)
    with pytest.raises(RuntimeError, match="with_training_data"):
        obj.open_source(f"conll:{CHUNKS}/validation.conll", role="eval")
    obj = obj.with_training_data(tagged).for_model(cfg)
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        obj.for_model(TransformerConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=2,
                                        mlp_dim=32, max_len=32))
    it = obj.make_iterator(tagged, tok, seq_len=16, global_batch_size=2, seed=1,
                           process_index=0, process_count=1)
    batch = next(it)
    state = it.get_state()
    assert state["kind"] == "token_classification"
    model = obj.make_model(cfg)
    params = jax.jit(lambda b: obj.init(model, {"params": jax.random.key(0),
                                                "dropout": jax.random.key(1)}, b))(batch)
    params = params["params"]

    @jax.jit
    def run(params, batch):
        norm = obj.normalizers(batch)
        loss, metrics = obj.loss(model, params, batch, jax.random.key(2), norm, True)
        logits = model.apply({"params": params}, batch["input_ids"], batch["input_mask"],
                             batch["token_type_ids"])
        return norm, loss, metrics, logits

    norm, loss, metrics, logits = run(params, batch)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rows, cols = np.nonzero(batch["label"] >= 0)
    ce = -logp[rows, cols, batch["label"][rows, cols]]
    assert len(ce) == sum(batch["word_start"].sum(1)) and float(norm["words"]) == len(ce)
    np.testing.assert_allclose(float(loss), ce.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"][0]), ce.sum(), rtol=1e-5)
    expected = next(it)
    again = obj.make_iterator(tagged, tok, seq_len=16, global_batch_size=2, seed=1,
                              process_index=0, process_count=1)
    again.set_state(state)
    got = next(again)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


# ------------------------------------------------------------------------- HF head -----------


def test_bert_token_classification_parity_import_and_export(tmp_path):
    """HF BertForTokenClassification -> converter -> our TokenClassifier: logits within 1e-4;
    ours -> HF again loads strictly as BertForTokenClassification with the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax

    from research.checkpoints import init_from
    from research.models.heads import TokenClassifier

    from .test_hf_convert import (BERT_KW, TOL, bert_batch, config_from_outputs, init_params,
                                  load_hf_strict, max_diff, randomize_hf, run_tool, save_hf,
                                  save_workdir, torch_long)
    torch.manual_seed(0)
    hf = transformers.BertForTokenClassification(
        transformers.BertConfig(**BERT_KW, num_labels=5, classifier_dropout=0.3))
    randomize_hf(hf, seed=4)
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={save_hf(hf, tmp_path / 'hf')}", f"--to={out}")
    info = json.loads(pathlib.Path(out, "run.json").read_text())
    assert info["objective"] == "token_classification" and info["num_labels"] == 5
    cfg = config_from_outputs(out)
    ids, mask, types, _ = bert_batch(cfg.vocab_size, seed=5)
    model = TokenClassifier(cfg, num_labels=5, head_dropout=0.5)
    fresh = init_params(model, ids, mask, types)
    params, restored = init_from.restore_into(fresh, out, [("(.*)", r"\1")])
    assert "classifier/kernel" in restored and not any("pooler" in k for k in restored)
    logits = jax.jit(model.apply)({"params": params}, ids, mask, types)
    with torch.no_grad():
        ref = hf(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                 token_type_ids=torch_long(types)).logits.numpy()
    assert logits.shape == ref.shape == (3, 12, 5)
    real = mask.astype(bool)  # padding positions are not compared (masked differently)
    assert max_diff(np.asarray(logits)[real], ref[real]) <= TOL
    assert np.abs(ref).max() > 1.0

    workdir = save_workdir(tmp_path / "run", cfg, params, "token_classification")
    hf_dir = str(tmp_path / "hf_back")
    run_tool(f"--from={workdir}", f"--to_hf={hf_dir}")
    config = json.loads(pathlib.Path(hf_dir, "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    back = load_hf_strict(transformers.BertForTokenClassification, hf_dir)
    with torch.no_grad():
        again = back(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                     token_type_ids=torch_long(types)).logits.numpy()
    assert max_diff(again[real], ref[real]) <= TOL


# ------------------------------------------------------------------------- CLI ---------------


def test_cli_fine_tune_on_chunking_learns(tmp_path):
    """configs/runs/finetune_token_classification.gin on bert_tiny from scratch, 40 steps on
    the 30 bundled training sentences, scored on those sentences: per-word accuracy far above
    always-the-majority-label (I-NP, 0.36) and a real chunk F1; test predictions have one
    label per visible word. (Measured: accuracy 0.84, F1 0.70 at step 40.)"""
    workdir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    train = f"conll:{CHUNKS}/train.conll"
    proc = subprocess.run(
        [sys.executable, "-m", "research.train", "--gin_file=configs/models/bert_tiny.gin",
         "--gin_file=configs/runs/finetune_token_classification.gin",
         "--gin.VOCAB='data/tokenizers/austen_8k.model'", "--gin.SEQ_LEN=64",
         "--gin.BATCH_SIZE=8", "--gin.EPOCHS=10", "--gin.LEARNING_RATE=1e-3",
         "--gin.train.eval_every=20", f"--gin.TRAIN_DATA='{train}'",
         f"--gin.EVAL_DATA='{train}'", f"--gin.TEST_DATA='conll:{CHUNKS}/validation.conll'",
         "--gin.TransformerConfig.dropout_rate=0.0",
         "--gin.TransformerConfig.attention_dropout_rate=0.0",
         "--gin.TokenClassificationObjective.head_dropout=0.0",
         "--gin.train.progress_bar=False", f"--workdir={workdir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/f1" in r]
    assert [r["step"] for r in evals] == [20, 40]
    labels = [line.split()[-1] for line in (CHUNKS / "train.conll").read_text().splitlines()
              if line.strip()]
    majority = max(labels.count(lab) for lab in set(labels)) / len(labels)
    last = evals[-1]
    assert last["eval/accuracy"] >= majority + 0.3, (last, majority)
    assert last["eval/f1"] >= 0.5 and last["eval/loss"] < evals[0]["eval/loss"]
    assert {"eval/precision", "eval/recall"} <= set(last)
    preds = (workdir / "predictions.tsv").read_text().splitlines()
    assert preds[0] == "index\tprediction" and len(preds) == 11
    dev = load_conll(f"conll:{CHUNKS}/validation.conll")
    names = set(load_conll(train).label_names)
    for line, words in zip(preds[1:], dev.words):
        tags = line.split("\t")[1].split()
        assert 0 < len(tags) <= len(words) and set(tags) <= names
