"""Corpora as they ship: parquet and compressed jsonl specs, weighted TRAIN_DATA mixtures."""

import bz2
import gzip
import json
import lzma
import math
import os
import pathlib
import shutil
import subprocess
import sys
from fractions import Fraction

import gin
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from research.data.mixture import MixtureSource, check_mixture, open_train_data
from research.data.sources import DataSourceError, DocumentList, open_documents
from research.errors import ConfigError, InvalidConfigError
from tests.conftest import ROOT, austen_paragraphs, xla_flags
from tests.test_causal_lm_data import make, synthetic_docs, take

# Documents with the cases a reader can get wrong: non-ASCII, inner newlines, JSON escapes.
EXTRA = ["Caf\u00e9 \u2014 na\u00efve \U0001F600", "two\nlines\n\nand a blank one",
         'quotes " and \\ backslash', "\t leading and trailing space \t"]


@pytest.fixture(scope="module")
def documents():
    return austen_paragraphs(600)[::3] + EXTRA


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "cache")


def docs_of(source):
    return [source[i] for i in range(len(source))]


def jsonl_bytes(docs, field="text"):
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


def write_shards(directory, docs, suffix, compress=lambda b: b, field="text", shards=3):
    """`docs` split over `shards` files DIR/part-K.jsonl{suffix} (in order)."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(docs), shards + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        (directory / f"part-{k}.jsonl{suffix}").write_bytes(compress(jsonl_bytes(docs[lo:hi],
                                                                                 field)))
    return str(directory / f"part-*.jsonl{suffix}")


def zstd_frames(data: bytes) -> bytes:
    """Two concatenated zstandard frames (as pzstd / chunked writers produce)."""
    cctx = zstandard.ZstdCompressor(level=3)
    half = len(data) // 2
    return cctx.compress(data[:half]) + cctx.compress(data[half:])


COMPRESSIONS = {".gz": gzip.compress, ".zst": zstd_frames, ".bz2": bz2.compress,
                ".xz": lzma.compress}


# --------------------------------------------------------------------- file formats -------

@pytest.mark.parametrize("suffix", sorted(COMPRESSIONS))
def test_compressed_jsonl_equals_plain_jsonl(tmp_path, data_dir, documents, suffix):
    plain = open_documents("jsonl:" + write_shards(tmp_path / "plain", documents, ""),
                           data_dir=data_dir)
    packed = open_documents("jsonl:" + write_shards(tmp_path / "packed", documents, suffix,
                                                    COMPRESSIONS[suffix]), data_dir=data_dir)
    expected = [d for d in documents if d.strip()]
    assert docs_of(plain) == expected
    assert docs_of(packed) == expected


def test_compressed_text_equals_plain_text(tmp_path, data_dir):
    source = ROOT / "data" / "austen" / "persuasion.txt"
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(source.read_bytes()))
    plain = open_documents(f"text:{source}", data_dir=data_dir)
    packed = open_documents(f"text:{tmp_path}/book.txt.gz", data_dir=data_dir)
    assert len(packed) == len(plain) > 100
    assert docs_of(packed) == docs_of(plain)


def write_parquet(directory, docs, column="text", shards=2, row_group_size=50):
    """`docs` over `shards` parquet files with an id column and small row groups."""
    directory.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(docs), shards + 1).astype(int)
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        table = pa.table({"id": list(range(lo, hi)), column: docs[lo:hi]})
        pq.write_table(table, directory / f"shard-{k:03d}.parquet",
                       row_group_size=row_group_size)
    return str(directory / "*.parquet")


def test_parquet_equals_jsonl_with_the_column_from_gin(tmp_path, data_dir, documents):
    """The text column is the knob jsonl uses: gin open_documents.text_field."""
    jsonl = write_shards(tmp_path / "j", documents, "", field="body")
    parquet = write_parquet(tmp_path / "p", documents, column="body")
    gin.parse_config("open_documents.text_field = 'body'")
    expected = docs_of(open_documents(f"jsonl:{jsonl}", data_dir=data_dir))
    source = open_documents(f"parquet:{parquet}", data_dir=data_dir)
    assert docs_of(source) == expected == [d for d in documents if d.strip()]
    assert "2 files" in source.name


def test_parquet_binary_column_and_cache_reuse(tmp_path, data_dir, documents):
    directory = tmp_path / "b"
    directory.mkdir()
    pq.write_table(pa.table({"text": [d.encode() for d in documents]}), directory / "x.parquet")
    first = open_documents(f"parquet:{directory}/*.parquet", data_dir=data_dir)
    again = open_documents(f"parquet:{directory}/*.parquet", data_dir=data_dir)
    assert docs_of(first) == docs_of(again) == [d for d in documents if d.strip()]
    root = os.path.join(data_dir, "research_local_documents")
    builds = [d for d in os.listdir(root)
              if os.path.exists(os.path.join(root, d, "1.0.0", "dataset_info.json"))]
    assert len(builds) == 1 and builds[0].startswith("parquet-")  # built once, then reused


@pytest.mark.parametrize("table, text_field, expected", [
    ({"body": ["a"]}, "text", "has no column 'text'"),
    ({"text": [1, 2]}, "text", "not a string"),
    ({"text": ["a", None]}, "text", "row 2 has a null 'text'"),
])
def test_parquet_mistakes_name_file_and_fix(tmp_path, data_dir, table, text_field, expected):
    pq.write_table(pa.table(table), tmp_path / "bad.parquet")
    with pytest.raises(DataSourceError, match=expected) as e:
        open_documents(f"parquet:{tmp_path}/bad.parquet", text_field=text_field,
                       data_dir=data_dir)
    assert "bad.parquet" in str(e.value)


@pytest.mark.parametrize("name, content", [
    ("bad.jsonl.gz", b"not gzip at all\n"),
    ("bad.jsonl.zst", b"not zstd at all\n"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "abc"}\n' * 200, mtime=0)[:40]),
], ids=["bad.jsonl.gz", "bad.jsonl.zst", "cut.jsonl.gz"])  # stable ids: xdist workers must agree
def test_corrupt_compressed_file_is_a_data_source_error(tmp_path, data_dir, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataSourceError, match=f"Cannot read input file .*{name}"):
        open_documents(f"jsonl:{tmp_path}/{name}", data_dir=data_dir)


def test_parquet_prefix_is_listed_in_the_unknown_spec_error():
    with pytest.raises(DataSourceError, match="parquet:GLOB"):
        open_documents("csv:x.csv")


# ------------------------------------------------------------------------- mixtures -------

def labelled(name, n):
    return DocumentList([f"{name}{j}" for j in range(n)], name)


MIXTURES = [  # (source sizes, weights)
    ([50, 7], [0.7, 0.3]),
    ([3, 1000], [0.9, 0.1]),
    ([10, 20, 30], [1, 1, 1]),
    ([13, 5, 41, 2, 9], [0.05, 2.5, 1, 0.3, 7]),
    ([1], [3]),
]


def reference_shares(sizes, weights):
    """L and per-source slot counts from the documented rule, in exact fractions."""
    w = [Fraction(str(x)) for x in weights]
    p = [x / sum(w) for x in w]
    length = max(math.ceil(n / q) for n, q in zip(sizes, p))
    return length, [length * q for q in p]


@pytest.mark.parametrize("sizes, weights", MIXTURES)
def test_mixture_realises_the_weights(sizes, weights):
    names = [chr(ord("a") + s) for s in range(len(sizes))]
    mix = MixtureSource([labelled(a, n) for a, n in zip(names, sizes)], weights)
    length, exact = reference_shares(sizes, weights)
    assert len(mix) == length
    picks = [mix.locate(i) for i in range(len(mix))]
    assert [mix[i] for i in range(len(mix))] == [f"{names[s]}{j}" for s, j in picks]
    counts = np.zeros((len(mix) + 1, len(sizes)), dtype=np.int64)
    for i, (s, _) in enumerate(picks):
        counts[i + 1] = counts[i]
        counts[i + 1, s] += 1
    for s, n in enumerate(sizes):
        # One epoch: within 1 of the exact expectation, and every document at least once.
        assert abs(counts[-1, s] - exact[s]) < 1 and counts[-1, s] >= n
        # Documents in order, wrapping around when the source is exhausted.
        assert [j for t, j in picks if t == s] == [k % n for k in range(counts[-1, s])]
        # Every prefix: within ceil(log2 S) / 2 of its expectation (1/2 for two sources).
        ideal = np.arange(len(mix) + 1) * counts[-1, s] / len(mix)
        bound = math.ceil(math.log2(len(sizes))) / 2
        assert np.max(np.abs(counts[:, s] - ideal)) <= bound + 1e-9


def test_mixture_is_deterministic_and_scale_free():
    """The same sources and weights give the same map; so do proportional weights."""
    make_sources = lambda: [labelled("a", 11), labelled("b", 4), labelled("c", 25)]
    first = MixtureSource(make_sources(), [0.2, 0.5, 0.3])
    again = MixtureSource(make_sources(), [0.2, 0.5, 0.3])
    scaled = MixtureSource(make_sources(), [2, 5, 3])
    assert docs_of(first) == docs_of(again) == docs_of(scaled)


@pytest.mark.parametrize("value, problem", [
    ([], "non-empty list"),
    ([("text:a.txt", 0)], "not a positive finite number"),
    ([("text:a.txt", -0.5)], "not a positive finite number"),
    ([("text:a.txt", float("nan"))], "not a positive finite number"),
    ([("text:a.txt", True)], "is not a number"),
    ([("text:a.txt", "0.5")], "is not a number"),
    ([("", 1.0)], "not a non-empty string"),
    ([("text:a.txt",)], "not a (spec, weight) pair"),
])
def test_bad_mixture_is_a_config_error_naming_the_fix(value, problem):
    with pytest.raises(ConfigError) as e:
        check_mixture(value)
    assert problem in str(e.value) and "--gin.TRAIN_DATA=" in str(e.value)
    with pytest.raises(ConfigError, match="positive weight"):
        MixtureSource([labelled("a", 2)], [0])


def test_run_config_accepts_a_mixture_and_refuses_a_bad_one():
    from research.training.run_config import RunConfig
    base = dict(model_config=None, objective=None, vocab="v.model", num_steps=10,
                batch_size=8, seq_len=32, learning_rate=1e-3)
    good = [("text:a/*.txt", 0.7), ("jsonl:b/*.jsonl.gz", 0.3)]
    assert RunConfig(train_data=good, **base).train_data == good
    with pytest.raises(InvalidConfigError, match=r"TRAIN_DATA .*\(spec, weight\) pairs"):
        RunConfig(train_data=[("text:a/*.txt", 0)], **base)


def test_open_train_data_mixes_specs_and_refuses_examples(tmp_path, data_dir, documents):
    class Documents:
        def open_source(self, spec, role):
            assert role == "train"
            return open_documents(spec, data_dir=data_dir)

    gz = write_shards(tmp_path / "gz", documents[:40], ".gz", gzip.compress, shards=1)
    text = f"text:{ROOT}/data/austen/persuasion.txt"
    mix = open_train_data(Documents(), [(text, 3), (f"jsonl:{gz}", 1)])
    plain = [open_documents(text, data_dir=data_dir), open_documents(f"jsonl:{gz}",
                                                                     data_dir=data_dir)]
    assert isinstance(mix, MixtureSource)
    for i in range(0, len(mix), 7):
        s, j = mix.locate(i)
        assert mix[i] == plain[s][j]
    assert open_train_data(Documents(), text)[0] == plain[0][0]

    class Examples:
        def open_source(self, spec, role):
            return [("a", 0)]

    with pytest.raises(ConfigError, match="cannot be mixed"):
        open_train_data(Examples(), [(text, 1), (text, 1)])


def test_mixture_batches_are_identical_for_any_process_count_and_resume():
    mix = MixtureSource([synthetic_docs(29, seed=1), synthetic_docs(5, seed=2)], [0.6, 0.4])
    kw = dict(seq_len=16, global_batch_size=8, seed=4)
    whole = take(make(mix, **kw), 6)
    hosts = [take(make(mix, process_index=p, process_count=2, **kw), 6) for p in range(2)]
    for step, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([hosts[0][step][key], hosts[1][step][key]]), batch[key])
    it = make(mix, **kw)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make(mix, **kw)
    resumed.set_state(state)
    for a, b in zip(take(resumed, 3), whole[3:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


# ------------------------------------------------------------------ through the CLI -------

def train_cli(args, env_extra, timeout=300):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", RESEARCH_HUGEPAGES="0",
               **env_extra)
    return subprocess.run([sys.executable, "-m", "research.train",
                           "--gin_file=configs/models/gpt_tiny.gin",
                           "--gin_file=configs/runs/pretrain_causal.gin", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(workdir):
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["train/loss"]) for m in map(json.loads, lines)]


def test_mixture_trains_and_resumes_exactly(tmp_path, documents):
    gz = write_shards(tmp_path / "corpus", documents, ".gz", gzip.compress)
    mixture = [("text:data/austen/northangerabbey.txt", 0.7), (f"jsonl:{gz}", 0.3)]
    args = ["--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
            "--gin.WARMUP_STEPS=1", "--gin.EVAL_DATA=None", "--gin.train.log_every=1",
            "--gin.train.checkpoint_every=3", "--gin.train.keep_checkpoints=5",
            "--gin.train.progress_bar=False", f"--gin.TRAIN_DATA={mixture!r}"]
    # Both runs share a JAX compilation cache: the resumed run loads the executables the first
    # run compiled (the same programs, so the same bits) instead of compiling them again.
    env = {"RESEARCH_DATA_DIR": str(tmp_path / "cache"),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    straight = tmp_path / "straight"
    proc = train_cli([*args, f"--workdir={straight}"], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "TRAIN_DATA mixture" in proc.stderr
    first = losses(straight)
    assert [step for step, _ in first] == list(range(1, 7))
    assert all(math.isfinite(loss) for _, loss in first)

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")
    metrics = resumed / "metrics.jsonl"  # steps 4-6 must come from the resumed run
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:3]))
    proc = train_cli([*args, f"--workdir={resumed}"], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = losses(resumed)
    assert [step for step, _ in again] == list(range(1, 7))
    np.testing.assert_allclose([x for _, x in again], [x for _, x in first], rtol=1e-6)


def test_bad_mixture_is_one_error_line(tmp_path):
    proc = train_cli(["--gin.TRAIN_DATA=[('text:data/austen/persuasion.txt', 0)]",
                      f"--workdir={tmp_path / 'run'}"], {}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "TRAIN_DATA" in errors[0] and "(spec, weight) pairs" in errors[0]
