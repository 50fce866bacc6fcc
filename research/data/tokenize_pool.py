"""Reading and tokenising documents in worker processes, for the causal-LM text iterator.

`RowTokenFeed` hands the packer (research.data.causal_lm) the token ids of each row stream's
documents: `tokens(i, k)` is int32[n] `tokenizer.encode(source[doc])` of owned row i's k-th
document. With workers=0 it reads and encodes in the calling thread, as the packer always
did. With workers=N it keeps N worker processes reading and encoding each row's next
documents ahead, in chunks of consecutive k. The parent still packs every row in order, so
the batches are the same for any worker count (only where the tokens are computed changes),
and the iterator state and resume are untouched.

The workers are a research.data.worker_processes.WorkerPool: fresh interpreters, never forks
of this process (which holds JAX / TensorFlow threads), and no `if __name__ == "__main__"`
guard needed in the calling script.

Worker processes get the document source and the tokenizer once, at start: the source pickled
(a local-file source is re-opened from its cache by `_rebuild_local_documents`, since TFDS
cannot pickle that builder itself), the tokenizer as its model path (`load_tokenizer`) or,
for other tokenizer objects, pickled. A source that does not pickle is read in the parent and
only its text goes to the workers. A tokenizer that does not pickle keeps the feed in-process
(logged once).

While the workers start (a few seconds: each imports numpy, the tokenizer library and the
source's reader) the parent keeps encoding in-process; once one chunk has come back, the
parent waits for the workers' results. An exception in a worker surfaces in the parent as a
`TokenizeWorkerError` naming the documents and the worker's error; a worker that dies
(killed, out of memory) as one saying so. Workers end on `close()`, when the feed is garbage
collected, at interpreter exit, and by themselves if the parent process dies.

`tokenize_workers` (gin: `tokenize_workers.workers = 2`) sets the worker count of iterators
that are not given one: an int (0: in-process) or 'auto', which starts
min(8, usable CPUs) workers (none on a 1-CPU machine) once the iterator has spent
`AUTO_START_S` seconds tokenising in-process, so short runs and tests never pay for worker
start-up.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import gin
import numpy as np

from research.data.worker_processes import BrokenWorkerError, RemoteError, WorkerPool
from research.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
AUTO_START_S = 1.0          # in-process tokenising time after which 'auto' starts workers
AUTO_MAX_WORKERS = 8
CHUNK_TOKENS = 4096         # tokens a worker task aims at (documents per task adapt to it)
CHUNKS_AHEAD = 3            # chunks each row keeps submitted (the current one included)
MAX_CHUNK_DOCUMENTS = 512
MAX_SOURCE_BLOB = 256 << 20  # a source pickling larger is read in the parent instead


class TokenizeWorkerError(RuntimeError):
    """A tokenize worker process failed (its exception is the cause) or died."""


@gin.configurable
def tokenize_workers(workers: int | str = AUTO) -> int | str:
    """The tokenize worker setting of iterators not given one: an int >= 0 or 'auto'.

    gin: `tokenize_workers.workers = 2` (0: tokenise in-process, as before workers existed).
    """
    check_workers(workers)
    return workers


def check_workers(workers: Any) -> None:
    """ConfigError unless `workers` is an int >= 0 or 'auto'."""
    if workers == AUTO:
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"tokenize workers must be an int >= 0 or 'auto', got {workers!r} "
                          "(gin: tokenize_workers.workers = 2; 0 tokenises in-process).")


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_workers(workers: int | str | None) -> tuple[int, float]:
    """(worker count, in-process seconds before starting them) for a setting; None reads gin.

    'auto' -> (min(8, usable CPUs), AUTO_START_S), or (0, 0) on one CPU; an int n -> (n, 0).
    """
    if workers is None:
        workers = tokenize_workers()
    check_workers(workers)
    if workers == AUTO:
        cpus = usable_cpus()
        return (min(AUTO_MAX_WORKERS, cpus), AUTO_START_S) if cpus > 1 else (0, 0.0)
    return int(workers), 0.0


# --------------------------------------------------------------------------- worker side

_WORKER: dict[str, Any] = {}


def _rebuild_local_documents(corpus, fingerprint: str, data_dir: str):
    """The cached TFDS builder of a local-file corpus (research.data.local_builder), opened
    again in a worker: TFDS pickles a builder as its base-class arguments, which
    `LocalDocuments.__init__` does not take."""
    from research.data import local_builder
    with local_builder.quiet_tfds():
        return local_builder.LocalDocuments(corpus=corpus, fingerprint=fingerprint,
                                            data_dir=data_dir)


class _SourcePickler(pickle.Pickler):
    def reducer_override(self, obj):
        from research.data.local_builder import LocalDocuments
        if isinstance(obj, LocalDocuments):
            fingerprint = obj.builder_config.name.split("-", 1)[1]
            return _rebuild_local_documents, (obj.corpus, fingerprint, str(obj.data_dir_root))
        return NotImplemented


def _dump_source(source: Sequence) -> bytes | None:
    """`source` pickled for the workers, or None (read it in the parent) if it does not pickle
    and unpickle to as many documents, or is larger than MAX_SOURCE_BLOB."""
    buffer = io.BytesIO()
    try:
        _SourcePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(source)
        blob = buffer.getvalue()
        if len(blob) > MAX_SOURCE_BLOB or len(pickle.loads(blob)) != len(source):
            return None
    except Exception as e:  # noqa: BLE001 - any failure: the parent reads the documents
        log.info("Document source %s does not pickle (%s: %s); tokenize workers get its text "
                 "from this process.", getattr(source, "name", type(source).__name__),
                 type(e).__name__, e)
        return None
    return blob


def _describe_tokenizer(tokenizer) -> tuple[str, Any] | None:
    """How a worker gets the tokenizer: ('load', path) for the project's tokenizers (loaded
    with `load_tokenizer`), ('pickle', bytes) for other picklable ones, else None."""
    from research.data.tokenizer import Tokenizer
    from research.data.wordpiece import WordPieceTokenizer
    if type(tokenizer) in (Tokenizer, WordPieceTokenizer):
        return "load", tokenizer.path
    try:
        return "pickle", pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001
        log.warning("Tokenizer %s does not pickle (%s); tokenising in this process.",
                    type(tokenizer).__name__, e)
        return None


def _worker_init(blobs: tuple[bytes | None, tuple[str, Any]]) -> None:
    """Keeps (source pickle or None, tokenizer description); decoded on first use, so that a
    failure is a task error the parent sees."""
    _WORKER.clear()
    _WORKER["blobs"] = blobs


def _worker_state() -> tuple[Sequence | None, Any]:
    """The worker's (source or None, tokenizer), loaded from the init blobs on first use."""
    if "tokenizer" not in _WORKER:
        source_blob, (kind, value) = _WORKER["blobs"]
        _WORKER["source"] = pickle.loads(source_blob) if source_blob is not None else None
        if kind == "load":
            from research.data.tokenizer import load_tokenizer
            _WORKER["tokenizer"] = load_tokenizer(value)
        else:
            _WORKER["tokenizer"] = pickle.loads(value)
    return _WORKER["source"], _WORKER["tokenizer"]


def _ping(_: Any = None) -> int:
    """Loads the worker's source and tokenizer; returns its pid."""
    _worker_state()
    return os.getpid()


def encode_items(items: Sequence, tokenizer) -> list[np.ndarray]:
    """int32 token ids of each item: a text is encoded, a token-id array used as is."""
    return [item.astype(np.int32, copy=False) if isinstance(item, np.ndarray)
            else np.asarray(tokenizer.encode(item), dtype=np.int32) for item in items]


def _encode_task(work: list[int] | list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(int64[n] token counts, int32[sum] ids) of n documents: indices into the worker's
    source, or (source not pickled) their text."""
    source, tokenizer = _worker_state()
    items = source.get_many(work) if hasattr(source, "get_many") else (
        [source[i] for i in work] if source is not None else work)
    ids = encode_items(items, tokenizer)
    lengths = np.array([len(x) for x in ids], np.int64)
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    return lengths, flat


# --------------------------------------------------------------------------- parent side

class _Chunk:
    """Documents k0 .. k0 + len(docs) - 1 of one row, being (or already) tokenised."""

    __slots__ = ("k0", "docs", "future", "tokens")

    def __init__(self, k0: int, docs: list[int], future: cf.Future):
        self.k0, self.docs, self.future = k0, docs, future
        self.tokens: list[np.ndarray] | None = None

    @property
    def end(self) -> int:
        return self.k0 + len(self.docs)


class RowTokenFeed:
    """Token ids of each row stream's documents, read and tokenised ahead in worker processes
    (see the module docstring). Used by one thread at a time."""

    def __init__(self, source: Sequence, tokenizer, num_rows: int,
                 document_index: Callable[[int, int], int | None], *,
                 workers: int | str | None = None, seq_len: int = 1024):
        """
        Args:
          source: the documents (texts, or token-id arrays used as they are).
          tokenizer: has `encode(str) -> list[int]`.
          num_rows: row streams (the iterator's owned rows), indexed 0 .. num_rows - 1.
          document_index: (row i, k) -> index into `source` of row i's k-th document, or
            None past the end (eval). Must not depend on anything but (i, k).
          workers: an int >= 0, 'auto', or None (the gin `tokenize_workers` setting).
          seq_len: tokens per row per batch (sets how far ahead rows are tokenised).
        """
        self.source = source
        self.tokenizer = tokenizer
        self.num_rows = int(num_rows)
        self.document_index = document_index
        self.workers, self._start_after_s = resolve_workers(workers)
        self._chunk_tokens = max(CHUNK_TOKENS, int(seq_len))
        self._inprocess_s = 0.0
        self._mean_tokens = 256.0   # running mean tokens per document (sizes chunks)
        self._seen = 0
        self._chunks: list[collections.deque[_Chunk]] = [collections.deque()
                                                         for _ in range(self.num_rows)]
        self._executor: WorkerPool | None = None
        self._blobs: tuple[bytes | None, tuple[str, Any]] | None = None
        self._disabled = self.workers == 0
        self._warm = False
        self.documents_from_workers = 0   # documents whose tokens came from a worker
        self.documents_in_process = 0     # ... that were read and encoded here

    # ------------------------------------------------------------------ public API

    @property
    def running(self) -> bool:
        """Whether worker processes are up."""
        return self._executor is not None

    def start(self, wait: bool = False, timeout: float | None = 120.0) -> bool:
        """Starts the workers now (an 'auto' feed would wait for AUTO_START_S); with `wait`,
        blocks until one has loaded the source and tokenizer, after which every document
        comes from the workers. Returns whether workers run (False: workers=0, or a tokenizer
        that does not pickle).

        Raises:
          TokenizeWorkerError: (wait) a worker failed to load them, or did not in `timeout` s.
        """
        if self._disabled:
            return False
        self._start_after_s = 0.0
        if not self._maybe_start():
            return False
        if wait and not self._warm:
            future = self._executor.submit(_ping, None)
            try:
                future.result(timeout=timeout)
            except Exception as e:  # noqa: BLE001 - the worker's error, or a timeout
                self.close()
                why = (f"{e.kind}: {e.message}" if isinstance(e, RemoteError)
                       else f"{type(e).__name__}: {e}")
                raise TokenizeWorkerError(f"Tokenize workers could not start: {why}") from e
            self._warm = True
        return True

    def prepare(self, ks: np.ndarray) -> None:
        """Submits (if workers run) the chunks each row needs from its document ks[i] on:
        first every row's current chunk, then the ones ahead, row by row."""
        if not self._maybe_start():
            return
        for depth in range(CHUNKS_AHEAD):
            for i in range(self.num_rows):
                self._top_up(i, int(ks[i]), depth + 1)

    def tokens(self, i: int, k: int) -> np.ndarray | None:
        """int32[n] token ids of row i's k-th document, or None past the end (eval)."""
        if self._maybe_start():
            chunks = self._chunks[i]
            while chunks and chunks[0].end <= k:
                chunks.popleft()
            if chunks and chunks[0].k0 > k:   # rewound without reset: start over
                self._cancel(chunks)
            self._top_up(i, k, CHUNKS_AHEAD)
            if chunks and chunks[0].k0 <= k:
                chunk = chunks[0]
                if self._warm or chunk.future.done():
                    toks = self._collect(chunk)[k - chunk.k0]
                    self.documents_from_workers += 1
                    return toks
        return self._encode_here(i, k)

    def reset(self) -> None:
        """Forgets every chunk (the cursor moved): later `tokens` calls ask afresh."""
        for chunks in self._chunks:
            self._cancel(chunks)

    def close(self, wait: bool = True) -> None:
        """Stops the workers (the feed stays usable: they start again when next needed)."""
        self.reset()
        executor, self._executor = self._executor, None
        self._warm = False
        if executor is not None:
            executor.shutdown(wait=wait)

    def __del__(self):
        try:
            self.close(wait=False)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ internals

    def _encode_here(self, i: int, k: int) -> np.ndarray | None:
        doc = self.document_index(i, k)
        if doc is None:
            return None
        t0 = time.perf_counter()
        toks = encode_items([self.source[doc]], self.tokenizer)[0]
        self._inprocess_s += time.perf_counter() - t0
        self.documents_in_process += 1
        self._observe(len(toks), 1)
        return toks

    def _observe(self, tokens: int, documents: int) -> None:
        self._seen += documents
        weight = documents / max(self._seen, 1)
        self._mean_tokens += weight * (tokens / max(documents, 1) - self._mean_tokens)

    def _maybe_start(self) -> bool:
        """Whether workers run (starting them if it is time)."""
        if self._executor is not None:
            return True
        if self._disabled or self._inprocess_s < self._start_after_s:
            return False
        if self._blobs is None:
            desc = _describe_tokenizer(self.tokenizer)
            if desc is None:
                self._disabled = True
                return False
            self._blobs = (_dump_source(self.source), desc)
        self._executor = WorkerPool(self.workers, init=(_worker_init, self._blobs))
        log.info("Tokenising %s in %d worker processes.",
                 getattr(self.source, "name", "the documents"), self.workers)
        return True

    def _top_up(self, i: int, k: int, depth: int) -> None:
        """Submits chunks of row i until `depth` of them cover k and beyond (fewer at the end
        of an eval pass)."""
        chunks = self._chunks[i]
        while len(chunks) < depth:
            start = chunks[-1].end if chunks else k
            size = int(np.clip(round(self._chunk_tokens / max(self._mean_tokens, 1.0)), 1,
                               MAX_CHUNK_DOCUMENTS))
            docs = []
            for kk in range(start, start + size):
                doc = self.document_index(i, kk)
                if doc is None:
                    break
                docs.append(doc)
            if not docs:
                return
            work = docs if self._blobs[0] is not None else self.source_texts(docs)
            chunks.append(_Chunk(start, docs, self._executor.submit(_encode_task, work)))

    def source_texts(self, docs: list[int]) -> list:
        """The items at `docs`, read in this process (for a source the workers cannot open)."""
        get_many = getattr(self.source, "get_many", None)
        return get_many(docs) if get_many is not None else [self.source[d] for d in docs]

    def _collect(self, chunk: _Chunk) -> list[np.ndarray]:
        if chunk.tokens is None:
            try:
                lengths, flat = chunk.future.result()
            except BrokenWorkerError as e:
                self.close()
                raise TokenizeWorkerError(
                    f"A {e} (killed, or out of memory?) while reading {self._describe(chunk)}; "
                    "rerun, or set tokenize_workers.workers = 0 to tokenise in-process.") from e
            except RemoteError as e:  # the worker's own exception
                self.close()
                raise TokenizeWorkerError(
                    f"A tokenize worker failed on {self._describe(chunk)}: {e.kind}: "
                    f"{e.message}") from e
            chunk.tokens = np.split(flat, np.cumsum(lengths)[:-1])
            self._warm = True
            self._observe(int(lengths.sum()), len(lengths))
        return chunk.tokens

    def _describe(self, chunk: _Chunk) -> str:
        docs = chunk.docs
        shown = ", ".join(map(str, docs[:4])) + (", ..." if len(docs) > 4 else "")
        return (f"documents [{shown}] ({len(docs)} in all) of "
                f"{getattr(self.source, 'name', type(self.source).__name__)}")

    @staticmethod
    def _cancel(chunks: collections.deque[_Chunk]) -> None:
        while chunks:
            chunks.pop().future.cancel()
