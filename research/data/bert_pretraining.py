"""Streaming, deterministic, per-host sharded and resumable BERT pretraining data.

`make_bert_pretraining_iterator(documents, tokenizer, seq_len=..., global_batch_size=...,
seed=...)` yields dicts of padded features batched to `[global_batch_size // process_count,
...]`:

  input_ids            int32   [b, L]  `[CLS] A [SEP] B [SEP]` (masked), pad = tokenizer.pad_id
  input_mask           int32   [b, L]  1 real token / 0 padding
  segment_ids          int32   [b, L]  0 for CLS + A + first SEP, 1 for B + final SEP
  masked_lm_positions  int32   [b, P]  predicted positions (0 padding)
  masked_lm_ids        int32   [b, P]  original ids there (pad_id padding)
  masked_lm_weights    float32 [b, P]  1 real / 0 padding
  next_sentence_labels int32   [b]     1 = random next (not-next), 0 = actual continuation

(L = seq_len, P = max_predictions_per_seq; instance semantics: `bert_instances` and
`masking`.)

Data order, identical for any process count:

* the infinite document order is the concatenation over epochs e of
  perm_e = `np.random.default_rng([seed, e]).permutation(N)` (identity without shuffling;
  `research.data.order`);
* row r of every global batch (B rows) comes from row stream r, which takes the documents
  at global positions r, r + B, r + 2B, ...;
* a row stream works in windows of `shuffle_window_docs` of its documents: it generates
  all instances of the window's documents (each document's randomness is seeded from
  (seed, duplicate, document index), duplicate = epoch, or epoch % dupe_factor for static
  masking), shuffles them with a generator seeded from (seed, epoch, r, window start) and
  emits them in order;
* host p owns rows [p B / P, (p + 1) B / P) and processes only their documents (plus the
  random-next documents they draw).

The state is, per row, (window start, instances emitted from the window): `get_state()`
is a small JSON-serialisable dict and after `set_state(state)` the iterator yields exactly
what the uninterrupted one would have. `merge_states` of every host's state restores any
other process count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from research.data.batching import check_batch_layout
from research.data.bert_instances import (
    FEATURES, TokenizedDocuments, TrainingInstance, create_instances_from_document,
    empty_features, pack_sentences, pair_tokens, single_segment_tokens, split_sentences,
    write_features)
from research.data.masking import MaskingVocab, create_masked_lm_predictions
from research.data.order import EpochOrder
from research.errors import ConfigError

__all__ = [
    "FEATURES", "BertDataConfig", "BertInstanceFactory", "BertPretrainingIterator",
    "make_bert_pretraining_iterator", "split_sentences",
]

STATE_VERSION = 1

# Trailing non-zero tags keep the seed sequences of different purposes apart (numpy's
# SeedSequence treats [a, b] and [a, b, 0] alike, so tags must be last and non-zero).
_TAG_INSTANCES = 0xB1
_TAG_MASKING = 0xB2
_TAG_WINDOW = 0xB3
_TAG_PACKED_MASKING = 0xB4

# A row stream that scans this many documents (times the corpus size) without finding
# one instance gives up instead of looping forever.
_EMPTY_SCAN_FACTOR = 20


@dataclasses.dataclass(frozen=True)
class BertDataConfig:
    """Everything that determines the global data stream (see the module docstring)."""
    seq_len: int
    global_batch_size: int
    seed: int
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_mask: bool = False
    next_sentence: bool = True
    dupe_factor: int | None = None
    repeat: bool = True
    shuffle: bool = True
    shuffle_window_docs: int = 64

    def __post_init__(self):
        min_len = 5 if self.next_sentence else 3
        checks = [
            (self.seq_len >= min_len, f"seq_len={self.seq_len} is too short: needs >= "
             f"{min_len} for {'[CLS] A [SEP] B [SEP]' if self.next_sentence else '[CLS] x [SEP]'}"),
            (self.global_batch_size >= 1,
             f"global_batch_size={self.global_batch_size} must be >= 1"),
            (isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool)
             and self.seed >= 0,
             f"seed={self.seed!r} must be a non-negative int"),
            (self.max_predictions_per_seq >= 1,
             f"max_predictions_per_seq={self.max_predictions_per_seq} must be >= 1"),
            (0.0 < self.masked_lm_prob <= 1.0,
             f"masked_lm_prob={self.masked_lm_prob} must be in (0, 1]"),
            (0.0 <= self.short_seq_prob <= 1.0,
             f"short_seq_prob={self.short_seq_prob} must be in [0, 1]"),
            (self.dupe_factor is None or self.dupe_factor >= 1,
             f"dupe_factor={self.dupe_factor} must be None (dynamic masking) or >= 1"),
            (self.shuffle_window_docs >= 1,
             f"shuffle_window_docs={self.shuffle_window_docs} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        object.__setattr__(self, "seed", int(self.seed))  # numpy ints -> JSON-friendly state

    @property
    def shuffled(self) -> bool:
        """Documents and windows are shuffled (never for a single pass, repeat=False)."""
        return self.shuffle and self.repeat

    def duplicate(self, epoch: int) -> int:
        """Which masking duplicate epoch `epoch` uses: itself, or epoch % dupe_factor."""
        return epoch if self.dupe_factor is None else epoch % self.dupe_factor


class BertInstanceFactory:
    """Masked training instances of documents, deterministic in (seed, duplicate, document)."""

    def __init__(self, corpus: TokenizedDocuments, tokenizer, config: BertDataConfig):
        tokenizer.require_special("pad", "cls", "sep", "mask")
        self.corpus = corpus
        self.config = config
        self.cls_id, self.sep_id = int(tokenizer.cls_id), int(tokenizer.sep_id)
        self.vocab = MaskingVocab.from_tokenizer(tokenizer)

    def _masked(self, tokens: np.ndarray, segments: np.ndarray, label: int,
                rng: np.random.Generator) -> TrainingInstance:
        c = self.config
        m = create_masked_lm_predictions(
            tokens, self.vocab, masked_lm_prob=c.masked_lm_prob,
            max_predictions_per_seq=c.max_predictions_per_seq,
            whole_word_mask=c.whole_word_mask, rng=rng)
        return TrainingInstance(m.tokens, segments, m.positions, m.labels, int(label))

    def document_instances(self, doc: int, duplicate: int) -> list[TrainingInstance]:
        """NSP instances of document `doc` under masking duplicate `duplicate`, doc order."""
        c = self.config
        pair_rng = np.random.default_rng([c.seed, duplicate, doc, _TAG_INSTANCES])
        mask_rng = np.random.default_rng([c.seed, duplicate, doc, _TAG_MASKING])
        pairs = create_instances_from_document(
            doc, self.corpus, max_seq_length=c.seq_len, short_seq_prob=c.short_seq_prob,
            rng=pair_rng)
        out = []
        for pair in pairs:
            tokens, segments = pair_tokens(pair, self.cls_id, self.sep_id)
            out.append(self._masked(tokens, segments, pair.is_random_next, mask_rng))
        return out

    def packed_instances(self, docs: Sequence[tuple[int, int]]) -> list[TrainingInstance]:
        """MLM-only `[CLS] x [SEP]` instances packing the sentences of (doc, duplicate) pairs.

        Each instance's masking is seeded from (seed, duplicate, doc, sentence, offset) of
        its first token.
        """
        c = self.config
        sentences = (((dup, doc, s), tokens) for doc, dup in docs
                     for s, tokens in enumerate(self.corpus[doc]))
        out = []
        for key, segment in pack_sentences(sentences, c.seq_len - 2):
            tokens, segments = single_segment_tokens(segment, self.cls_id, self.sep_id)
            rng = np.random.default_rng([c.seed, *key, _TAG_PACKED_MASKING])
            out.append(self._masked(tokens, segments, 0, rng))
        return out


class WindowSource:
    """Instances of the windows of every row stream."""

    def __init__(self, factory: BertInstanceFactory, config: BertDataConfig,
                 num_documents: int):
        self.factory = factory
        self.config = config
        self.num_documents = num_documents
        self.order = EpochOrder(num_documents, config.seed, config.shuffled)

    def stream_length(self, row: int) -> int | None:
        """Documents in row stream `row`: None (infinite) when repeating."""
        if self.config.repeat:
            return None
        return max(0, -(-(self.num_documents - row) // self.config.global_batch_size))

    def window_documents(self, row: int, start: int) -> list[tuple[int, int]]:
        """(epoch, document) of the documents of row `row`'s window at `start`."""
        c = self.config
        stop = start + c.shuffle_window_docs
        length = self.stream_length(row)
        if length is not None:
            stop = min(stop, length)
        return [self.order.locate(row + j * c.global_batch_size) for j in range(start, stop)]

    def window(self, row: int, start: int) -> list[TrainingInstance]:
        """The shuffled instances of row `row`'s window beginning at stream document `start`."""
        c = self.config
        located = self.window_documents(row, start)
        if not located:
            return []
        if c.next_sentence:
            instances = [inst for epoch, doc in located
                         for inst in self.factory.document_instances(doc, c.duplicate(epoch))]
        else:
            instances = self.factory.packed_instances(
                [(doc, c.duplicate(epoch)) for epoch, doc in located])
        if c.shuffled:
            rng = np.random.default_rng([c.seed, located[0][0], row, start, _TAG_WINDOW])
            instances = [instances[i] for i in rng.permutation(len(instances))]
        return instances


_UNKNOWN = object()  # lookahead not computed yet


class RowStream:
    """One row of the global batch: emits its windows' instances, then None when done.

    The position is (window_start, emitted): the window of the last emitted instance and
    how many of its instances were emitted. Later windows are only looked at, never
    entered, until an instance is taken from them.
    """

    def __init__(self, row: int, source: WindowSource):
        self.row = row
        self.source = source
        self.step = source.config.shuffle_window_docs
        self.set_state(0, 0)

    def state(self) -> list[int]:
        return [self.window_start, self.emitted]

    def set_state(self, window_start: int, emitted: int) -> None:
        if (not isinstance(window_start, int) or not isinstance(emitted, int)
                or window_start < 0 or window_start % self.step or emitted < 0):
            raise ValueError(f"row {self.row}: invalid state (window_start={window_start!r}, "
                             f"emitted={emitted!r}) for shuffle_window_docs={self.step}")
        self.window_start, self.emitted = window_start, emitted
        self._window: list[TrainingInstance] | None = None
        self._ahead = _UNKNOWN

    def _current(self) -> list[TrainingInstance]:
        if self._window is None:
            self._window = self.source.window(self.row, self.window_start)
        return self._window

    def _out_at(self, start: int) -> bool:
        length = self.source.stream_length(self.row)
        return length is not None and start >= length

    def _scan(self, start: int) -> tuple[int, list[TrainingInstance]] | None:
        """The first window at or after `start` that has instances; None if the pass ends."""
        scanned, limit = 0, _EMPTY_SCAN_FACTOR * self.source.num_documents + self.step
        while not self._out_at(start):
            instances = self.source.window(self.row, start)
            if instances:
                return start, instances
            scanned += self.step
            if scanned > limit:
                raise ConfigError(
                    f"row stream {self.row} scanned {scanned} documents without one training "
                    "instance: the documents are empty (or this row only ever sees empty "
                    "ones). Check the corpus, or use shuffle=True.")
            start += self.step
        return None

    def _following(self) -> tuple[int, list[TrainingInstance]] | None:
        if self._ahead is _UNKNOWN:
            self._ahead = self._scan(self.window_start + self.step)
        return self._ahead

    def has_next(self) -> bool:
        """Whether `next()` would return an instance (may load later windows)."""
        return self.emitted < len(self._current()) or self._following() is not None

    def next(self) -> TrainingInstance | None:
        """The next instance, or None once a single pass (repeat=False) is used up."""
        if self.emitted >= len(self._current()):
            ahead = self._following()
            if ahead is None:
                return None
            (self.window_start, self._window), self.emitted = ahead, 0
            self._ahead = _UNKNOWN
        self.emitted += 1
        return self._window[self.emitted - 1]


class BertPretrainingIterator:
    """Iterator of host-local batches; see the module docstring.

    `exhausted` (repeat=False) turns True once every owned row is out of instances; the
    batches keep coming, all padding, so every host can run the same number of steps (each
    host only knows its own rows: combine the hosts' flags to stop a multi-host loop).
    """

    def __init__(self, documents: Sequence[str], tokenizer, config: BertDataConfig, *,
                 process_index: int = 0, process_count: int = 1, cache_size: int = 4096):
        check_batch_layout(seq_len=config.seq_len, global_batch_size=config.global_batch_size,
                           seed=config.seed, process_index=process_index,
                           process_count=process_count)
        if len(documents) == 0:
            raise ConfigError("documents is empty: BERT pretraining needs at least one document.")
        self.config = config
        self.tokenizer = tokenizer
        self.num_documents = len(documents)
        self.local_batch_size = config.global_batch_size // process_count
        self.row_offset = process_index * self.local_batch_size
        corpus = TokenizedDocuments(documents, tokenizer, cache_size=cache_size)
        self.factory = BertInstanceFactory(corpus, tokenizer, config)
        self.source = WindowSource(self.factory, config, self.num_documents)
        self.rows = [RowStream(self.row_offset + i, self.source)
                     for i in range(self.local_batch_size)]

    def __iter__(self) -> "BertPretrainingIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        c = self.config
        batch = empty_features(self.local_batch_size, c.seq_len, c.max_predictions_per_seq,
                               self.tokenizer.pad_id)
        for i, stream in enumerate(self.rows):
            inst = stream.next()
            if inst is not None:
                write_features(batch, i, inst)
        return batch

    @property
    def exhausted(self) -> bool:
        """True once every owned row has run out of instances (repeat=False only)."""
        return not self.config.repeat and not any(r.has_next() for r in self.rows)

    def close(self) -> None:
        """No background work to stop; present for parity with the causal-LM iterator."""

    def _fingerprint(self) -> dict:
        return {**dataclasses.asdict(self.config), "num_documents": self.num_documents}

    def get_state(self) -> dict:
        """Small JSON-serialisable position: per row [window start, emitted]."""
        return {"kind": "bert_pretraining", "version": STATE_VERSION,
                "config": self._fingerprint(), "row_offset": self.row_offset,
                "rows": [r.state() for r in self.rows]}

    def set_state(self, state: dict) -> None:
        """Resumes from `get_state()` output (of this host, or of hosts covering its rows)."""
        if state.get("kind") != "bert_pretraining" or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a BERT pretraining data state (kind={state.get('kind')!r}, "
                             f"version={state.get('version')!r}); this code reads kind "
                             f"'bert_pretraining' version {STATE_VERSION}.")
        mine = self._fingerprint()
        differing = sorted(k for k in set(mine) | set(state["config"])
                           if mine.get(k) != state["config"].get(k))
        if differing:
            saved = state["config"]
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in differing)
            raise ConfigError(f"BERT data state was saved with a different configuration "
                              f"({changes}); resume with the original settings, or start the "
                              "data from scratch.")
        first = self.row_offset - state["row_offset"]
        rows = state["rows"][first:first + self.local_batch_size] if first >= 0 else []
        if len(rows) != self.local_batch_size:
            raise ValueError(f"BERT data state covers rows [{state['row_offset']}, "
                             f"{state['row_offset'] + len(state['rows'])}) but this host needs "
                             f"[{self.row_offset}, {self.row_offset + self.local_batch_size}).")
        for stream, row_state in zip(self.rows, rows):
            if not isinstance(row_state, (list, tuple)) or len(row_state) != 2:
                raise ValueError(f"malformed BERT data state row {row_state!r}: expected "
                                 "[window_start, emitted].")
            stream.set_state(*row_state)


def merge_states(states: Sequence[dict]) -> dict:
    """One state covering the whole global batch (row_offset 0) from every host's
    `get_state()`; `set_state` takes each host's rows from it under any process count.

    Raises:
      ValueError: if the states disagree on the configuration or do not tile the batch.
    """
    states = list(states)
    if not states or any(not isinstance(s, dict) or s.get("kind") != "bert_pretraining"
                         for s in states):
        raise ValueError("merge_states needs a non-empty list of BERT pretraining data states.")
    base = {k: v for k, v in states[0].items() if k not in ("row_offset", "rows")}
    rows: list = []
    for s in sorted(states, key=lambda s: s.get("row_offset", -1)):
        if {k: v for k, v in s.items() if k not in ("row_offset", "rows")} != base:
            raise ValueError("BERT data states of different configurations cannot be merged.")
        if s.get("row_offset") != len(rows) or not isinstance(s.get("rows"), list):
            raise ValueError(f"BERT data states do not tile the global batch: rows from "
                             f"{len(rows)} are missing or repeated.")
        rows.extend(s["rows"])
    batch = base.get("config", {}).get("global_batch_size")
    if len(rows) != batch:
        raise ValueError(f"BERT data states cover {len(rows)} of the {batch} rows.")
    return {**base, "row_offset": 0, "rows": rows}


def make_bert_pretraining_iterator(
        documents: Sequence[str], tokenizer, *, seq_len: int, global_batch_size: int,
        seed: int, max_predictions_per_seq: int = 20, masked_lm_prob: float = 0.15,
        short_seq_prob: float = 0.1, whole_word_mask: bool = False, next_sentence: bool = True,
        dupe_factor: int | None = None, process_index: int = 0, process_count: int = 1,
        repeat: bool = True, shuffle: bool = True, shuffle_window_docs: int = 64,
        cache_size: int = 4096) -> BertPretrainingIterator:
    """BERT pretraining batches `[global_batch_size // process_count, ...]` (module docstring).

    Args:
      documents: random-access sequence of document strings (`len`, `[i] -> str`).
      tokenizer: `research.data.tokenizer.Tokenizer` with [PAD], [CLS], [SEP], [MASK].
      seq_len: L, tokens per instance (specials included).
      global_batch_size: B, rows of the global batch (same data for any process_count).
      seed: non-negative int; determines everything.
      max_predictions_per_seq: P.
      masked_lm_prob: fraction of each instance's tokens to predict.
      short_seq_prob: probability that a document uses a short random target length
        (NSP only; MLM-only segments are always packed up to L).
      whole_word_mask: mask all pieces of a word together.
      next_sentence: NSP pairs `[CLS] A [SEP] B [SEP]`; False = MLM only, `[CLS] x [SEP]`
        with sentences packed up to L (across documents, within a window), label 0.
      dupe_factor: None = dynamic masking (fresh instances/masks every epoch); an int =
        static masking, epoch e reuses duplicate e % dupe_factor.
      process_index, process_count: this host's share of the rows.
      repeat: False = one pass in corpus order (no shuffling), then padding batches
        forever with `.exhausted` True.
      shuffle: shuffle documents per epoch and instances per window (when repeating).
      shuffle_window_docs: documents per row-stream window.
      cache_size: tokenised documents kept in the LRU cache.
    """
    config = BertDataConfig(
        seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
        max_predictions_per_seq=max_predictions_per_seq, masked_lm_prob=masked_lm_prob,
        short_seq_prob=short_seq_prob, whole_word_mask=whole_word_mask,
        next_sentence=next_sentence, dupe_factor=dupe_factor, repeat=repeat, shuffle=shuffle,
        shuffle_window_docs=shuffle_window_docs)
    return BertPretrainingIterator(documents, tokenizer, config, process_index=process_index,
                                   process_count=process_count, cache_size=cache_size)
