"""Extractive QA (SQuAD v1.1 / v2.0): document-stride windows, the n-best span search with
v2.0's null answer, EM/F1 against the official scripts' formulas, the HF
BertForQuestionAnswering head, and a `research.train` fine-tune that learns."""

from __future__ import annotations

import collections
import json
import os
import re
import string
import subprocess
import sys

import numpy as np
import pytest

from research.data.local_builder import DataSourceError
from research.data.squad import (QAExample, QAExamples, QAIterator, doc_windows, load_squad,
                                 make_features)
from research.data.tokenizer import load_tokenizer
from research.objectives.span_search import predict_answers
from research.objectives.squad_metrics import normalize_answer, squad_scores

from .conftest import ROOT, xla_flags

AUSTEN_QA = ROOT / "data" / "austen_qa"


class WordTokenizer:
    """One piece per word (two for words longer than 6 characters), ids from a growing vocab."""

    pad_id, cls_id, sep_id, bos_id, eos_id = 0, 1, 2, -1, -1

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def require_special(self, *names: str) -> None:
        assert set(names) <= {"pad", "cls", "sep"}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, 10 + len(self.vocab))

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            parts = [word[:4], word[4:]] if len(word) > 6 else [word]
            ids += [self._id(p) for p in parts]
        return ids


def examples_of(*items) -> QAExamples:
    """QAExamples from (qid, question, context, answer text or None) tuples."""
    out = []
    for qid, question, context, answer in items:
        answers = () if answer is None else ((answer, context.index(answer)),)
        out.append(QAExample(qid, question, context, answers, answer is None))
    return QAExamples(out, "hand-made")


# ----------------------------------------------------------------------------- windows ------

def test_doc_windows_follow_run_squad():
    assert doc_windows(10, 4, 3) == [(0, 4), (3, 4), (6, 4)]
    assert doc_windows(10, 4, 5) == [(0, 4), (4, 4), (8, 2)]
    assert doc_windows(3, 8, 2) == [(0, 3)]


@pytest.mark.parametrize("seq_len, stride", [(40, 8), (64, 24)], ids=["L40-s8", "L64-s24"])
def test_every_answer_is_recoverable_from_a_window_that_holds_it(seq_len, stride):
    tok = load_tokenizer(str(ROOT / "data" / "tokenizers" / "austen_8k.model"))
    examples = load_squad(f"squad:{AUSTEN_QA}/*.json")
    f = make_features(examples, tok, max_seq_length=seq_len, doc_stride=stride,
                      max_query_length=12)
    assert f.input_ids.shape == (len(f), seq_len)
    found = collections.Counter()
    for w in range(len(f)):
        ex = examples.examples[f.example_index[w]]
        n = int(f.input_mask[w].sum())
        assert f.input_ids[w, 0] == tok.cls_id and f.input_ids[w, n - 1] == tok.sep_id
        context_pos = np.flatnonzero(f.char_spans[w, :, 0] >= 0)
        # Context pieces sit after [CLS] q [SEP], are token type 1, in document order.
        assert (f.token_type_ids[w, context_pos] == 1).all()
        assert context_pos[-1] == n - 2 and np.all(np.diff(context_pos) == 1)
        assert np.all(np.diff(f.char_spans[w, context_pos, 0]) >= 0)
        s, e = f.start_positions[w], f.end_positions[w]
        if s == 0:
            assert e == 0
            continue
        text = ex.context[f.char_spans[w, s, 0]:f.char_spans[w, e, 1]]
        assert text == ex.answers[0][0], (ex.qid, text)
        found[ex.qid] += 1
    answerable = [ex.qid for ex in examples.examples if not ex.is_impossible]
    assert set(found) == set(answerable)
    assert max(found.values()) > 1  # the stride repeats answers in overlapping windows
    # Each context piece is the max-context piece of exactly one window of its question.
    for e, ex in enumerate(examples.examples):
        words = re.findall(r"\w+|[^\w\s]", ex.context)
        pieces = sum(len(tok.encode(word)) for word in words)
        assert f.max_context[f.example_index == e].sum() == pieces


def test_windows_stride_over_pieces_and_targets_need_the_whole_answer():
    tok = WordTokenizer()
    context = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11"
    ex = examples_of(("a", "q?", context, "w5 w6"))
    # 16 positions - 1 question piece - 3 special = 12 pieces of room: one window.
    f = make_features(ex, tok, max_seq_length=16, doc_stride=3, max_query_length=8)
    assert len(f) == 1 and (f.start_positions[0], f.end_positions[0]) == (3 + 5, 3 + 6)
    # Room for 4 pieces, stride 3: windows start at pieces 0, 3, 6, 9 (run_squad.py).
    f = make_features(ex, tok, max_seq_length=8, doc_stride=3, max_query_length=8)
    firsts = [context[f.char_spans[w, 3, 0]:f.char_spans[w, 3, 1]] for w in range(len(f))]
    assert firsts == ["w0", "w3", "w6", "w9"]
    # w5 w6 lies whole only in the window starting at w3 (pieces w3 w4 w5 w6).
    assert f.start_positions.tolist() == [0, 5, 0, 0] and f.end_positions.tolist() == [0, 6, 0, 0]


def test_iterator_batches_windows_and_pads_the_last_batch():
    tok = WordTokenizer()
    ex = examples_of(("a", "q?", "w0 w1 w2 w3 w4 w5 w6", "w4"), ("b", "r?", "x y z", None))
    f = make_features(ex, tok, max_seq_length=8, doc_stride=2, max_query_length=4)
    it = QAIterator(f, tok, seq_len=8, global_batch_size=4, seed=0, repeat=False)
    batches = list(it)
    assert len(batches) == -(-len(f) // 4)
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[index >= 0].tolist()) == list(range(len(f)))
    for b in batches:
        real = b["index"] >= 0
        np.testing.assert_array_equal(b["input_ids"][real], f.input_ids[b["index"][real]])
        np.testing.assert_array_equal(b["start_positions"][real],
                                      f.start_positions[b["index"][real]])
        assert (b["input_mask"][~real] == 0).all() and (b["weight"] == real).all()
    # Resumable like the classification iterator: a restored state continues the sequence.
    train = QAIterator(f, tok, seq_len=8, global_batch_size=2, seed=3, repeat=True)
    next(train)
    state = train.get_state()
    expected = next(train)
    again = QAIterator(f, tok, seq_len=8, global_batch_size=2, seed=3, repeat=True)
    again.set_state(state)
    assert state["kind"] == "extractive_qa"
    np.testing.assert_array_equal(next(again)["index"], expected["index"])


def test_squad_files_on_gs_read_as_locally(gcs):
    from research import storage

    for name in ("train.json", "dev.json"):
        storage.upload(str(AUSTEN_QA / name), storage.join(gcs, "qa", name))
    local = load_squad(f"squad:{AUSTEN_QA}/*.json")
    remote = load_squad(f"squad:{gcs}/qa/*.json")
    assert remote.examples == local.examples and len(remote) == 24
    assert remote.name == f"squad:{gcs}/qa/*.json (2 files)"


def test_bad_squad_files_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "abc def", "qas": [
        {"id": "1", "question": "q", "answers": [{"text": "def", "answer_start": 0}]}]}]}]}))
    with pytest.raises(DataSourceError, match=r"qas\[0\]\.answers\[0\].*answer_start=0"):
        load_squad(f"squad:{bad}")
    bad.write_text('{"data": [{"title": "x"}]}')
    with pytest.raises(DataSourceError, match="'paragraphs'"):
        load_squad(f"squad:{bad}")
    with pytest.raises(DataSourceError, match="Unknown extractive QA data spec"):
        load_squad(f"jsonl:{bad}")


# ------------------------------------------------------------------------- span search ------

def one_window(context: str, answer: str | None = None):
    ex = examples_of(("a", "q1 q2", context, answer))
    return make_features(ex, WordTokenizer(), max_seq_length=16, doc_stride=4,
                         max_query_length=4)


def test_span_search_on_hand_made_logits():
    context = "alpha beta gamma delta epsilon zeta eta theta"  # pieces at positions 4..11
    f = one_window(context)
    start, end = np.full((1, 16), -5.0), np.full((1, 16), -5.0)
    start[0, 5], end[0, 7] = 3.0, 3.0                       # beta .. delta: 6
    start[0, 1], end[0, 2] = 9.0, 9.0                       # the question: never an answer
    start[0, 14], end[0, 15] = 9.0, 9.0                     # padding: never an answer
    end[0, 4] = 4.0                                         # before beta: only alpha..alpha, -1
    kw = dict(n_best_size=20)
    assert predict_answers(start, end, f, max_answer_length=30, **kw) == {"a": "beta gamma delta"}
    # At most 2 pieces: beta..delta is out; alpha..alpha (-1) beats beta..beta/gamma (-2) ...
    assert predict_answers(start, end, f, max_answer_length=2, **kw) == {"a": "alpha"}
    end[0, 6] = 0.0                                         # ... until beta..gamma scores 3
    assert predict_answers(start, end, f, max_answer_length=2, **kw) == {"a": "beta gamma"}
    # Only the top n_best_size starts and ends are tried: with 1, the question's positions
    # take the top places and leave no candidate (v1.1 answers ""); without them (and the
    # early end) the top start and end are beta and delta.
    assert predict_answers(start, end, f, max_answer_length=30, n_best_size=1)["a"] == ""
    start[0, 1] = end[0, 2] = start[0, 14] = end[0, 15] = end[0, 4] = -9.0
    assert predict_answers(start, end, f, max_answer_length=30, n_best_size=1)["a"] == \
        "beta gamma delta"


def test_null_answer_and_threshold():
    f = one_window("alpha beta gamma delta")
    start, end = np.zeros((1, 16)), np.zeros((1, 16))
    start[0, 5], end[0, 6] = 2.0, 2.0         # best span beta gamma: score 4
    start[0, 0], end[0, 0] = 2.5, 2.0         # null score 4.5
    kw = dict(n_best_size=20, max_answer_length=30)
    assert predict_answers(start, end, f, **kw) == {"a": "beta gamma"}              # v1.1
    assert predict_answers(start, end, f, version_2=True, **kw) == {"a": ""}       # 0.5 > 0
    assert predict_answers(start, end, f, version_2=True, null_score_diff_threshold=0.6,
                           **kw) == {"a": "beta gamma"}


def test_null_score_is_the_minimum_over_windows():
    ex = examples_of(("a", "q", "w0 w1 w2 w3 w4 w5 w6 w7", None))
    f = make_features(ex, WordTokenizer(), max_seq_length=8, doc_stride=2, max_query_length=4)
    n = len(f)
    assert n >= 3
    start, end = np.zeros((n, 8)), np.zeros((n, 8))
    start[:, 0] = 10.0
    start[1, 0] = 0.5                          # window 1's null score is the smallest: 0.5
    start[0, 3], end[0, 3] = 0.4, 0.4          # best span: 0.8 > 0.5, so it is answered
    out = predict_answers(start, end, f, version_2=True)
    assert out["a"] == "w0"
    start[1, 0] = 1.0                          # now null 1.0 - 0.8 > 0
    assert predict_answers(start, end, f, version_2=True)["a"] == ""


def brute_force(start, end, f, max_len, version_2, threshold):
    """Reference: every valid (window, start, end), best score; v2 against the min null."""
    best, null = (-np.inf, ""), np.inf
    ctx = f.examples.examples[0].context
    for w in range(len(f)):
        null = min(null, start[w, 0] + end[w, 0])
        for s in range(start.shape[1]):
            for e in range(s, min(start.shape[1], s + max_len)):
                if f.char_spans[w, s, 0] < 0 or f.char_spans[w, e, 0] < 0:
                    continue
                if not f.max_context[w, s]:
                    continue
                score = start[w, s] + end[w, e]
                if score > best[0]:
                    best = (score, ctx[f.char_spans[w, s, 0]:f.char_spans[w, e, 1]])
    if version_2 and null - best[0] > threshold:
        return ""
    return best[1]


@pytest.mark.parametrize("seed", [0, 1, 2, 3], ids=["s0", "s1", "s2", "s3"])
def test_span_search_equals_brute_force_on_random_logits(seed):
    rng = np.random.default_rng(seed)
    words = " ".join(f"w{i}" for i in range(17))
    f = make_features(examples_of(("a", "q x", words, "w3")), WordTokenizer(), max_seq_length=12,
                      doc_stride=3, max_query_length=4)
    start, end = rng.normal(size=(2, len(f), 12))
    for version_2, threshold in ((False, 0.0), (True, 0.0), (True, -1.0), (True, 1.0)):
        got = predict_answers(start, end, f, n_best_size=12, max_answer_length=3,
                              version_2=version_2, null_score_diff_threshold=threshold)
        assert got["a"] == brute_force(start, end, f, 3, version_2, threshold)


def test_objective_scores_window_logits_through_the_span_search(tmp_path):
    from research.errors import ConfigError
    from research.objectives.extractive_qa import ExtractiveQAObjective

    path = tmp_path / "qa.json"
    context = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": context, "qas": [
        {"id": "a", "question": "q?", "answers": [{"text": "w7 w8", "answer_start": 21}]},
        {"id": "b", "question": "r?", "answers": [], "is_impossible": True}]}]}]}))
    objective = ExtractiveQAObjective(doc_stride=2, max_query_length=4)
    source = objective.open_source(f"squad:{path}")
    objective = objective.with_training_data(source)
    assert objective.version_2  # decided by the unanswerable question
    tok = WordTokenizer()
    batches = list(objective.make_iterator(source, tok, seq_len=8, global_batch_size=4, seed=0,
                                           repeat=False))
    f = objective.scored_features
    logits = np.full((len(f), 2, 8), -5.0)
    logits[:, :, 0] = 0.0                               # null score 0 everywhere ...
    for w in np.flatnonzero(f.start_positions > 0):     # ... but 10 on the answer of "a"
        logits[w, 0, f.start_positions[w]] = logits[w, 1, f.end_positions[w]] = 5.0
    index = np.concatenate([b["index"] for b in batches])
    labels = np.sort(index[index >= 0])
    assert objective.answers(logits, f) == {"a": "w7 w8", "b": ""}
    scores = objective.task_metrics(logits, labels)
    assert scores["exact_match"] == scores["f1"] == 100.0 and scores["no_ans_f1"] == 100.0
    with pytest.raises(ValueError, match="each of the"):
        objective.task_metrics(logits[1:], labels[1:])
    # A test split's questions need no answers; predictions.json is the official script's input.
    doc = json.loads(path.read_text())
    for qa in doc["data"][0]["paragraphs"][0]["qas"]:
        qa.pop("answers"), qa.pop("is_impossible", None)
    (tmp_path / "test.json").write_text(json.dumps(doc))
    with pytest.raises(DataSourceError, match="'answers' is missing"):
        objective.open_source(f"squad:{tmp_path}/test.json")
    test = objective.open_source(f"squad:{tmp_path}/test.json", role="test")
    list(objective.make_iterator(test, tok, seq_len=8, global_batch_size=4, seed=0, repeat=False))
    name, text = objective.prediction_file({"prediction": logits, "index": labels})
    assert name == "predictions.json" and json.loads(text) == {"a": "w7 w8", "b": ""}
    with pytest.raises(ValueError, match="every window"):
        objective.prediction_file({"prediction": logits[1:], "index": labels[1:]})
    with pytest.raises(ConfigError, match="version_2_with_negative = False"):
        ExtractiveQAObjective(version_2_with_negative=False).open_source(f"squad:{path}")


# ----------------------------------------------------------------------------- EM / F1 ------

def ref_normalize(s):
    """The official normalize_answer: lower, remove punctuation, remove articles, whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def ref_f1_v1(pred, gold):
    p, g = ref_normalize(pred).split(), ref_normalize(gold).split()
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def ref_v1(gold, preds):
    """evaluate-v1.1.py: mean over all questions of the max over gold answers, percent."""
    em = f1 = 0.0
    for qid, answers in gold.items():
        if qid not in preds:
            continue
        em += max(float(ref_normalize(preds[qid]) == ref_normalize(a)) for a in answers)
        f1 += max(ref_f1_v1(preds[qid], a) for a in answers)
    return {"exact_match": 100 * em / len(gold), "f1": 100 * f1 / len(gold)}


def ref_v2(gold, preds):
    """evaluate-v2.0.py: empty-normalising golds dropped ([""] if none left), empty-token F1
    = (both empty), HasAns / NoAns by whether the question lists any answer."""
    exact, f1 = {}, {}
    for qid, answers in gold.items():
        golds = [a for a in answers if ref_normalize(a)] or [""]
        pred = preds[qid]
        exact[qid] = max(int(ref_normalize(a) == ref_normalize(pred)) for a in golds)
        scores = []
        for a in golds:
            g, p = ref_normalize(a).split(), ref_normalize(pred).split()
            scores.append(float(g == p) if not g or not p else ref_f1_v1(pred, a))
        f1[qid] = max(scores)

    def mean(qids):
        return {"exact_match": 100 * sum(exact[q] for q in qids) / len(qids),
                "f1": 100 * sum(f1[q] for q in qids) / len(qids)}
    out = mean(list(gold))
    for name, keep in (("has_ans", True), ("no_ans", False)):
        qids = [q for q in gold if bool(gold[q]) == keep]
        out.update({f"{name}_{k}": v for k, v in mean(qids).items()})
    return out


def test_normalize_answer():
    assert normalize_answer("  The Denver  Broncos!! ") == "denver broncos"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_v1_equal_the_official_formulas():
    gold = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["Santa Clara, California"],
            "q3": ["1,000 miles"], "q4": ["Levi's Stadium"], "q5": ["a cat"]}
    preds = {"q1": "the Denver Broncos!", "q2": "Santa Clara", "q3": "about 1000 miles",
             "q4": "Stadium Levis stadium"}                    # q5 has no prediction: 0
    got = squad_scores(gold, preds)
    # By hand: EM q1 only; F1 1, 0.8 (P 1, R 2/3), 0.8 (P 2/3, R 1), 0.8 (P 2/3, R 1), 0.
    np.testing.assert_allclose(got["exact_match"], 100 / 5)
    np.testing.assert_allclose(got["f1"], 100 * (1 + 0.8 + 0.8 + 0.8 + 0) / 5)
    ref = ref_v1(gold, preds)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12)


def test_exact_match_and_f1_v2_equal_the_official_formulas():
    gold = {"a": ["Paris", "in Paris"], "b": [], "c": [], "d": ["the"], "e": ["New York City"]}
    preds = {"a": "Paris, France", "b": "", "c": "London", "d": "", "e": "york city"}
    got = squad_scores(gold, preds, version_2=True)
    ref = ref_v2(gold, preds)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12)
    # By hand: a F1 2/3 (P 1/2, R 1); b EM 1; c 0; d: "the" -> "" so [""], "" matches: EM 1;
    # e F1 0.8 (P 1, R 2/3).
    np.testing.assert_allclose(got["exact_match"], 100 * 2 / 5)
    np.testing.assert_allclose(got["f1"], 100 * (2 / 3 + 1 + 0 + 1 + 0.8) / 5)
    np.testing.assert_allclose(got["no_ans_exact_match"], 50.0)
    np.testing.assert_allclose(got["has_ans_f1"], 100 * (2 / 3 + 1 + 0.8) / 3)


# ----------------------------------------------------------------------------- HF head ------

def test_bert_for_question_answering_parity_and_round_trip(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import jax
    import transformers

    from research.checkpoints.hf import bert as hf_bert
    from research.checkpoints.hf.rules import flatten
    from research.models.heads import SpanExtractor

    from .test_hf_convert import (BERT_KW, TOL, bert_batch, config_from_outputs, max_diff,
                                  randomize_hf, restore, run_tool, save_hf, torch_long)

    hf = transformers.BertForQuestionAnswering(transformers.BertConfig(**BERT_KW))
    randomize_hf(hf, seed=4)
    with torch_no_grad():
        hf.qa_outputs.weight.mul_(10.0)  # logits of order 1-10, so the comparison is strict
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={save_hf(hf, tmp_path / 'hf')}", f"--to={out}")
    assert json.loads((tmp_path / "ours" / "run.json").read_text())["objective"] == "extractive_qa"
    cfg = config_from_outputs(out)
    ids, mask, types, _ = bert_batch(cfg.vocab_size, seed=5)
    model = SpanExtractor(cfg)
    params = restore(out, model, ids, mask, types)
    assert set(flatten(params)) >= {"qa_outputs/kernel", "qa_outputs/bias"}
    start, end = jax.jit(model.apply)({"params": params}, ids, mask, types)
    with torch_no_grad():
        ref = hf(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                 token_type_ids=torch_long(types))
    real = mask.astype(bool)
    assert max_diff(np.asarray(start)[real], ref.start_logits.numpy()[real]) <= TOL
    assert max_diff(np.asarray(end)[real], ref.end_logits.numpy()[real]) <= TOL
    assert np.abs(ref.start_logits.numpy()).max() > 1.0
    # Export: our params -> a BertForQuestionAnswering state dict, loaded strictly, same logits.
    hf_config, state = hf_bert.bert_to_hf(cfg, flatten(jax.device_get(params)))
    assert hf_config["architectures"] == ["BertForQuestionAnswering"]
    back = transformers.BertForQuestionAnswering(transformers.BertConfig(**{
        k: v for k, v in hf_config.items() if k != "architectures"})).eval()
    back.load_state_dict({k: torch_tensor(v) for k, v in state.items()}, strict=True)
    with torch_no_grad():
        ref2 = back(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                    token_type_ids=torch_long(types))
    assert max_diff(ref2.start_logits.numpy()[real], ref.start_logits.numpy()[real]) <= TOL
    assert max_diff(ref2.end_logits.numpy()[real], ref.end_logits.numpy()[real]) <= TOL


def torch_tensor(x):
    import torch
    return torch.from_numpy(np.array(x))


def torch_no_grad():
    import torch
    return torch.no_grad()


# ------------------------------------------------------------------------- CLI fine-tune ----

# Each context is 8 to 11 filler words with one city name somewhere in it; the question asks
# for the city. Finding it needs only the pieces' identity (a city never occurs elsewhere), so
# bert_tiny learns it in a few dozen steps; a model that learned nothing, or whose targets or
# span search were broken, answers the wrong words (EM ~0).
CITIES = ["Bath", "London", "Lyme", "Portsmouth", "Brighton", "Highbury", "Kellynch", "Derby"]
FILLER = ("the a of and to in was her his she he it had that with for as not be but you at "
          "by on all so my which have this from very been were").split()


def synthetic_squad(path, n, seed):
    rng = np.random.default_rng(seed)
    qas, paragraphs = [], []
    for i in range(n):
        words = list(rng.choice(FILLER, int(rng.integers(8, 12))))
        city = str(rng.choice(CITIES))
        words.insert(int(rng.integers(0, len(words) + 1)), city)
        context = " ".join(words) + "."
        start = context.index(f"{city}")
        qas = [{"id": f"q{i}", "question": "Which town is named?",
                "answers": [{"text": city, "answer_start": start}]}]
        paragraphs.append({"context": context, "qas": qas})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t",
                                                              "paragraphs": paragraphs}]}))


ENV = dict(os.environ, XLA_FLAGS=xla_flags(1),
           TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


EPOCHS = 5  # 20 steps; measured: EM 56 at step 4 (first eval), 100 from step 8


def test_cli_fine_tune_learns(tmp_path):
    synthetic_squad(tmp_path / "train.json", 64, seed=0)
    test = json.loads((tmp_path / "train.json").read_text())  # the same questions, no answers
    for article in test["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                qa["answers"] = []
    (tmp_path / "test.json").write_text(json.dumps(test))
    workdir = tmp_path / "qa"
    proc = subprocess.run(
        [sys.executable, "-m", "research.train", "--gin_file=configs/models/bert_tiny.gin",
         "--gin_file=configs/runs/finetune_qa.gin", "--gin.SEQ_LEN=32", "--gin.BATCH_SIZE=16",
         f"--gin.EPOCHS={EPOCHS}", "--gin.LEARNING_RATE=1e-3", "--gin.train.progress_bar=False",
         "--gin.train.log_every=4", "--gin.TransformerConfig.dropout_rate=0.0",
         "--gin.TransformerConfig.attention_dropout_rate=0.0",
         "--gin.ExtractiveQAObjective.max_query_length=8",
         "--gin.ExtractiveQAObjective.doc_stride=8",
         "--gin.VOCAB='data/tokenizers/austen_8k.model'",
         f"--gin.TRAIN_DATA='squad:{tmp_path}/train.json'",
         f"--gin.EVAL_DATA='squad:{tmp_path}/train.json'",
         f"--gin.TEST_DATA='squad:{tmp_path}/test.json'", f"--workdir={workdir}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/f1" in r]
    assert [r["step"] for r in evals] == [4 * e for e in range(1, EPOCHS + 1)]
    assert {"eval/exact_match", "eval/loss", "eval/span_accuracy"} <= set(evals[0])
    # Trivial baselines: always the first context word, or always the most frequent city.
    examples = load_squad(f"squad:{tmp_path}/train.json")
    gold = examples.gold()
    first = {ex.qid: ex.context.split()[0] for ex in examples.examples}
    common = collections.Counter(a[0] for a in gold.values()).most_common(1)[0][0]
    baseline = max(squad_scores(gold, first)["f1"],
                   squad_scores(gold, {q: common for q in gold})["f1"])
    assert baseline < 30.0
    best = max(r["eval/exact_match"] for r in evals)
    assert best >= 60.0 and max(r["eval/f1"] for r in evals) >= baseline + 40.0, \
        ([(r["eval/exact_match"], r["eval/f1"]) for r in evals], baseline)
    assert evals[-1]["eval/loss"] < 0.5 * evals[0]["eval/loss"]
    best_f1 = json.loads((workdir / "best" / "best.json").read_text())["value"]
    assert best_f1 == max(r["eval/f1"] for r in evals)
    # predictions.json: the best checkpoint's answer to every test question (here the eval
    # questions without their answers, so it scores what the best eval scored)
    answers = json.loads((workdir / "predictions.json").read_text())
    assert set(answers) == set(gold)
    assert squad_scores(gold, answers)["f1"] == pytest.approx(best_f1, abs=1e-9)
