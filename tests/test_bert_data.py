"""BERT pretraining data: masking, NSP pairs, MLM-only packing and the streaming iterator."""

import collections
import json

import numpy as np
import pytest
from scipy import stats

from research.data import bert_instances as bi
from research.data import masking
from research.data.bert_pretraining import (
    FEATURES, make_bert_pretraining_iterator, split_sentences)
from research.data.tokenizer import Tokenizer
from research.errors import ConfigError
from tests.conftest import austen_paragraphs

P_MIN = 1e-3  # significance floor for the statistical checks


@pytest.fixture(scope="module")
def tok(sp_model) -> Tokenizer:
    return Tokenizer(sp_model)


@pytest.fixture(scope="module")
def vocab(tok) -> masking.MaskingVocab:
    return masking.MaskingVocab.from_tokenizer(tok)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    return austen_paragraphs(300)


@pytest.fixture(scope="module")
def corpus(paragraphs, tok) -> bi.TokenizedDocuments:
    return bi.TokenizedDocuments(paragraphs, tok)


@pytest.fixture(scope="module")
def austen_instances(corpus, tok) -> list[np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` token arrays of real Austen pairs (seq_len 128)."""
    rng = np.random.default_rng(0)
    out = []
    for d in range(len(corpus)):
        for pair in bi.create_instances_from_document(d, corpus, max_seq_length=128,
                                                      short_seq_prob=0.1, rng=rng):
            out.append(bi.pair_tokens(pair, tok.cls_id, tok.sep_id)[0])
    return out


def _mask(tokens, vocab, rng, *, prob=0.15, cap=20, wwm=False):
    return masking.create_masked_lm_predictions(
        tokens, vocab, masked_lm_prob=prob, max_predictions_per_seq=cap,
        whole_word_mask=wwm, rng=rng)


# ----------------------------------------------------------------------------- sentences

def test_split_sentences():
    assert split_sentences("") == [] and split_sentences("  \n ") == []
    out = split_sentences("Mr. Darcy arrived. He was proud! Was he?  ")
    assert out == ["Mr. Darcy arrived.", "He was proud!", "Was he?"]


def test_tokenized_documents_drop_empty(tok):
    docs = bi.TokenizedDocuments(["", "One. Two.", "   "], tok)
    assert docs[0] == () and docs[2] == ()
    assert len(docs[1]) == 2 and all(s.dtype == np.int32 and len(s) for s in docs[1])
    with pytest.raises(IndexError):
        docs[3]


# ----------------------------------------------------------------------------- masking

def test_prediction_count_is_exact(austen_instances, vocab):
    rng = np.random.default_rng(1)
    lengths = set()
    # Austen instances plus short ones ([CLS] a.. [SEP] b.. [SEP]) where the floor of 1 applies.
    short = [np.array([4, *range(10, 10 + n), 5, 20, 5], np.int32) for n in range(1, 5)]
    for tokens in [*austen_instances, *short]:
        for cap in (20, 5):
            m = _mask(tokens, vocab, rng, cap=cap)
            assert len(m.positions) == min(cap, max(1, int(round(0.15 * len(tokens)))))
            lengths.add(len(tokens))
    # Short instances (budget floor of 1) and long ones (cap) are both exercised.
    assert min(lengths) <= 6 and max(lengths) == 128


def test_specials_never_chosen(austen_instances, vocab, tok):
    rng = np.random.default_rng(2)
    for tokens in austen_instances[:400]:
        for wwm in (False, True):
            m = _mask(tokens, vocab, rng, prob=0.5, cap=1000, wwm=wwm)
            assert not vocab.is_special[tokens[m.positions]].any()
            assert (m.tokens[tokens == tok.cls_id] == tok.cls_id).all()
            assert (m.tokens[tokens == tok.sep_id] == tok.sep_id).all()
            assert np.array_equal(m.labels, tokens[m.positions])
            assert (np.diff(m.positions) > 0).all()
            unchosen = np.ones(len(tokens), bool)
            unchosen[m.positions] = False
            assert np.array_equal(m.tokens[unchosen], tokens[unchosen])
    # With probability 1 every non-special position is predicted.
    m = _mask(austen_instances[0], vocab, rng, prob=1.0, cap=10_000)
    assert len(m.positions) == (~vocab.is_special[austen_instances[0]]).sum()


def test_80_10_10_split(austen_instances, vocab, tok):
    rng = np.random.default_rng(3)
    recorded = np.zeros(3, np.int64)
    observed = np.zeros(3, np.int64)  # [MASK], unchanged, changed to another token
    for _ in range(5):
        for tokens in austen_instances:
            m = _mask(tokens, vocab, rng)
            recorded += np.bincount(m.actions, minlength=3)
            new = m.tokens[m.positions]
            is_mask = new == tok.mask_id
            same = new == m.labels
            observed += [is_mask.sum(), same.sum(), (~is_mask & ~same).sum()]
            random = m.actions == masking.ACTION_RANDOM
            assert not vocab.is_special[new[random]].any()
    n = recorded.sum()
    assert n > 20_000
    p = stats.chisquare(recorded, n * np.array([0.8, 0.1, 0.1])).pvalue
    assert p > P_MIN, (recorded, p)
    # A random draw equal to the original reads as "unchanged", as in the reference.
    hit = 1.0 / len(vocab.replacement_ids)
    expected = n * np.array([0.8, 0.1 + 0.1 * hit, 0.1 * (1 - hit)])
    p = stats.chisquare(observed, expected).pvalue
    assert p > P_MIN, (observed, p)


def test_random_replacements_are_uniform_over_non_special(austen_instances, vocab):
    rng = np.random.default_rng(4)
    draws = []
    for tokens in austen_instances * 3:
        m = _mask(tokens, vocab, rng, prob=1.0, cap=10_000)
        draws.append(m.tokens[m.positions][m.actions == masking.ACTION_RANDOM])
    draws = np.concatenate(draws)
    assert not vocab.is_special[draws].any()
    counts = np.bincount(draws, minlength=len(vocab.is_special))[vocab.replacement_ids]
    assert counts.mean() > 10
    assert stats.chisquare(counts).pvalue > P_MIN


def _words(tokens: np.ndarray, vocab) -> list[np.ndarray]:
    """Positions of each word: a word-start piece and the continuation pieces after it."""
    words, current = [], []
    for i, t in enumerate(tokens):
        if vocab.is_special[t]:
            words.append(current)
            current = []
        elif vocab.word_start[t]:
            words.append(current)
            current = [i]
        else:
            current.append(i)
    words.append(current)
    return [np.array(w) for w in words if w]


def test_whole_word_masking(austen_instances, vocab):
    rng = np.random.default_rng(5)
    partial_without_wwm = 0
    multi_piece_chosen = full_budget = 0
    for tokens in austen_instances[:1500]:
        budget = masking.num_to_predict(len(tokens), 0.15, 20)
        m = _mask(tokens, vocab, rng, wwm=True)
        # Whole words that would overshoot the budget are skipped, as in the reference, so
        # a short instance made only of multi-piece words can get no prediction at all.
        assert len(m.positions) <= budget
        full_budget += len(m.positions) == budget
        chosen = set(m.positions.tolist())
        for word in _words(tokens, vocab):
            hits = sum(int(i) in chosen for i in word)
            assert hits in (0, len(word)), (tokens, m.positions, word)
            multi_piece_chosen += hits == len(word) > 1
        plain = set(_mask(tokens, vocab, rng).positions.tolist())
        partial_without_wwm += any(0 < sum(int(i) in plain for i in w) < len(w)
                                   for w in _words(tokens, vocab))
    assert multi_piece_chosen > 100
    assert full_budget > 0.9 * min(1500, len(austen_instances))
    assert partial_without_wwm > 100  # the check above is not vacuous


# ----------------------------------------------------------------------------- NSP pairs

STRIDE = 100_000  # synthetic token id = document * STRIDE + position in the document


def _synthetic_docs(n_docs: int, seed: int, max_sentences: int = 12,
                    max_len: int = 12) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Documents of sentences whose ids encode (document, position); and per-document
    sentence index of every position."""
    rng = np.random.default_rng(seed)
    docs, sentence_of = [], []
    for d in range(n_docs):
        lengths = rng.integers(1, max_len + 1, size=rng.integers(1, max_sentences + 1))
        ids = d * STRIDE + np.arange(lengths.sum(), dtype=np.int32)
        docs.append(np.split(ids, np.cumsum(lengths)[:-1]))
        sentence_of.append(np.repeat(np.arange(len(lengths)), lengths))
    return docs, sentence_of


def _pairs(docs, seq_len, seed, short_seq_prob=0.1):
    out = []
    for d in range(len(docs)):
        rng = np.random.default_rng([seed, d])
        out.append(bi.create_instances_from_document(
            d, docs, max_seq_length=seq_len, short_seq_prob=short_seq_prob, rng=rng))
    return out


def _contiguous(x: np.ndarray) -> bool:
    return len(x) > 0 and bool((np.diff(x) == 1).all())


def test_nsp_pairs_origin_and_lengths():
    docs, sentence_of = _synthetic_docs(300, seed=0)
    seq_len = 40
    n_random = n_real = 0
    for d, pairs in enumerate(_pairs(docs, seq_len, seed=1)):
        for p in pairs:
            a, b = p.tokens_a, p.tokens_b
            assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= seq_len - 3
            assert (a // STRIDE == d).all() and _contiguous(a)
            assert _contiguous(b) and (b // STRIDE == p.b_document).all()
            if p.is_random_next:
                n_random += 1
                assert p.b_document != d
            else:
                n_real += 1
                assert p.b_document == d and b[0] > a[-1]
                if len(a) + len(b) < seq_len - 3:  # untruncated: B is exactly what follows A
                    pos_a, pos_b = a % STRIDE, b % STRIDE
                    assert pos_b[0] == pos_a[-1] + 1
                    s = sentence_of[d]
                    assert pos_a[0] == 0 or s[pos_a[0] - 1] != s[pos_a[0]]
                    assert pos_b[-1] == len(s) - 1 or s[pos_b[-1] + 1] != s[pos_b[-1]]
    assert n_random > 200 and n_real > 200


def test_nsp_real_b_matches_tokenized_text(corpus, paragraphs, tok):
    """On real text, an untruncated actual-next B is the document's very next tokens."""
    checked = 0
    rng = np.random.default_rng(6)
    for d in range(len(corpus)):
        stream = np.concatenate(corpus[d])
        for p in bi.create_instances_from_document(d, corpus, max_seq_length=128,
                                                   short_seq_prob=0.1, rng=rng):
            if p.is_random_next or len(p.tokens_a) + len(p.tokens_b) == 125:
                continue
            ab = np.concatenate([p.tokens_a, p.tokens_b])
            windows = np.lib.stride_tricks.sliding_window_view(stream, len(ab))
            assert (windows == ab).all(axis=1).any()
            checked += 1
    assert checked > 50


def test_put_back_covers_document_exactly_once():
    """Without truncation, A's and actual-next B's partition each document, in order."""
    docs, _ = _synthetic_docs(200, seed=2, max_sentences=20, max_len=10)  # <= 200 tokens
    put_back = 0
    for d, pairs in enumerate(_pairs(docs, 512, seed=3, short_seq_prob=0.0)):
        used = [p.tokens_a if p.is_random_next else np.concatenate([p.tokens_a, p.tokens_b])
                for p in pairs]
        assert np.array_equal(np.concatenate(used), np.concatenate(docs[d]))
        put_back += sum(p.is_random_next and p.chunk_sentences > 1 for p in pairs)
    assert put_back > 50


def test_nsp_statistics():
    docs, _ = _synthetic_docs(3000, seed=4)
    seq_len = 40
    max_num_tokens = seq_len - 3
    all_pairs = _pairs(docs, seq_len, seed=5)
    # Short targets: per document with probability 0.1, uniform in [2, max_num_tokens].
    targets = np.array([pairs[0].target_length for pairs in all_pairs if pairs])
    assert ((targets >= 2) & (targets <= max_num_tokens)).all()
    expected = 0.1 * (1 - 1 / (max_num_tokens - 1))  # a short draw can equal the maximum
    short = int((targets < max_num_tokens).sum())
    assert stats.binomtest(short, len(targets), expected).pvalue > P_MIN
    flat = [p for pairs in all_pairs for p in pairs]
    assert all(p.is_random_next for p in flat if p.chunk_sentences == 1)
    multi = [p.is_random_next for p in flat if p.chunk_sentences > 1]
    assert len(multi) > 1000
    assert stats.binomtest(sum(multi), len(multi), 0.5).pvalue > P_MIN


def test_single_document_draws_b_from_itself():
    docs, _ = _synthetic_docs(1, seed=6, max_sentences=30)
    pairs = _pairs(docs, 20, seed=7)[0]
    assert any(p.is_random_next for p in pairs)
    assert all(p.b_document == 0 for p in pairs)


def test_truncate_seq_pair():
    rng = np.random.default_rng(8)
    fronts = 0
    for _ in range(300):
        la, lb, limit = rng.integers(1, 40), rng.integers(1, 40), int(rng.integers(2, 40))
        a, b = np.arange(la), 1000 + np.arange(lb)
        ta, tb = bi.truncate_seq_pair(a, b, limit, rng)
        # Expected lengths: repeatedly shorten the longer one (B on ties).
        ea, eb = la, lb
        while ea + eb > limit:
            ea, eb = (ea - 1, eb) if ea > eb else (ea, eb - 1)
        assert (len(ta), len(tb)) == (ea, eb)
        assert _contiguous(ta) or len(ta) == 0
        assert len(ta) == 0 or set(ta) <= set(a)
        assert len(tb) == 0 or set(tb) <= set(b)
        fronts += int(len(ta) > 0 and ta[0] > 0)
    assert 0 < fronts < 300


# ----------------------------------------------------------------------------- MLM-only packing

def test_pack_sentences():
    sents = [((0, i), np.full(n, i, np.int32)) for i, n in enumerate([3, 4, 9, 2, 1])]
    packed = bi.pack_sentences(sents, max_tokens=6)
    assert [k for k, _ in packed] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 2, 6)]
    assert [v.tolist() for _, v in packed] == [[0] * 3, [1] * 4, [2] * 6, [2, 2, 2, 3, 3, 4]]
    assert np.array_equal(np.concatenate([v for _, v in packed]),
                          np.concatenate([s for _, s in sents]))
    assert all(len(v) <= 6 for _, v in packed)


# ----------------------------------------------------------------------------- iterator

def _it(docs, tok, **kw):
    args = dict(seq_len=64, global_batch_size=8, seed=0, shuffle_window_docs=4)
    args.update(kw)
    return make_bert_pretraining_iterator(docs, tok, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(xs, ys) -> bool:
    return all(np.array_equal(x[k], y[k]) for x, y in zip(xs, ys) for k in x)


def _restore(batch: dict, row: int) -> np.ndarray:
    """Unmasked real tokens of one row."""
    n = batch["input_mask"][row].sum()
    ids = batch["input_ids"][row, :n].copy()
    m = int(batch["masked_lm_weights"][row].sum())
    ids[batch["masked_lm_positions"][row, :m]] = batch["masked_lm_ids"][row, :m]
    return ids


def test_iterator_features(paragraphs, tok, vocab):
    it = _it(paragraphs, tok)
    for batch in _take(it, 6):
        assert set(batch) == set(FEATURES)
        for name, (kind, dtype) in FEATURES.items():
            shape = {"L": (8, 64), "P": (8, 20), "": (8,)}[kind]
            assert batch[name].shape == shape and batch[name].dtype == dtype, name
        for r in range(8):
            n = batch["input_mask"][r].sum()
            assert n >= 5 and (batch["input_mask"][r, :n] == 1).all()
            assert (batch["input_ids"][r, n:] == tok.pad_id).all()
            ids = _restore(batch, r)
            seps = np.flatnonzero(ids == tok.sep_id)
            assert ids[0] == tok.cls_id and len(seps) == 2 and seps[1] == n - 1
            seg = batch["segment_ids"][r, :n]
            assert (seg[:seps[0] + 1] == 0).all() and (seg[seps[0] + 1:] == 1).all()
            m = int(batch["masked_lm_weights"][r].sum())
            assert m == masking.num_to_predict(int(n), 0.15, 20)
            pos = batch["masked_lm_positions"][r, :m]
            assert not vocab.is_special[ids[pos]].any()
            assert (batch["masked_lm_positions"][r, m:] == 0).all()
        assert set(batch["next_sentence_labels"].tolist()) <= {0, 1}


def test_iterator_deterministic_by_seed(paragraphs, tok):
    a = _take(_it(paragraphs, tok), 4)
    b = _take(_it(paragraphs, tok), 4)
    c = _take(_it(paragraphs, tok, seed=1), 4)
    assert _same(a, b) and not _same(a, c)


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_concatenate_to_global_batch(paragraphs, tok, process_count):
    full = _take(_it(paragraphs, tok), 5)
    hosts = [_take(_it(paragraphs, tok, process_index=p, process_count=process_count), 5)
             for p in range(process_count)]
    for step, batch in enumerate(full):
        for k in batch:
            joined = np.concatenate([h[step][k] for h in hosts])
            assert np.array_equal(joined, batch[k]), (step, k)


def test_resume_equals_uninterrupted(paragraphs, tok):
    kw = dict(whole_word_mask=True, dupe_factor=3)
    it = _it(paragraphs, tok, **kw)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)
    resumed = _it(paragraphs, tok, **kw)
    resumed.set_state(state)
    assert _same(_take(resumed, 6), expected)
    # A single host's state restores a host of a 2-process run (same rows).
    half = _it(paragraphs, tok, process_index=1, process_count=2, **kw)
    half.set_state(state)
    got = _take(half, 6)
    assert all(np.array_equal(g[k], e[k][4:]) for g, e in zip(got, expected) for k in g)
    with pytest.raises(ConfigError, match="seed"):
        _it(paragraphs, tok, seed=5, **kw).set_state(state)


def _epoch_rows(docs, tok, dupe_factor, epochs=3) -> list[collections.Counter]:
    """Feature rows per epoch; 16 docs, 2 rows, 8-doc windows: window k = epoch k / 8."""
    it = _it(docs, tok, global_batch_size=2, shuffle_window_docs=8, dupe_factor=dupe_factor)
    per_epoch = [collections.Counter() for _ in range(epochs)]
    while min(k for k, _ in it.get_state()["rows"]) < 8 * epochs:
        batch = next(it)
        for r, (k, _) in enumerate(it.get_state()["rows"]):
            if k < 8 * epochs:
                per_epoch[k // 8][b"".join(batch[f][r].tobytes() for f in sorted(batch))] += 1
    return per_epoch


def test_static_masking_repeats_every_dupe_factor_epochs(paragraphs, tok):
    docs = paragraphs[:16]
    e0, e1, e2 = _epoch_rows(docs, tok, dupe_factor=2)
    assert sum(e0.values()) > 16
    assert e0 == e2 and e0 != e1


def test_dynamic_masking_differs_between_epochs(paragraphs, tok):
    e0, e1, e2 = _epoch_rows(paragraphs[:16], tok, dupe_factor=None)
    assert e0 != e2 and e0 != e1
    assert not set(e0) & set(e2)


def test_single_pass_covers_each_document_once(paragraphs, tok):
    docs = paragraphs[:37]
    it = _it(docs, tok, repeat=False, shuffle_window_docs=3)
    batches = []
    while not it.exhausted:
        batches.append(next(it))
    assert batches[-1]["input_mask"].any()  # turns True right after the last real batch
    # Row r yields the instances of documents r, r + 8, ... in corpus order.
    for r in range(8):
        expected = [inst for d in range(r, 37, 8)
                    for inst in it.factory.document_instances(d, duplicate=0)]
        got = [b for b in batches if b["input_mask"][r].any()]
        assert len(got) == len(expected)
        assert all(b["input_mask"][r].any() for b in batches[:len(expected)])
        for b, inst in zip(batches, expected):
            want = bi.instance_features(inst, 64, 20, tok.pad_id)
            assert all(np.array_equal(b[k][r], want[k]) for k in want)
    for _ in range(3):
        pad = next(it)
        assert it.exhausted
        assert not pad["input_mask"].any() and not pad["masked_lm_weights"].any()
        assert (pad["input_ids"] == tok.pad_id).all()


def test_mlm_only_packs_full_segments(paragraphs, tok, corpus):
    docs = paragraphs[:40]
    it = _it(docs, tok, next_sentence=False, repeat=False, shuffle_window_docs=5)
    rows = collections.defaultdict(list)
    while not it.exhausted:
        batch = next(it)
        assert not batch["segment_ids"].any() and not batch["next_sentence_labels"].any()
        for r in range(8):
            if batch["input_mask"][r].any():
                ids = _restore(batch, r)
                assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) <= 64
                assert int(batch["masked_lm_weights"][r].sum()) == \
                    masking.num_to_predict(len(ids), 0.15, 20)
                rows[r].append(ids[1:-1])
    for r in range(8):
        stream = np.concatenate([s for d in range(r, 40, 8) for s in corpus[d]])
        assert np.array_equal(np.concatenate(rows[r]), stream)
        assert np.mean([len(x) for x in rows[r]]) > 40  # segments are packed near-full


def test_iterator_errors(paragraphs, tok):
    with pytest.raises(ConfigError, match="divisible"):
        _it(paragraphs, tok, process_count=3)
    with pytest.raises(ConfigError, match="seq_len"):
        _it(paragraphs, tok, seq_len=4)
    with pytest.raises(ConfigError, match="empty"):
        _it([], tok)
    with pytest.raises(ConfigError, match="without one training instance"):
        next(_it(["", " "], tok))
