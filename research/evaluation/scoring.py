"""Per-token log-probabilities of a causal LM over many token sequences: batched, jitted once
per bucket length, with the parameters and the batch sharded over a `Layout`'s mesh.

A request is (inputs, targets): int token lists of one length T <= max_length, inputs[t]
predicting targets[t]. Requests are sorted by length, cut into batches of `batch_size` rows,
right-padded to the smallest bucket length that holds the longest (16, 32, 64, ... and
max_length) and the batch to `batch_size` rows, so the scoring function compiles once per
bucket, not per request. Padding is segment 0; real tokens are segment 1 at positions
0..T-1, and a causal model's real tokens never see the right padding.

For each target: its log-probability, log_softmax over the model's whole vocabulary (as the
training loss), and whether it is the greedy choice: the argmax over the ids below
`vocab_limit` (the tokenizer's vocabulary, as `research.generate` decodes).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from research.decoding.cache import mask_vocab
from research.decoding.layout import Layout
from research.errors import ConfigError
from research.models.transformer import CausalLM

MIN_BUCKET = 16


def bucket_lengths(max_length: int) -> list[int]:
    """The padded lengths: powers of two from MIN_BUCKET below max_length, then max_length."""
    out, length = [], MIN_BUCKET
    while length < max_length:
        out.append(length)
        length *= 2
    return out + [max_length]


@functools.partial(jax.jit, static_argnames=("model", "layout"))
def token_scores(model: CausalLM, params: Any, inputs: jax.Array, targets: jax.Array,
                 segment_ids: jax.Array, positions: jax.Array, vocab_limit: int | jax.Array, *,
                 layout: Layout) -> tuple[jax.Array, jax.Array]:
    """inputs, targets, segment_ids, positions int32[B, T] -> (log p(targets) float32[B, T],
    is-greedy bool[B, T]); the greedy choice is taken over ids < vocab_limit."""
    logits = model.apply({"params": params}, inputs, segment_ids=segment_ids,
                         positions=positions)  # float32 [B, T, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(mask_vocab(logits, vocab_limit), axis=-1) == targets
    batch = layout.sharding(("act_batch", None), inputs.shape)
    return (jax.lax.with_sharding_constraint(picked, batch),
            jax.lax.with_sharding_constraint(greedy, batch))


class Scorer:
    """Scores token sequences with `model`/`params` (placed by `layout.put_params`).

    Args:
      batch_size: rows per forward pass (every batch is padded to it).
      max_length: the longest sequence (tokens per row) a request may have.
      vocab_limit: ids >= this are never greedy (default: the model's vocabulary).
    """

    def __init__(self, model: CausalLM, params: Any, layout: Layout, *, batch_size: int,
                 max_length: int, vocab_limit: int | None = None):
        if batch_size < 1 or max_length < 1:
            raise ConfigError(f"batch_size={batch_size} and max_length={max_length} must be "
                              "at least 1.")
        if max_length > model.cfg.max_len:
            raise ConfigError(f"a window of {max_length} tokens exceeds the model's max_len "
                              f"{model.cfg.max_len}; pass a smaller --seq_len.")
        self.model, self.params, self.layout = model, params, layout
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.vocab_limit = int(vocab_limit or model.cfg.vocab_size)
        self.buckets = bucket_lengths(self.max_length)

    def score_arrays(self, inputs: np.ndarray, targets: np.ndarray, segment_ids: np.ndarray,
                     positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One packed batch, int32[B, T] each (B <= batch_size, T a bucket length or any T
        <= max_length) -> host (log-probs float32[B, T], greedy bool[B, T])."""
        rows = inputs.shape[0]
        pad = self.batch_size - rows
        if pad > 0:  # a fixed batch shape: one compilation per length
            inputs, targets, segment_ids, positions = (
                np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
                for x in (inputs, targets, segment_ids, positions))
        with self.layout.context():
            put = self.layout.batch
            logp, greedy = token_scores(self.model, self.params, put(inputs), put(targets),
                                        put(segment_ids), put(positions), self.vocab_limit,
                                        layout=self.layout)
        return np.asarray(logp)[:rows], np.asarray(greedy)[:rows]

    def bucket(self, length: int) -> int:
        """The smallest bucket length >= `length`."""
        if length > self.max_length:
            raise ConfigError(f"a sequence of {length} tokens exceeds the scoring window of "
                              f"{self.max_length}.")
        return next(b for b in self.buckets if b >= length)

    def score(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
              progress: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each request's (log-probs float32[T], greedy bool[T]), in the order given; with
        `progress`, a progress bar of that name over the batches."""
        if len(inputs) != len(targets) or any(len(a) != len(b) or not a
                                              for a, b in zip(inputs, targets)):
            raise ValueError("every request needs inputs and targets of one non-zero length")
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        out: list[Any] = [None] * len(inputs)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, unit="batch"):
            chunk = order[start:start + self.batch_size]
            width = self.bucket(len(inputs[chunk[0]]))
            arrays = np.zeros((4, len(chunk), width), np.int32)  # inputs, targets, segs, pos
            for row, i in enumerate(chunk):
                n = len(inputs[i])
                arrays[0, row, :n], arrays[1, row, :n] = inputs[i], targets[i]
                arrays[2, row, :n], arrays[3, row, :n] = 1, np.arange(n)
            logp, greedy = self.score_arrays(*arrays)
            for row, i in enumerate(chunk):
                n = len(inputs[i])
                out[i] = (logp[row, :n], greedy[row, :n])
        return out
