"""BERT pretraining instances: sentence splitting, NSP pairs, MLM-only packing, features.

The NSP pair procedure follows google-research/bert's `create_instances_from_document`:

* `max_num_tokens = max_seq_length - 3`; the document's `target_seq_length` is
  `max_num_tokens`, or with probability `short_seq_prob` a random int in
  `[2, max_num_tokens]`;
* sentences accumulate into a chunk until its length reaches the target or the document
  ends; A is the chunk's first `a_end` sentences (`a_end` random in `[1, len(chunk) - 1]`,
  or 1 for a single-sentence chunk);
* B is random (label 1) for a single-sentence chunk, else with probability 0.5: sentences
  of another document from a random start until `target_seq_length - len(A)` is reached,
  and the chunk's unused sentences are put back (re-used by the next chunk); otherwise B is
  the rest of the chunk (label 0, the actual continuation);
* the pair is truncated to `max_num_tokens` by removing one token at a time from the longer
  side (B on ties), from its front or back with probability 0.5 each.

Differences, all documented where they occur: the random document is drawn uniformly from
the *other* documents (the reference retries 10 times and may, rarely, keep the same one);
empty documents are skipped when drawing it; with a single document B comes from that same
document, as in the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int32)
_RANDOM_DOCUMENT_TRIES = 10

# Feature name -> (shape kind, dtype); "L" = seq_len, "P" = max_predictions_per_seq.
FEATURES: dict[str, tuple[str, type]] = {
    "input_ids": ("L", np.int32),
    "input_mask": ("L", np.int32),
    "segment_ids": ("L", np.int32),
    "masked_lm_positions": ("P", np.int32),
    "masked_lm_ids": ("P", np.int32),
    "masked_lm_weights": ("P", np.float32),
    "next_sentence_labels": ("", np.int32),
}


# ----------------------------------------------------------------------------- sentences

def split_sentences(text: str) -> list[str]:
    """Splits a document into sentences with BlingFire's rule-based sentence breaker.

    Line breaks inside a document are treated as spaces first, so hard-wrapped text (the
    bundled novels) splits at sentence ends, not at line ends. Sentences are stripped;
    empty ones are dropped. (BlingFire is ~50x faster than pysbd on the bundled corpus, with
    the same or better boundaries, e.g. inside quotations.)
    """
    # imported here: only jobs that split text need BlingFire (a 42 MB wheel that a GPU machine
    # running benchmarks on synthetic batches need not carry)
    import blingfire

    if not text or text.isspace():
        return []
    flat = " ".join(text.split())
    return [s.strip() for s in blingfire.text_to_sentences(flat).split("\n") if s.strip()]


class TokenizedDocuments(Sequence):
    """Random access to documents as tokenised sentences, with an LRU cache.

    `docs[i]` is a tuple of int32[n_s] arrays, one per non-empty sentence of document i.
    """

    def __init__(self, documents: Sequence[str], tokenizer, cache_size: int = 4096):
        """Args:
          documents: random-access sequence of document strings (`len`, `[i] -> str`).
          tokenizer: anything with `encode_batch(list[str]) -> list[list[int]]`.
          cache_size: documents kept tokenised (random-next re-reads other documents).
        """
        self.documents = documents
        self.tokenizer = tokenizer
        self._get = functools.lru_cache(maxsize=cache_size)(self._load)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        if not 0 <= i < len(self):
            raise IndexError(f"document index {i} out of range for {len(self)} documents")
        return self._get(int(i))

    def _load(self, i: int) -> tuple[np.ndarray, ...]:
        sentences = split_sentences(self.documents[i])
        if not sentences:
            return ()
        ids = self.tokenizer.encode_batch(sentences)
        return tuple(np.asarray(s, dtype=np.int32) for s in ids if len(s))


# ----------------------------------------------------------------------------- NSP pairs

@dataclasses.dataclass(frozen=True)
class PairInstance:
    """One NSP pair before masking.

    Attributes:
      tokens_a: int32[na] segment A (truncated).
      tokens_b: int32[nb] segment B (truncated).
      is_random_next: B was taken from another document (label 1).
      target_length: the document's target_seq_length (diagnostic).
      chunk_sentences: sentences in the chunk A was cut from (diagnostic).
      b_document: index of the document B came from.
    """
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    is_random_next: bool
    target_length: int
    chunk_sentences: int
    b_document: int


def _concat(sentences: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(sentences).astype(np.int32) if sentences else _EMPTY


def _sentences(documents: Sequence, i: int) -> list[np.ndarray]:
    return [np.asarray(s, dtype=np.int32) for s in documents[i] if len(s)]


def truncate_seq_pair(tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Removes tokens until `len(a) + len(b) <= max_num_tokens`.

    Each step removes one token from the longer sequence (B on ties), from its front or its
    back with probability 0.5 each. Returns the truncated (a, b) views.
    """
    excess = len(tokens_a) + len(tokens_b) - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    front = rng.random(excess) < 0.5
    a_lo, a_hi, b_lo, b_hi = 0, len(tokens_a), 0, len(tokens_b)
    for step in range(excess):
        if a_hi - a_lo > b_hi - b_lo:
            a_lo, a_hi = (a_lo + 1, a_hi) if front[step] else (a_lo, a_hi - 1)
        else:
            b_lo, b_hi = (b_lo + 1, b_hi) if front[step] else (b_lo, b_hi - 1)
    return tokens_a[a_lo:a_hi], tokens_b[b_lo:b_hi]


def _random_document(document_index: int, documents: Sequence,
                     rng: np.random.Generator) -> tuple[int, list[np.ndarray]] | None:
    """A uniformly random *other* non-empty document (the same one if it is the only one)."""
    n = len(documents)
    for _ in range(_RANDOM_DOCUMENT_TRIES):
        if n == 1:
            j = 0
        else:
            j = int(rng.integers(0, n - 1))
            j += j >= document_index  # skip this document
        sentences = _sentences(documents, j)
        if sentences:
            return j, sentences
    return None


def _random_segment(sentences: list[np.ndarray], target_length: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Sentences from a random start until `target_length` tokens are reached."""
    start = int(rng.integers(0, len(sentences)))
    taken, length = [], 0
    for s in sentences[start:]:
        taken.append(s)
        length += len(s)
        if length >= target_length:
            break
    return _concat(taken)


def document_target_length(max_num_tokens: int, short_seq_prob: float,
                           rng: np.random.Generator) -> int:
    """`max_num_tokens`, or with probability `short_seq_prob` a random int in [2, max]."""
    if rng.random() < short_seq_prob:
        return int(rng.integers(2, max_num_tokens + 1))
    return max_num_tokens


def create_instances_from_document(document_index: int, documents: Sequence, *,
                                   max_seq_length: int, short_seq_prob: float,
                                   rng: np.random.Generator) -> list[PairInstance]:
    """All NSP pairs of one document (see the module docstring for the procedure).

    Args:
      document_index: which document of `documents`.
      documents: random access to tokenised documents: `documents[i]` is a sequence of
        int token arrays (one per sentence), e.g. `TokenizedDocuments`.
      max_seq_length: L; pairs fit `[CLS] A [SEP] B [SEP]` in L tokens. Needs L >= 5.
      short_seq_prob: probability of a short target length for this document.
      rng: consumed deterministically.
    """
    max_num_tokens = max_seq_length - 3
    if max_num_tokens < 2:
        raise ValueError(f"max_seq_length={max_seq_length} is too short for NSP pairs; "
                         "use at least 5 ([CLS] A [SEP] B [SEP]).")
    document = _sentences(documents, document_index)
    target = document_target_length(max_num_tokens, short_seq_prob, rng)
    instances: list[PairInstance] = []
    chunk: list[np.ndarray] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = _concat(chunk[:a_end])
            tokens_b, b_document = None, document_index
            is_random_next = len(chunk) == 1 or rng.random() < 0.5
            if is_random_next:
                picked = _random_document(document_index, documents, rng)
                if picked is not None:
                    b_document, other = picked
                    tokens_b = _random_segment(other, target - len(tokens_a), rng)
                i -= len(chunk) - a_end  # put the unused sentences back
            else:
                tokens_b = _concat(chunk[a_end:])
            if tokens_b is not None:
                a, b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                instances.append(PairInstance(a, b, is_random_next, target, len(chunk),
                                              b_document))
            chunk, chunk_length = [], 0
        i += 1
    return instances


def pair_tokens(pair: PairInstance, cls_id: int, sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] A [SEP] B [SEP]` ids and segment ids (0 for CLS+A+SEP, 1 for B+SEP), int32[n]."""
    na, nb = len(pair.tokens_a), len(pair.tokens_b)
    tokens = np.concatenate([[cls_id], pair.tokens_a, [sep_id], pair.tokens_b, [sep_id]])
    segments = np.concatenate([np.zeros(na + 2, np.int32), np.ones(nb + 1, np.int32)])
    return tokens.astype(np.int32), segments


# ----------------------------------------------------------------------------- MLM-only

def pack_sentences(sentences: Iterable[tuple[tuple, np.ndarray]],
                   max_tokens: int) -> list[tuple[tuple, np.ndarray]]:
    """Packs consecutive sentences into segments of at most `max_tokens` tokens.

    RoBERTa FULL-SENTENCES style: sentences stay whole and packing continues across
    document boundaries; a sentence longer than `max_tokens` is cut into pieces.

    Args:
      sentences: (key tuple, int32[n]) in stream order, e.g. key = (document, sentence).
    Returns:
      list of (key + (token offset,) of the segment's first token, int32[<= max_tokens]).
    """
    out = []
    parts: list[np.ndarray] = []
    length, key = 0, None
    for sentence_key, tokens in sentences:
        for offset in range(0, len(tokens), max_tokens):
            piece = tokens[offset:offset + max_tokens]
            if parts and length + len(piece) > max_tokens:
                out.append((key, _concat(parts)))
                parts, length = [], 0
            if not parts:
                key = tuple(sentence_key) + (offset,)
            parts.append(piece)
            length += len(piece)
    if parts:
        out.append((key, _concat(parts)))
    return out


def single_segment_tokens(tokens: np.ndarray, cls_id: int,
                          sep_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] tokens [SEP]` ids and all-zero segment ids, int32[n + 2]."""
    ids = np.concatenate([[cls_id], tokens, [sep_id]]).astype(np.int32)
    return ids, np.zeros(len(ids), np.int32)


# ----------------------------------------------------------------------------- features

@dataclasses.dataclass(frozen=True)
class TrainingInstance:
    """A masked instance, unpadded (n tokens, m predictions).

    Attributes:
      input_ids: int32[n] masked ids, specials included.
      segment_ids: int32[n].
      masked_lm_positions: int32[m] ascending.
      masked_lm_ids: int32[m] original ids at those positions.
      next_sentence_label: 1 = random next (not-next), 0 = actual continuation / no NSP.
    """
    input_ids: np.ndarray
    segment_ids: np.ndarray
    masked_lm_positions: np.ndarray
    masked_lm_ids: np.ndarray
    next_sentence_label: int


def empty_features(batch: int, seq_len: int, max_predictions: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """All-padding feature arrays `[batch, ...]` (see FEATURES for names/dtypes)."""
    sizes = {"L": (seq_len,), "P": (max_predictions,), "": ()}
    out = {name: np.zeros((batch,) + sizes[kind], dtype)
           for name, (kind, dtype) in FEATURES.items()}
    out["input_ids"][:] = pad_id
    out["masked_lm_ids"][:] = pad_id
    return out


def write_features(features: dict[str, np.ndarray], row: int, inst: TrainingInstance) -> None:
    """Writes `inst` into row `row` of padded `features` (from `empty_features`)."""
    seq_len = features["input_ids"].shape[1]
    max_predictions = features["masked_lm_positions"].shape[1]
    n, m = len(inst.input_ids), len(inst.masked_lm_positions)
    if n > seq_len or m > max_predictions:
        raise ValueError(f"instance of {n} tokens / {m} predictions does not fit "
                         f"seq_len={seq_len} / max_predictions_per_seq={max_predictions}")
    features["input_ids"][row, :n] = inst.input_ids
    features["input_mask"][row, :n] = 1
    features["segment_ids"][row, :n] = inst.segment_ids
    features["masked_lm_positions"][row, :m] = inst.masked_lm_positions
    features["masked_lm_ids"][row, :m] = inst.masked_lm_ids
    features["masked_lm_weights"][row, :m] = 1.0
    features["next_sentence_labels"][row] = inst.next_sentence_label


def instance_features(inst: TrainingInstance, seq_len: int, max_predictions: int,
                      pad_id: int) -> dict[str, np.ndarray]:
    """Padded features of one instance: shapes [L], [P] or [] (see FEATURES)."""
    features = empty_features(1, seq_len, max_predictions, pad_id)
    write_features(features, 0, inst)
    return {k: v[0] for k, v in features.items()}
