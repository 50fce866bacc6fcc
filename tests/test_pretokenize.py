"""Pre-tokenised input: tools/pretokenize.py, the `tokens:DIR` source (research.data.tokens),
its vectorised causal-LM packing, and `python -m research.benchmark --data_only`."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from research.data.causal_lm import make_causal_lm_iterator, merge_states
from research.data.order import EpochOrder
from research.data.sources import open_documents
from research.data.token_writer import write_token_files
from research.data.tokenizer import load_tokenizer
from research.data.tokens import (TokenFilesError, TokenSource, open_token_source,
                                  tokenizer_fingerprint)
from research.errors import ConfigError
from tests.conftest import (ROOT, austen_paragraphs, env_without_hugepage_settings,
                            xla_flags)

VOCAB = str(ROOT / "data" / "tokenizers" / "austen_8k.model")
TOOL = ROOT / "tools" / "pretokenize.py"
SHARD_TOKENS = 3000  # several shards from a small corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(spec, data_dir) of two text files holding 400 Austen paragraphs."""
    d = tmp_path_factory.mktemp("corpus")
    paragraphs = austen_paragraphs(400)
    (d / "one.txt").write_text("\n\n".join(paragraphs[:170]))
    (d / "two.txt").write_text("\n\n".join(paragraphs[170:]))
    return f"text:{d}/*.txt", str(d / "cache")


@pytest.fixture(scope="module")
def token_dir(corpus, tmp_path_factory):
    spec, cache = corpus
    out = str(tmp_path_factory.mktemp("tok") / "austen")
    write_token_files(spec, VOCAB, out, workers=1, source_kwargs={"data_dir": cache},
                      chunk_documents=37, shard_tokens=SHARD_TOKENS)
    return out


def read_dir(path):
    """{file name: bytes} of every file in `path`."""
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(path).iterdir())}


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == y[k].dtype, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------ the written files

def test_tokens_are_the_tokenizers_own_output(corpus, token_dir):
    spec, cache = corpus
    docs = open_documents(spec, data_dir=cache)
    tok = load_tokenizer(VOCAB)
    src = open_token_source(token_dir)
    assert isinstance(src, TokenSource) and len(src) == len(docs) == 400
    expected = [tok.encode(docs[i]) for i in range(len(docs))]
    for i, ids in enumerate(expected):
        got = src[i]
        assert got.dtype == np.int32 and got.tolist() == ids, i
    assert src[-1].tolist() == expected[-1]
    with pytest.raises(IndexError):
        src[len(docs)]
    flat = np.concatenate([np.asarray(e, np.int64) for e in expected])
    idx = np.array([0, 5, len(flat) - 1, SHARD_TOKENS + 7, 2 * SHARD_TOKENS])
    np.testing.assert_array_equal(src.take(idx), flat[idx])  # across shard boundaries
    meta = json.loads(open(os.path.join(token_dir, "tokens.json")).read())
    assert meta["num_documents"] == 400 and meta["num_tokens"] == len(flat)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == tok.vocab_size
    assert meta["tokenizer"]["fingerprint"] == src.tokenizer_fingerprint
    assert src.tokenizer_fingerprint == tokenizer_fingerprint(tok)
    # A shard closes at the first document boundary at or past SHARD_TOKENS tokens.
    shards = meta["shards"]
    assert len(shards) > 2 and sum(s["num_documents"] for s in shards) == 400
    for s in shards[:-1]:
        last_doc = expected[s["first_document"] + s["num_documents"] - 1]
        assert s["num_tokens"] >= SHARD_TOKENS > s["num_tokens"] - len(last_doc)


def run_tool(*args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # must work uninstalled
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_with_two_workers_writes_identical_files(corpus, token_dir, tmp_path):
    """Worker processes and another chunk size give byte-identical files."""
    spec, cache = corpus
    out = tmp_path / "two"
    proc = run_tool(f"--input={spec}", f"--vocab={VOCAB}", f"--output={out}", "--workers=2",
                    f"--shard_tokens={SHARD_TOKENS}", f"--data_dir={cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Wrote 400 documents" in proc.stdout and "2 worker(s)" in proc.stdout
    assert read_dir(str(out)) == read_dir(token_dir)


def load_tool():
    spec = importlib.util.spec_from_file_location("pretokenize_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", ["non_empty_output", "missing_vocab", "bad_spec",
                                  "tokens_input", "workers"])
def test_cli_mistakes_are_one_error_line(case, corpus, tmp_path, capsys):
    spec, cache = corpus
    out = tmp_path / "out"
    args = {"input": spec, "vocab": VOCAB, "output": str(out), "data_dir": cache}
    expect = {"non_empty_output": "is not empty", "missing_vocab": "does not exist",
              "bad_spec": "Unknown document spec", "tokens_input": "already tokenised",
              "workers": "--workers=0"}[case]
    if case == "non_empty_output":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    elif case == "missing_vocab":
        args["vocab"] = str(tmp_path / "nope.model")
    elif case == "bad_spec":
        args["input"] = "nonsense:foo"
    elif case == "tokens_input":
        args["input"] = f"tokens:{tmp_path}"
    argv = [f"--{k}={v}" for k, v in args.items()] + (["--workers=0"] if case == "workers" else [])
    tool = load_tool()
    if case == "workers":
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        code = exit_info.value.code
    else:
        code = tool.main(argv)
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], err
    if case == "non_empty_output":
        assert os.listdir(out) == ["keep.txt"]
    elif case != "workers":
        assert not out.exists() or not os.listdir(out)


def test_bad_token_dirs_name_the_problem(token_dir, tmp_path):
    with pytest.raises(TokenFilesError, match="not a directory"):
        open_token_source(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenFilesError, match="no tokens.json"):
        open_token_source(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(token_dir, broken)
    with open(broken / "tokens-00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(TokenFilesError, match="tokens-00001.bin has 10 bytes"):
        open_token_source(str(broken))


# ---------------------------------------------------------- batches from tokens:DIR

@pytest.mark.parametrize("B, L, repeat, P", [
    (4, 64, True, 1),
    (8, 1024, True, 2),     # B16 x 1024-like rows: many documents per row
    (4, 16, True, 1),       # documents split across batches
    (4, 64, False, 1),      # eval: one pass in order, then padding
])
def test_batches_equal_the_text_specs(corpus, token_dir, B, L, repeat, P):
    spec, cache = corpus
    tok = load_tokenizer(VOCAB)
    text = open_documents(spec, data_dir=cache)
    tokens = open_token_source(token_dir)
    for p in range(P):
        kw = dict(seq_len=L, global_batch_size=B, seed=3, repeat=repeat, process_index=p,
                  process_count=P, prefetch=0)
        a = make_causal_lm_iterator(text, tok, **kw)
        b = make_causal_lm_iterator(tokens, tok, **kw)
        after_end = 0
        for _ in range(12 if repeat else 1000):
            assert_batches_equal([next(a)], [next(b)])
            assert a.get_state() == b.get_state()
            assert a.exhausted == b.exhausted
            after_end += b.exhausted
            if after_end > 2:  # eval: padding batches after the pass match too
                break
        assert b.exhausted != repeat  # eval: ran past the end of its pass


class FileTokenizer:
    """Test tokenizer for synthetic token files: has a VOCAB file, never encodes."""
    bos_id, eos_id, pad_id = 2, 3, 0

    def __init__(self, path):
        self.path = str(path)

    def encode(self, text):
        raise AssertionError("token sources are never tokenised")


def write_synthetic(path, docs, tokenizer, shard_docs=7):
    """The documented DIR layout (research/data/tokens.py), written independently of the
    writer: offsets.npy, tokens-NNNNN.bin of `shard_docs` documents each, tokens.json."""
    os.makedirs(path)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    np.save(os.path.join(path, "offsets.npy"), offsets)
    shards = []
    for s, first in enumerate(range(0, len(docs), shard_docs)):
        part = docs[first:first + shard_docs]
        flat = np.concatenate([np.asarray(d, "<u2") for d in part] + [np.zeros(0, "<u2")])
        with open(os.path.join(path, f"tokens-{s:05d}.bin"), "wb") as f:
            f.write(flat.tobytes())
        shards.append({"file": f"tokens-{s:05d}.bin", "first_document": first,
                       "num_documents": len(part), "num_tokens": len(flat)})
    meta = {"format": "research-tokens", "version": 1, "dtype": "uint16",
            "num_documents": len(docs), "num_tokens": int(offsets[-1]),
            "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "vocab": tokenizer.path},
            "shards": shards}
    with open(os.path.join(path, "tokens.json"), "w") as f:
        json.dump(meta, f)
    return open_token_source(path)


class ArrayDocs:
    """The same documents as a plain sequence of arrays: the per-document packing path."""

    def __init__(self, source):
        self.source, self.tokenizer_fingerprint = source, source.tokenizer_fingerprint

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]


@pytest.fixture
def synthetic(tmp_path):
    """(make(n, max_len) -> TokenSource of documents [id, ...] incl. empty ones, tokenizer)."""
    tok = FileTokenizer(tmp_path / "vocab.model")
    (tmp_path / "vocab.model").write_bytes(b"synthetic vocabulary")

    def make(n, max_len=40, seed=0):
        rng = np.random.default_rng(seed)
        docs = [[] if i % 5 == 4 else [1000 + i, *rng.integers(4, 900, rng.integers(0, max_len))]
                for i in range(n)]
        return write_synthetic(str(tmp_path / f"tok{n}_{max_len}_{seed}"), docs, tok)
    return make, tok


@pytest.mark.parametrize("n_docs, B, L, shuffle, repeat, P", [
    (50, 4, 16, True, True, 1),     # several documents per row
    (30, 4, 7, False, True, 1),     # pieces split across many batches
    (3, 8, 32, True, True, 1),      # fewer documents than rows: positions wrap epochs
    (20, 2, 128, True, True, 1),    # long rows, many segments
    (60, 8, 16, True, True, 4),     # hosts
    (25, 4, 16, False, False, 1),   # eval pass, then padding
    (25, 4, 16, False, False, 2),
])
def test_vectorised_packing_equals_per_document_packing(synthetic, n_docs, B, L, shuffle,
                                                        repeat, P):
    make, tok = synthetic
    src = make(n_docs)
    for p in range(P):
        kw = dict(seq_len=L, global_batch_size=B, seed=1, shuffle=shuffle, repeat=repeat,
                  process_index=p, process_count=P, prefetch=0)
        fast = make_causal_lm_iterator(src, tok, **kw)
        slow = make_causal_lm_iterator(ArrayDocs(src), tok, **kw)
        assert fast._vectorised and not slow._vectorised
        for _ in range(15):
            assert_batches_equal([next(fast)], [next(slow)])
            assert fast.get_state() == slow.get_state()
            assert fast.exhausted == slow.exhausted


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_is_exact_under_any_process_count(synthetic, prefetch):
    make, tok = synthetic
    src = make(80)
    kw = dict(seq_len=24, global_batch_size=8, seed=5, prefetch=prefetch)
    whole = take(make_causal_lm_iterator(src, tok, **kw), 9)
    # Two hosts run 4 batches and save; one process restores their merged state.
    states = []
    for p in range(2):
        it = make_causal_lm_iterator(src, tok, process_index=p, process_count=2, **kw)
        take(it, 4)
        states.append(json.loads(json.dumps(it.get_state())))
        it.close()
    resumed = make_causal_lm_iterator(open_token_source(src.path), tok, **kw)
    resumed.set_state(merge_states(states))
    assert_batches_equal(take(resumed, 5), whole[4:])
    resumed.close()


class RecordingTokens(TokenSource):
    """A TokenSource that records which documents' tokens were read."""

    def __init__(self, path):
        super().__init__(path)
        self.read = set()

    def take(self, flat):
        flat = np.asarray(flat)
        self.read |= set((np.searchsorted(self.offsets, flat, side="right") - 1).tolist())
        return super().take(flat)


def test_each_host_reads_only_its_rows(synthetic):
    make, tok = synthetic
    n, B, P, L = 200, 8, 4, 16
    path = make(n).path
    order = EpochOrder(n, 2, True)
    for p in range(P):
        src = RecordingTokens(path)
        it = make_causal_lm_iterator(src, tok, seq_len=L, global_batch_size=B, seed=2,
                                     process_index=p, process_count=P, prefetch=0)
        take(it, 6)
        k_max = max(k for k, _ in it.get_state()["rows"])
        rows = range(p * B // P, (p + 1) * B // P)
        mine = {order.locate(r + k * B)[1] for r in rows for k in range(k_max + 1)}
        assert src.read and src.read <= mine
        assert len(src.read) < n // 2  # far from the whole corpus


# ----------------------------------------------------------------- the tokenizer check

def test_a_different_vocab_is_refused_naming_both(token_dir, tmp_path):
    src = open_token_source(token_dir)
    same = tmp_path / "copy_of_austen.model"
    shutil.copy(VOCAB, same)  # same bytes elsewhere: the same tokenizer
    make_causal_lm_iterator(src, load_tokenizer(str(same)), seq_len=8, global_batch_size=2,
                            seed=0, prefetch=0)
    wordpiece = tmp_path / "vocab.txt"
    wordpiece.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    with pytest.raises(ConfigError) as err:
        make_causal_lm_iterator(src, load_tokenizer(str(wordpiece)), seq_len=8,
                                global_batch_size=2, seed=0, prefetch=0)
    assert VOCAB in str(err.value) and str(wordpiece) in str(err.value)
    assert "fingerprint" in str(err.value) and "pretokenize.py" in str(err.value)


# ------------------------------------------------------------ benchmark --data_only

def benchmark(*args):
    env = env_without_hugepage_settings(XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "research.benchmark",
                           "--gin_file=configs/models/gpt_tiny.gin",
                           "--gin_file=configs/runs/pretrain_causal.gin", "--gin.BATCH_SIZE=4",
                           "--gin.SEQ_LEN=64", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


def test_benchmark_data_only_reports_the_input_rate():
    out, result = benchmark("--data_only", "--data_batches=7", "--warmup=2")
    assert result["data_only"] is True and "tokens_per_sec" not in result  # no step timed
    assert result["data_batches"] == 7 and result["data_warmup"] == 2
    assert result["data_tokens_per_sec"] == pytest.approx(7 * 4 * 64 / result["data_time_s"])
    assert "austen" in result["source"] and 0.9 < result["data_real_token_fraction"] <= 1
    assert "data tokens/s:" in out


@pytest.mark.parametrize("flags, expected", [
    (["--data_only", "--profile_steps=0:1"], "use --data_only=with_step"),
    (["--data_only=sometimes"], "invalid choice: 'sometimes'"),
])
def test_benchmark_data_only_flag_mistakes(flags, expected, capsys):
    from research import benchmark
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--gin_file=configs/runs/pretrain_causal.gin", *flags])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0]


def test_benchmark_data_only_with_step_prints_the_ratio():
    out, result = benchmark("--data_only=with_step", "--data_batches=5", "--steps=2",
                            "--warmup=1")
    assert result["tokens_per_sec"] > 0 and result["data_tokens_per_sec"] > 0
    assert result["data_to_step_ratio"] == pytest.approx(
        result["data_tokens_per_sec"] / result["tokens_per_sec"])
    assert "data / step tokens/s:" in out and "table row:" in out


def test_training_with_another_vocab_is_one_error_line(token_dir, sp_model, tmp_path):
    """research.train refuses tokens:DIR with a VOCAB of another fingerprint, naming both."""
    env = env_without_hugepage_settings(XLA_FLAGS=xla_flags(), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
         "--gin_file=configs/runs/pretrain_causal.gin", "--gin.TRAIN_STEPS=2",
         "--gin.BATCH_SIZE=2", "--gin.SEQ_LEN=16", "--gin.EVAL_DATA=None",
         f"--gin.TRAIN_DATA='tokens:{token_dir}'", f"--gin.VOCAB='{sp_model}'",
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and VOCAB in lines[0] and sp_model in lines[0], proc.stderr[-3000:]


def test_tokens_spec_reaches_the_objectives(token_dir):
    """`tokens:DIR` opens through open_documents (so the CLIs take it); BERT pretraining,
    which needs text, and a mixture containing it are refused with the fix named."""
    from research.data.mixture import open_train_data
    from research.objectives.bert_pretraining import BertPretrainingObjective
    from research.objectives.causal_lm import CausalLMObjective
    source = open_documents(f"tokens:{token_dir}")
    assert isinstance(source, TokenSource) and len(source) > 0
    assert len(CausalLMObjective().open_source(f"tokens:{token_dir}")) == len(source)
    with pytest.raises(ConfigError, match="needs the text"):
        BertPretrainingObjective().open_source(f"tokens:{token_dir}")
    with pytest.raises(ConfigError, match="cannot be part of a mixture"):
        open_train_data(CausalLMObjective(),
                        [(f"tokens:{token_dir}", 1), ("text:data/austen/emma.txt", 1)])
