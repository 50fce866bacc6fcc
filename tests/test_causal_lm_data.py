"""Causal-LM packing: reference equality, multi-host layout, resumption, eval pass."""

import json

import numpy as np
import pytest

from research.data.causal_lm import make_causal_lm_iterator, make_causal_lm_iterator_from_spec
from research.data.order import EpochOrder
from research.data.sources import DocumentList
from research.data.tokenizer import load_tokenizer
from research.errors import ConfigError
from tests.conftest import austen_paragraphs

BOS, EOS, PAD = 2, 3, 0
FIRST_ID = 10_000  # each synthetic document starts with token FIRST_ID + its index


class WordTokenizer:
    """Test tokenizer: a document is whitespace-separated integers, one token each."""
    bos_id, eos_id, pad_id = BOS, EOS, PAD

    def encode(self, text):
        return [int(w) for w in text.split()]


def synthetic_docs(n, max_len=40, seed=0):
    """Documents 'ID t1 t2 ...' with ID = FIRST_ID + i and 0..max_len further tokens."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        body = rng.integers(4, 1000, size=rng.integers(0, max_len + 1))
        docs.append(" ".join(str(t) for t in [FIRST_ID + i, *body]))
    return DocumentList(docs, "synthetic")


def doc_order(n, seed, shuffle, epochs):
    """The documented infinite order, written independently of the implementation."""
    order = []
    for e in range(epochs):
        perm = np.random.default_rng([seed, e]).permutation(n) if shuffle else range(n)
        order += [int(d) for d in perm]
    return order


def reference_rows(docs, tok, order, *, B, L, num_batches, rows=None, repeat=True):
    """Pure-python packing: per row, the concatenated pairs cut into windows of L."""
    out = {k: [] for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
    for r in (range(B) if rows is None else rows):
        stream_in, stream_tgt, owner = [], [], []
        for j, d in enumerate(order[r::B]):
            toks = tok.encode(docs[d])
            stream_in += [tok.bos_id] + toks
            stream_tgt += toks + [tok.eos_id]
            owner += [j] * (len(toks) + 1)
            if len(stream_in) >= L * num_batches:
                break
        assert repeat or len(order) == len(docs)
        row = {k: [] for k in out}
        for w in range(num_batches):
            seg, pos, prev = 0, 0, None
            for t in range(w * L, (w + 1) * L):
                if t < len(stream_in):
                    if owner[t] != prev:
                        seg, pos, prev = seg + 1, 0, owner[t]
                    row["inputs"].append(stream_in[t])
                    row["targets"].append(stream_tgt[t])
                    row["weights"].append(1.0)
                    row["segment_ids"].append(seg)
                    row["positions"].append(pos)
                    pos += 1
                else:
                    for k, v in (("inputs", PAD), ("targets", PAD), ("weights", 0.0),
                                 ("segment_ids", 0), ("positions", 0)):
                        row[k].append(v)
        for k in out:
            out[k].append(np.array(row[k]).reshape(num_batches, L))
    # -> [num_batches, rows, L]
    return {k: np.stack(v, axis=1) for k, v in out.items()}


def take(it, n):
    return [next(it) for _ in range(n)]


def stack(batches):
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def make(docs, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("prefetch", 0)
    return make_causal_lm_iterator(docs, WordTokenizer(), **kw)


# ------------------------------------------------------------------------ epoch order

@pytest.mark.parametrize("shuffle", [True, False])
def test_epoch_order_is_the_documented_order(shuffle):
    """`EpochOrder` (shared by the causal-LM, BERT and classification iterators) is the
    documented order, one item at a time and vectorised."""
    n, seed, epochs = 7, 3, 5
    order = EpochOrder(n, seed, shuffle)
    expected = doc_order(n, seed, shuffle, epochs)
    assert [order.locate(g) for g in range(n * epochs)] == [
        (g // n, expected[g]) for g in range(n * epochs)]
    positions = np.array([[34, 0, 8], [13, 21, 6]])
    got_epochs, got_items = order.locate_many(positions)
    assert got_epochs.shape == got_items.shape == positions.shape
    assert got_epochs.tolist() == (positions // n).tolist()
    assert got_items.tolist() == [[expected[g] for g in row] for row in positions.tolist()]


# --------------------------------------------------------------------- packing semantics

@pytest.mark.parametrize("n_docs, B, L, shuffle", [
    (50, 4, 16, True),     # several documents per row
    (30, 4, 7, False),     # pieces split across many batches
    (3, 8, 32, True),      # fewer documents than rows: positions wrap into later epochs
    (20, 2, 128, True),    # long rows, many segments
])
def test_matches_reference_packing(n_docs, B, L, shuffle):
    docs = synthetic_docs(n_docs)
    nb = 12
    got = stack(take(make(docs, seq_len=L, global_batch_size=B, shuffle=shuffle), nb))
    order = doc_order(n_docs, 0, shuffle, epochs=nb * L + 2)  # enough for any row
    ref = reference_rows(docs, WordTokenizer(), order, B=B, L=L, num_batches=nb)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert got["inputs"].dtype == np.int32 and got["targets"].dtype == np.int32
    assert got["weights"].dtype == np.float32
    assert got["segment_ids"].dtype == np.int32 and got["positions"].dtype == np.int32
    assert got["inputs"].shape == (nb, B, L)


def test_row_stream_is_concatenation_of_pairs_nothing_lost():
    docs = synthetic_docs(10, max_len=30)
    B, L, nb = 2, 9, 40
    batches = take(make(docs, seq_len=L, global_batch_size=B), nb)
    order = doc_order(10, 0, True, epochs=40)
    tok = WordTokenizer()
    for r in range(B):
        stream_in = np.concatenate([b["inputs"][r] for b in batches])
        stream_tgt = np.concatenate([b["targets"][r] for b in batches])
        exp_in, exp_tgt = [], []
        for d in order[r::B]:
            toks = tok.encode(docs[d])
            exp_in += [BOS] + toks
            exp_tgt += toks + [EOS]
            if len(exp_in) >= L * nb:
                break
        np.testing.assert_array_equal(stream_in, exp_in[:L * nb])
        np.testing.assert_array_equal(stream_tgt, exp_tgt[:L * nb])
        # inputs are targets shifted right by one within a document (continuations too)
        starts = stream_in == BOS
        np.testing.assert_array_equal(stream_in[1:][~starts[1:]], stream_tgt[:-1][~starts[1:]])
        # every row of a training batch is full
        assert all(b["weights"].min() == 1.0 for b in batches)


def test_segments_and_positions_restart_on_continuation():
    docs = DocumentList(["10 11 12 13 14 15 16 17 18 19 20 21"])
    it = make(docs, seq_len=5, global_batch_size=1, shuffle=False)
    b0, b1, b2 = take(it, 3)
    np.testing.assert_array_equal(b0["inputs"][0], [BOS, 10, 11, 12, 13])
    np.testing.assert_array_equal(b1["inputs"][0], [14, 15, 16, 17, 18])  # true previous token
    np.testing.assert_array_equal(b1["targets"][0], [15, 16, 17, 18, 19])
    np.testing.assert_array_equal(b1["positions"][0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(b2["inputs"][0], [19, 20, 21, BOS, 10])  # next epoch
    np.testing.assert_array_equal(b2["targets"][0], [20, 21, EOS, 10, 11])
    np.testing.assert_array_equal(b2["segment_ids"][0], [1, 1, 1, 2, 2])
    np.testing.assert_array_equal(b2["positions"][0], [0, 1, 2, 0, 1])


def test_determinism_and_seed_sensitivity():
    docs = synthetic_docs(40)
    kw = dict(seq_len=16, global_batch_size=4)
    a = take(make(docs, seed=1, **kw), 5)
    assert_batches_equal(a, take(make(docs, seed=1, **kw), 5))
    b = take(make(docs, seed=2, **kw), 5)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ hosts

@pytest.mark.parametrize("P", [2, 4])
def test_host_batches_concatenate_to_global_batch(P):
    docs = synthetic_docs(37)
    kw = dict(seq_len=24, global_batch_size=8, seed=5)
    global_batches = take(make(docs, **kw), 8)
    host_batches = [take(make(docs, process_index=p, process_count=P, **kw), 8)
                    for p in range(P)]
    for step, g in enumerate(global_batches):
        for k in g:
            parts = [host_batches[p][step][k] for p in range(P)]
            assert all(x.shape == (8 // P, 24) for x in parts)
            np.testing.assert_array_equal(np.concatenate(parts), g[k])


def test_hosts_read_disjoint_documents():
    docs = synthetic_docs(400, max_len=10)
    kw = dict(seq_len=16, global_batch_size=8, seed=3, process_count=2)
    seen = []
    for p in range(2):
        batches = take(make(docs, process_index=p, **kw), 10)  # < one epoch in total
        ids = np.concatenate([b["inputs"][b["inputs"] >= FIRST_ID] for b in batches])
        assert len(set(ids)) == len(ids)
        seen.append(set(ids.tolist()))
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_batch_not_divisible_by_process_count():
    with pytest.raises(ConfigError, match="not divisible by process_count=3"):
        make(synthetic_docs(5), seq_len=8, global_batch_size=8, process_count=3)


# ------------------------------------------------------------------------- resumption

@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("process_index", [0, 1])
def test_resume_from_state(prefetch, process_index):
    docs = synthetic_docs(23, max_len=60)
    kw = dict(seq_len=16, global_batch_size=6, seed=9, process_index=process_index,
              process_count=2, prefetch=prefetch)
    full = take(make(docs, **kw), 12)
    it = make(docs, **kw)
    take(it, 5)
    state = json.loads(json.dumps(it.get_state()))
    assert len(state["rows"]) == 3
    it.close()
    fresh = make(docs, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 7), full[5:])
    fresh.close()
    # restoring into a used iterator rewinds it too
    it.set_state(state)
    assert_batches_equal(take(it, 7), full[5:])
    it.close()


def test_set_state_validates():
    docs = synthetic_docs(10)
    it = make(docs, seq_len=8, global_batch_size=4)
    next(it)
    state = it.get_state()
    for kw, field in [(dict(seed=1), "seed"), (dict(seq_len=9), "seq_len"),
                      (dict(global_batch_size=2), "global_batch_size")]:
        other = make(docs, **{**dict(seq_len=8, global_batch_size=4), **kw})
        with pytest.raises(ConfigError, match=field):
            other.set_state(state)
    with pytest.raises(ConfigError, match="num_documents"):
        make(synthetic_docs(11), seq_len=8, global_batch_size=4).set_state(state)
    with pytest.raises(ValueError, match="Malformed"):
        it.set_state({**state, "rows": [[0, 0]]})


def test_prefetch_matches_no_prefetch_and_state_tracks_yielded():
    docs = synthetic_docs(31)
    kw = dict(seq_len=20, global_batch_size=4, seed=4)
    plain = make(docs, prefetch=0, **kw)
    fetched = make(docs, prefetch=3, **kw)
    for _ in range(10):
        assert_batches_equal([next(plain)], [next(fetched)])
        assert plain.get_state() == fetched.get_state()
    fetched.close()


def test_prefetch_thread_error_is_raised_and_retry_resumes():
    class Flaky(DocumentList):
        fail = True

        def _get(self, i):
            if self.fail and i == 5:
                raise OSError("disk hiccup")
            return super()._get(i)

    docs = synthetic_docs(8)
    flaky = Flaky([docs[i] for i in range(8)])
    kw = dict(seq_len=16, global_batch_size=2, shuffle=False)
    expected = take(make(docs, **kw), 6)
    it = make(flaky, prefetch=2, **kw)
    got = []
    with pytest.raises(RuntimeError, match="prefetch thread failed") as info:
        for _ in range(6):
            got.append(next(it))
    assert isinstance(info.value.__cause__, OSError)
    Flaky.fail = False
    got += take(it, 6 - len(got))
    assert_batches_equal(got, expected)
    it.close()


# -------------------------------------------------------------------------------- eval

@pytest.mark.parametrize("P", [1, 2])
def test_eval_pass_covers_each_document_once_then_pads(P):
    n = 29
    docs = synthetic_docs(n, max_len=25)
    seen = []
    for p in range(P):
        it = make(docs, seq_len=16, global_batch_size=4, repeat=False, process_index=p,
                  process_count=P, prefetch=2)
        assert not it.exhausted
        tokens, steps = [], 0
        while not it.exhausted:
            b = next(it)
            tokens.append(b["inputs"][b["weights"] > 0])
            steps += 1
            assert steps < 500
        for _ in range(3):  # keeps yielding all-padding batches
            b = next(it)
            assert b["weights"].sum() == 0 and b["segment_ids"].max() == 0
            assert (b["inputs"] == PAD).all() and b["inputs"].shape == (4 // P, 16)
        it.close()
        ids = np.concatenate(tokens)
        seen += ids[ids >= FIRST_ID].tolist()
    assert sorted(seen) == [FIRST_ID + i for i in range(n)]


def test_eval_matches_reference_in_order():
    docs = synthetic_docs(13, max_len=20)
    B, L, nb = 4, 12, 10
    got = stack(take(make(docs, seq_len=L, global_batch_size=B, repeat=False), nb))
    ref = reference_rows(docs, WordTokenizer(), list(range(13)), B=B, L=L, num_batches=nb,
                         repeat=False)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


# --------------------------------------------------------------- real tokenizer & spec

def test_real_tokenizer_from_spec(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    paragraphs = austen_paragraphs(60)
    (tmp_path / "austen.txt").write_text("\n\n".join(paragraphs))
    it = make_causal_lm_iterator_from_spec(
        f"text:{tmp_path}/*.txt", tok, data_dir=str(tmp_path / "cache"), seq_len=64,
        global_batch_size=4, seed=0, shuffle=False, repeat=False)
    batches = []
    while not it.exhausted:
        batches.append(next(it))
    it.close()
    for r in range(4):
        stream = np.concatenate([b["inputs"][r][b["weights"][r] > 0] for b in batches])
        pieces = np.split(stream, np.flatnonzero(stream == tok.bos_id)[1:])
        assert len(pieces) == len(paragraphs[r::4])
        for piece, text in zip(pieces, paragraphs[r::4]):
            assert piece[0] == tok.bos_id
            assert tok.decode(piece) == tok.decode(tok.encode(text))
