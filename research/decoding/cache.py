"""The KV-cache mechanics every decoder here shares: left-padded prompts, the prompt prefill,
one cached decode step, and reordering the cache's rows (beam search).

Prompts of different lengths are left-padded into one batch; padding is its own segment (id 0),
so real tokens never attend to it, and positions count real tokens only. Every new token is
segment 1 at the next position of its row. These functions run inside the jitted decoders
(`research.decoding.sampling`, `.beam_search`) under their `Layout`'s context.

Shapes: B batch rows, P padded prompt length, V vocab; the cache holds max_len positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.decoding.layout import Layout, scan_axes
from research.errors import ConfigError
from research.models.transformer import CausalLM

Array = jax.Array
Cache = Any  # the model's `cache` collection (research.models.attention.Attention)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns tokens int32[B, P] and segment ids int32[B, P] (1 = prompt token, 0 = padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token (the tokenizer's BOS is "
                          "prepended by the CLI, so pass text).")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        tokens[row, width - len(p):] = p
        segments[row, width - len(p):] = 1
    return tokens, segments


def check_length(model: CausalLM, prompt_width: int, max_new_tokens: int) -> None:
    """ConfigError if the padded prompt plus the new tokens do not fit the model's max_len."""
    limit = model.cfg.max_len
    if prompt_width + max_new_tokens > limit:
        raise ConfigError(f"prompt ({prompt_width} tokens) + max_new_tokens ({max_new_tokens}) "
                          f"exceeds the model's max_len {limit}; shorten one of them.")


CACHE_MULTIPLE = 256  # cache lengths are rounded up to this, so few lengths compile


def cache_sized(model: CausalLM, length: int) -> CausalLM:
    """`model` with a KV cache of `length` positions rounded up to CACHE_MULTIPLE (at most its
    max_len), when its positions take no table of max_len rows (rotary or none: the parameters
    are the same); learned positions keep max_len. A Llama-3 config's max_len of 131072 would
    otherwise allocate a cache that long for a short generation."""
    cfg = model.cfg
    size = min(cfg.max_len, -(-length // CACHE_MULTIPLE) * CACHE_MULTIPLE)
    if cfg.position == "learned" or size == cfg.max_len:
        return model
    return CausalLM(dataclasses.replace(cfg, max_len=size))


def prompt_positions(segments: Array) -> Array:
    """Positions int32[B, P] counting real tokens from 0 (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)


def mask_vocab(logits: Array, vocab_limit: int | Array) -> Array:
    """float32 logits [B, V] with the ids >= vocab_limit (the model's vocabulary padding
    beyond the tokenizer's, TransformerConfig.vocab_multiple) at -inf: never generated."""
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def prefill(model: CausalLM, params: Any, tokens: Array, segments: Array, layout: Layout,
            vocab_limit: int | Array) -> tuple[Cache, Array, Array]:
    """Runs the prompts tokens/segments int32[B, P] through the model into an empty cache.
    Returns (cache, float32 logits [B, V] of each row's next token (`mask_vocab`ed), the next
    position int32[B])."""
    positions = prompt_positions(segments)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens[:, :1],
                                               decode=True)["cache"])
    cache = layout.constrain_cache(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens,
                                  segment_ids=segments, positions=positions, decode=True,
                                  mutable=["cache"])
    return (layout.constrain_cache(mutated["cache"]), mask_vocab(logits[:, -1], vocab_limit),
            positions[:, -1] + 1)


def step(model: CausalLM, params: Any, cache: Cache, token: Array, position: Array,
         layout: Layout, vocab_limit: int | Array) -> tuple[Cache, Array]:
    """Appends one token int32[B] at `position` int32[B] to each row. Returns (cache, float32
    logits [B, V] of the token after it, `mask_vocab`ed)."""
    logits, mutated = model.apply(
        {"params": params, "cache": cache}, token[:, None],
        segment_ids=jnp.ones((token.shape[0], 1), jnp.int32), positions=position[:, None],
        decode=True, mutable=["cache"])
    return layout.constrain_cache(mutated["cache"]), mask_vocab(logits[:, -1], vocab_limit)


def reorder(cache: Cache, rows: Array) -> Cache:
    """The cache whose row i is the old row `rows[i]` (rows int32[B'], B' may differ from B):
    every leaf with a batch axis (the first after a scan 'layers' axis) is gathered, the write
    index is shared and kept."""

    def take(path, x):
        axis = scan_axes(path, x)
        return x if x.ndim <= axis else jnp.take(x, rows, axis=axis)

    return jax.tree_util.tree_map_with_path(take, cache)
