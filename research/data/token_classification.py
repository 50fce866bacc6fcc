"""Batches of word-tagged sentences for token classification, labels aligned to sub-word
pieces (as HF `run_ner` and google-research/bert's NER recipes do).

Each word is tokenised on its own; the pieces of a sentence are laid out as a single text
(`[CLS] pieces [SEP]`, `research.data.classification.encoding.assemble`, cut to seq_len).
The first piece of each word carries the word's label; every other position (later pieces,
[CLS], [SEP], padding) has label -1 and weight 0. `word_start` marks the first pieces, so
predictions map back to words in order (`word_predictions`). Words cut off by the sequence
length (or that tokenise to no piece) have no first piece: they are neither trained on nor
scored, as in `run_ner`; `coverage` counts them.

Example order, host sharding and resumable state are the classification iterator's
(`ClassificationIterator`): identical global batches for any process count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from research.data.classification.encoding import TokenizerLike, assemble
from research.data.classification.iterator import ClassificationIterator
from research.data.conll import TaggedSentences

IGNORE = -1  # label of positions that are not the first piece of a labelled word
Batch = dict[str, np.ndarray]


def align_labels(word_pieces: Sequence[Sequence[int]], word_labels: Sequence[int],
                 budget: int) -> tuple[list[int], list[int], list[int]]:
    """Pieces of one sentence with their labels, cut to `budget` pieces.

    Args:
      word_pieces: the piece ids of each word.
      word_labels: the label id of each word (-1: unlabeled).
      budget: the most pieces kept (seq_len minus the special tokens).
    Returns:
      (pieces, labels, word_start), each of length min(total pieces, budget): labels[i] is
      the word's label at the first piece of a word and IGNORE elsewhere; word_start[i] is 1
      at the first piece of a word, else 0.
    """
    pieces, labels, starts = [], [], []
    for ids, label in zip(word_pieces, word_labels, strict=True):
        for j, piece in enumerate(ids):
            pieces.append(int(piece))
            labels.append(int(label) if j == 0 else IGNORE)
            starts.append(1 if j == 0 else 0)
    return pieces[:budget], labels[:budget], starts[:budget]


def word_predictions(values: np.ndarray, word_start: np.ndarray) -> np.ndarray:
    """The values (e.g. predicted label ids) of a row's words, in order: `values` [T] at the
    positions where `word_start` [T] is set."""
    return np.asarray(values)[np.asarray(word_start).astype(bool)]


def coverage(sentences: TaggedSentences, tokenizer: TokenizerLike,
             seq_len: int) -> tuple[int, int]:
    """(words that get a first piece at `seq_len`, all words) of `sentences`."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    kept = 0
    for words in sentences.words:
        pieces = encode_batch(list(words)) if encode_batch else [tokenizer.encode(w) for w in words]
        _, _, starts = align_labels(pieces, [0] * len(words), max(seq_len - 2, 0))
        kept += sum(starts)
    return kept, sentences.num_words


class TokenClassificationIterator(ClassificationIterator):
    """Batches of tagged sentences, each a dict of numpy arrays with leading dim b =
    global_batch_size // process_count:
      input_ids int32[b, seq_len] ([CLS] pieces [SEP], then pad_id), input_mask int32[b,
      seq_len] (1 real, 0 padding), token_type_ids int32[b, seq_len] (0),
      label int32[b, seq_len] (the word's label at its first piece, -1 elsewhere),
      word_start int32[b, seq_len] (1 at the first piece of each word), weight float32[b]
      (1 real row, 0 padding row), index int32[b] (sentence index, -1 for padding rows).
    """

    def __init__(self, sentences: TaggedSentences, tokenizer: TokenizerLike, **kwargs: Any):
        super().__init__(sentences, tokenizer, **kwargs)  # type: ignore[arg-type]

    def _make_batch(self, indices: np.ndarray) -> Batch:
        b, L = len(indices), self.seq_len
        input_ids = np.full((b, L), self.tokenizer.pad_id, np.int32)
        label = np.full((b, L), IGNORE, np.int32)
        word_start = np.zeros((b, L), np.int32)
        lengths = np.zeros(b, np.int64)
        real = np.flatnonzero(indices >= 0)
        sentences = [int(indices[r]) for r in real]
        flat = [w for k in sentences for w in self.examples.words[k]]
        encoded = self._encode_many(flat) if flat else []
        offset = 0
        for row, k in zip(real, sentences):
            n = len(self.examples.words[k])
            pieces, labels, starts = align_labels(encoded[offset:offset + n],
                                                  self.examples.labels[k], max(L - 2, 0))
            offset += n
            ids, _ = assemble([pieces], self.tokenizer, L, self.style)
            input_ids[row, :len(ids)] = ids
            label[row, 1:1 + len(labels)] = labels
            word_start[row, 1:1 + len(starts)] = starts
            lengths[row] = len(ids)
        return {
            "input_ids": input_ids,
            "input_mask": (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32),
            "token_type_ids": np.zeros((b, L), np.int32),
            "label": label,
            "word_start": word_start,
            "weight": (indices >= 0).astype(np.float32),
            "index": indices.astype(np.int32),
        }

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "kind": "token_classification"}


def make_token_classification_iterator(sentences: TaggedSentences, tokenizer: TokenizerLike, *,
                                       seq_len: int, global_batch_size: int, seed: int,
                                       process_index: int = 0, process_count: int = 1,
                                       repeat: bool = True, shuffle: bool | None = None
                                       ) -> TokenClassificationIterator:
    """Batches of [global_batch_size // process_count] sentences in the encoder layout (see
    `TokenClassificationIterator`; the other arguments as `make_classification_iterator`)."""
    return TokenClassificationIterator(sentences, tokenizer, seq_len=seq_len,
                                       global_batch_size=global_batch_size, seed=seed,
                                       style="encoder", process_index=process_index,
                                       process_count=process_count, repeat=repeat,
                                       shuffle=shuffle)
