"""Classification data: loaders (tsv/csv/jsonl/tfds), example layout, batch iterator."""

import csv
import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from research.data.classification import (DataSourceError, Examples, encode_example,
                                          epoch_steps, load_examples,
                                          make_classification_iterator, truncate_lengths)
from research.data.local_builder import LocalCorpus, prepare_local_dataset
from research.data.tokenizer import Tokenizer
from research.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
RT = ROOT / "data" / "rotten_tomatoes"
FEATURES = {"input_ids": np.int32, "input_mask": np.int32, "token_type_ids": np.int32,
            "label": np.int32, "weight": np.float32, "index": np.int32,
            "last_index": np.int32}


@pytest.fixture(scope="module")
def tok(sp_model):
    return Tokenizer(sp_model)


def write(path, text):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def toy_examples(n, pair=False, regression=False):
    rng = np.random.default_rng(n)
    words = "the a film was good bad very long short plot actor scene".split()
    texts = []
    for i in range(n):
        a = f"row {i} " + " ".join(rng.choice(words, int(rng.integers(0, 12))))
        texts.append((a, " ".join(rng.choice(words, int(rng.integers(1, 9))))) if pair
                     else (a,))
    labels = (rng.normal(size=n).astype(np.float32) if regression
              else rng.integers(0, 3, n).astype(np.int64))
    fields = ("a", "b") if pair else ("text",)
    return Examples(texts, labels, None, f"toy{n}", fields, regression)


# ============================================================================== loaders

def test_tsv_single_custom_fields_and_int_labels(tmp_path):
    p = write(tmp_path / "t.tsv", "id\tsentence\ty\n7\tgood film\t1\n8\t\"quoted\" bad\t0\n\n")
    ex = load_examples(f"tsv:{p}", text_fields=("sentence",), label_field="y")
    assert ex.texts == [("good film",), ('"quoted" bad',)]  # tsv: no quoting
    assert ex.labels.dtype == np.int64 and ex.labels.tolist() == [1, 0]
    assert ex.label_names is None and ex.num_classes == 2 and len(ex) == 2
    assert ex.name == f"tsv:{p}"


def test_csv_pairs_with_quoting_and_string_labels(tmp_path):
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text_a", "text_b", "label"])
        w.writerow(["A man, a plan", 'He said "hi"', "entailment"])
        w.writerow(["two\nlines", "b", "contradiction"])
        w.writerow(["x", "y", "neutral"])
    ex = load_examples(f"csv:{path}", text_fields=("text_a", "text_b"))
    assert ex.texts == [("A man, a plan", 'He said "hi"'), ("two\nlines", "b"), ("x", "y")]
    assert ex.label_names == ["contradiction", "entailment", "neutral"]  # sorted
    assert ex.labels.tolist() == [1, 0, 2]
    # Given names (e.g. the train split's) fix the ids.
    names = ["entailment", "neutral", "contradiction"]
    ex = load_examples(f"csv:{path}", text_fields=("text_a", "text_b"), label_names=names)
    assert ex.label_names == names and ex.labels.tolist() == [0, 2, 1]


def test_jsonl_pairs_glob_and_label_names(tmp_path):
    write(tmp_path / "d" / "b.jsonl", json.dumps({"p": "b1", "h": "bb", "gold": "yes"}) + "\n")
    write(tmp_path / "d" / "a.jsonl", json.dumps({"p": "a1", "h": "aa", "gold": "no"}) + "\n\n")
    ex = load_examples(f"jsonl:{tmp_path}/d/*.jsonl", text_fields=("p", "h"),
                       label_field="gold")
    assert ex.texts == [("a1", "aa"), ("b1", "bb")]  # sorted file order
    assert ex.label_names == ["no", "yes"] and ex.labels.tolist() == [0, 1]
    assert "2 files" in ex.name
    # Integer JSON labels are ids as-is; label_names only names them.
    p = write(tmp_path / "ints.jsonl", '{"text": "x", "label": 2}\n{"text": "y", "label": 0}\n')
    ex = load_examples(f"jsonl:{p}", label_names=["a", "b", "c"])
    assert ex.labels.tolist() == [2, 0] and ex.label_names == ["a", "b", "c"]
    # A string in label_names is looked up there, even if it looks like an integer.
    p = write(tmp_path / "stars.jsonl", '{"text": "x", "label": "5"}\n{"text": "y", '
                                        '"label": "1"}\n')
    ex = load_examples(f"jsonl:{p}", label_names=["1", "2", "3", "4", "5"])
    assert ex.labels.tolist() == [4, 0]


def test_regression_and_unlabeled_rows(tmp_path):
    p = write(tmp_path / "r.tsv", "s1\ts2\tscore\nx\ty\t3.5\nz\tw\t\nq\tr\t-1\n")
    with pytest.raises(DataSourceError, match=r"r.tsv, line 3: no label in 'score'.*"
                                              r"allow_unlabeled=True"):
        load_examples(f"tsv:{p}", text_fields=("s1", "s2"), label_field="score",
                      regression=True)
    ex = load_examples(f"tsv:{p}", text_fields=("s1", "s2"), label_field="score",
                       regression=True, allow_unlabeled=True)
    assert ex.labels.dtype == np.float32 and ex.regression and ex.num_classes is None
    np.testing.assert_array_equal(ex.labels, [3.5, np.nan, -1.0])
    # Classification: empty and -1 labels are unlabeled (-1).
    p = write(tmp_path / "test.tsv", "label\ttext\n1\ta\n\tb\n-1\tc\n")
    ex = load_examples(f"tsv:{p}", allow_unlabeled=True)
    assert ex.labels.tolist() == [1, -1, -1] and ex.num_unlabeled == 2
    with pytest.raises(DataSourceError, match=r"test.tsv, line 3: .*\(and 1 more rows\)"):
        load_examples(f"tsv:{p}")
    # A test file with no label column at all.
    p = write(tmp_path / "nolabel.tsv", "index\ttext\n0\ta\n1\tb\n")
    ex = load_examples(f"tsv:{p}", allow_unlabeled=True)
    assert ex.labels.tolist() == [-1, -1]


def test_loader_errors_name_file_line_and_fix(tmp_path):
    p = write(tmp_path / "a.tsv", "label\tsentence\n1\tx\n")
    with pytest.raises(DataSourceError, match=r"a.tsv, line 1: no text column 'text'; the "
                                              r"header has columns \['label', 'sentence'\]"):
        load_examples(f"tsv:{p}")
    with pytest.raises(DataSourceError, match=r"no label column 'y'.*label_field="):
        load_examples(f"tsv:{p}", text_fields=("sentence",), label_field="y")
    p = write(tmp_path / "names.tsv", "label\ttext\npos\tx\nneg\ty\nmeh\tz\n")
    with pytest.raises(DataSourceError, match=r"names.tsv, line 4: label 'meh' is not in "
                                              r"label_names \['neg', 'pos'\]"):
        load_examples(f"tsv:{p}", label_names=["neg", "pos"])
    p = write(tmp_path / "range.tsv", "label\ttext\n0\tx\n5\ty\n")
    with pytest.raises(DataSourceError, match=r"range.tsv, line 3: class id 5 is out of "
                                              r"range \(label_names has 2\)"):
        load_examples(f"tsv:{p}", label_names=["neg", "pos"])
    empty = write(tmp_path / "empty.tsv", "")
    header_only = write(tmp_path / "header.csv", "label,text\n")
    for spec, path in ((f"tsv:{empty}", empty), (f"csv:{header_only}", header_only)):
        with pytest.raises(DataSourceError, match=f"{path} is empty"):
            load_examples(spec)
    p = write(tmp_path / "short.tsv", "label\ttext\n1\tx\n0\n")
    with pytest.raises(DataSourceError, match=r"short.tsv, line 3: 1 fields, but the header "
                                              r"has 2"):
        load_examples(f"tsv:{p}")
    p = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label}\n')
    with pytest.raises(DataSourceError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_examples(f"jsonl:{p}")
    p = write(tmp_path / "nolab.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataSourceError, match=r"nolab.jsonl, line 2: no label field 'label' "
                                              r"\(fields present: \['text'\]\)"):
        load_examples(f"jsonl:{p}")
    p = write(tmp_path / "notext.jsonl", '{"body": "a", "label": 1}\n')
    with pytest.raises(DataSourceError, match=r"line 1: text field 'text' is missing"):
        load_examples(f"jsonl:{p}")
    p = write(tmp_path / "frac.jsonl", '{"text": "a", "label": 0.5}\n')
    with pytest.raises(DataSourceError, match="not an integer. Pass regression=True"):
        load_examples(f"jsonl:{p}")
    p = write(tmp_path / "reg.tsv", "label\ttext\nhigh\tx\n")
    with pytest.raises(DataSourceError, match=r"reg.tsv, line 2: regression label 'high' is "
                                              r"not a number"):
        load_examples(f"tsv:{p}", regression=True)
    p = write(tmp_path / "mixed.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": '
                                        '"pos"}\n')
    with pytest.raises(DataSourceError, match="use one kind, or pass label_names"):
        load_examples(f"jsonl:{p}")
    with pytest.raises(DataSourceError, match="Unknown classification data spec"):
        load_examples(f"parquet:{p}")
    with pytest.raises(DataSourceError, match="matches no file"):
        load_examples(f"tsv:{tmp_path}/nothing*.tsv")
    with pytest.raises(DataSourceError, match="files have no splits"):
        load_examples(f"jsonl:{p}", split="validation")
    with pytest.raises(DataSourceError, match="give 1 .* or 2"):
        load_examples(f"jsonl:{p}", text_fields=("a", "b", "c"))


def test_rotten_tomatoes_loads():
    sizes = {"train": 10246, "validation": 1281, "test": 1281}
    for split, n in sizes.items():
        ex = load_examples(f"tsv:{RT / split}.tsv")
        assert len(ex) == n and set(ex.labels.tolist()) == {0, 1}
        assert all(len(t) == 1 and t[0] for t in ex.texts)


def test_tfds_glue_through_mock_data():
    with tfds.testing.mock_data(num_examples=9):
        ex = load_examples("tfds:glue/sst2:validation", text_fields=("sentence",))
        assert len(ex) == 9 and ex.name == "tfds:glue/sst2:validation"
        assert ex.label_names == ["negative", "positive"]
        assert ex.labels.dtype == np.int64 and set(ex.labels.tolist()) <= {0, 1}
        assert all(isinstance(t[0], str) for t in ex.texts)
        ex = load_examples("tfds:glue/stsb", split="train",
                           text_fields=("sentence1", "sentence2"), regression=True)
        assert len(ex) == 9 and ex.labels.dtype == np.float32 and ex.label_names is None
        assert all(len(t) == 2 for t in ex.texts)
        with pytest.raises(DataSourceError, match=r"no text feature 'text' \(features: "
                                                  r"\['idx', 'label', 'sentence'\]\)"):
            load_examples("tfds:glue/sst2:validation")
        with pytest.raises(DataSourceError, match="give the split in one place"):
            load_examples("tfds:glue/sst2:test", split="train", text_fields=("sentence",))


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_tfds_prepared_dataset_both_formats(tmp_path, file_format):
    path = write(tmp_path / "in" / "a.txt", "\n\n".join(f"document {i}" for i in range(7)))
    builder = prepare_local_dataset(LocalCorpus("text", (path,)), str(tmp_path / "tfds"),
                                    file_format=file_format)
    spec = f"tfds:research_local_documents/{builder.builder_config.name}"
    ex = load_examples(spec, data_dir=str(tmp_path / "tfds"), allow_unlabeled=True)
    assert ex.texts == [(f"document {i}",) for i in range(7)]
    assert ex.labels.tolist() == [-1] * 7
    with pytest.raises(DataSourceError, match="no label feature 'label'"):
        load_examples(spec, data_dir=str(tmp_path / "tfds"))


def test_tfds_not_prepared_never_downloads(tmp_path):
    with pytest.raises(DataSourceError, match="is not prepared"):
        load_examples("tfds:glue/sst2:validation", text_fields=("sentence",),
                      data_dir=str(tmp_path))


# ============================================================================= encoding

def reference_truncate(la, lb, budget):
    """BERT's _truncate_seq_pair on lengths: pop from the longer (second on ties)."""
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def test_truncate_lengths_matches_reference_loop():
    for la in range(0, 25):
        for lb in range(0, 25):
            for budget in range(0, 30):
                assert truncate_lengths(la, lb, budget) == reference_truncate(la, lb, budget)


def test_encode_example_layouts_and_truncation(tok):
    a, b = "It is a truth universally acknowledged", "that a single man"
    ta, tb = tok.encode(a), tok.encode(b)
    ids, types = encode_example((a,), tok, 64, style="encoder")
    assert ids == [tok.cls_id, *ta, tok.sep_id] and types == [0] * len(ids)
    ids, types = encode_example((a, b), tok, 64, style="encoder")
    assert ids == [tok.cls_id, *ta, tok.sep_id, *tb, tok.sep_id]
    assert types == [0] * (len(ta) + 2) + [1] * (len(tb) + 1)
    ids, types = encode_example((a,), tok, 64, style="decoder")
    assert ids == [tok.bos_id, *ta, tok.eos_id] and set(types) == {0}
    ids, types = encode_example((a, b), tok, 64, style="decoder")
    assert ids == [tok.bos_id, *ta, tok.sep_id, *tb, tok.eos_id] and set(types) == {0}
    # Truncation: the single text is cut from its end; pairs longest-first.
    ids, _ = encode_example((a,), tok, 5, style="encoder")
    assert ids == [tok.cls_id, *ta[:3], tok.sep_id]
    for seq_len in range(3, len(ta) + len(tb) + 4):
        la, lb = reference_truncate(len(ta), len(tb), seq_len - 3)
        for style, (s, m, e) in (("encoder", (tok.cls_id, tok.sep_id, tok.sep_id)),
                                 ("decoder", (tok.bos_id, tok.sep_id, tok.eos_id))):
            ids, types = encode_example((a, b), tok, seq_len, style=style)
            assert ids == [s, *ta[:la], m, *tb[:lb], e] and len(ids) <= seq_len
            assert len(types) == len(ids)
    with pytest.raises(ConfigError, match="seq_len=2 cannot hold the 3 special tokens"):
        encode_example((a, b), tok, 2)
    with pytest.raises(ConfigError, match="style='gpt' is not supported"):
        encode_example((a,), tok, 8, style="gpt")


# ============================================================================= iterator

def batches(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_contents_dtypes_and_epoch_order(tok):
    ex = toy_examples(10, pair=True)
    it = make_classification_iterator(ex, tok, seq_len=16, global_batch_size=4, seed=3)
    got = batches(it, 5)  # 20 rows = two epochs
    for batch in got:
        assert set(batch) == set(FEATURES)
        for k, dtype in FEATURES.items():
            assert batch[k].dtype == dtype, k
            assert batch[k].shape == ((4, 16) if batch[k].ndim == 2 else (4,))
    order = np.concatenate([np.random.default_rng([3, e]).permutation(10) for e in (0, 1)])
    np.testing.assert_array_equal(np.concatenate([b["index"] for b in got]), order)
    b = got[0]
    for r, i in enumerate(b["index"]):
        ids, types = encode_example(ex.texts[i], tok, 16, style="encoder")
        n = len(ids)
        assert b["input_ids"][r, :n].tolist() == ids
        assert (b["input_ids"][r, n:] == tok.pad_id).all()
        assert b["token_type_ids"][r, :n].tolist() == types
        assert b["input_mask"][r].tolist() == [1] * n + [0] * (16 - n)
        assert b["last_index"][r] == n - 1 and b["label"][r] == ex.labels[i]
    assert (b["weight"] == 1).all()
    # Same seed, same batches; another seed, another order.
    assert_batches_equal(got, batches(make_classification_iterator(
        ex, tok, seq_len=16, global_batch_size=4, seed=3), 5))
    other = batches(make_classification_iterator(ex, tok, seq_len=16, global_batch_size=4,
                                                 seed=4), 5)
    assert not np.array_equal(np.concatenate([b["index"] for b in other]), order)


def test_decoder_style_last_index_is_eos_and_regression_labels(tok):
    ex = toy_examples(7, regression=True)
    it = make_classification_iterator(ex, tok, seq_len=12, global_batch_size=3, seed=0,
                                      style="decoder")
    for b in batches(it, 4):
        rows = np.arange(3)
        assert (b["input_ids"][rows, b["last_index"]] == tok.eos_id).all()
        assert (b["token_type_ids"] == 0).all() and b["label"].dtype == np.float32
        np.testing.assert_array_equal(b["label"], ex.labels[b["index"]])


@pytest.mark.parametrize("repeat", [True, False])
def test_host_batches_concatenate_to_global_batch(tok, repeat):
    ex = toy_examples(13, pair=True)
    kw = dict(seq_len=20, global_batch_size=8, seed=1, repeat=repeat)
    steps = 5 if repeat else 2
    full = batches(make_classification_iterator(ex, tok, **kw), steps)
    for count in (2, 4):
        hosts = [batches(make_classification_iterator(
            ex, tok, process_index=p, process_count=count, **kw), steps)
            for p in range(count)]
        for h in hosts:
            assert h[0]["input_ids"].shape == (8 // count, 20)
        joined = [{k: np.concatenate([h[s][k] for h in hosts]) for k in full[s]}
                  for s in range(steps)]
        assert_batches_equal(joined, full)


def test_resume_yields_the_uninterrupted_batches(tok):
    ex = toy_examples(11)
    kw = dict(seq_len=16, global_batch_size=4, seed=7)
    reference = batches(make_classification_iterator(ex, tok, **kw), 9)
    it = make_classification_iterator(ex, tok, **kw)
    batches(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    assert state["position"] == 4
    fresh = make_classification_iterator(ex, tok, **kw)
    fresh.set_state(state)
    assert_batches_equal(batches(fresh, 5), reference[4:])
    # The state holds no process layout: a 2-host resume gives the same global batches.
    halves = []
    for p in range(2):
        h = make_classification_iterator(ex, tok, process_index=p, process_count=2, **kw)
        h.set_state(state)
        halves.append(next(h))
    np.testing.assert_array_equal(np.concatenate([h["index"] for h in halves]),
                                  reference[4]["index"])
    with pytest.raises(ConfigError, match="seed: state has 7, iterator has 8"):
        make_classification_iterator(ex, tok, seq_len=16, global_batch_size=4,
                                     seed=8).set_state(state)
    with pytest.raises(ConfigError, match="num_examples: state has 11, iterator has 12"):
        make_classification_iterator(toy_examples(12), tok, **kw).set_state(state)
    with pytest.raises(ValueError, match="'position' must be an integer"):
        it.set_state({**state, "position": -1})


def test_single_pass_covers_each_example_once(tok):
    ex = toy_examples(10)
    B = 4
    assert epoch_steps(10, B) == 3 and epoch_steps(8, B) == 2
    for count in (1, 2, 4):
        seen = []
        for p in range(count):
            it = make_classification_iterator(ex, tok, seq_len=16, global_batch_size=B,
                                              seed=0, repeat=False, process_index=p,
                                              process_count=count)
            assert it.num_batches == 3 and len(it) == 3 and not it.exhausted
            got = list(it)
            assert len(got) == 3 and it.exhausted
            with pytest.raises(StopIteration):
                next(it)
            for b in got:
                pad = b["index"] < 0
                assert ((b["weight"] == 0) == pad).all()
                assert (b["input_mask"][pad] == 0).all() and (b["label"][pad] == 0).all()
                assert (b["input_ids"][pad] == tok.pad_id).all()
                seen.extend(b["index"][~pad].tolist())
        assert sorted(seen) == list(range(10))
    # No shuffle by default in a single pass: examples in order.
    it = make_classification_iterator(ex, tok, seq_len=16, global_batch_size=B, seed=0,
                                      repeat=False)
    assert np.concatenate([b["index"] for b in it]).tolist() == list(range(10)) + [-1, -1]
    state = it.get_state()
    it2 = make_classification_iterator(ex, tok, seq_len=16, global_batch_size=B, seed=0,
                                       repeat=False)
    it2.set_state(state)
    assert it2.exhausted and list(it2) == []


def test_iterator_argument_errors(tok):
    ex = toy_examples(5)
    with pytest.raises(ConfigError, match="not divisible by process_count=3"):
        make_classification_iterator(ex, tok, seq_len=8, global_batch_size=4, seed=0,
                                     process_count=3)
    with pytest.raises(ValueError, match="process_index=2 must be in"):
        make_classification_iterator(ex, tok, seq_len=8, global_batch_size=4, seed=0,
                                     process_index=2, process_count=2)
    with pytest.raises(TypeError, match="endless"):
        len(make_classification_iterator(ex, tok, seq_len=8, global_batch_size=4, seed=0))
