"""Batches of a classification / regression split, identical for any process count.

The global batch of B rows holds the next B positions of the example order
(`research.data.order`: epoch e is `np.random.default_rng([seed, e]).permutation(N)`,
identity without shuffle). Host p of P yields rows [p*B/P, (p+1)*B/P) and tokenises only
those, so the concatenation of the host batches equals the P=1 batch for any P. The state
is the number of batches yielded, so it can even be restored under a different process
count.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from research.data.batching import check_batch_layout
from research.data.classification.encoding import TokenizerLike, assemble, special_ids
from research.data.classification.examples import Examples
from research.data.order import EpochOrder
from research.errors import ConfigError

STATE_VERSION = 1
Batch = dict[str, np.ndarray]


def epoch_steps(num_examples: int, global_batch_size: int) -> int:
    """Global batches in one pass over `num_examples`: ceil(num_examples / batch size)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    return -(-int(num_examples) // int(global_batch_size))


class ClassificationIterator:
    """Batches of a classification / regression split (see module docstring).

    Each batch is a dict of numpy arrays with leading dim b = global_batch_size //
    process_count:
      input_ids int32[b, seq_len] (pad_id after the text), input_mask int32[b, seq_len]
      (1 real token, 0 padding), token_type_ids int32[b, seq_len], label int32[b] (class id,
      -1 unlabeled) or float32[b] (regression, NaN unlabeled), weight float32[b] (1 real
      row, 0 padding row), index int32[b] (example index, -1 for padding rows),
      last_index int32[b] (position of the last real token; 0 for padding rows).
    Padding rows (repeat=False only) have all-pad input_ids, mask 0 and label 0.
    """

    def __init__(self, examples: Examples, tokenizer: TokenizerLike, *, seq_len: int,
                 global_batch_size: int, seed: int, style: str = "encoder",
                 process_index: int = 0, process_count: int = 1, repeat: bool = True,
                 shuffle: bool | None = None):
        check_batch_layout(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                           process_index=process_index, process_count=process_count)
        if len(examples) == 0:
            raise ValueError(f"Examples {examples.name!r} are empty; nothing to batch.")
        pair = len(examples.texts[0]) == 2
        special_ids(tokenizer, style, pair)  # validates style and special ids early
        if tokenizer.pad_id is None or tokenizer.pad_id < 0:
            raise ConfigError("The tokenizer has no [PAD] piece; retrain it with "
                              "tools/train_tokenizer.py.")
        self.examples = examples
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.style = style
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.repeat = bool(repeat)
        self.shuffle = self.repeat if shuffle is None else bool(shuffle)
        self.num_examples = len(examples)
        self.per_host = self.global_batch_size // self.process_count
        self.num_batches: int | None = (
            None if self.repeat else epoch_steps(self.num_examples, self.global_batch_size))
        self.position = 0  # global batches yielded so far
        self._row_offsets = np.arange(self.per_host, dtype=np.int64) + (
            self.process_index * self.per_host)
        self.order = EpochOrder(self.num_examples, self.seed, self.shuffle)

    # ----------------------------------------------------------------- example order

    def batch_indices(self, step: int) -> np.ndarray:
        """int64[b]: example indices of this host's rows of global batch `step` (-1: pad)."""
        epochs, indices = self.order.locate_many(
            step * self.global_batch_size + self._row_offsets)
        if not self.repeat:
            indices[epochs > 0] = -1
        return indices

    # ----------------------------------------------------------------------- batches

    def _make_batch(self, indices: np.ndarray) -> Batch:
        b, L = len(indices), self.seq_len
        input_ids = np.full((b, L), self.tokenizer.pad_id, np.int32)
        token_type_ids = np.zeros((b, L), np.int32)
        lengths = np.zeros(b, np.int64)
        real = np.flatnonzero(indices >= 0)
        if len(real):
            texts = [self.examples.texts[int(k)] for k in indices[real]]
            n_fields = len(texts[0])
            encoded = [self._encode_many([t[f] for t in texts]) for f in range(n_fields)]
            for r, row in enumerate(real):
                ids, types = assemble([enc[r] for enc in encoded], self.tokenizer, L,
                                      self.style)
                input_ids[row, :len(ids)] = ids
                token_type_ids[row, :len(types)] = types
                lengths[row] = len(ids)
        labels = self.examples.labels
        if self.examples.regression:
            label = np.zeros(b, np.float32)
            label[real] = labels[indices[real]]
        else:
            label = np.zeros(b, np.int32)
            label[real] = labels[indices[real]]
        return {
            "input_ids": input_ids,
            "input_mask": (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32),
            "token_type_ids": token_type_ids,
            "label": label,
            "weight": (indices >= 0).astype(np.float32),
            "index": indices.astype(np.int32),
            "last_index": np.maximum(lengths - 1, 0).astype(np.int32),
        }

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        batch = getattr(self.tokenizer, "encode_batch", None)
        return batch(texts) if batch is not None else [self.tokenizer.encode(t) for t in texts]

    def __iter__(self) -> ClassificationIterator:
        return self

    def __next__(self) -> Batch:
        if self.exhausted:
            raise StopIteration
        batch = self._make_batch(self.batch_indices(self.position))
        self.position += 1
        return batch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("A repeat=True classification iterator is endless; it has no "
                            "length (use epoch_steps(num_examples, global_batch_size)).")
        return self.num_batches

    @property
    def exhausted(self) -> bool:
        """True once a repeat=False pass has yielded all `num_batches` batches."""
        return self.num_batches is not None and self.position >= self.num_batches

    def close(self) -> None:
        """Nothing to release (no background thread); kept for the iterator contract."""

    # -------------------------------------------------------------------- checkpoints

    def _identity(self) -> dict[str, Any]:
        return {"kind": "classification", "version": STATE_VERSION, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "num_examples": self.num_examples, "repeat": self.repeat,
                "shuffle": self.shuffle, "style": self.style}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: batches yielded so far plus the configuration.

        The process layout is not part of it: the global batch sequence does not depend
        on it, so a state may be restored under another process count.
        """
        return {**self._identity(), "position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores `get_state()` output; the next batch is the one after the saved one.

        Raises:
          ConfigError: if the state was saved under a different seq_len / batch size / seed
            / dataset size / order / style (the user changed the run or its data).
          ValueError: if the state is malformed.
        """
        if not isinstance(state, dict):
            raise ValueError(f"Classification iterator state must be a dict, got "
                             f"{type(state).__name__}.")
        mismatched = [f"{key}: state has {state.get(key)!r}, iterator has {value!r}"
                      for key, value in self._identity().items() if state.get(key) != value]
        if mismatched:
            raise ConfigError(
                "Cannot restore classification iterator state saved under a different "
                "configuration (" + "; ".join(mismatched) + "). Resume with the same "
                "seq_len, global_batch_size, seed, dataset, repeat/shuffle and style, or "
                "start the data from scratch.")
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0 or (
                self.num_batches is not None and position > self.num_batches):
            limit = f" <= {self.num_batches}" if self.num_batches is not None else ""
            raise ValueError(f"Malformed classification iterator state: 'position' must be "
                             f"an integer >= 0{limit}, got {position!r}.")
        self.position = position


def make_classification_iterator(examples: Examples, tokenizer: TokenizerLike, *,
                                 seq_len: int, global_batch_size: int, seed: int,
                                 style: str = "encoder", process_index: int = 0,
                                 process_count: int = 1, repeat: bool = True,
                                 shuffle: bool | None = None) -> ClassificationIterator:
    """Batches of [global_batch_size // process_count] rows (see `ClassificationIterator`).

    Args:
      examples: from `load_examples`.
      tokenizer: has `encode` (and optionally `encode_batch`), `pad_id` and the special
        ids of the style.
      seq_len: tokens per row (texts truncated to fit, see `encode_example`).
      global_batch_size: rows of the global batch (all processes together).
      seed: example-order seed; epoch e uses `np.random.default_rng([seed, e])`.
      style: 'encoder' (BERT layout) or 'decoder' (GPT layout).
      process_index, process_count: this host yields global rows [p*b, (p+1)*b).
      repeat: True (train): endless epochs. False (eval): one pass of `num_batches` =
        ceil(N / global_batch_size) batches (the same on every host), the last padded
        with weight-0 rows, then StopIteration.
      shuffle: permute each epoch; default True when repeat, False otherwise.
    """
    return ClassificationIterator(examples, tokenizer, seq_len=seq_len,
                                  global_batch_size=global_batch_size, seed=seed, style=style,
                                  process_index=process_index, process_count=process_count,
                                  repeat=repeat, shuffle=shuffle)
