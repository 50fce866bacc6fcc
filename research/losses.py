"""Losses and metric reductions.

Metrics travel as `{name: (numerator_sum, denominator_sum)}` so that sums over microbatches,
devices, steps and eval batches stay exact; `summarize` divides at the end.
"""

from __future__ import annotations

import math
from typing import Mapping

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
