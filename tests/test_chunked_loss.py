"""Chunked cross entropy: same sums and gradients as the full-logits loss, in the objective and
through a train step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.objectives import losses
from research.training import partitioning
from research.data.causal_lm import make_causal_lm_iterator
from research.data.sources import DocumentList
from research.models.transformer import CausalLM, TransformerConfig
from research.objectives.causal_lm import CausalLMObjective
from research.training.setup import build_setup
from research.training.steps import make_train_step

from .conftest import austen_paragraphs

B, T, D, V = 2, 12, 16, 40


def _inputs():
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (B, T, D))
    w = jax.random.normal(k[1], (D, V)) * 0.3
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = (jax.random.uniform(k[3], (B, T)) > 0.2).astype(jnp.float32)
    return hidden, w, targets, weights


@pytest.mark.parametrize("chunk", [1, 4, 5, 12, 100])
def test_chunked_equals_plain_sums_and_gradients(chunk):
    hidden, w, targets, weights = _inputs()

    def plain(h, w):
        return losses.weighted_cross_entropy(h @ w, targets, weights)

    def chunked(h, w):
        return losses.chunked_cross_entropy(h, lambda x: x @ w, targets, weights, chunk)

    for a, b in zip(plain(hidden, w), chunked(hidden, w)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5)
    g_plain = jax.grad(lambda h, w: plain(h, w)[0], argnums=(0, 1))(hidden, w)
    g_chunk = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(hidden, w)
    for a, b in zip(g_plain, g_chunk):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_chunked_never_materialises_full_logits():
    """No [B, T, V] float array appears in the jaxpr of the loss or its gradient."""
    hidden, w, targets, weights = _inputs()

    def loss(h, w):
        return losses.chunked_cross_entropy(h, lambda x: x @ w, targets, weights, 4)[0]

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, w)

    def shapes(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                yield tuple(getattr(v.aval, "shape", ()))
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    yield from shapes(getattr(inner, "jaxpr", inner))
    seen = set(shapes(jaxpr.jaxpr))
    assert (B, 4, V) in seen  # one chunk's logits
    assert (B, T, V) not in seen


TINY = TransformerConfig(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64,
                         vocab_multiple=8, dropout_rate=0.0)


@pytest.mark.parametrize("tie", [True, False])
def test_objective_chunked_matches_plain(tie):
    cfg = dataclasses.replace(TINY, vocab_size=96, tie_embeddings=tie)
    model = CausalLM(cfg)
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 96, (2, 20)).astype(np.int32),
             "targets": rng.integers(0, 96, (2, 20)).astype(np.int32),
             "segment_ids": np.ones((2, 20), np.int32),
             "positions": np.tile(np.arange(20, dtype=np.int32), (2, 1)),
             "weights": (rng.random((2, 20)) > 0.1).astype(np.float32)}
    params = CausalLMObjective().init(model, {"params": jax.random.key(1)}, batch)["params"]

    def run(chunk):
        obj = CausalLMObjective(loss_chunk_size=chunk)
        norm = obj.normalizers(batch)
        fn = lambda p: obj.loss(model, p, batch, jax.random.key(0), norm, deterministic=True)
        return jax.value_and_grad(fn, has_aux=True)(params)

    (loss0, m0), g0 = run(None)
    for chunk in (8, 7):  # neither divides T=20; 4 (below) does
        (loss1, m1), g1 = run(chunk)
        np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-5)
        for k in m0:
            np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    (loss2, _), g2 = run(4)
    np.testing.assert_allclose(float(loss2), float(loss0), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_train_step_chunked_equals_plain(sp_model):
    def run(chunk):
        setup = build_setup(model_config=TINY, objective=CausalLMObjective(loss_chunk_size=chunk),
                            vocab=sp_model, seq_len=32, batch_size=8, seed=0,
                            mesh_shape={"data": 2, "fsdp": 2, "tensor": 2}, learning_rate=1e-2,
                            num_steps=10, warmup_steps=2)
        it = make_causal_lm_iterator(DocumentList(austen_paragraphs(200)), setup.tokenizer,
                                     seq_len=32, global_batch_size=8, seed=0)
        step = make_train_step(setup)
        state, out = setup.init_state(), []
        with partitioning.mesh_rules(setup.mesh, setup.rules):
            for _ in range(3):
                state, metrics = step(state, partitioning.global_batch(next(it), setup.mesh))
                num, den = jax.device_get(metrics["loss"])
                out.append(float(num) / float(den))
        return out, state["params"]

    plain, p0 = run(None)
    chunked, p1 = run(12)  # 32 = 2 full chunks + a padded one
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
