"""The continuous-batching engine (research.serving): the per-row KV-cache write index equals
each row alone; engine outputs equal research.generate's (greedy) and, sampled, the same
requests run alone; stop strings, EOS, max_tokens, cancel and queueing; no recompilation per
request; validation; async streaming; shutdown and failures."""

import asyncio
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT
from research.decoding.layout import Layout, cache_length_axis, scan_axes
from research.generate import generate
from research.models.transformer import CausalLM, TransformerConfig
from research.serving import slots
from research.serving.detokenize import TextStream, held_back
from research.serving.engine import (Engine, RequestError, SamplingParams, ShuttingDownError,
                                     TokenEvent)

PROMPTS = [[2, 5, 6, 7, 8, 9], [2, 10], [2, 3, 4], list(range(2, 22))]  # the last: bucket 32
VOCAB_LIMIT = 120
TIMEOUT = 60


def model_and_params(**kw):
    cfg = TransformerConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                            max_len=64, init_std=0.5, **kw)
    model = CausalLM(cfg)
    # Random weights from numpy: compiling model.init costs more than every test here.
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(1),
                                                        jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(1)
    return model, jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(s.dtype), shapes)


def letters(ids) -> str:
    """A decode function: one letter per token id."""
    return "".join(chr(ord("a") + int(i) % 26) for i in ids)


@pytest.fixture(scope="module")
def mp():
    return model_and_params()


def make_engine(mp, **kw) -> Engine:
    model, params = mp
    options = dict(decode=letters, eos_id=-1, pad_id=0, vocab_limit=VOCAB_LIMIT, max_batch=4,
                   max_len=32, min_cache=16)  # prompt and cache-length buckets 16, 32
    options.update(kw)
    return Engine(model, params, **options)


@pytest.fixture(scope="module")
def engine(mp):
    eng = make_engine(mp)
    eng.warmup()
    eng.start()
    yield eng
    eng.shutdown(drain=False, timeout=TIMEOUT)


# ---- the per-row cache write index ---------------------------------------------------------


def _empty_cache(model, rows):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((rows, 1), jnp.int32),
                                               decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, cache, tokens, positions):
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens,
                                  segment_ids=jnp.ones(tokens.shape, jnp.int32),
                                  positions=positions, decode=True, mutable=["cache"])
    return logits, mutated["cache"]


@pytest.mark.parametrize("options", [
    dict(), dict(position="rotary", num_kv_heads=1, scan_layers=True, sliding_window=3)],
    ids=["learned", "rotary_scan_window"])
def test_per_row_cache_index_equals_each_row_alone(options):
    """Rows at different write indices (4, 6 and 9 tokens cached), advanced by 2 tokens in one
    batched call with an int32[B] cache_index, give the logits and cache rows of each row
    advanced alone with the scalar index."""
    model, params = model_and_params(**options)
    prompt = np.array([[5, 6, 7, 8]], np.int32)
    new = np.array([[20, 21], [22, 23], [24, 25]], np.int32)
    lengths = [4, 6, 9]
    alone_logits, alone_caches, prefilled = [], [], []
    for row, length in enumerate(lengths):
        _, cache = _apply(model, params, _empty_cache(model, 1), prompt, np.arange(4)[None])
        for n in range(4, length):  # one token at a time up to `length`
            _, cache = _apply(model, params, cache, np.array([[10 + n + row]], np.int32),
                              np.array([[n]]))
        prefilled.append(cache)
        logits, cache = _apply(model, params, cache, new[row:row + 1],
                               (length + np.arange(2))[None])
        alone_logits.append(np.asarray(logits[0]))
        alone_caches.append(jax.tree.map(np.asarray, cache))

    def stack(path, *xs):
        if getattr(path[-1], "key", None) == "cache_index":
            return jnp.stack(xs, axis=-1)  # [] -> [B], or [L] -> [L, B] when scanned
        return jnp.concatenate(xs, axis=scan_axes(path, xs[0]))

    batched = jax.tree_util.tree_map_with_path(stack, *prefilled)
    positions = np.array([[n, n + 1] for n in lengths])
    logits, cache = _apply(model, params, batched, new, positions)
    logits = np.asarray(logits)
    cache = jax.tree.map(np.asarray, cache)
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(logits[row], alone_logits[row], rtol=1e-5, atol=1e-5)
        end = length + 2

        def check(path, got, want):
            axis = scan_axes(path, got)
            if getattr(path[-1], "key", None) == "cache_index":  # [(L,) B] and scalar [(L,)]
                assert (np.take(got, row, axis=-1) == end).all() and (want == end).all()
            else:  # key/value [(L,) K, S, H], segments [(L,) S]: the first `end` written
                position = cache_length_axis(path, got) - 1  # once the row axis is taken
                got, want = np.take(got, row, axis=axis), np.take(want, 0, axis=axis)
                np.testing.assert_allclose(np.take(got, range(end), axis=position),
                                           np.take(want, range(end), axis=position),
                                           rtol=1e-5, atol=1e-5)

        jax.tree_util.tree_map_with_path(check, cache, alone_caches[row])


# ---- sampling ------------------------------------------------------------------------------


def test_candidate_filter_equals_the_full_sort_and_draws_follow_softmax():
    """Top-k / top-p from the best FILTER_CANDIDATES tokens keeps exactly the tokens a full
    sort keeps, on every row it resolves (and defers the others); draws follow softmax."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(40, 300)) * 3).astype(np.float32)
    top_k = rng.choice([0, 1, 5, 64, 65, 200], 40).astype(np.int32)
    top_p = rng.choice([1.0, 0.3, 0.9, 0.999], 40).astype(np.float32)
    full = np.asarray(jax.jit(slots._filter_sorted)(logits, top_k, top_p))
    fast, resolved = map(np.asarray, jax.jit(slots._filter_candidates)(logits, top_k, top_p))
    assert resolved[top_k > slots.FILTER_CANDIDATES].sum() == 0 and 10 < resolved.sum() < 40
    np.testing.assert_array_equal(np.isinf(fast[resolved]), np.isinf(full[resolved]))
    n = 20000
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    rows = np.tile(np.log(probs).astype(np.float32), (n, 1))
    ones, zeros = np.ones(n, np.float32), np.zeros(n, np.int32)
    draws = jax.jit(functools.partial(slots.sample_rows, filtered=False))(
        rows, np.full(n, 7, np.uint32), np.arange(n, dtype=np.int32), ones, zeros, ones)
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=6) / n, probs, atol=0.015)


def test_gumbel_noise_is_finite_for_every_bit_pattern_so_padding_ids_are_never_drawn():
    """The extreme hash outputs give uniforms strictly inside (0, 1), hence finite noise: with
    24 bits the largest rounded to 1.0, its noise was +inf, and a vocabulary-padding id at -inf
    became NaN, which argmax took (a served request then failed decoding an id past the
    tokenizer's vocabulary, about once in 150 requests of 32 x 28 draws)."""
    bits = np.array([0, 1, 511, 512, 2 ** 31, 2 ** 32 - 512, 2 ** 32 - 2, 2 ** 32 - 1], np.uint32)
    uniform = np.asarray(jax.jit(slots.open_uniform)(bits))
    assert (uniform > 0).all() and (uniform < 1).all()
    np.testing.assert_array_equal(uniform, ((bits >> 9) + 0.5) * 2.0 ** -23)  # exact
    noise = -np.log(-np.log(uniform))
    assert np.isfinite(noise).all()  # so a masked id (-inf) plus its noise stays -inf
    # 2^20 draws: finite, their uniforms mean 1/2 and the noise Euler's gamma (5 sigma).
    many = np.asarray(jax.jit(slots.gumbel_noise, static_argnums=2)(
        np.arange(64, dtype=np.uint32), np.zeros(64, np.int32), 2 ** 14)).astype(np.float64)
    assert np.isfinite(many).all()
    assert abs(np.exp(-np.exp(-many)).mean() - 0.5) < 5 * (12 * 2 ** 20) ** -0.5
    assert abs(many.mean() - np.euler_gamma) < 5 * (np.pi ** 2 / 6 / 2 ** 20) ** 0.5


# ---- outputs ---------------------------------------------------------------------------------


def test_greedy_equals_generate(engine, mp):
    model, params = mp
    want = generate(model, params, PROMPTS, max_new_tokens=12, eos_id=-1, pad_id=0,
                    temperature=0, vocab_limit=VOCAB_LIMIT)  # rows equal single prompts'
    for prompt, row in zip(PROMPTS, want):
        got = engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0)).result(TIMEOUT)
        assert got == (row, letters(row), "length")


SAMPLED = [SamplingParams(max_tokens=14, temperature=1.0, seed=1),
           SamplingParams(max_tokens=10, temperature=1.0, top_k=5, seed=2),
           SamplingParams(max_tokens=12, temperature=0.7, top_p=0.8, seed=3),
           SamplingParams(max_tokens=9, temperature=1.3, top_k=30, top_p=0.9, seed=4),
           SamplingParams(max_tokens=11, temperature=0.0),
           SamplingParams(max_tokens=13, temperature=1.0, seed=1)]


def test_concurrent_requests_equal_the_same_requests_alone(engine):
    """Six sampled requests (more than the 4 slots: some queue) submitted at once get exactly
    the tokens each gets alone; every token id is < vocab_limit."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(SAMPLED))]
    alone = [engine.submit(p, s).result(TIMEOUT) for p, s in zip(prompts, SAMPLED)]
    handles = [engine.submit(p, s) for p, s in zip(prompts, SAMPLED)]
    together = [h.result(TIMEOUT) for h in handles]
    assert together == alone
    assert [len(ids) for ids, _, _ in alone] == [s.max_tokens for s in SAMPLED]
    assert all(0 <= t < VOCAB_LIMIT for ids, _, _ in alone for t in ids)
    assert engine.stats() == {"active": 0, "queued": 0, "capacity": 4}


def test_many_requests_queue_and_all_finish(engine):
    handles = [engine.submit(PROMPTS[i % 3], SamplingParams(max_tokens=3 + i % 4, seed=i))
               for i in range(11)]
    results = [h.result(TIMEOUT) for h in handles]
    assert [len(ids) for ids, _, _ in results] == [3 + i % 4 for i in range(11)]
    assert {reason for _, _, reason in results} == {"length"}


# ---- ends: stop strings, EOS, cancel -----------------------------------------------------------


def test_stop_string_cuts_the_text_and_frees_the_slot(engine):
    greedy = SamplingParams(max_tokens=20, temperature=0)
    ids, text, _ = engine.submit(PROMPTS[0], greedy).result(TIMEOUT)
    stop = text[6:8]
    at = text.find(stop)
    handle = engine.submit(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0,
                                                      stop=("zzzz", stop)))
    got_ids, got_text, reason = handle.result(TIMEOUT)
    assert (got_text, reason) == (text[:at], "stop")
    assert got_ids == ids[:at + len(stop)]  # ends with the token completing the stop string
    assert engine.stats()["active"] == 0


def test_slot_cache_follows_the_longest_request(mp):
    """The slot cache grows to the bucket the longest running request needs and shrinks back
    when it ends; a request that runs across the growth gets generate's tokens."""
    model, params = mp
    eng = make_engine(mp, min_cache=8)  # cache lengths 8, 16, 32
    lengths = []
    fit = eng._fit_cache
    eng._fit_cache = lambda needed, grow_only=False: (fit(needed, grow_only),
                                                      lengths.append(eng._cache_len))
    eng.start()
    try:
        want = generate(model, params, PROMPTS[:1], max_new_tokens=20, eos_id=-1, pad_id=0,
                        temperature=0, vocab_limit=VOCAB_LIMIT)[0]
        got = eng.submit(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0)).result(TIMEOUT)
        short = eng.submit(PROMPTS[1], SamplingParams(max_tokens=2, temperature=0)).result(TIMEOUT)
    finally:
        eng.shutdown(timeout=TIMEOUT)
    assert got == (want, letters(want), "length")
    assert len(PROMPTS[0]) + 20 > 16 and 32 in lengths  # grew to the bucket it needed
    assert short[2] == "length" and lengths[-1] == 8  # back to what the short one needs


def test_eos_ends_the_request(mp, engine):
    ids, _, _ = engine.submit(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0)
                              ).result(TIMEOUT)
    eos = ids[4]
    cut = ids[:ids.index(eos) + 1]
    eng = make_engine(mp, eos_id=eos)
    eng.start()
    try:
        got = eng.submit(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0)).result(TIMEOUT)
    finally:
        eng.shutdown(timeout=TIMEOUT)
    assert got == (cut, letters(cut[:-1]), "stop")  # EOS kept in the ids, not in the text


def test_cancel_frees_the_slot(engine):
    """Four long requests fill the slots, a fifth queues; cancelling one (from the engine
    thread, as soon as a first token is out: deterministic) lets the fifth run meanwhile."""
    longs = []

    class CancelFirst:
        def on_first_token(self, seconds):
            longs[0].cancel()
            longs[0].cancel()  # idempotent

    engine.observer = CancelFirst()
    try:
        longs.extend(engine.submit(PROMPTS[0], SamplingParams(max_tokens=25, seed=i))
                     for i in range(4))
        queued = engine.submit(PROMPTS[1], SamplingParams(max_tokens=4))
        ids, _, reason = longs[0].result(TIMEOUT)
        assert reason == "cancelled" and len(ids) < 25
        assert queued.result(TIMEOUT)[2] == "length"
        assert not any(h.done() for h in longs[1:])  # the queued one ran in the freed slot
    finally:
        engine.observer = None
    waiting = engine.submit(PROMPTS[2], SamplingParams(max_tokens=20))
    waiting.cancel()
    assert waiting.result(TIMEOUT)[2] == "cancelled"
    for h in longs[1:]:
        h.cancel()
    assert {h.result(TIMEOUT)[2] for h in longs[1:]} == {"cancelled"}
    assert engine.submit(PROMPTS[2], SamplingParams(max_tokens=2)).result(TIMEOUT)[2] == "length"
    assert engine.stats() == {"active": 0, "queued": 0, "capacity": 4}


# ---- text streaming ------------------------------------------------------------------------


def test_text_stream_holds_back_partial_utf8_and_stop_prefixes():
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    stream = TextStream(decode, list(b"> "), stops=("END",))
    deltas = [stream.add([b]) for b in "é ok EN".encode()]
    assert deltas[0] == ("", 1)  # half of é
    assert deltas[1] == ("é", 1)
    assert "".join(d for d, _ in deltas) == "é ok "  # "EN" may begin "END": held
    assert not stream.stopped
    assert stream.add(list(b"D!?")) == ("", 1) and stream.stopped  # "D" completes "END"
    assert held_back("abc\ufffd", ()) == 1 and held_back("xEN", ("END", "N!")) == 2
    stream = TextStream(decode, [], stops=("END",))
    assert stream.add(list(b"aE")) == ("a", 2)
    assert stream.finish() == "E"


def test_async_consumer_gets_the_events_in_order(engine):
    params = SamplingParams(max_tokens=10, seed=5, stop=("q",))

    async def consume():
        handle = engine.submit(PROMPTS[0], params, loop=asyncio.get_running_loop())
        return handle, [event async for event in handle]

    handle, events = asyncio.run(asyncio.wait_for(consume(), TIMEOUT))
    ids, text, reason = handle.result(TIMEOUT)
    assert all(isinstance(e, TokenEvent) for e in events)
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == reason
    assert sum((e.token_ids for e in events), []) == ids
    assert "".join(e.text for e in events) == text
    assert (ids, text, reason) == engine.submit(PROMPTS[0], params).result(TIMEOUT)


@pytest.mark.parametrize("stops", [(), ("Mr. Darcy",)], ids=["no_stop", "stop"])
def test_long_text_stream_equals_decoding_everything(stops):
    """Hundreds of tokens (past many settle points), one at a time and in steps of 4: the
    deltas concatenate to the text of all ids after the prompt (SentencePiece's word
    boundaries and byte-fallback characters included), cut at the stop string."""
    from research.data.tokenizer import Tokenizer
    tok = Tokenizer(str(ROOT / "data" / "tokenizers" / "austen_8k.model"))
    prompt = tok.encode("It is a truth universally acknowledged,")
    text = (" that a single man — naïve or not — in possession of a good fortune, must be in "
            "want of a wife; «déjà vu» 文字. ") * 12 + "Mr. Darcy bowed. " + "Then more. " * 5
    ids = tok.encode(text)
    full = tok.decode(prompt + ids)[len(tok.decode(prompt)):]
    assert len(ids) > 300 and "\ufffd" not in full
    want = full[:full.find(stops[0])] if stops else full
    for size in (1, 4):
        stream = TextStream(tok.decode, prompt, stops)
        out = []
        for i in range(0, len(ids), size):
            delta, _ = stream.add(ids[i:i + size])
            out.append(delta)
            if stream.stopped:
                break
        if not stream.stopped:
            out.append(stream.finish())
        assert "".join(out) == want and stream.stopped == bool(stops)


# ---- compilation, validation, lifecycle --------------------------------------------------------


def test_no_recompilation_per_request(engine):
    """After warmup, requests of many prompt lengths (every bucket) and sampling settings
    compile nothing."""
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        handles = [engine.submit(list(range(2, 2 + n)), SamplingParams(
            max_tokens=1 + n % 4, temperature=(n % 3) / 2, top_k=n % 4, top_p=1 - (n % 2) / 4,
            seed=n, stop=("xy",) * (n % 2))) for n in range(1, 30, 2)]
        assert {h.result(TIMEOUT)[2] for h in handles} <= {"length", "stop"}
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


@pytest.mark.parametrize("prompt,params,field", [
    ([], SamplingParams(), "prompt"),
    ([2, 500], SamplingParams(), "prompt"),
    ([2, "x"], SamplingParams(), "prompt"),
    ([2] * 28, SamplingParams(max_tokens=5), "max_tokens"),
    ([2] * 32, SamplingParams(max_tokens=1), "prompt"),
    ([2], SamplingParams(max_tokens=0), "max_tokens"),
    ([2], SamplingParams(temperature=-0.5), "temperature"),
    ([2], SamplingParams(top_p=0.0), "top_p"),
    ([2], SamplingParams(top_p=1.5), "top_p"),
    ([2], SamplingParams(top_k=-1), "top_k"),
    ([2], SamplingParams(stop=("",)), "stop"),
], ids=["empty", "vocab", "not_int", "too_long", "prompt_fills_context", "max_tokens_0", "temperature",
        "top_p_0", "top_p_big", "top_k", "stop"])
def test_validation_names_the_field(mp, prompt, params, field):
    eng = make_engine(mp)
    with pytest.raises(RequestError) as err:
        eng.submit(prompt, params)
    assert err.value.field == field and field in str(err.value)
    assert eng.stats()["queued"] == 0


def test_shutdown_drains_in_flight_requests_then_refuses(mp):
    eng = make_engine(mp)
    eng.start()
    handles = [eng.submit(PROMPTS[i % 3], SamplingParams(max_tokens=8, seed=i)) for i in range(3)]
    eng.shutdown(drain=True, timeout=TIMEOUT)
    assert [h.result(0)[2] for h in handles] == ["length"] * 3
    with pytest.raises(ShuttingDownError):
        eng.submit(PROMPTS[0], SamplingParams())
    assert eng._thread is None  # joined


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(mp):
    """An exception in a prefill or a decode step ends that step's requests with 'error' (no
    request hangs) and the engine serves the next ones."""
    eng = make_engine(mp)
    calls = {"_admit_call": [], "_decode_call": []}

    def flaky(name, fail_at):
        real = getattr(eng, name)

        def call(*args):
            calls[name].append(1)
            if len(calls[name]) == fail_at:
                raise RuntimeError("injected")
            return real(*args)
        setattr(eng, name, call)

    flaky("_admit_call", 1)
    flaky("_decode_call", 2)
    eng.start()
    try:
        failed = eng.submit(PROMPTS[0], SamplingParams(max_tokens=10)).result(TIMEOUT)
        assert failed[2] == "error"  # its prefill failed
        failed = eng.submit(PROMPTS[0], SamplingParams(max_tokens=10)).result(TIMEOUT)
        # Its first token, one decode step (a slot is free: one step per call), then a failure.
        assert failed[2] == "error" and len(failed[0]) == 2
        assert eng.submit(PROMPTS[0], SamplingParams(max_tokens=3)).result(TIMEOUT)[2] == "length"
    finally:
        eng.shutdown(timeout=TIMEOUT)


def test_a_request_whose_detokenizer_raises_fails_alone(mp):
    """A request whose own text cannot be made (its decode raises, as SentencePiece does on an
    out-of-range id) ends with 'error' and frees its slot; the requests decoding beside it in
    the same steps get exactly the tokens they get without it."""
    poison = 99  # in the bad request's prompt; decoding its third generated token raises
    active_when_raised = []

    def decode(ids):
        if poison in ids and len(ids) > len(bad_prompt) + 2:
            active_when_raised.append(eng.stats()["active"])
            raise IndexError("piece id is out of range")
        return letters(ids)

    bad_prompt = [2, poison, 5]
    good = [(PROMPTS[0], SamplingParams(max_tokens=9, seed=3)),
            (PROMPTS[2], SamplingParams(max_tokens=12, seed=4))]
    eng = make_engine(mp, decode=decode)
    eng.start()
    try:
        alone = [eng.submit(p, s).result(TIMEOUT) for p, s in good]
        bad = eng.submit(bad_prompt, SamplingParams(max_tokens=12, seed=5))
        beside = [eng.submit(p, s) for p, s in good]
        assert bad.result(TIMEOUT)[2] == "error" and isinstance(bad.error, IndexError)
        assert active_when_raised == [3]  # it failed while the other two were decoding
        assert [h.result(TIMEOUT) for h in beside] == alone
        assert [reason for _, _, reason in alone] == ["length", "length"]
        assert eng.stats() == {"active": 0, "queued": 0, "capacity": 4}
    finally:
        eng.shutdown(timeout=TIMEOUT)


def test_a_burst_is_admitted_before_the_next_decode_step_and_streams_per_prefill(mp):
    """One prompt per prefill call (prefill_tokens=16): a request that arrives during a
    prefill joins the next prefill, not after a decode step, and each call's first token is
    out before the next call starts."""
    eng = make_engine(mp, prefill_tokens=16)
    calls, seen = [], []
    real_admit, real_decode = eng._admit_call, eng._decode_call
    late: list = []

    def admit(*args):
        calls.append("admit")
        seen.append([h.first_token_at is not None for h in handles + late])
        if len(calls) == 1:  # arrives while the first prefill runs
            late.append(eng.submit(PROMPTS[2], SamplingParams(max_tokens=3)))
        return real_admit(*args)

    def decode(*args):
        calls.append(f"decode{args[-1]}")
        return real_decode(*args)

    eng._admit_call, eng._decode_call = admit, decode
    handles = [eng.submit(PROMPTS[i], SamplingParams(max_tokens=3)) for i in range(2)]
    eng.start()
    try:
        assert all(h.result(TIMEOUT)[2] == "length" for h in handles + late)
    finally:
        eng.shutdown(timeout=TIMEOUT)
    assert calls[:3] == ["admit"] * 3 and "admit" not in calls[3:]
    assert seen == [[False, False], [True, False, False], [True, True, False]]
    # 3 of 4 slots taken: one step per decode call (3 tokens = the first + 2 steps).
    assert calls[3:] == ["decode1", "decode1"]


def test_a_full_batch_runs_steps_per_sync_steps_per_call(mp):
    steps = []
    eng = make_engine(mp, max_batch=2, steps_per_sync=4)
    real = eng._decode_call
    eng._decode_call = lambda *args: steps.append(args[-1]) or real(*args)
    handles = [eng.submit(PROMPTS[0], SamplingParams(max_tokens=9, seed=i)) for i in range(2)]
    alone = make_engine(mp, max_batch=2, steps_per_sync=4)
    alone.start()
    eng.start()
    try:
        got = [h.result(TIMEOUT) for h in handles]
        assert got == [alone.submit(PROMPTS[0], SamplingParams(max_tokens=9, seed=i))
                       .result(TIMEOUT) for i in range(2)]
    finally:
        eng.shutdown(timeout=TIMEOUT)
        alone.shutdown(timeout=TIMEOUT)
    assert steps == [4, 4] and all(len(ids) == 9 for ids, _, _ in got)


def test_sharded_engine_equals_one_device(mp, engine):
    """The parameters and cache sharded over 8 (simulated) devices, data x tensor: the same
    tokens as one device."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    layout = Layout.create({"data": 2, "tensor": 4})
    eng = make_engine(mp, layout=layout)
    try:
        params = [SamplingParams(max_tokens=8, temperature=0), SAMPLED[1], SAMPLED[3]]
        handles = [eng.submit(PROMPTS[i], p) for i, p in enumerate(params)]
        eng.start()  # all three admitted together: one prefill and one decode step compile
        got = [h.result(TIMEOUT) for h in handles]
    finally:
        eng.shutdown(timeout=TIMEOUT)
    assert got == [engine.submit(PROMPTS[i], p).result(TIMEOUT) for i, p in enumerate(params)]
