"""Data, tokenizers, pre-tokenised corpora and the HF converter on gs:// (a real GCS server on
localhost, tests/gcs_emulator.py): each gives exactly what the same files give locally."""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from research import storage
from research.data.classification.readers import read_files
from research.data.file_readers import DataSourceError
from research.data.sources import open_documents
from research.data.tokenizer import load_tokenizer
from research.data.tokens import RemoteShard, open_token_source, tokenizer_fingerprint
from research.storage import StorageError
from tests.conftest import ROOT, austen_paragraphs

VOCAB = str(ROOT / "data" / "tokenizers" / "austen_8k.model")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_corpus(base: pathlib.Path, fmt: str) -> str:
    """Three files (two in a subdirectory; text: plain, bz2 and zstd) of Austen paragraphs;
    returns the glob under `base`."""
    paragraphs = austen_paragraphs(90)
    parts = [paragraphs[:30], paragraphs[30:55], paragraphs[55:]]
    suffixes = {"text": ["txt", "txt.bz2", "txt.zst"], "jsonl": ["jsonl.gz"] * 3,
                "parquet": ["parquet"] * 3}[fmt]
    for name, docs, suffix in zip(["a", "sub/b", "sub/c"], parts, suffixes):
        path = base / f"{name}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "text":
            data = "\n\n".join(docs).encode()
            if suffix.endswith(".bz2"):
                data = bz2.compress(data)
            elif suffix.endswith(".zst"):
                import zstandard
                data = zstandard.ZstdCompressor().compress(data)
            path.write_bytes(data)
        elif fmt == "jsonl":
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.writelines(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(docs))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"body": docs}), path, row_group_size=7)
    return {"text": "**/*.txt*", "jsonl": "**/*.jsonl.gz", "parquet": "**/*.parquet"}[fmt]


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_remote_specs_give_the_local_documents(fmt, gcs, tmp_path, caplog):
    local = tmp_path / "data"
    pattern = _write_corpus(local, fmt)
    storage.upload(str(local), storage.join(gcs, "data"))
    kw = {} if fmt == "text" else {"text_field": "body"}
    mine = open_documents(f"{fmt}:{local}/{pattern}", data_dir=str(tmp_path / "c1"), **kw)
    remote = open_documents(f"{fmt}:{gcs}/data/{pattern}", data_dir=str(tmp_path / "c2"), **kw)
    assert len(remote) == len(mine) == 90
    assert list(remote) == list(mine)
    assert remote.name == f"{fmt}:{gcs}/data/{pattern} (3 files)"
    # reopened unchanged: the cache (keyed by URL, size, mtime) is reused, same documents
    with caplog.at_level(logging.INFO, logger="research.data.local_builder"):
        again = open_documents(f"{fmt}:{gcs}/data/{pattern}", data_dir=str(tmp_path / "c2"), **kw)
    assert "Reusing cached local dataset" in caplog.text
    assert list(again) == list(mine)


def test_missing_bucket_or_objects_are_one_clear_error(gcs):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x1' does not exist"):
        open_documents("jsonl:gs://no-such-bucket-x1/data/*.jsonl.gz")
    with pytest.raises(DataSourceError, match=f"matches no object.*storage ls {gcs}/nothing/`"):
        open_documents(f"text:{gcs}/nothing/*.txt")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x1' does not exist"):
        open_documents("tokens:gs://no-such-bucket-x1/tok")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x1' does not exist"):
        load_tokenizer("gs://no-such-bucket-x1/tok/spm.model")


def test_cli_names_a_missing_bucket_in_one_error_line(gcs, tmp_path, capsys):
    tool = _load_tool("pretokenize")
    for args in ([f"--input=jsonl:gs://no-such-bucket-x1/d/*.jsonl", f"--vocab={VOCAB}",
                  f"--output={tmp_path / 'a'}"],
                 [f"--input=text:{ROOT}/data/austen/persuasion.txt", f"--vocab={VOCAB}",
                  "--output=gs://no-such-bucket-x1/tok"]):
        assert tool.main([*args, "--workers=1"]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines()
                 if line.startswith("error:")]
        assert len(lines) == 1 and "bucket 'no-such-bucket-x1' does not exist" in lines[0], lines


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl"])
def test_classification_files_on_gs(fmt, gcs, tmp_path):
    rows = [("a \"quoted\" text, with comma", "pos"), ("b\u00e9", "neg"), ("third", "pos")]
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    elif fmt == "csv":
        quoted = [t.replace('"', '""') for t, _ in rows]
        path.write_text("\ufefftext,label\n" + "".join(f'"{q}",{y}\r\n'
                                                      for q, (_, y) in zip(quoted, rows)),
                        encoding="utf-8")
    else:
        path.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    url = storage.join(gcs, f"train.{fmt}")
    storage.upload(str(path), url)
    a = read_files(fmt, [str(path)], ("text",), "label", False)
    b = read_files(fmt, [url], ("text",), "label", False)
    assert b.texts == a.texts and b.labels == a.labels and b.where == a.where
    assert b.texts[0] == (rows[0][0],)


# --------------------------------------------------------------------- tokenizers -----------

def test_sentencepiece_vocab_from_gs(gcs):
    sp_model = VOCAB  # the bundled model
    url = storage.join(gcs, "tok", "austen_8k.model")
    storage.upload(sp_model, url)
    local, remote = load_tokenizer(sp_model), load_tokenizer(url)
    assert remote.path == url  # recorded as given (run.json)
    texts = austen_paragraphs(20)
    assert remote.encode_batch(texts) == local.encode_batch(texts)
    assert (remote.vocab_size, remote.bos_id, remote.eos_id, remote.mask_id) == \
        (local.vocab_size, local.bos_id, local.eos_id, local.mask_id)
    assert tokenizer_fingerprint(remote) == tokenizer_fingerprint(local) is not None


def test_wordpiece_vocab_and_config_from_gs(gcs, tmp_path):
    from research.data.wordpiece import WordPieceTokenizer
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "The", "the", "quick", "fox",
              "##es", "!", "Q", "##uick"]
    local = tmp_path / "bert"
    local.mkdir()
    (local / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
    (local / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    storage.upload(str(local), storage.join(gcs, "bert"))
    a = load_tokenizer(str(local / "vocab.txt"))
    b = load_tokenizer(storage.join(gcs, "bert", "vocab.txt"))
    assert isinstance(b, WordPieceTokenizer) and b.lowercase is False  # config read beside it
    texts = ["The quick foxes!", "the Quick fox", "unknown words"]
    assert b.encode_batch(texts) == a.encode_batch(texts)
    assert b.encode("The") != b.encode("the")  # cased, as the remote config says
    assert tokenizer_fingerprint(b) == tokenizer_fingerprint(a)


def test_missing_vocab_on_gs_says_so(gcs):
    from research.data.tokenizer_base import VocabNotFoundError
    with pytest.raises(VocabNotFoundError, match="does not exist"):
        load_tokenizer(storage.join(gcs, "none.model"))


# ------------------------------------------------------------- pre-tokenised corpora --------

@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    paragraphs = austen_paragraphs(300)
    (d / "one.txt").write_text("\n\n".join(paragraphs[:140]))
    (d / "two.txt").write_text("\n\n".join(paragraphs[140:]))
    return f"text:{d}/*.txt", str(d / "cache")


def test_pretokenize_to_gs_gives_the_local_files_and_batches(text_corpus, gcs, tmp_path, capsys):
    from research.data.causal_lm import make_causal_lm_iterator
    spec, cache = text_corpus
    tool = _load_tool("pretokenize")
    local_out, remote_out = str(tmp_path / "tok"), storage.join(gcs, "tok")
    common = [f"--input={spec}", f"--vocab={VOCAB}", "--workers=1", "--shard_tokens=5000",
              f"--data_dir={cache}"]
    assert tool.main([*common, f"--output={local_out}"]) == 0
    assert tool.main([*common, f"--output={remote_out}"]) == 0
    assert "tokens:" + remote_out in capsys.readouterr().out
    names = sorted(os.listdir(local_out))
    assert len([n for n in names if n.endswith(".bin")]) > 2
    assert storage.listdir(remote_out) == names
    for name in names:  # byte-identical files
        assert storage.read_bytes(storage.join(remote_out, name)) == \
            pathlib.Path(local_out, name).read_bytes(), name

    a, b = open_token_source(local_out), open_token_source(remote_out)
    assert isinstance(b._shards[0], RemoteShard) and len(b) == len(a)
    for d in (0, 1, len(a) // 2, len(a) - 1):
        np.testing.assert_array_equal(b[d], a[d])
    flat = np.random.default_rng(0).integers(0, a.num_tokens, (7, 33))
    np.testing.assert_array_equal(b.take(flat), a.take(flat))
    tok = load_tokenizer(VOCAB)
    for p in range(2):  # each host's batches, from its own rows only
        kw = dict(seq_len=64, global_batch_size=4, seed=3, process_index=p, process_count=2,
                  prefetch=0)
        it_a, it_b = make_causal_lm_iterator(a, tok, **kw), make_causal_lm_iterator(b, tok, **kw)
        for _ in range(4):
            x, y = next(it_a), next(it_b)
            assert sorted(x) == sorted(y)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
        assert it_a.get_state() == it_b.get_state()
    # a second run into the same prefix is refused with one error line
    assert tool.main([*common, f"--output={remote_out}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not empty" in errors[0]


def test_remote_shard_ranged_reads_are_exact(gcs):
    data = np.random.default_rng(1).integers(0, 60000, 20000).astype("<u2")
    url = storage.join(gcs, "shard.bin")
    storage.write_bytes(url, data.tobytes())
    shard = RemoteShard(url, np.dtype("<u2"), len(data))
    idx = np.concatenate([np.arange(5, 50), [19999, 0, 7000, 7001, 7000],
                          np.arange(9000, 15000, 3)])
    np.testing.assert_array_equal(shard[idx], data[idx])
    np.testing.assert_array_equal(shard[idx.reshape(-1, 1)], data[idx.reshape(-1, 1)])
    np.testing.assert_array_equal(shard[100:4100], data[100:4100])
    assert shard[5:5].size == 0
    with pytest.raises(IndexError):
        shard[np.array([20000])]


# ----------------------------------------------------------------------- converter ----------

def _tiny_gpt2_hf_dir(directory: pathlib.Path) -> dict:
    """Writes a random tiny GPT-2 HF checkpoint (config.json + model.safetensors, made by our own
    exporter: no torch needed) into `directory`; returns its state dict."""
    import flax.linen as nn
    import jax
    from research.checkpoints.hf import convert as hf_convert
    from research.checkpoints.hf.rules import flatten
    from research.checkpoints.hf.safetensors_io import write_hf_dir
    from research.models.transformer import CausalLM, TransformerConfig
    cfg = TransformerConfig(vocab_size=96, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                            max_len=24, dropout_rate=0.0)
    shapes = nn.unbox(jax.eval_shape(lambda: CausalLM(cfg).init(
        jax.random.PRNGKey(0), np.zeros((1, 8), np.int32)))["params"])
    rng = np.random.default_rng(5)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)
    config, state = hf_convert.to_hf(cfg, flatten(params))
    write_hf_dir(str(directory), config, state)
    return state


def test_hf_converter_round_trip_on_gs(gcs, tmp_path):
    from safetensors.numpy import load
    tool = _load_tool("convert_checkpoint")
    state = _tiny_gpt2_hf_dir(tmp_path / "hf")
    src, ours, back = (storage.join(gcs, n) for n in ("hf", "ours", "back"))
    storage.upload(str(tmp_path / "hf"), src)
    assert tool.main([f"--from_hf={src}", f"--to={ours}"]) == 0
    info = json.loads(storage.read_text(storage.join(ours, "run.json")))
    assert info["source"]["hf_dir"] == src and info["objective"] == "causal_lm"
    assert storage.exists(storage.join(ours, "model.gin"))
    assert storage.isdir(storage.join(ours, "checkpoints", "0", "params"))
    assert tool.main([f"--from={ours}", f"--to_hf={back}"]) == 0
    after = load(storage.read_bytes(storage.join(back, "model.safetensors")))
    assert sorted(after) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    assert json.loads(storage.read_text(storage.join(back, "config.json"))) == \
        json.loads((tmp_path / "hf" / "config.json").read_text())
