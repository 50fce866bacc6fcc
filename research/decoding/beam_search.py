"""Beam search with a KV cache, equal to Hugging Face `transformers`' `generate(num_beams=...,
do_sample=False)` (its vectorised `_beam_search`, transformers 4.50+/5.x), token for token.

Per row, `num_beams` running beams (the cache holds B * num_beams rows) and the `num_beams`
best finished hypotheses. Each step:
  1. scores = running beam score + log_softmax(logits): the 2 * num_beams best of the
     num_beams * V continuations;
  2. a continuation ending in EOS (or reaching max_new_tokens) "hits" the stopping criteria;
     the best num_beams that do not become the running beams (their cache rows reordered);
  3. those that hit, among the top num_beams of the 2 * num_beams only, are finished with the
     score sum_logprobs / generated_length ** length_penalty (the length counts the EOS), and
     the best num_beams finished ones are kept.
A row stops improving (HF's `_check_early_stop_heuristic`) once it has num_beams finished
hypotheses and, for `early_stopping=False` (HF's default), the best running score divided by
the current length ** length_penalty cannot beat the worst finished one; with "never" and a
positive length_penalty the divisor uses max_new_tokens instead; with True a row is closed as
soon as num_beams hypotheses finished. The loop ends when no row can improve. The result is
each row's best finished hypothesis. HF's -1e9 score masks are reproduced as written (in
float32), so ties break the same way.

Shapes: B batch rows, K = num_beams, N = max_new_tokens, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.decoding import cache as cache_lib
from research.decoding.layout import Layout
from research.errors import ConfigError
from research.models.transformer import CausalLM

Array = jax.Array
MASK = -1.0e9  # HF's score for "not this one"


class State(NamedTuple):
    cache: Any  # KV cache of the B * K running beams
    logits: Array  # float32 [B * K, V]
    position: Array  # int32 [B * K]: position of the next token
    running: Array  # int32 [B, K, N]: running beams' tokens
    running_scores: Array  # float32 [B, K]: their summed log-probabilities
    finished: Array  # int32 [B, K, N]: best finished hypotheses (pad after their length)
    scores: Array  # float32 [B, K]: their length-penalised scores (MASK: empty slot)
    lengths: Array  # int32 [B, K]: their lengths (EOS included)
    is_finished: Array  # bool [B, K]: the slot holds a finished hypothesis
    improvable: Array  # bool [B]: the row's finished set may still change
    step: Array  # int32 []


def _gather(x: Array, index: Array) -> Array:
    """x [B, M, ...] gathered along axis 1 by index int[B, J] -> [B, J, ...]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def beam_search(model: CausalLM, params: Any, tokens: Array, segments: Array, *,
                num_beams: int, max_new_tokens: int, eos_id: int, pad_id: int,
                length_penalty: float, early_stopping: bool | str, layout: Layout,
                vocab_limit: int | None = None) -> tuple[Array, Array, Array]:
    """Beam search from the left-padded prompts tokens/segments int32[B, P] (eos_id -1: none;
    ids >= vocab_limit, default the model's vocab_size, are never generated).
    Returns the best hypothesis of each row: tokens int32[B, N] (pad_id after its length), its
    length int32[B] and its score float32[B]. Compiles once per num_beams, early_stopping,
    shapes and layout (the ids and the length penalty are traced)."""
    if early_stopping not in (False, True, "never"):
        raise ConfigError(f"early_stopping={early_stopping!r}: use False, True or 'never'.")
    # HF divides by (generated length ** length_penalty), computed in Python floats.
    divisors = np.arange(1, max_new_tokens + 1, dtype=np.float64) ** length_penalty
    # The best length a running beam may reach, for the early-stop heuristic: its current one,
    # or max_new_tokens with early_stopping="never" and a positive length_penalty.
    to_the_end = early_stopping == "never" and length_penalty > 0
    return _beam_search(model, params, tokens, segments, jnp.asarray(divisors, jnp.float32),
                        jnp.asarray(to_the_end), jnp.asarray(eos_id, jnp.int32),
                        jnp.asarray(pad_id, jnp.int32),
                        jnp.asarray(vocab_limit or model.cfg.vocab_size, jnp.int32),
                        num_beams=num_beams,
                        max_new_tokens=max_new_tokens, closes_when_full=early_stopping is True,
                        layout=layout)


@functools.partial(jax.jit, static_argnames=("model", "num_beams", "max_new_tokens",
                                             "closes_when_full", "layout"))
def _beam_search(model: CausalLM, params: Any, tokens: Array, segments: Array, divisors: Array,
                 to_the_end: Array, eos_id: Array, pad_id: Array, vocab_limit: Array, *,
                 num_beams: int,
                 max_new_tokens: int, closes_when_full: bool, layout: Layout
                 ) -> tuple[Array, Array, Array]:
    """`beam_search` with divisors float32[N] (the length penalties) and the heuristic's
    `to_the_end` (bool []) precomputed."""
    b, k, n = tokens.shape[0], num_beams, max_new_tokens
    cache, logits, position = cache_lib.prefill(model, params, tokens, segments, layout,
                                                vocab_limit)
    expand = jnp.repeat(jnp.arange(b), k)  # every prompt row k times (HF expands the input)
    # 2K candidates per row: at most K end in EOS (one per beam), so K running beams remain.
    candidates = 2 * k
    top_k_mask = jnp.arange(candidates) < k

    def body(s: State) -> State:
        t = s.step
        vocab = s.logits.shape[-1]
        log_probs = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        log_probs = log_probs.reshape(b, k, vocab) + s.running_scores[:, :, None]
        top_scores, top_index = jax.lax.top_k(log_probs.reshape(b, k * vocab), candidates)
        source, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_seqs = _gather(s.running, source)
        top_seqs = jax.lax.dynamic_update_slice(top_seqs, token[:, :, None], (0, 0, t))
        hits = (token == eos_id) | (t + 1 >= n)

        # Running beams for the next step: the best K continuations that did not hit.
        running_scores = top_scores + hits.astype(jnp.float32) * MASK
        keep = jax.lax.top_k(running_scores, k)[1]
        running, running_scores = _gather(top_seqs, keep), _gather(running_scores, keep)
        rows = (_gather(source, keep) + jnp.arange(b)[:, None] * k).reshape(-1)

        # Finished hypotheses: merge the ones that just hit (top K only) into the best K.
        just_finished = hits & top_k_mask[None, :]
        new_scores = top_scores / divisors[t]
        closed = jnp.all(s.is_finished, axis=-1, keepdims=True) & closes_when_full
        new_scores = new_scores + closed.astype(jnp.float32) * MASK
        new_scores = new_scores + (~s.improvable[:, None]).astype(jnp.float32) * MASK
        new_scores = new_scores + (~just_finished).astype(jnp.float32) * MASK
        merged_scores = jnp.concatenate([s.scores, new_scores], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        finished = _gather(jnp.concatenate([s.finished, top_seqs], axis=1), best)
        scores = _gather(merged_scores, best)
        lengths = _gather(jnp.concatenate([s.lengths, jnp.full((b, candidates), t + 1)], 1), best)
        is_finished = _gather(jnp.concatenate([s.is_finished, just_finished], axis=1), best)

        # Can a running beam still beat the worst finished hypothesis?
        best_running = running_scores[:, :1] / jnp.where(to_the_end, divisors[n - 1], divisors[t])
        worst = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), MASK)
        improvable = s.improvable & jnp.any(best_running > worst, axis=-1)

        cache = cache_lib.reorder(s.cache, rows)
        cache, logits = cache_lib.step(model, params, cache, running[:, :, t].reshape(-1),
                                       s.position, layout, vocab_limit)
        return State(cache, logits, s.position + 1, running, running_scores, finished, scores,
                     lengths, is_finished, improvable, t + 1)

    def cond(s: State) -> Array:
        open_beams = ~(jnp.all(s.is_finished) & closes_when_full)
        return (s.step < n) & jnp.any(s.improvable) & open_beams

    init = State(
        cache=cache_lib.reorder(cache, expand), logits=logits[expand], position=position[expand],
        running=jnp.full((b, k, n), pad_id, jnp.int32),
        running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(MASK),
        finished=jnp.full((b, k, n), pad_id, jnp.int32), scores=jnp.full((b, k), MASK),
        lengths=jnp.zeros((b, k), jnp.int32), is_finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool), step=jnp.zeros((), jnp.int32))
    s = jax.lax.while_loop(cond, body, init)
    return s.finished[:, 0], s.lengths[:, 0], s.scores[:, 0]
