"""Continuous-batching inference engine: concurrent requests share one jitted decode step over a
fixed set of KV-cache slots (`research.serving.slots`).

A background thread runs the loop. Between steps the host admits the waiting requests
(prefill calls of a fixed shape per prompt-length bucket, powers of two, so nothing recompiles
per request; the prompts are moved into free slots), streams each request's new tokens and
text, and ends requests at EOS, `max_tokens`, a stop string or a cancel, freeing their slots
for the queue.

Sampling follows each request's own parameters; its n-th token is drawn with noise hashed
from (seed, n) (`slots.gumbel_noise`), so a request's tokens do not depend on what else runs:
its prefill has the fixed shape [prefill_rows(bucket), bucket] whatever is admitted with it, the
decode step the shape [max_batch, 1], and XLA computes their rows independently (masked
cache positions add exact zeros); the tokens are bit-for-bit those it gets alone (tested).

Events: each request gets `TokenEvent`s (new token ids, new text, finish_reason) in order,
delivered to an asyncio loop (async iteration over the handle) and kept for `result()`.
finish_reason: 'stop' (EOS, kept in token_ids but not in the text, or a stop string: the text
ends before it, the token completing it is the last one), 'length' (max_tokens), 'cancelled',
'error' (the engine failed on this request's step; logged, the engine keeps serving).

  engine = Engine(model, params, decode=tok.decode, eos_id=tok.eos_id, pad_id=tok.pad_id,
                  vocab_limit=tok.vocab_size)
  engine.warmup(); engine.start()
  ids, text, reason = engine.submit(prompt_ids, SamplingParams(max_tokens=32)).result()
  engine.shutdown()
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from research.decoding.cache import cache_sized
from research.decoding.layout import Layout
from research.models.transformer import CausalLM
from research.serving import slots as slots_lib
from research.serving.requests import (EngineObserver, RequestError, RequestHandle,
                                       SamplingParams, ShuttingDownError, TokenEvent)

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineObserver", "RequestError", "RequestHandle", "SamplingParams",
           "ShuttingDownError", "TokenEvent"]


class Engine:
    """Continuous batching over `max_batch` KV-cache slots of `max_len` positions.

    `decode` maps token ids to text (the tokenizer's); ids >= `vocab_limit` are never
    generated. `layout` shards the parameters and the cache (default: the first device).
    When every slot is taken, `steps_per_sync` decode steps run per host round trip (more:
    less host overhead, later ends); while a slot is free, or a request is fewer than
    `steps_per_sync` tokens from its max_tokens, one (a request that arrives waits for one
    step at most, then joins; a slot frees at the step its request ends). The slot cache is
    kept as long as its longest request needs, rounded up to a power of two >= `min_cache`
    (resized between calls; one compiled step per length), so a step reads no unused
    positions.
    Prompts of length bucket P are prefilled `prefill_rows(P)` at a time, about
    `prefill_tokens` / P (a fixed shape per bucket: more rows cost a lone request more time
    to first token and save time when many arrive together); each prefill call's first tokens
    stream before the next call, and waiting requests are all admitted before the next decode
    step."""

    def __init__(self, model: CausalLM, params: Any, *, decode: Callable[[Sequence[int]], str],
                 eos_id: int, pad_id: int, vocab_limit: int, max_batch: int = 16,
                 max_len: int | None = None, layout: Layout | None = None,
                 observer: EngineObserver | None = None, steps_per_sync: int = 4,
                 min_cache: int = 64, prefill_tokens: int = 128):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        limit = model.cfg.max_len
        self.max_len = int(min(max_len or limit, limit))
        if self.max_len < 2:
            raise ValueError(f"max_len={self.max_len} must be at least 2")
        self.model = cache_sized(model, self.max_len)
        self.layout = layout or Layout.single_device()
        self.params = self.layout.put_params(model, params)
        self.decode_text = decode
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.vocab_limit = int(min(vocab_limit, model.cfg.vocab_size))
        self.capacity = int(max_batch)
        self.observer = observer
        self.steps_per_sync = int(steps_per_sync)
        self.prefill_tokens = int(prefill_tokens)
        self.prompt_buckets = slots_lib.buckets(min(slots_lib.MIN_PROMPT_BUCKET, self.max_len),
                                                self.max_len)
        self.cache_buckets = slots_lib.buckets(min(min_cache, self.max_len), self.max_len)
        self._lock = threading.Condition()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._admitting: list[RequestHandle] = []  # taken from the queue, not yet in a slot
        self._slots: list[RequestHandle | None] = [None] * self.capacity
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._cache = self._state = None
        self._cache_len = 0

    # ---- requests -------------------------------------------------------------------------

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """RequestError naming the field if the request cannot run."""
        if len(prompt_ids) == 0:
            raise RequestError("prompt", "the prompt is empty (it needs at least one token)")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                   for t in prompt_ids):
            raise RequestError("prompt", "token ids must be integers")
        bad = [t for t in prompt_ids if not 0 <= int(t) < self.model.cfg.vocab_size]
        if bad:
            raise RequestError("prompt", f"token id {bad[0]} is outside the model's vocabulary "
                                         f"[0, {self.model.cfg.vocab_size})")
        if not isinstance(params.max_tokens, int) or params.max_tokens <= 0:
            raise RequestError("max_tokens", f"max_tokens={params.max_tokens} must be a "
                                             "positive integer")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise RequestError("max_tokens" if len(prompt_ids) < self.max_len else "prompt",
                               f"the prompt ({len(prompt_ids)} tokens) + max_tokens "
                               f"({params.max_tokens}) exceeds the context length "
                               f"{self.max_len}; shorten one of them")
        if not params.temperature >= 0:
            raise RequestError("temperature", f"temperature={params.temperature} must be >= 0 "
                                              "(0 = greedy)")
        if not 0 < params.top_p <= 1:
            raise RequestError("top_p", f"top_p={params.top_p} must be in (0, 1]")
        if not isinstance(params.top_k, int) or params.top_k < 0:
            raise RequestError("top_k", f"top_k={params.top_k} must be an integer >= 0 "
                                        "(0 = off)")
        if not isinstance(params.seed, int):
            raise RequestError("seed", f"seed={params.seed!r} must be an integer")
        if any(not isinstance(s, str) or not s for s in params.stop):
            raise RequestError("stop", "stop strings must be non-empty strings")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queues a request (thread-safe) after `validate`; ShuttingDownError once shutdown
        began. With `loop`, its events are delivered there for `async for`."""
        self.validate(prompt_ids, params)
        handle = RequestHandle([int(t) for t in prompt_ids], params, self.decode_text, loop)
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError()
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        with self._lock:
            return {"active": sum(s is not None for s in self._slots),
                    "queued": len(self._waiting), "capacity": self.capacity}

    # ---- lifecycle ------------------------------------------------------------------------

    def _ensure_slots(self) -> None:
        if self._cache is None:
            with self.layout.context():
                self._cache, self._state = slots_lib.init_slots(
                    self.model, length=self.cache_buckets[0], rows=self.capacity,
                    layout=self.layout)
            self._cache_len = self.cache_buckets[0]

    def _fit_cache(self, needed: int, grow_only: bool = False) -> None:
        """Resizes the slot cache to the bucket of `needed` positions (with `grow_only`, only
        if it is shorter)."""
        length = slots_lib.bucket(needed, self.cache_buckets[0], self.max_len)
        if length == self._cache_len or (grow_only and length < self._cache_len):
            return
        self._cache = slots_lib.resize(self._cache, length=length, layout=self.layout)
        self._cache_len = length

    def warmup(self) -> None:
        """Compiles every prefill bucket and the decode steps (call before `start`): then no
        request compiles anything."""
        if self._thread is not None:
            raise RuntimeError("Engine.warmup() must run before start()")
        self._ensure_slots()
        with self.layout.context():
            for length in self.cache_buckets:
                self._fit_cache(length)
                for width in self.prompt_buckets:
                    if width <= length:
                        n = self.prefill_rows(width)
                        self._admit_call(np.full((n, width), self.pad_id, np.int32),
                                         np.ones((n,), np.int32),
                                         np.full((n,), self.capacity, np.int32),
                                         *self._request_arrays([None] * n))
                for filtered in (False, True):
                    for steps in sorted({1, self.steps_per_sync}):
                        self._decode_call(np.zeros((self.capacity,), bool), filtered, steps)
                for other in self.cache_buckets:  # every resize from this length
                    if other != length:
                        self._fit_cache(other)
                        self._fit_cache(length)
            self._fit_cache(self.cache_buckets[0])
            jax.block_until_ready(self._state)

    def start(self) -> None:
        """Starts the background decode thread."""
        if self._thread is not None:
            return
        self._ensure_slots()
        self._thread = threading.Thread(target=self._run, name="serving-engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuses new requests; with `drain` lets the queued and running ones finish (else
        cancels them), then stops the thread (waiting at most `timeout` seconds)."""
        with self._lock:
            self._accepting = False
            if not drain:
                for handle in list(self._waiting) + [s for s in self._slots if s is not None]:
                    handle.cancel()
            self._stop = True
            self._lock.notify_all()
        if self._thread is None:  # never started: nothing will run the queue
            with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for handle in waiting:
                self._finish(handle, "cancelled")
        else:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None

    # ---- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while (not self._waiting and all(s is None for s in self._slots)
                       and not self._stop):
                    self._lock.wait()
                if self._stop and not self._waiting and all(s is None for s in self._slots):
                    return
            try:
                with self.layout.context():
                    self._admit_waiting()
                    self._step()
            except Exception as err:  # noqa: BLE001 - fail the requests, keep serving
                log.exception("serving engine step failed; failing its requests")
                self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            handles = (self._admitting + list(self._waiting)
                       + [s for s in self._slots if s is not None])
            self._waiting.clear()
            self._slots = [None] * self.capacity
            self._admitting = []
        for handle in handles:
            handle.error = err
            self._finish(handle, "error")
        self._cache = self._state = None
        self._cache_len = 0
        try:
            self._ensure_slots()
        except Exception:  # noqa: BLE001
            log.exception("serving engine could not rebuild its cache")

    def _finish(self, handle: RequestHandle, reason: str, ids: list[int] = (),
                text: str = "") -> None:
        handle._emit(list(ids), text, reason)
        self._observe("on_finish", handle.prompt_tokens, len(handle.token_ids), reason,
                      time.monotonic() - handle.submitted)

    def _observe(self, method: str, *args) -> None:
        """Calls the observer's `method` if it has one; its failures are logged, not raised."""
        hook = getattr(self.observer, method, None)
        if hook is None:
            return
        try:
            hook(*args)
        except Exception:  # noqa: BLE001 - metrics must not fail requests
            log.exception("serving observer %s failed", method)

    def _request_arrays(self, handles: list[RequestHandle | None]) -> tuple[np.ndarray, ...]:
        """seed, temperature, top_k, top_p arrays [n] (None: a padding row)."""
        params = [h.params if h is not None else SamplingParams() for h in handles]
        return (np.array([p.seed % 2 ** 32 for p in params], np.uint32),
                np.array([p.temperature for p in params], np.float32),
                np.array([min(p.top_k, self.model.cfg.vocab_size) for p in params], np.int32),
                np.array([p.top_p for p in params], np.float32))

    def prefill_rows(self, width: int) -> int:
        """How many prompts of padded length `width` one prefill computes together."""
        return max(1, min(self.capacity, self.prefill_tokens // width))

    def _admit_call(self, tokens, lengths, slots, seed, temperature, top_k,
                    top_p) -> np.ndarray:
        """Prefills prompts of width P and moves them into their slots (the cache grown to at
        least P positions first)."""
        self._fit_cache(tokens.shape[1], grow_only=True)
        prompts, self._state, first = slots_lib.prefill_prompts(
            self.model, self.params, self._state, tokens, lengths, slots, seed, temperature,
            top_k, top_p, layout=self.layout, vocab_limit=self.vocab_limit)
        self._cache = slots_lib.insert(self._cache, prompts, slots, lengths, layout=self.layout)
        return first

    def _decode_call(self, active: np.ndarray, filtered: bool, steps: int) -> np.ndarray:
        self._cache, self._state, tokens = slots_lib.decode(
            self.model, self.params, self._cache, self._state, active, layout=self.layout,
            vocab_limit=self.vocab_limit, steps=steps, filtered=filtered)
        return tokens

    def _admit_waiting(self) -> None:
        """Prefills waiting requests into free slots, one call of `prefill_rows(P)` prompts at
        a time, and streams each call's first tokens as soon as it returns. Requests that
        arrive meanwhile join the next call: a burst is admitted with no decode step between
        its prefills."""
        while True:
            with self._lock:
                width, group = self._take_group()
                self._admitting = [h for _, h in group]  # failed with the step if it raises
            if not group:
                return
            self._admit_group(width, group)
            self._admitting = []

    def _take_group(self) -> tuple[int, list[tuple[int, RequestHandle]]]:
        """(P, [(slot, request)]): the oldest waiting request's prompt bucket P and up to
        `prefill_rows(P)` waiting requests of that bucket (oldest first), each given a free
        slot; taken off the queue. Cancelled requests met on the way end. Call under the lock."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        width, group, kept = 0, [], collections.deque()
        while self._waiting:
            handle = self._waiting.popleft()
            if handle.cancelled:
                self._finish(handle, "cancelled")
                continue
            bucket = slots_lib.bucket(handle.prompt_tokens, self.prompt_buckets[0], self.max_len)
            width = width or bucket
            if bucket == width and len(group) < min(len(free), self.prefill_rows(width)):
                group.append((free[len(group)], handle))
            else:
                kept.append(handle)
        self._waiting = kept
        return width, group

    def _admit_group(self, width: int, group: list[tuple[int, RequestHandle]]) -> None:
        """One prefill call for up to `prefill_rows(width)` requests whose prompts share the
        length bucket `width`."""
        n = self.prefill_rows(width)
        tokens = np.full((n, width), self.pad_id, np.int32)
        lengths = np.ones((n,), np.int32)
        where = np.full((n,), self.capacity, np.int32)  # padding rows: not stored
        for j, (slot, handle) in enumerate(group):
            tokens[j, width - handle.prompt_tokens:] = handle.prompt
            lengths[j] = handle.prompt_tokens
            where[j] = slot
        padded = [h for _, h in group] + [None] * (n - len(group))
        first = np.asarray(self._admit_call(tokens, lengths, where,
                                            *self._request_arrays(padded)))
        now = time.monotonic()
        with self._lock:
            for slot, handle in group:
                self._slots[slot] = handle
        for j, (slot, handle) in enumerate(group):
            handle.first_token_at = now
            self._observe("on_first_token", now - handle.submitted)
            self._advance(slot, handle, [int(first[j])])

    def _step(self) -> None:
        """One decode call for every slot; streams the new tokens."""
        with self._lock:
            for i, handle in enumerate(self._slots):
                if handle is not None and handle.cancelled:
                    self._slots[i] = None
                    self._finish(handle, "cancelled")
            owners = list(self._slots)
        active = np.array([h is not None for h in owners])
        if not active.any():
            return
        filtered = any(h.params.top_k > 0 or h.params.top_p < 1.0
                       for h in owners if h is not None)
        # A free slot may be taken at any moment: sync every step so that a new request waits
        # for at most one step, not `steps_per_sync`. Nor run past the step at which a request
        # reaches max_tokens: its slot frees there, and its client's next request (or one that
        # waits) gets in one step later, not up to `steps_per_sync`.
        remaining = min(h.params.max_tokens - len(h.token_ids) for h in owners if h is not None)
        steps = self.steps_per_sync if active.all() and remaining >= self.steps_per_sync else 1
        needed = max(h.prompt_tokens + len(h.token_ids) - 1 for h in owners if h is not None)
        self._fit_cache(needed + steps)
        start = time.monotonic()
        tokens = np.asarray(self._decode_call(active, filtered, steps))  # [steps, B]
        seconds = time.monotonic() - start
        new = 0
        for i, handle in enumerate(owners):
            if handle is not None:
                new += self._advance(i, handle, tokens[:, i].tolist())
        self._observe("on_step", int(active.sum()), self.capacity, new, seconds)

    def _advance(self, slot: int, handle: RequestHandle, tokens: list[int]) -> int:
        """Streams the tokens a slot generated (those past the request's end dropped); ends
        the request when due. Returns how many tokens counted. If this request's own work
        raises (its detokenizer, its stop strings), it alone ends with 'error' and frees its
        slot: the other slots' requests and the device state are untouched."""
        try:
            return self._stream_tokens(slot, handle, tokens)
        except Exception as err:  # noqa: BLE001 - one request's text must not fail the others
            log.exception("serving engine could not stream a request's tokens; failing it")
            handle.error = err
            with self._lock:
                if self._slots[slot] is handle:
                    self._slots[slot] = None
            self._finish(handle, "error")
            return 0

    def _stream_tokens(self, slot: int, handle: RequestHandle, tokens: list[int]) -> int:
        if handle.done():
            return 0
        room = handle.params.max_tokens - len(handle.token_ids)
        tokens = tokens[:room]
        reason = None
        if self.eos_id in tokens:
            tokens = tokens[:tokens.index(self.eos_id) + 1]
            reason = "stop"
        text_ids = tokens[:-1] if reason == "stop" else tokens
        text, taken = handle.stream.add(text_ids)
        if handle.stream.stopped:  # cut after the token that completed the stop string
            tokens, reason = tokens[:taken], "stop"
        elif reason is None and len(handle.token_ids) + len(tokens) >= handle.params.max_tokens:
            reason = "length"
        if reason is not None and not handle.stream.stopped:
            text += handle.stream.finish()
        if reason is None:
            handle._emit(tokens, text, None)
        else:
            with self._lock:
                if self._slots[slot] is handle:
                    self._slots[slot] = None
            self._finish(handle, reason, tokens, text)
        return len(tokens)

