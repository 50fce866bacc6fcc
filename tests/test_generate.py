"""KV-cache decoding equals recomputation; sampling filters behave."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.generate import generate, left_pad, sample_logits
from research.models.transformer import CausalLM, TransformerConfig

PROMPTS = [[2, 5, 6, 7, 8, 9], [2, 10], [2, 3, 4]]


def model_and_params(**kw):
    cfg = TransformerConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                            max_len=64, init_std=0.5, **kw)
    model = CausalLM(cfg)
    return model, nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])


@pytest.mark.parametrize("options", [dict(), dict(position="rotary", num_kv_heads=1, scan_layers=True)])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)])
def test_kv_cache_equals_no_cache(options, sampling):
    model, params = model_and_params(**options)
    kw = dict(max_new_tokens=12, eos_id=3, pad_id=0, **sampling)
    cached = generate(model, params, PROMPTS, **kw)
    recomputed = generate(model, params, PROMPTS, use_cache=False, **kw)
    assert cached == recomputed
    assert all(1 <= len(row) <= 12 for row in cached)


def test_batched_prompts_equal_single_prompts():
    model, params = model_and_params()
    batched = generate(model, params, PROMPTS, max_new_tokens=10, eos_id=3, pad_id=0, temperature=0)
    for prompt, row in zip(PROMPTS, batched):
        alone = generate(model, params, [prompt], max_new_tokens=10, eos_id=3, pad_id=0, temperature=0)
        assert alone[0] == row


def test_greedy_continues_with_the_argmax_of_a_full_forward():
    model, params = model_and_params()
    row = generate(model, params, [PROMPTS[0]], max_new_tokens=1, eos_id=-1, pad_id=0, temperature=0)
    logits = model.apply({"params": params}, jnp.asarray([PROMPTS[0]]))
    assert row[0][0] == int(jnp.argmax(logits[0, -1]))


def test_left_pad_layout():
    tokens, segments = left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draws = lambda **kw: np.asarray(sample_logits(logits, jax.random.key(0), **kw))  # noqa: E731
    assert set(draws(temperature=1.0, top_k=2, top_p=1.0).tolist()) == {0, 1}
    assert set(draws(temperature=1.0, top_k=0, top_p=0.7).tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7
    assert set(draws(temperature=1.0, top_k=0, top_p=0.1).tolist()) == {0}
    free = draws(temperature=1.0, top_k=0, top_p=1.0)
    freq = np.bincount(free, minlength=4) / free.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_array_equal(draws(temperature=0.0, top_k=0, top_p=1.0), 0)


def test_too_long_request_is_refused():
    model, params = model_and_params()
    with pytest.raises(ValueError, match="max_len"):
        generate(model, params, PROMPTS, max_new_tokens=100, eos_id=3, pad_id=0)
