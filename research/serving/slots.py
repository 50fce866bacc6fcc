"""The device side of the serving engine: a fixed batch of KV-cache slots, one write index per
row, the prompt prefill that fills free slots and the decode step that advances every slot.

The cache is the model's `cache` collection for `max_batch` rows of S positions (key/value
heads-major [B, K, S, H]), with `cache_index` int32[B] (one write index per row,
`Attention._update_cache`). The engine keeps S a power of two just long enough for its longest
request (`resize`, up to max_len), so a decode step reads no unused positions. A request's row
holds its prompt at [0, P) and its generated tokens after; its write index and position are the
number of tokens it holds, so a row never sees padding. Rows no request holds compute garbage
the host ignores (their index and position are kept at 0).

Sampling is per row: temperature (0 = greedy), top-k (0 = off) and top-p (1 = off) arrays, and
Gumbel noise hashed from the request's seed and the index n of the token it draws (n from 0),
so a request's tokens do not depend on the other rows.

Shapes: B = max_batch slots, S = the cache's length, n prompts admitted per call (padding rows
go to slot index B, dropped), P their padded length (a bucket: powers of two from 16 up to
max_len), V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.decoding.cache import mask_vocab, prompt_positions
from research.decoding.layout import Layout, cache_length_axis, scan_axes
from research.models.transformer import CausalLM

Array = jax.Array
Cache = Any
MIN_PROMPT_BUCKET = 16


def bucket(n: int, low: int, high: int) -> int:
    """The smallest power of two >= max(n, low), capped at `high`."""
    size = low
    while size < n:
        size *= 2
    return min(size, high)


def buckets(low: int, high: int) -> list[int]:
    """Every value `bucket(., low, high)` takes."""
    out, size = [], low
    while size < high:
        out.append(size)
        size *= 2
    return out + [high]


class SlotState(NamedTuple):
    """Per-slot decoding state, every leaf [B]."""

    token: Array  # int32: the row's last token, fed at the next step
    position: Array  # int32: its position (= the row's write index)
    count: Array  # int32: tokens generated so far (the RNG stream index of the next one)
    seed: Array  # uint32: the request's seed
    temperature: Array  # float32: 0 = greedy
    top_k: Array  # int32: 0 = off
    top_p: Array  # float32: 1 = off


def _mix(x: Array) -> Array:
    """lowbias32 (C. Wellons): a 32-bit integer hash with full avalanche. uint32 -> uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: Array, count: Array, vocab: int) -> Array:
    """Gumbel(0, 1) noise float32[B, V], a pure function of each row's (seed uint32, count
    int32) and the token id: counter-based, so a row's noise never depends on the other rows or
    on the batch size. (A hash rather than jax.random's threefry: as random for sampling,
    several times cheaper per step at a 50k vocabulary and faster to compile.)"""
    row = _mix(_mix(seed.astype(jnp.uint32)) ^ (count.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))
    bits = _mix(_mix(row[:, None] ^ jnp.arange(vocab, dtype=jnp.uint32)[None]) + row[:, None])
    return -jnp.log(-jnp.log(open_uniform(bits)))


def open_uniform(bits: Array) -> Array:
    """float32 uniforms strictly inside (0, 1) from uint32 bits: the top 23 bits, centred in
    their interval, so (k + 0.5) 2^-23 for k < 2^23: 2^-24 ... 1 - 2^-24, all exact in float32.
    (24 bits would round the largest, 1 - 2^-25, up to 1.0, whose Gumbel noise is +inf: a
    vocabulary-padding id at -inf then sums to NaN, which argmax picks.)"""
    return ((bits >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -23)


FILTER_CANDIDATES = 64  # top-k / top-p look at this many best tokens first (no full sort)


def _filter_sorted(scaled: Array, top_k: Array, top_p: Array) -> Array:
    """scaled float32[B, V] with the tokens outside each row's top-k, then top-p (mass
    strictly above a token < top_p; at least one kept), at -inf: a full sort per row."""
    v = scaled.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = top_k[:, None]
    kth = jnp.where(k > 0, jnp.take_along_axis(ordered, jnp.clip(k - 1, 0, v - 1), axis=-1),
                    -jnp.inf)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    ordered = jnp.where((k > 0) & (jnp.arange(v)[None] >= k), -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    index = jnp.sum(before < top_p[:, None], axis=-1, keepdims=True) - 1  # keeps >= 1
    cutoff = jnp.take_along_axis(ordered, index, axis=-1)
    return jnp.where((top_p[:, None] < 1.0) & (scaled < cutoff), -jnp.inf, scaled)


def _filter_candidates(scaled: Array, top_k: Array, top_p: Array) -> tuple[Array, Array]:
    """`_filter_sorted` from each row's FILTER_CANDIDATES best tokens only (lax.top_k, far
    cheaper than sorting a large vocabulary). Returns (filtered logits [B, V], resolved
    bool[B]): rows whose top-k exceeds the candidates, or whose top-p mass the candidates do
    not reach, are not resolved (their logits are to be taken from `_filter_sorted`)."""
    c = min(FILTER_CANDIDATES, scaled.shape[-1])
    cand = jax.lax.top_k(scaled, c)[0]  # descending [B, C]
    k = top_k[:, None]
    kth = jnp.where(k > 0, jnp.take_along_axis(cand, jnp.clip(k - 1, 0, c - 1), axis=-1),
                    -jnp.inf)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    cand = jnp.where((k > 0) & (jnp.arange(c)[None] >= k), -jnp.inf, cand)
    top = cand[:, :1]
    total = jnp.sum(jnp.exp(scaled - top), axis=-1, keepdims=True)  # after top-k: all kept
    probs = jnp.exp(cand - top) / total
    before = jnp.cumsum(probs, axis=-1) - probs
    below = jnp.sum(before < top_p[:, None], axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(cand, below - 1, axis=-1)
    resolved = (top_k <= c) & ((top_p >= 1.0) | (below[:, 0] < c))
    return jnp.where((top_p[:, None] < 1.0) & (scaled < cutoff), -jnp.inf, scaled), resolved


def sample_rows(logits: Array, seed: Array, count: Array, temperature: Array, top_k: Array,
                top_p: Array, filtered: bool) -> Array:
    """One token int32[B] per row of float32 logits [B, V], each row with its own parameters
    (arrays [B]): argmax (temperature 0) or a draw from softmax(logits / temperature) after
    top-k then top-p filtering (the Gumbel-max trick with `gumbel_noise(seed, count)`).
    `filtered=False` skips the filters (valid when no row sets them); a row's token is the same
    either way. Filtering looks at the best FILTER_CANDIDATES tokens, sorting the vocabulary
    only when some row needs more (which path a row takes depends on that row alone)."""
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw() -> Array:
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        if filtered:
            fast, resolved = _filter_candidates(scaled, top_k, top_p)
            scaled = jax.lax.cond(
                jnp.all(resolved), lambda: fast,
                lambda: jnp.where(resolved[:, None], fast, _filter_sorted(scaled, top_k, top_p)))
        drawn = jnp.argmax(scaled + gumbel_noise(seed, count, v), axis=-1).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # An all-greedy batch skips the noise and filters (most of a small model's step).
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)


def empty_cache(model: CausalLM, rows: int, length: int, per_row_index: bool) -> Cache:
    """A zero cache of `rows` rows and `length` positions; `cache_index` int32[rows] (after
    any scan 'layers' axis) with `per_row_index`, else the model's scalar."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((rows, 1), jnp.int32),
                                               decode=True)["cache"])

    def make(path, s):
        name = getattr(path[-1], "key", None)
        shape = list(s.shape)
        if name == "cache_index":
            return jnp.zeros(tuple(shape) + ((rows,) if per_row_index else ()), jnp.int32)
        shape[cache_length_axis(path, s)] = length  # key/value [B, K, S, H], segments [B, S]
        return jnp.zeros(shape, s.dtype)

    return jax.tree_util.tree_map_with_path(make, shapes)


def empty_state(rows: int) -> SlotState:
    """Slots holding no request."""
    zeros = np.zeros((rows,), np.int32)
    return SlotState(zeros, zeros, zeros, np.zeros((rows,), np.uint32),
                     np.zeros((rows,), np.float32), zeros, np.ones((rows,), np.float32))


def _constrain(cache: Cache, state: SlotState, layout: Layout) -> tuple[Cache, SlotState]:
    def batch(x):
        return jax.lax.with_sharding_constraint(x, layout.sharding(("act_batch",), x.shape))
    return layout.constrain_cache(cache), SlotState(*map(batch, state))


@functools.partial(jax.jit, static_argnames=("model", "length", "rows", "layout"))
def init_slots(model: CausalLM, *, length: int, rows: int,
               layout: Layout) -> tuple[Cache, SlotState]:
    """The empty slot cache (`rows` rows of `length` positions) and state, placed by `layout`."""
    state = SlotState(*map(jnp.asarray, empty_state(rows)))
    return _constrain(empty_cache(model, rows, length, per_row_index=True), state, layout)


def _rows_at(big: Array, rows: Array, cols: Array, values: Array, axis: int,
             position: int) -> Array:
    """`big` with the entries at (row rows[r], position cols[r, j]) set from `values`, which is
    laid out as `big` with R rows on `axis` and J positions on `position` (out-of-range rows or
    positions: dropped)."""
    index = [slice(None)] * big.ndim
    index[axis], index[position] = rows[:, None], cols
    if position != axis + 1:  # apart, the two indexed axes lead the selection: [R, J, ...]
        values = jnp.moveaxis(values, (axis, position), (0, 1))
    return big.at[tuple(index)].set(values, mode="drop")


def _per_row(index: Array, x: Array, axis: int, position: int) -> Array:
    """index int[R, J] shaped to take per-row positions from x along `position`."""
    shape = [1] * x.ndim
    shape[axis], shape[position] = index.shape
    return index.reshape(shape)


def _insert(cache: Cache, filled: Cache, slots: Array, lengths: Array) -> Cache:
    """`cache` with rows `slots` int32[R] (an index >= B: dropped) replaced by the R prefilled
    rows of `filled` (P positions, prompts left-padded): row r's lengths[r] real tokens move to
    [0, lengths[r]), its write index becomes lengths[r]."""

    def put(path, big, small):
        name = getattr(path[-1], "key", None)
        axis = scan_axes(path, big)
        if name == "cache_index":
            lead = (slice(None),) * axis
            return big.at[lead + (slots,)].set(lengths, mode="drop")
        position = cache_length_axis(path, big)
        width = small.shape[position]
        t = jnp.arange(width)[None]
        src = jnp.minimum(t + width - lengths[:, None], width - 1)  # [R, P]
        moved = jnp.take_along_axis(small, _per_row(src, small, axis, position), axis=position)
        if name == "cached_segment_ids":
            moved = jnp.broadcast_to((t < lengths[:, None]).astype(moved.dtype), moved.shape)
        return _rows_at(big, slots, jnp.broadcast_to(t, src.shape), moved, axis, position)

    return jax.tree_util.tree_map_with_path(put, cache, filled)


@functools.partial(jax.jit, static_argnames=("model", "layout", "vocab_limit"),
                   donate_argnames=("state",))
def prefill_prompts(model: CausalLM, params: Any, state: SlotState, tokens: Array,
                    lengths: Array, slots: Array, seed: Array, temperature: Array, top_k: Array,
                    top_p: Array, *, layout: Layout, vocab_limit: int
                    ) -> tuple[Cache, SlotState, Array]:
    """Prefills the left-padded prompts tokens int32[n, P] (lengths int32[n]), samples each
    one's first token (count 0) and sets the state of its slot (slots int32[n]; an index >= B:
    a padding row, not stored). Per-request arrays [n]. The prompts' cache (n rows of P
    positions) goes into the slots with `insert`.

    XLA computes the rows independently: a request's numbers (hence its tokens) are those it
    gets alone, whatever is admitted with it. Returns (prompt cache, state, first tokens
    int32[n])."""
    n, width = tokens.shape
    segments = (jnp.arange(width)[None] >= width - lengths[:, None]).astype(jnp.int32)
    hidden, mutated = model.apply(
        {"params": params, "cache": layout.constrain_cache(
            empty_cache(model, n, width, per_row_index=False))}, tokens,
        segment_ids=segments, positions=prompt_positions(segments), decode=True,
        mutable=["cache"], method=CausalLM.hidden)
    # Only the last position's logits are needed: the output projection of one token.
    logits = model.apply({"params": params}, hidden[:, -1:], method=CausalLM.project)
    logits = mask_vocab(logits[:, -1], vocab_limit)
    first = sample_rows(logits, seed, jnp.zeros((n,), jnp.int32), temperature, top_k, top_p,
                        filtered=True)

    def put(old, new):
        return old.at[slots].set(new.astype(old.dtype), mode="drop")

    state = SlotState(put(state.token, first), put(state.position, lengths),
                      put(state.count, jnp.ones_like(lengths)), put(state.seed, seed),
                      put(state.temperature, temperature), put(state.top_k, top_k),
                      put(state.top_p, top_p))
    _, state = _constrain({}, state, layout)
    return layout.constrain_cache(mutated["cache"]), state, first


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("cache",))
def insert(cache: Cache, prompts: Cache, slots: Array, lengths: Array, *,
           layout: Layout) -> Cache:
    """`cache` with `prefill_prompts`' prompt cache moved into rows slots int32[n] (an index
    >= B: dropped), row r's lengths[r] tokens at positions [0, lengths[r]). The cache must be
    at least P positions long (`resize`)."""
    return layout.constrain_cache(_insert(cache, prompts, slots, lengths))


@functools.partial(jax.jit, static_argnames=("length", "layout"))
def resize(cache: Cache, *, length: int, layout: Layout) -> Cache:
    """The slot cache with `length` positions: cut, or padded with empty positions (zeros,
    segment 0: masked); write indices unchanged. The caller keeps every row's tokens inside."""

    def fit(path, x):
        if getattr(path[-1], "key", None) == "cache_index":
            return x
        axis = cache_length_axis(path, x)
        if length <= x.shape[axis]:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, pad)

    return layout.constrain_cache(jax.tree_util.tree_map_with_path(fit, cache))


@functools.partial(jax.jit, static_argnames=("model", "layout", "vocab_limit", "steps",
                                             "filtered"),
                   donate_argnames=("cache", "state"))
def decode(model: CausalLM, params: Any, cache: Cache, state: SlotState, active: Array, *,
           layout: Layout, vocab_limit: int, steps: int = 1,
           filtered: bool = True) -> tuple[Cache, SlotState, Array]:
    """`steps` decode steps of every slot: feeds each row's last token, samples the next.
    `active` bool[B]: rows holding a request (the others are reset to index/position 0).
    The steps attend to the whole cache, so the engine keeps it only as long as its longest
    request needs (`resize`): attention over unused positions costs the most at small batch
    sizes, and masked keys add exact zeros, so a row's numbers do not depend on the length.
    Every active row's tokens must fit. Returns (cache, state, tokens int32[steps, B])."""
    b = active.shape[0]

    def body(carry, _):
        cache, st = carry
        logits, mutated = model.apply(
            {"params": params, "cache": cache}, st.token[:, None],
            segment_ids=jnp.ones((b, 1), jnp.int32), positions=st.position[:, None],
            decode=True, mutable=["cache"])
        logits = mask_vocab(logits[:, -1], vocab_limit)
        token = sample_rows(logits, st.seed, st.count, st.temperature, st.top_k, st.top_p,
                            filtered)

        def keep_active(path, x):
            if getattr(path[-1], "key", None) == "cache_index":
                return jnp.where(active, x, 0)
            return x

        cache = jax.tree_util.tree_map_with_path(keep_active, mutated["cache"])
        st = st._replace(token=token, position=jnp.where(active, st.position + 1, 0),
                         count=st.count + 1)
        return (layout.constrain_cache(cache), st), token

    (cache, state), tokens = jax.lax.scan(body, (cache, state), None, length=steps)
    cache, state = _constrain(cache, state, layout)
    return cache, state, tokens
