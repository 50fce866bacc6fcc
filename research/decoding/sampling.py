"""Greedy decoding and sampling (temperature, top-k, top-p) with a KV cache.

`start` prefills the prompts; `run` then generates tokens in a `lax.while_loop` until a given
step count or until every row has emitted EOS. Both are jitted once per shape and `Layout`
(the step bound is a traced argument), so the host may run the loop in chunks, checking stop
strings between them (`research.generate`), without recompiling. A row that is done feeds
padding and records `pad_id`.

Greedy decoding (temperature 0) equals Hugging Face `generate(do_sample=False)` token for
token (tests/test_generate_hf_parity.py).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from research.decoding import cache as cache_lib
from research.decoding.layout import Layout
from research.models.transformer import CausalLM

Array = jax.Array


class State(NamedTuple):
    """Decoding state of B rows, N = max_new_tokens."""

    cache: Any  # the model's KV cache, B rows
    logits: Array  # float32 [B, V]: next-token logits of each row
    position: Array  # int32 [B]: position of each row's next token
    tokens: Array  # int32 [B, N]: generated tokens (pad_id after EOS and after `step`)
    done: Array  # bool [B]: the row has emitted EOS (or was stopped by the host)
    rng: Array  # PRNG key
    step: Array  # int32 []: tokens generated so far


def sample_logits(logits: Array, rng: Array, temperature: float, top_k: int,
                  top_p: float) -> Array:
    """Draws one token int32[B] per row from float logits [B, V]; temperature 0 is argmax."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        cutoff_index = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1  # keep >= 1 token
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _constrain(state: State, layout: Layout) -> State:
    """Pins the batch-major leaves to act_batch, so `run`'s inputs and outputs are laid out
    alike (one compilation however often the host calls it)."""
    def batch(x):
        logical = ("act_batch",) + (None,) * (x.ndim - 1)
        return jax.lax.with_sharding_constraint(x, layout.sharding(logical, x.shape))
    return state._replace(cache=layout.constrain_cache(state.cache), logits=batch(state.logits),
                          position=batch(state.position), tokens=batch(state.tokens),
                          done=batch(state.done))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "layout"))
def start(model: CausalLM, params: Any, tokens: Array, segments: Array, rng: Array, *,
          max_new_tokens: int, pad_id: int | Array, vocab_limit: int | Array,
          layout: Layout) -> State:
    """Prefills the left-padded prompts tokens/segments int32[B, P]; ids >= vocab_limit are
    never generated."""
    cache, logits, position = cache_lib.prefill(model, params, tokens, segments, layout,
                                                vocab_limit)
    b = tokens.shape[0]
    state = State(cache, logits, position, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                  jnp.zeros((b,), bool), rng, jnp.zeros((), jnp.int32))
    return _constrain(state, layout)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p", "layout"),
                   donate_argnames=("state",))
def run(model: CausalLM, params: Any, state: State, until: int | Array, *, temperature: float,
        top_k: int, top_p: float, eos_id: int | Array, pad_id: int | Array,
        vocab_limit: int | Array, layout: Layout) -> State:
    """Generates until `state.step` reaches `until` (at most N) or every row is done. `until`,
    `eos_id` (-1: none), `pad_id` and `vocab_limit` are traced: changing them does not
    recompile."""

    def body(s: State) -> State:
        rng, draw = jax.random.split(s.rng)
        token = sample_logits(s.logits, draw, temperature, top_k, top_p)
        token = jnp.where(s.done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, s.step))
        cache, logits = cache_lib.step(model, params, s.cache, token, s.position, layout,
                                       vocab_limit)
        return _constrain(State(cache, logits, s.position + 1, tokens,
                                s.done | (token == eos_id), rng, s.step + 1), layout)

    return jax.lax.while_loop(lambda s: (s.step < until) & ~jnp.all(s.done), body, state)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_id", "pad_id"))
def generate_without_cache(model: CausalLM, params: Any, tokens: Array, segments: Array,
                           rng: Array, *, max_new_tokens: int, temperature: float, top_k: int,
                           top_p: float, eos_id: int, pad_id: int) -> Array:
    """The reference `start` + `run` are tested against: every step re-runs the whole
    (growing) sequence, no cache. Returns the new tokens int32[B, N]."""
    b, p = tokens.shape
    positions = cache_lib.prompt_positions(segments)
    seq = jnp.concatenate([tokens, jnp.full((b, max_new_tokens), pad_id, jnp.int32)], axis=1)
    seg = jnp.concatenate([segments, jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
    pos = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(max_new_tokens)], axis=1)

    def body(i, carry):
        seq, done, rng = carry
        rng, draw = jax.random.split(rng)
        logits = model.apply({"params": params}, seq, segment_ids=seg, positions=pos)
        last = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
        token = jnp.where(done, pad_id, sample_logits(last, draw, temperature, top_k, top_p))
        seq = jax.lax.dynamic_update_slice(seq, token[:, None], (0, p + i))
        return seq, done | (token == eos_id), rng

    seq, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (seq, jnp.zeros((b,), bool), rng))
    return seq[:, p:]
