"""The Pallas splash-attention kernel (research.models.attention_splash), run in Pallas interpret
mode on CPU, against the einsum attention (softmax_attention + attention_mask) in float32:
forward and gradients, packed segments with padding, causal and not, MHA / GQA / MQA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.errors import ConfigError
from research.models.attention import attention_mask, softmax_attention
from research.models.attention_splash import block_sizes, splash_attention, splash_supported

# float32 kernels that differ only in summation order (blocked online softmax vs one softmax):
# the observed differences are <= 4e-6 on values of magnitude ~1..6.
TOL = dict(rtol=1e-5, atol=1e-5)


def packed_segments(rng: np.random.Generator, batch: int, length: int, docs: int = 4) -> np.ndarray:
    """int32[batch, length]: each row `docs` documents of random lengths (ids 1..docs) followed by
    1..length/4 padding tokens (id 0)."""
    out = np.zeros((batch, length), np.int32)
    for row in out:
        real = length - rng.integers(1, length // 4 + 1)
        cuts = np.sort(rng.choice(np.arange(1, real), docs - 1, replace=False))
        row[:real] = np.searchsorted(cuts, np.arange(real), side="right") + 1
    return out


def inputs(b, t, s, n, k, h, seed=0, dtype=jnp.float32):
    """q [b, t, n, h], k/v [b, s, k, h] ~ N(0, 1), an output cotangent like q, and packed
    segment ids int[b, s] (the queries' ids are their first t)."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
    q, key, value = draw(b, t, n, h), draw(b, s, k, h), draw(b, s, k, h)
    cotangent = draw(b, t, n, h)
    return q, key, value, cotangent, jnp.asarray(packed_segments(rng, b, s))


def reference(q, k, v, q_seg, kv_seg, causal):
    """The einsum attention the splash kernel must equal."""
    return softmax_attention(q, k, v, attention_mask(q_seg, kv_seg, causal))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_forward_matches_einsum(causal, heads):
    n, k = heads
    q, key, value, _, seg = inputs(2, 128, 128, n, k, 64)
    out = jax.jit(lambda *a: splash_attention(*a, seg, seg, causal=causal, interpret=True))(
        q, key, value)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, reference(q, key, value, seg, seg, causal), **TOL)


def test_forward_many_blocks_mqa():
    """T = 384: 3 x 3 blocks of 128, documents crossing block edges, the causal mask's
    above-diagonal blocks skipped; one kv head for 4 query heads; H = 128 (1/sqrt(H) inexact)."""
    q, key, value, _, seg = inputs(1, 384, 384, 4, 1, 128, seed=1)
    assert block_sizes(384, 384).block_q == 128
    out = jax.jit(lambda *a: splash_attention(*a, seg, seg, causal=True, interpret=True))(
        q, key, value)
    np.testing.assert_allclose(out, reference(q, key, value, seg, seg, True), **TOL)


def test_forward_queries_prefix_of_keys():
    """T = 128 queries against S = 256 keys (different block sizes); with causal masking query t
    still sees key t of its own segment."""
    q, key, value, _, seg = inputs(2, 128, 256, 2, 1, 64, seed=2)
    q_seg = seg[:, :128]
    out = jax.jit(lambda *a: splash_attention(*a, q_seg, seg, causal=True, interpret=True))(
        q, key, value)
    np.testing.assert_allclose(out, reference(q, key, value, q_seg, seg, True), **TOL)


def test_bfloat16_output_dtype_and_rounding():
    """bf16 in, bf16 out. With H = 64 the 1/8 scale is exact and the kernel works in float32, so
    the only difference from float32 attention on the same bf16 inputs is the output's rounding
    to bf16 (relative 2^-9)."""
    q, key, value, _, seg = inputs(1, 128, 128, 4, 2, 64, seed=3, dtype=jnp.bfloat16)
    out = jax.jit(lambda *a: splash_attention(*a, seg, seg, causal=True, interpret=True))(
        q, key, value)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, key, value)]
    np.testing.assert_allclose(out.astype(jnp.float32), reference(*f32, seg, seg, True),
                               rtol=2.0 ** -8, atol=1e-5)


@pytest.mark.parametrize("causal, shape", [(True, (2, 128, 4, 2, 64)),
                                           (False, (1, 256, 2, 2, 128)),
                                           (True, (1, 384, 2, 1, 64))],
                         ids=["causal-gqa", "full-mha", "causal-mqa-3blocks"])
def test_gradients_match_einsum(causal, shape):
    """d/d(q, k, v) of sum(out * cotangent): the kernel's dq and dkv kernels (dk/dv summed over
    each kv head's query group) against autodiff of the einsum attention."""
    b, t, n, k, h = shape
    q, key, value, cotangent, seg = inputs(b, t, t, n, k, h, seed=4)

    def loss(attend):
        return lambda *a: jnp.sum(attend(*a) * cotangent)

    kernel = lambda *a: splash_attention(*a, seg, seg, causal=causal, interpret=True)
    einsum = lambda *a: reference(*a, seg, seg, causal)
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, key, value)
    want = jax.grad(loss(einsum), argnums=(0, 1, 2))(q, key, value)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, **TOL, err_msg=name)


def test_supported_shapes():
    for t in (128, 256, 384, 512, 1024, 1536):
        assert splash_supported(t, t, 64) and splash_supported(t, 128, 128)
    assert splash_supported(128, 4096, 256)
    for t in (64, 100, 200, 320, 1000):  # no block of 512 / 256 / 128 divides t
        assert not splash_supported(t, 128, 64) and not splash_supported(128, t, 64)
    for h in (32, 80, 96, 192):
        assert not splash_supported(128, 128, h)
    picked = [block_sizes(t, t).block_q for t in (128, 384, 768, 1024, 1536)]
    assert picked == [128, 128, 256, 512, 512]
    sizes = block_sizes(256, 1024)
    picked = (sizes.block_q, sizes.block_kv, sizes.block_q_dq, sizes.block_kv_dkv)
    assert picked == (256, 512, 256, 512)


def test_mistakes_raise_config_error():
    q, key, value, _, seg = inputs(1, 128, 128, 3, 2, 64)
    with pytest.raises(ConfigError, match="multiple of the kv heads"):
        splash_attention(q, key, value, seg, seg, causal=True, interpret=True)
    q, key, value, _, seg = inputs(1, 200, 200, 2, 2, 64)
    with pytest.raises(ConfigError, match="splash_supported"):
        splash_attention(q, key, value, seg, seg, causal=True, interpret=True)
    q, key, value, _, seg = inputs(1, 128, 128, 2, 2, 64)
    with pytest.raises(ConfigError, match="q_segments"):
        splash_attention(q, key, value, seg[:, :64], seg, causal=True, interpret=True)
    if jax.default_backend() != "tpu":
        with pytest.raises(ConfigError, match="TPU only"):
            splash_attention(q, key, value, seg, seg, causal=True)
