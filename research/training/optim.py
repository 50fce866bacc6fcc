"""Optimizer and learning-rate schedules (optax)."""

from __future__ import annotations

import re
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


@gin.configurable
def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0,
                           schedule: str = "cosine", final_fraction: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then one of:

    cosine: cosine decay to `final_fraction * learning_rate` at `total_steps`;
    linear: linear decay to `final_fraction * learning_rate` at `total_steps`;
    rsqrt:  learning_rate * sqrt(warmup_steps / step) after warmup (T5's inverse square root);
    constant.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"learning_rate_schedule.schedule={schedule!r}; choose one of {SCHEDULES}.")
    warmup_steps = max(0, int(warmup_steps))
    decay_steps = max(1, int(total_steps) - warmup_steps)
    end = learning_rate * final_fraction
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_fraction)
    elif schedule == "linear":
        after = optax.linear_schedule(learning_rate, end, decay_steps)
    elif schedule == "rsqrt":
        w = max(1, warmup_steps)
        after = lambda count: learning_rate * jax.lax.rsqrt((count + w) / w)  # noqa: E731
    else:
        after = optax.constant_schedule(learning_rate)
    if not warmup_steps:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


DEFAULT_NO_DECAY = r"(bias|scale|norm|embedding_norm)"


def weight_decay_mask(params: Any, exclude_regex: str = DEFAULT_NO_DECAY) -> Any:
    """True for parameters that get weight decay: all but those whose path matches the regex.

    Paths look like `decoder/layer_0/attention/query/bias`; by default norms and biases are
    excluded, as in BERT and GPT-2 training.
    """
    pattern = re.compile(exclude_regex) if exclude_regex else None

    def decays(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return not (pattern and pattern.search(name))

    return jax.tree_util.tree_map_with_path(decays, params)


_EMBEDDING = re.compile(r"(^|/)(token_embed|position_embed|type_embed|embedding_norm)(/|$)")
_LAYER = re.compile(r"(^|/)layer_(\d+)(/|$)")
_SCANNED = re.compile(r"(^|/)layers(/|$)")


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def update_multipliers(params: Any, layer_decay: float | None = None,
                       frozen_regex: str | None = None) -> Any:
    """Per-parameter factors applied to the final updates (pytree like `params`).

    Layer-wise learning-rate decay: embeddings get `layer_decay ** (L + 1)`, layer i
    `layer_decay ** (L - i)`, everything above the stack (final norm, pooler, heads) 1. Scanned
    layers get a factor per layer along their leading axis. Parameters whose path matches
    `frozen_regex` get 0 (no update at all, weight decay included).
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    num_layers = 0
    for p, x in leaves:
        name = _path(p)
        if m := _LAYER.search(name):
            num_layers = max(num_layers, int(m.group(2)) + 1)
        elif _SCANNED.search(name):
            num_layers = max(num_layers, x.shape[0])
    frozen = re.compile(frozen_regex) if frozen_regex else None

    def factor(p, x):
        name = _path(p)
        if frozen is not None and frozen.search(name):
            return jnp.zeros((), jnp.float32)
        if not layer_decay:
            return jnp.ones((), jnp.float32)
        if _EMBEDDING.search(name):
            return jnp.asarray(layer_decay ** (num_layers + 1), jnp.float32)
        if m := _LAYER.search(name):
            return jnp.asarray(layer_decay ** (num_layers - int(m.group(2))), jnp.float32)
        if _SCANNED.search(name):
            per_layer = layer_decay ** (num_layers - jnp.arange(x.shape[0], dtype=jnp.float32))
            return per_layer.reshape((-1,) + (1,) * (len(x.shape) - 1))
        return jnp.ones((), jnp.float32)

    return jax.tree_util.tree_map_with_path(factor, params)


def scale_updates_by_path(layer_decay: float | None, frozen_regex: str | None) -> optax.GradientTransformation:
    """Multiplies each update by its `update_multipliers` factor (computed at trace time)."""

    def update(updates, state, params=None):
        factors = update_multipliers(updates, layer_decay, frozen_regex)
        return jax.tree.map(lambda u, f: (u * f).astype(u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


@gin.configurable
def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int = 0, *,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 0.01, no_decay_regex: str = DEFAULT_NO_DECAY,
                   clip_norm: float | None = 1.0, layer_decay: float | None = None,
                   frozen_regex: str | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and a warmup schedule. Returns (optimizer, schedule).

    `layer_decay` (e.g. 0.9) scales layer i's updates by layer_decay ** (L - i) (layer-wise
    LR decay for fine-tuning); `frozen_regex` (e.g. '^(encoder|decoder)/') freezes matching
    parameters.
    """
    schedule = learning_rate_schedule(learning_rate, total_steps, warmup_steps)
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=lambda p: weight_decay_mask(p, no_decay_regex)))
    if layer_decay or frozen_regex:
        parts.append(scale_updates_by_path(layer_decay, frozen_regex))
    return optax.chain(*parts), schedule
