"""Packed causal-LM batches from a `DocumentSource`, identical for any process count.

Each document is tokenised as `toks` and becomes the pair

    inputs  = [BOS] + toks
    targets = toks + [EOS]          # inputs[t] predicts targets[t]

Row streams. The global batch has B = global_batch_size rows; row r of every global batch
is filled by an independent row stream r. The (infinite) document order is the
concatenation over epochs e = 0, 1, 2, ... of a permutation perm_e of range(N), drawn from
`np.random.default_rng([seed, e])` (identity without shuffle; `research.data.order`). Row
stream r consumes the
documents at global positions r, r + B, r + 2B, ... of that order and packs their pairs
greedily: a row is the contiguous token stream of its documents cut into windows of
seq_len, so a document that does not fit continues in the row's next batch (as a new
segment whose positions restart at 0, keeping its true previous token as input). Nothing
is dropped.

Host p of P owns rows [p*B/P, (p+1)*B/P) and reads only their documents, so concatenating
the host batches of any P gives exactly the P=1 global batch.

Resumption: `get_state()` is a small JSON-serialisable dict (per owned row: the next
position index k and the token offset in the current document); `set_state` restores it,
after which the iterator yields exactly what an uninterrupted one would have. A row's
position does not depend on the process layout, so `merge_states` of every host's state
restores a run under any other process count.

Eval (repeat=False): one pass over the documents in order (no shuffle by default); a row
that runs out yields padding; `.exhausted` turns True once every owned row is out, and
all-padding batches keep coming, so every host can run the same number of steps.

Pre-tokenised sources. An item that is already an array of token ids (a `tokens:DIR` source,
research.data.tokens) is used as `toks` without tokenising; the source's tokenizer
fingerprint must match the tokenizer's (else a ConfigError naming both). A `TokenSource` is
packed a whole batch at a time by research.data.token_packing: the same batches and states.

Tokenize workers. Text documents are read and tokenised ahead in worker processes
(research.data.tokenize_pool; `tokenize_workers`, gin `tokenize_workers.workers`: an int, 0 for
in-process, or 'auto'); this process still packs every row in order, so the batches and states
are the same for any worker count.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from research.data.batching import check_batch_layout, check_int
from research.data.order import EpochOrder
from research.data.sources import open_documents
from research.data.token_packing import pack_batch
from research.data.tokenize_pool import RowTokenFeed
from research.data.tokens import TokenSource, check_tokenizer
from research.errors import ConfigError

STATE_VERSION = 1
Batch = dict[str, np.ndarray]


class TokenizerLike(Protocol):
    """What the packer needs from a tokenizer (e.g. `research.data.tokenizer.Tokenizer`)."""
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


class CausalLMIterator:
    """Iterator of packed causal-LM batches (see module docstring).

    Each batch is a dict of numpy arrays of shape [global_batch_size // process_count,
    seq_len]: `inputs` int32, `targets` int32, `weights` float32 (1 on real targets, 0 on
    padding), `segment_ids` int32 (1, 2, ... per document piece in a row, 0 on padding),
    `positions` int32 (position within the piece, from 0).
    """

    def __init__(self, source: Sequence[str], tokenizer: TokenizerLike, *, seq_len: int,
                 global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, repeat: bool = True, shuffle: bool | None = None,
                 prefetch: int = 2, tokenize_workers: int | str | None = None):
        check_batch_layout(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                           process_index=process_index, process_count=process_count)
        check_int("prefetch", prefetch, 0)
        self.num_documents = len(source)
        if self.num_documents == 0:
            raise ValueError(f"Document source {getattr(source, 'name', source)!r} is empty; "
                             "a causal-LM iterator needs at least one document.")
        check_tokenizer(source, tokenizer)  # token ids: VOCAB must be the one that made them
        for attr in ("bos_id", "eos_id", "pad_id"):
            if getattr(tokenizer, attr, -1) is None or getattr(tokenizer, attr, -1) < 0:
                raise ConfigError(
                    f"Tokenizer has no {attr[:-3]} piece ({attr}={getattr(tokenizer, attr, None)})"
                    "; retrain it with tools/train_tokenizer.py, which adds <s>, </s> and [PAD].")
        self.source = source
        self.tokenizer = tokenizer
        self._vectorised = isinstance(source, TokenSource)
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.repeat = bool(repeat)
        self.shuffle = self.repeat if shuffle is None else bool(shuffle)
        self.prefetch = prefetch
        per_host = global_batch_size // process_count
        self.rows = np.arange(process_index * per_host, (process_index + 1) * per_host)
        self._positions = np.arange(seq_len, dtype=np.int32)
        self.order = EpochOrder(self.num_documents, self.seed, self.shuffle)
        # Producer-side cursor: per owned row, next position index k and token offset.
        self._k = np.zeros(per_host, dtype=np.int64)
        self._off = np.zeros(per_host, dtype=np.int64)
        self._pair_cache: list[tuple[int, np.ndarray, np.ndarray] | None] = [None] * per_host
        # Text: each owned row's documents, tokenised (ahead, in workers if any) by the feed
        # (given a function of (row, k), not a method: no reference cycle to this iterator).
        self._feed = None if self._vectorised else RowTokenFeed(
            source, tokenizer, per_host,
            functools.partial(_row_document, self.order, self.rows, self.global_batch_size,
                              self.repeat),
            workers=tokenize_workers, seq_len=self.seq_len)
        # Consumer-side: state of the last yielded batch.
        self._yielded = (self._k.copy(), self._off.copy())
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None

    @property
    def feed(self) -> RowTokenFeed | None:
        """The tokenize feed of a text source (None for token-id sources): `feed.start(wait=
        True)` starts its workers now; `feed.documents_from_workers` counts their documents."""
        return self._feed

    # ----------------------------------------------------------------- document order

    def document_index(self, row: int, k: int) -> int | None:
        """Index into `source` of row stream `row`'s k-th document (None: eval pass over)."""
        epoch, doc = self.order.locate(row + k * self.global_batch_size)
        if epoch > 0 and not self.repeat:
            return None
        return doc

    def _pair(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(inputs, targets) int32[len(toks) + 1] of owned row i's current document."""
        k = int(self._k[i])
        cached = self._pair_cache[i]
        if cached is not None and cached[0] == k:
            return cached[1], cached[2]
        toks = self._feed.tokens(i, k)  # the item's ids (an array item as is), or None
        if toks is None:
            return None
        inputs = np.concatenate([np.array([self.tokenizer.bos_id], np.int32), toks])
        targets = np.concatenate([toks, np.array([self.tokenizer.eos_id], np.int32)])
        self._pair_cache[i] = (k, inputs, targets)
        return inputs, targets

    # ----------------------------------------------------------------------- packing

    def _produce(self) -> Batch:
        """Packs the next batch from the producer cursor and advances it."""
        if self._vectorised:
            batch, self._k, self._off = pack_batch(
                self.source, self.order, self.rows, self._k, self._off, seq_len=self.seq_len,
                global_batch_size=self.global_batch_size, repeat=self.repeat,
                bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                pad_id=self.tokenizer.pad_id)
            return batch
        self._feed.prepare(self._k)
        shape = (len(self.rows), self.seq_len)
        pad = self.tokenizer.pad_id
        inputs = np.full(shape, pad, np.int32)
        targets = np.full(shape, pad, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        for i in range(len(self.rows)):
            filled, segment = 0, 0
            while filled < self.seq_len:
                pair = self._pair(i)
                if pair is None:
                    break
                pair_in, pair_tgt = pair
                off = int(self._off[i])
                n = min(self.seq_len - filled, len(pair_in) - off)
                segment += 1
                inputs[i, filled:filled + n] = pair_in[off:off + n]
                targets[i, filled:filled + n] = pair_tgt[off:off + n]
                segment_ids[i, filled:filled + n] = segment
                positions[i, filled:filled + n] = self._positions[:n]
                filled += n
                if off + n == len(pair_in):
                    self._k[i] += 1
                    self._off[i] = 0
                    self._pair_cache[i] = None
                else:
                    self._off[i] = off + n
        return {"inputs": inputs, "targets": targets,
                "weights": (segment_ids > 0).astype(np.float32),
                "segment_ids": segment_ids, "positions": positions}

    def _rows_out(self, k: np.ndarray) -> bool:
        """Whether every owned row has consumed all its documents (eval only)."""
        if self.repeat:
            return False
        return bool(np.all(self.rows + k * self.global_batch_size >= self.num_documents))

    # ----------------------------------------------------------------- iteration API

    def __iter__(self) -> CausalLMIterator:
        return self

    def __next__(self) -> Batch:
        if self.prefetch == 0:
            batch = self._produce()
            self._yielded = (self._k.copy(), self._off.copy())
            return batch
        if self._thread is None:
            self._start_producer()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread.join()
            self._thread = None
            self._restore_cursor(*self._yielded)  # a retry resumes after the last batch
            raise RuntimeError("The causal-LM prefetch thread failed; see the cause "
                               "above.") from item
        batch, self._yielded = item
        return batch

    @property
    def exhausted(self) -> bool:
        """True once every owned row has run out of documents (repeat=False only)."""
        return self._rows_out(self._yielded[0])

    # -------------------------------------------------------------------- prefetching

    def _start_producer(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._producer_loop,
                                        args=(self._queue, self._stop),
                                        name="causal-lm-prefetch", daemon=True)
        self._thread.start()

    def _producer_loop(self, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item: Any = (self._produce(), (self._k.copy(), self._off.copy()))
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the consumer by __next__
            out.put(e)

    def close(self) -> None:
        """Stops the prefetch thread and the tokenize workers (if any). The iterator stays
        usable: the next `__next__` restarts them from the last yielded batch's state."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None
            # The producer ran ahead; rewind it to what has been yielded.
            self._restore_cursor(*self._yielded)
        if self._feed is not None:
            self._feed.close()

    def __del__(self):
        try:
            if self._thread is not None:
                self._stop.set()
            if self._feed is not None:
                self._feed.close(wait=False)
        except Exception:
            pass

    # -------------------------------------------------------------------- checkpoints

    def _identity(self) -> dict[str, Any]:
        return {"kind": "causal_lm", "version": STATE_VERSION, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size,
                "process_index": self.process_index, "process_count": self.process_count,
                "seed": self.seed, "repeat": self.repeat, "shuffle": self.shuffle,
                "num_documents": self.num_documents}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state of the last yielded batch (O(rows) ints, no tokens)."""
        k, off = self._yielded
        return {**self._identity(), "rows": [[int(a), int(b)] for a, b in zip(k, off)]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores `get_state()` output from an iterator with the same configuration.

        The state may come from another process layout as long as it covers this host's rows:
        a row stream's position does not depend on which host reads it, so the
        `merge_states` of every host's state restores any process count.

        Raises:
          ConfigError: if the state belongs to a different seq_len / batch size / seed /
            corpus size (the user changed the run or its data).
          ValueError: if the state does not cover this host's rows, or is malformed.
        """
        if not isinstance(state, dict):
            raise ValueError(f"Causal-LM iterator state must be a dict, got "
                             f"{type(state).__name__}.")
        expected = {k: v for k, v in self._identity().items() if k not in _LAYOUT_KEYS}
        mismatched = [f"{key}: state has {state.get(key)!r}, iterator has {value!r}"
                      for key, value in expected.items() if state.get(key) != value]
        if mismatched:
            raise ConfigError(
                "Cannot restore causal-LM iterator state saved under a different "
                "configuration (" + "; ".join(mismatched) + "). Resume with the same "
                "seq_len, global_batch_size, seed, shuffle/repeat and dataset, or start the "
                "data from scratch.")
        first, count = _covered_rows(state, self.global_batch_size)
        rows = state.get("rows")
        if (not isinstance(rows, list) or len(rows) != count
                or any(not isinstance(r, (list, tuple)) or len(r) != 2
                       or any(not isinstance(v, int) or v < 0 for v in r) for r in rows)):
            raise ValueError(f"Malformed causal-LM iterator state: 'rows' must be "
                             f"{count} pairs of non-negative ints [k, offset].")
        lo, hi = int(self.rows[0]), int(self.rows[-1]) + 1
        if lo < first or hi > first + count:
            raise ValueError(
                f"Causal-LM iterator state covers global rows [{first}, {first + count}) "
                f"(process {state['process_index']} of {state['process_count']}) but this host "
                f"(process {self.process_index} of {self.process_count}) reads rows [{lo}, {hi}); "
                "restore the merged state of every host (causal_lm.merge_states).")
        mine = rows[lo - first:hi - first]
        self.close()
        k = np.array([r[0] for r in mine], dtype=np.int64)
        off = np.array([r[1] for r in mine], dtype=np.int64)
        self._restore_cursor(k, off)
        self._yielded = (k.copy(), off.copy())

    def _restore_cursor(self, k: np.ndarray, off: np.ndarray) -> None:
        self._k = k.copy()
        self._off = off.copy()
        self._pair_cache = [None] * len(self.rows)
        if self._feed is not None:
            self._feed.reset()


_LAYOUT_KEYS = ("process_index", "process_count")


def _row_document(order: EpochOrder, rows: np.ndarray, global_batch_size: int, repeat: bool,
                  i: int, k: int) -> int | None:
    """`CausalLMIterator.document_index` of owned row i (rows[i]) and k."""
    epoch, doc = order.locate(int(rows[i]) + k * global_batch_size)
    return None if epoch > 0 and not repeat else doc


def _covered_rows(state: dict[str, Any], global_batch_size: int) -> tuple[int, int]:
    """(first global row, row count) that a state saved by process i of P covers."""
    index, count = state.get("process_index"), state.get("process_count")
    if (not isinstance(index, int) or not isinstance(count, int) or isinstance(index, bool)
            or isinstance(count, bool) or not 0 <= index < count
            or global_batch_size % count):
        raise ValueError(f"Malformed causal-LM iterator state: process_index={index!r}, "
                         f"process_count={count!r} (global_batch_size={global_batch_size}).")
    per_host = global_batch_size // count
    return index * per_host, per_host


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state covering the whole global batch from every host's `get_state()` (any order),
    as if saved by a single process: it restores an iterator under any process count.

    Raises:
      ValueError: if the states disagree on the configuration or do not tile the batch.
    """
    states = list(states)
    if not states or not all(isinstance(s, dict) for s in states):
        raise ValueError("merge_states needs a non-empty list of causal-LM iterator states.")
    base = {k: v for k, v in states[0].items() if k not in (*_LAYOUT_KEYS, "rows")}
    if base.get("kind") != "causal_lm":
        raise ValueError(f"not a causal-LM iterator state (kind={base.get('kind')!r}).")
    for s in states[1:]:
        other = {k: v for k, v in s.items() if k not in (*_LAYOUT_KEYS, "rows")}
        if other != base:
            raise ValueError("causal-LM iterator states of different configurations cannot be "
                             f"merged: {base} vs {other}.")
    batch = int(base["global_batch_size"])
    spans = sorted((*_covered_rows(s, batch), i) for i, s in enumerate(states))
    rows: list[list[int]] = []
    for first, count, i in spans:
        if first != len(rows):
            raise ValueError(f"causal-LM iterator states do not tile the global batch of {batch} "
                             f"rows: rows from {len(rows)} are missing or repeated.")
        part = states[i].get("rows")
        if not isinstance(part, list) or len(part) != count:
            raise ValueError(f"Malformed causal-LM iterator state: 'rows' must be {count} pairs.")
        rows.extend([int(a), int(b)] for a, b in part)
    if len(rows) != batch:
        raise ValueError(f"causal-LM iterator states cover {len(rows)} of the {batch} rows.")
    return {**base, "process_index": 0, "process_count": 1, "rows": rows}


def make_causal_lm_iterator(source: Sequence[str], tokenizer: TokenizerLike, *,
                            seq_len: int, global_batch_size: int, seed: int,
                            process_index: int = 0, process_count: int = 1,
                            repeat: bool = True, shuffle: bool | None = None,
                            prefetch: int = 2,
                            tokenize_workers: int | str | None = None) -> CausalLMIterator:
    """Packed causal-LM batches of shape [global_batch_size // process_count, seq_len].

    Args:
      source: random-access documents (`research.data.sources.DocumentSource`), or token-id
        arrays (`research.data.tokens.TokenSource`, from a `tokens:DIR` spec).
      tokenizer: has `encode(str) -> list[int]`, `bos_id`, `eos_id`, `pad_id`; for token
        sources the one the tokens were made with (its fingerprint is checked).
      seq_len: tokens per row.
      global_batch_size: rows of the global batch (all processes together).
      seed: document-order seed (epoch e uses `np.random.default_rng([seed, e])`).
      process_index, process_count: this host and the number of hosts; this host yields
        global rows [p*B/P, (p+1)*B/P).
      repeat: True (train): endless epochs. False (eval): one pass, then padding.
      shuffle: permute each epoch; default True when repeat, False otherwise.
      prefetch: batches packed ahead in a background thread (0: no thread).
      tokenize_workers: processes reading and tokenising text documents ahead
        (research.data.tokenize_pool): an int (0: in this process), 'auto', or None for the
        gin setting `tokenize_workers.workers` (default 'auto'). The batches do not depend on
        it. Unused for token-id sources.
    """
    return CausalLMIterator(source, tokenizer, seq_len=seq_len,
                            global_batch_size=global_batch_size, seed=seed,
                            process_index=process_index, process_count=process_count,
                            repeat=repeat, shuffle=shuffle, prefetch=prefetch,
                            tokenize_workers=tokenize_workers)


_SOURCE_KWARGS = ("split", "text_field", "data_dir", "on_decode_error")


def make_causal_lm_iterator_from_spec(spec: str, tokenizer: TokenizerLike,
                                      **kwargs: Any) -> CausalLMIterator:
    """`open_documents(spec, ...)` then `make_causal_lm_iterator(...)`.

    Keyword arguments split / text_field / data_dir / on_decode_error go to
    `open_documents` (unset ones fall back to its gin bindings); the rest to
    `make_causal_lm_iterator`.
    """
    source_kwargs = {k: kwargs.pop(k) for k in _SOURCE_KWARGS if k in kwargs}
    return make_causal_lm_iterator(open_documents(spec, **source_kwargs), tokenizer, **kwargs)
