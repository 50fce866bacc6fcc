"""Writes a pre-tokenised corpus (the `tokens:DIR` layout of research.data.tokens) from any
document spec, tokenising in worker processes: the engine of tools/pretokenize.py.

The documents are cut into chunks of consecutive indices; each worker process opens the spec
(`open_documents`) and the tokenizer (`load_tokenizer`) once and returns each chunk's token
ids; the parent writes them in document order, starting a new shard file once a shard holds
`shard_tokens` tokens (at the next document boundary). Shard boundaries therefore depend only
on the documents, never on the worker count or chunk size: the output is byte-identical for
any `workers`.

The output may be an object-store URL (`--output=gs://bkt/corpus`, through `research.storage`):
each shard is written to a local temporary directory, uploaded once closed and deleted, so
local disk holds at most one shard; offsets.npy follows and tokens.json is written last.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from research import storage
from research.data import tokens as tokens_lib
from research.data.sources import open_documents
from research.data.tokenizer import load_tokenizer
from research.errors import ConfigError

CHUNK_DOCUMENTS = 512
SHARD_TOKENS = 1 << 28  # 512 MiB per shard at uint16

_WORKER: dict[str, Any] = {}  # each worker process's source and tokenizer


def _init_worker(spec: str, source_kwargs: dict[str, Any], vocab: str) -> None:
    _WORKER["source"] = open_documents(spec, **source_kwargs)
    _WORKER["tokenizer"] = load_tokenizer(vocab)


def _encode_chunk(bounds: tuple[int, int], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(int64[n] token counts, dtype[sum] ids) of documents [lo, hi) of the worker's source."""
    lo, hi = bounds
    source, tokenizer = _WORKER["source"], _WORKER["tokenizer"]
    ids = tokenizer.encode_batch([source[i] for i in range(lo, hi)])
    lengths = np.fromiter((len(x) for x in ids), np.int64, count=hi - lo)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.dtype(dtype),
                       count=int(lengths.sum()))
    return lengths, flat


@contextlib.contextmanager
def _chunk_results(spec: str, source_kwargs: dict[str, Any], vocab: str,
                   chunks: list[tuple[int, int]], workers: int,
                   dtype: str) -> Iterator[Iterator[tuple[np.ndarray, np.ndarray]]]:
    """The encoded chunks, in order: in this process for workers=1, else from a pool of
    `workers` spawned processes (spawn: the parent may hold TensorFlow/TFDS threads)."""
    encode = functools.partial(_encode_chunk, dtype=dtype)
    if workers == 1:
        _init_worker(spec, source_kwargs, vocab)
        yield map(encode, chunks)
        return
    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(spec, source_kwargs, vocab))
    try:
        yield pool.imap(encode, chunks)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class _ShardWriter:
    """Appends documents' tokens to DIR/tokens-NNNNN.bin, a new shard once one holds
    `shard_tokens` tokens; records each shard's first document and counts. `on_closed(name)`
    is called with each shard's file name once it is complete (e.g. to upload it)."""

    def __init__(self, path: str, dtype: str, shard_tokens: int,
                 on_closed: Callable[[str], None] | None = None):
        self.path, self.shard_tokens = path, shard_tokens
        self.on_closed = on_closed
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shards: list[dict[str, Any]] = []
        self.lengths: list[np.ndarray] = []
        self.num_documents = 0
        self._file = None
        self._new_shard()

    def _close_shard(self) -> None:
        self._file.close()
        if self.on_closed is not None:
            self.on_closed(self.shards[-1]["file"])

    def _new_shard(self) -> None:
        if self._file is not None:
            self._close_shard()
        name = tokens_lib.shard_file(len(self.shards))
        self.shards.append({"file": name, "first_document": self.num_documents,
                            "num_documents": 0, "num_tokens": 0})
        self._file = open(os.path.join(self.path, name), "wb")

    def add(self, lengths: np.ndarray, flat: np.ndarray) -> None:
        """Writes consecutive documents: their token counts and concatenated ids."""
        self.lengths.append(lengths)
        while lengths.size:
            shard = self.shards[-1]
            if shard["num_tokens"] >= self.shard_tokens and shard["num_documents"]:
                self._new_shard()
                shard = self.shards[-1]
            ends = np.cumsum(lengths)
            room = self.shard_tokens - shard["num_tokens"]
            take = min(int(np.searchsorted(ends, room, side="left")) + 1, len(lengths))
            count = int(ends[take - 1])
            self._file.write(flat[:count].astype(self.dtype, copy=False).tobytes())
            shard["num_documents"] += take
            shard["num_tokens"] += count
            self.num_documents += take
            lengths, flat = lengths[take:], flat[count:]

    def close(self) -> np.ndarray:
        """Closes the last shard; returns the int64[N + 1] document offsets."""
        self._close_shard()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return offsets


def check_output(output: str) -> None:
    """ConfigError unless --output (a local directory or a URL prefix) is new or empty."""
    if storage.is_remote(output):
        if storage.isfile(output):
            raise ConfigError(f"--output={output} is an object; pick a prefix (a directory).")
        if storage.listdir(output):
            raise ConfigError(f"--output={output} is not empty; tools/pretokenize.py never "
                              "overwrites. Pick a new prefix, or delete this one first.")
        return
    if os.path.isdir(output) and os.listdir(output):
        raise ConfigError(f"--output={output} is not empty; tools/pretokenize.py never "
                          "overwrites. Pick a new directory, or empty this one first.")
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output={output} is a file; pick a directory (a new one is "
                          "created).")


def write_token_files(spec: str, vocab: str, output: str, *, workers: int = 1,
                      source_kwargs: dict[str, Any] | None = None,
                      chunk_documents: int = CHUNK_DOCUMENTS,
                      shard_tokens: int = SHARD_TOKENS, progress: bool = False) -> dict[str, Any]:
    """Tokenises the documents of `spec` with `vocab` into the new or empty directory `output`.

    Args:
      spec: any `open_documents` spec (not `tokens:`).
      vocab: SentencePiece .model or WordPiece vocab.txt (local or a URL).
      output: a local directory or a URL prefix (gs://bkt/corpus; see the module docstring).
      workers: tokenising processes (1: this process).
      source_kwargs: extra `open_documents` arguments (text_field, split, ...).
      chunk_documents: documents per work item.
      shard_tokens: a shard is closed at the first document boundary at or past this many
        tokens.
      progress: show a progress bar (on a terminal).

    Returns:
      The metadata written to output/tokens.json, plus 'seconds' (not written).

    Raises:
      ConfigError: a `tokens:` input, a non-empty output, a bad VOCAB or input spec.
    """
    if spec.startswith("tokens:"):
        raise ConfigError(f"--input={spec} is already tokenised; give the text spec it was "
                          "made from.")
    if workers < 1 or chunk_documents < 1 or shard_tokens < 1:
        raise ConfigError(f"workers, chunk_documents and shard_tokens must be >= 1 (got "
                          f"{workers}, {chunk_documents}, {shard_tokens}).")
    check_output(output)
    source_kwargs = dict(source_kwargs or {})
    start = time.perf_counter()
    tokenizer = load_tokenizer(vocab)
    source = open_documents(spec, **source_kwargs)  # builds any cache once, before the workers
    n = len(source)
    dtype = tokens_lib.token_dtype(tokenizer.vocab_size)
    chunks = [(lo, min(lo + chunk_documents, n)) for lo in range(0, n, chunk_documents)]
    with _staging(output) as (local, on_closed):
        writer = _ShardWriter(local, dtype, shard_tokens, on_closed)
        with _chunk_results(spec, source_kwargs, vocab, chunks, workers, dtype) as results:
            for lengths, flat in tqdm(results, total=len(chunks), unit="chunk",
                                      disable=not progress, desc="pretokenize"):
                writer.add(lengths, flat)
        offsets = writer.close()
        np.save(os.path.join(local, tokens_lib.INDEX_FILE), offsets)
        if on_closed is not None:
            on_closed(tokens_lib.INDEX_FILE)
    meta = {"format": tokens_lib.FORMAT, "version": tokens_lib.VERSION, "dtype": dtype,
            "num_documents": n, "num_tokens": int(offsets[-1]), "source": spec,
            "tokenizer": {"fingerprint": tokens_lib.tokenizer_fingerprint(tokenizer),
                          "vocab": storage.resolve(vocab), "kind": type(tokenizer).__name__,
                          "vocab_size": int(tokenizer.vocab_size)},
            "shards": writer.shards}
    tokens_lib.write_metadata(output, meta)
    return {**meta, "seconds": time.perf_counter() - start}


@contextlib.contextmanager
def _staging(output: str) -> Iterator[tuple[str, Callable[[str], None] | None]]:
    """(local directory the files are written to, callback that publishes one of them): the
    output itself and no callback for a local output; for a URL a temporary directory and a
    callback that uploads the named file to the output and deletes it locally."""
    if not storage.is_remote(output):
        os.makedirs(output, exist_ok=True)
        yield output, None
        return
    with tempfile.TemporaryDirectory(prefix="pretokenize-") as local:
        def publish(name: str) -> None:
            storage.upload(os.path.join(local, name), storage.join(output, name))
            os.remove(os.path.join(local, name))
        yield local, publish
