"""Pre-tokenised corpora: the `tokens:DIR` data spec and the tokenizer fingerprint.

`tools/pretokenize.py` (research.data.token_writer) tokenises a corpus once into DIR:

    DIR/tokens.json          metadata: format, version, dtype, document and token counts, the
                             tokenizer (fingerprint, vocab path, vocab size), the shards
    DIR/offsets.npy          int64[num_documents + 1]: document d is tokens [offsets[d],
                             offsets[d + 1]) of the corpus-wide token stream
    DIR/tokens-00000.bin     raw little-endian token ids (dtype from tokens.json: uint16 when
    DIR/tokens-00001.bin     the vocabulary fits, else int32), consecutive pieces of that
    ...                      stream; each shard holds whole documents

Why flat memory-mapped shards rather than ArrayRecord: a document is a slice of a mapped
file found by two integer loads, so `source[d]` costs a few microseconds with no record parsing
or decompression, and the causal-LM packer gathers a whole batch's tokens with one vectorised
index into the mapping (research.data.token_packing). A host touches only the pages of the
documents its rows read; the index (8 bytes per document) is read whole.

DIR may be an object-store URL (`tokens:gs://bkt/corpus`, through `research.storage`): the
shards are then not mapped but read with ranged reads of exactly the tokens a lookup needs
(positions of one lookup closer than `RemoteShard.MERGE_GAP` tokens share one read, and the
reads of one lookup run concurrently), so each host still fetches only its own rows' tokens;
the index and tokens.json are read whole.

`open_token_source(DIR)` returns a `TokenSource`: `len(src)`, `src[d]` -> int32[len_d] token
ids (no BOS/EOS), `.name`, `.tokenizer_fingerprint`. The causal-LM iterator uses such items
as they are (no tokenisation) and refuses a VOCAB whose fingerprint differs.

The fingerprint (`tokenizer_fingerprint`) is the sha256 of the tokenizer's kind, its model or
vocab file's bytes and (WordPiece) its lowercasing: two tokenizers with the same fingerprint
give the same ids for every text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from research import storage
from research.errors import ConfigError

METADATA_FILE = "tokens.json"
INDEX_FILE = "offsets.npy"
FORMAT = "research-tokens"
VERSION = 1
DTYPES = ("uint16", "int32")


class TokenFilesError(ConfigError):
    """A `tokens:DIR` that is not a complete pre-tokenised corpus, or a VOCAB it was not made
    with."""


def shard_file(index: int) -> str:
    """File name of token shard `index` inside DIR."""
    return f"tokens-{index:05d}.bin"


def token_dtype(vocab_size: int) -> str:
    """The smallest stored dtype that holds ids < vocab_size."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """'sha256:HEX' of the tokenizer's kind, model/vocab file bytes and lowercasing; None when
    the tokenizer names no file (`.path`), e.g. a test tokenizer."""
    path = getattr(tokenizer, "path", None)
    if not path or not storage.isfile(path):
        return None
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(storage.read_bytes(path))  # a local file and its copy at a URL: the same hash
    if hasattr(tokenizer, "lowercase"):
        h.update(f"lowercase={bool(tokenizer.lowercase)}".encode())
    return "sha256:" + h.hexdigest()


class TokenSource(Sequence):
    """Random access to the documents of a pre-tokenised corpus (see the module docstring).

    Attributes:
      name: 'tokens:DIR'.
      tokenizer_fingerprint: the fingerprint of the tokenizer that wrote DIR.
      tokenizer_vocab: the VOCAB path recorded when DIR was written (for messages).
      offsets: int64[N + 1] token offsets of the documents in the corpus-wide stream.
      lengths: int64[N] tokens per document.
      num_tokens: total tokens.
    """

    def __init__(self, path: str):
        self.path = path
        meta = _read_metadata(path)
        self.metadata = meta
        self.name = f"tokens:{path}"
        self.tokenizer_fingerprint: str = meta["tokenizer"]["fingerprint"]
        self.tokenizer_vocab: str = meta["tokenizer"].get("vocab", "?")
        self.num_tokens = int(meta["num_tokens"])
        self.dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.offsets = _read_index(path, int(meta["num_documents"]), self.num_tokens)
        self.lengths = np.diff(self.offsets)
        shards = meta["shards"]
        self._shard_first_doc = np.array([s["first_document"] for s in shards], np.int64)
        self._shard_start = np.array([self.offsets[s["first_document"]] for s in shards],
                                     np.int64)
        self._shards = [self._map(s) for s in shards]

    def _map(self, shard: dict[str, Any]) -> np.ndarray | RemoteShard:
        """The shard's tokens as a read-only array backed by a memory map (a `RemoteShard`
        for a URL)."""
        file = storage.join(self.path, shard["file"])
        count = int(shard["num_tokens"])
        try:
            size = storage.getsize(file)
        except OSError as err:
            raise TokenFilesError(f"tokens:{self.path} is incomplete: cannot read {file} "
                                  f"({err.strerror or err}). Re-run tools/pretokenize.py into "
                                  "an empty --output.") from None
        if size != count * self.dtype.itemsize:
            raise TokenFilesError(f"tokens:{self.path}: {file} has {size} bytes, but tokens.json "
                                  f"says {count} {self.dtype.name} tokens. Re-run "
                                  "tools/pretokenize.py into an empty --output.")
        if count == 0:
            return np.zeros(0, self.dtype)
        if storage.is_remote(file):
            return RemoteShard(file, self.dtype, count)
        return np.asarray(np.memmap(file, dtype=self.dtype, mode="r", shape=(count,)))

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        """int32[len_i]: the token ids of document i (no BOS/EOS)."""
        if not hasattr(i, "__index__"):
            raise TypeError(f"TokenSource indices must be integers, got {type(i).__name__}")
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document index {i} out of range for {self.name} ({n} documents)")
        shard = int(np.searchsorted(self._shard_first_doc, i, side="right")) - 1
        start = int(self.offsets[i]) - int(self._shard_start[shard])
        return self._shards[shard][start:start + int(self.lengths[i])].astype(np.int32)

    def get_many(self, indices: Iterable[int]) -> list[np.ndarray]:
        """Documents at `indices`, in that order."""
        return [self[i] for i in indices]

    def take(self, flat: np.ndarray) -> np.ndarray:
        """int32 token ids at positions `flat` (int64, any shape) of the corpus-wide stream."""
        flat = np.asarray(flat, dtype=np.int64)
        if self.num_tokens == 0:
            if flat.size:
                raise IndexError(f"{self.name} holds no tokens")
            return np.zeros(flat.shape, np.int32)
        if len(self._shards) == 1:
            return self._shards[0][flat].astype(np.int32)
        shard = np.searchsorted(self._shard_start, flat, side="right") - 1
        out = np.empty(flat.shape, np.int32)
        for s in np.unique(shard):
            mine = shard == s
            out[mine] = self._shards[s][flat[mine] - self._shard_start[s]]
        return out

    def __repr__(self) -> str:
        return f"<TokenSource {self.name}: {len(self)} documents, {self.num_tokens} tokens>"


class RemoteShard:
    """A token shard on object storage, indexed like the memory-mapped array it stands for:
    `shard[a:b]` and `shard[int64 array]` return the same dtype values, fetching only the
    bytes they need with ranged reads (one read per run of positions less than `MERGE_GAP`
    tokens apart; a lookup's reads run concurrently)."""

    MERGE_GAP = 2048  # tokens: reading a few KiB more beats another request

    def __init__(self, url: str, dtype: np.dtype, count: int):
        self.url, self.dtype, self.count = url, np.dtype(dtype), int(count)
        self.shape = (self.count,)
        self._fs, self._path = storage.filesystem(url)

    def __len__(self) -> int:
        return self.count

    def read_ranges(self, starts: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
        """The tokens [starts[i], ends[i]) for each i (0 <= start < end <= count)."""
        size = self.dtype.itemsize
        with storage.errors(self.url, "read"):
            blobs = self._fs.cat_ranges([self._path] * len(starts),
                                        [int(a) * size for a in starts],
                                        [int(b) * size for b in ends], on_error="raise")
        out = []
        for blob, a, b in zip(blobs, starts, ends):
            if len(blob) != (int(b) - int(a)) * size:
                raise TokenFilesError(
                    f"{self.url}: read {len(blob)} bytes at token {int(a)}, expected "
                    f"{(int(b) - int(a)) * size}; the shard changed or is truncated. Re-run "
                    "tools/pretokenize.py into an empty --output.")
            out.append(np.frombuffer(blob, self.dtype))
        return out

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.count)
            if step != 1:
                raise IndexError(f"{self.url}: only contiguous slices are supported")
            if stop <= start:
                return np.zeros(0, self.dtype)
            return self.read_ranges(np.array([start]), np.array([stop]))[0]
        idx = np.asarray(key, dtype=np.int64)
        if idx.size == 0:
            return np.zeros(idx.shape, self.dtype)
        if idx.min() < 0 or idx.max() >= self.count:
            raise IndexError(f"token position out of range for {self.url} ({self.count} tokens)")
        positions = np.unique(idx)
        breaks = np.flatnonzero(np.diff(positions) > self.MERGE_GAP) + 1
        starts = positions[np.r_[0, breaks]]
        ends = positions[np.r_[breaks - 1, len(positions) - 1]] + 1
        data = np.concatenate(self.read_ranges(starts, ends))
        base = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
        run = np.searchsorted(starts, idx, side="right") - 1
        return data[base[run] + idx - starts[run]]


def open_token_source(path: str) -> TokenSource:
    """The pre-tokenised corpus in DIR `path` (written by tools/pretokenize.py; a local path or
    a URL such as gs://bkt/corpus).

    Raises:
      TokenFilesError: DIR missing, incomplete or not written by tools/pretokenize.py.
      StorageError: a URL whose bucket does not exist or cannot be read.
    """
    if storage.is_remote(path):
        return TokenSource(storage.resolve(path))
    return TokenSource(os.path.expanduser(path))


def check_tokenizer(source: Any, tokenizer: Any) -> None:
    """Raises TokenFilesError unless `tokenizer` is the one `source` (a TokenSource, or any
    source with a `tokenizer_fingerprint`) was tokenised with; a source made of others (a
    mixture's `.sources`) is checked part by part; no-op for text sources."""
    for part in getattr(source, "sources", ()):
        check_tokenizer(part, tokenizer)
    recorded = getattr(source, "tokenizer_fingerprint", None)
    if recorded is None:
        return
    mine = tokenizer_fingerprint(tokenizer)
    vocab = getattr(tokenizer, "path", None)
    if mine is None:
        raise TokenFilesError(
            f"{getattr(source, 'name', source)} holds token ids, but the tokenizer "
            f"({type(tokenizer).__name__}) names no VOCAB file to check them against; set "
            "VOCAB to the .model (or vocab.txt) the corpus was pre-tokenised with.")
    if mine != recorded:
        raise TokenFilesError(
            f"{getattr(source, 'name', source)} was tokenised with "
            f"{getattr(source, 'tokenizer_vocab', '?')!r} (fingerprint {recorded[:19]}...), "
            f"but VOCAB={vocab!r} has fingerprint {mine[:19]}...: the ids would mean other "
            "pieces. Set VOCAB to the tokenizer the corpus was written with, or re-run "
            "tools/pretokenize.py with this VOCAB.")


def _read_metadata(path: str) -> dict[str, Any]:
    file = storage.join(path, METADATA_FILE)
    if not storage.isdir(path):
        storage.check_bucket(path)
        raise TokenFilesError(f"tokens:{path} is not a directory. Write one with `python "
                              "tools/pretokenize.py --input=SPEC --vocab=PATH --output=DIR`.")
    try:
        meta = json.loads(storage.read_text(file))
    except FileNotFoundError:
        raise TokenFilesError(f"tokens:{path} has no {METADATA_FILE}: it is not a (complete) "
                              "pre-tokenised corpus. Re-run tools/pretokenize.py into an empty "
                              "--output.") from None
    except (OSError, ValueError) as err:
        raise TokenFilesError(f"tokens:{path}: cannot read {file} ({err}). Re-run "
                              "tools/pretokenize.py into an empty --output.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TokenFilesError(f"tokens:{path}: {file} is not a {FORMAT} metadata file.")
    if meta.get("version") != VERSION or meta.get("dtype") not in DTYPES:
        raise TokenFilesError(f"tokens:{path}: unsupported version {meta.get('version')!r} or "
                              f"dtype {meta.get('dtype')!r} (this code reads version {VERSION}, "
                              f"dtypes {DTYPES}). Re-run tools/pretokenize.py.")
    return meta


def _read_index(path: str, num_documents: int, num_tokens: int) -> np.ndarray:
    file = storage.join(path, INDEX_FILE)
    try:
        offsets = np.load(io.BytesIO(storage.read_bytes(file)) if storage.is_remote(file)
                          else file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise TokenFilesError(f"tokens:{path}: cannot read {file} ({err}). Re-run "
                              "tools/pretokenize.py into an empty --output.") from None
    if (offsets.dtype != np.int64 or offsets.shape != (num_documents + 1,) or offsets[0] != 0
            or offsets[-1] != num_tokens or np.any(np.diff(offsets) < 0)):
        raise TokenFilesError(f"tokens:{path}: {file} does not match tokens.json "
                              f"({num_documents} documents, {num_tokens} tokens). Re-run "
                              "tools/pretokenize.py into an empty --output.")
    return offsets


def write_metadata(path: str, meta: dict[str, Any]) -> None:
    """Writes DIR/tokens.json atomically (last, so a DIR with it is complete); DIR may be a
    URL."""
    storage.write_text(storage.join(path, METADATA_FILE),
                       json.dumps(meta, indent=1, sort_keys=True) + "\n")

