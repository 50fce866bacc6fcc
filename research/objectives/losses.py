"""Losses and metric reductions.

Metrics travel as `{name: (numerator_sum, denominator_sum)}` so that sums over microbatches,
devices, steps and eval batches stay exact; `summarize` divides at the end.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

MetricSums = dict[str, tuple[jax.Array, jax.Array]]


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """Per-token cross entropy and correctness.

    logits: float[..., V]; targets: int[...]; weights: float[...].
    Returns (sum of weighted losses, sum of weighted correct predictions, sum of weights).
    """
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    return jnp.sum(losses * weights), jnp.sum(correct * weights), jnp.sum(weights)


def chunked_cross_entropy(hidden: jax.Array, project_fn: Callable[[jax.Array], jax.Array],
                          targets: jax.Array, weights: jax.Array, chunk_size: int):
    """`weighted_cross_entropy(project_fn(hidden), targets, weights)` without the full logits.

    hidden: [B, T, D]; project_fn: [B, c, D] -> logits [B, c, V]; targets: int[B, T];
    weights: float[B, T]. Scans over T in chunks of `chunk_size` (the last chunk padded with
    weight 0); each chunk's projection + cross entropy sits under `jax.checkpoint`, so only one
    [B, chunk, V] block of logits is alive at a time in the forward pass and in the backward
    pass (which recomputes it). Returns the same three sums as `weighted_cross_entropy`.
    """
    b, t, d = hidden.shape
    chunk_size = max(1, min(int(chunk_size), t))
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))  # padded positions weigh 0

    def split(x):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.swapaxes(x.reshape(b, n, chunk_size, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_sums(h, tgt, w):
        return weighted_cross_entropy(project_fn(h), tgt, w)

    def body(carry, xs):
        sums = chunk_sums(*xs)
        return tuple(a + s for a, s in zip(carry, sums)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(body, (zero, zero, zero), (split(hidden), split(targets), split(weights)))
    return sums


def add_sums(a: MetricSums, b: MetricSums) -> MetricSums:
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def summarize(sums: Mapping[str, tuple[float, float]], prefix: str = "",
              perplexity: bool = False) -> dict[str, float]:
    """Means from (numerator, denominator) sums; with `perplexity`, also exp(loss) (LM losses)."""
    out = {}
    for name, (num, den) in sums.items():
        value = float(num) / max(float(den), 1e-12)
        out[prefix + name] = value
        if name == "loss" and perplexity:
            out[prefix + "perplexity"] = math.exp(min(value, 80.0))
    return out
