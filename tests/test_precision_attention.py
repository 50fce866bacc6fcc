"""Precision modes (all-bf16, mixed), attention implementations (xla / None / cudnn) and
remat offloading: what each setting really does to dtypes, numerics and errors."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.errors import ConfigError
from research.training import partitioning
from research.models.attention_select import query_blocks, select_impl
from research.models.transformer import CausalLM, TransformerConfig, TransformerStack
from research.objectives.causal_lm import CausalLMObjective
from research.training.optim import make_optimizer
from research.training.loop import build_setup, make_train_step

from .conftest import ROOT, causal_block_elements

VOCAB = str(ROOT / "data" / "tokenizers" / "austen_8k.model")
SEQ, BATCH = 16, 4
TINY = TransformerConfig(num_layers=1, d_model=32, num_heads=4, mlp_dim=64, max_len=SEQ,
                         vocab_multiple=8)
SMALL = dict(vocab_size=97, num_layers=1, d_model=32, num_heads=4, mlp_dim=64, max_len=32)


def make_setup(**overrides):
    cfg = dataclasses.replace(TINY, **overrides)
    return build_setup(model_config=cfg, objective=CausalLMObjective(), vocab=VOCAB, seq_len=SEQ,
                       batch_size=BATCH, seed=0, mesh_shape={"data": 1}, learning_rate=1e-2,
                       num_steps=10, warmup_steps=0, devices=jax.devices()[:1])


def packed_batch(vocab_size, seed=0):
    """Two documents per row (segment ids 1, 2; positions restart), every target counted."""
    toks = np.random.default_rng(seed).integers(5, vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    seg = np.repeat([[1] * 7 + [2] * (SEQ - 7)], BATCH, 0).astype(np.int32)
    pos = np.concatenate([np.arange(7), np.arange(SEQ - 7)])
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "segment_ids": seg,
            "positions": np.repeat(pos[None], BATCH, 0).astype(np.int32),
            "weights": np.ones((BATCH, SEQ), np.float32)}


def random_params(abstract, seed=0, std=0.1):
    """Concrete parameters for an abstract tree, drawn in numpy: norm scales 1, biases 0,
    the rest N(0, std), in each leaf's dtype. (Compiling the model's own threefry initializer
    costs seconds per config on a 2-core CPU; the tests here are about what comes after.)
    std 0.1, not GPT's 0.02, makes the logits O(1), so the loss depends on the arithmetic's
    precision instead of sitting at log(V) whatever the dtype."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = np.ones(leaf.shape)
        elif "bias" in name:
            value = np.zeros(leaf.shape)
        else:
            value = rng.normal(0.0, std, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def dtypes(tree):
    """The dtypes of a tree's non-integer leaves (optimizer step counters are int32)."""
    return {str(x.dtype) for x in jax.tree.leaves(tree) if not jnp.issubdtype(x.dtype, jnp.integer)}


def all_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (remat, jit, custom_vjp...)."""
    yield from jaxpr.eqns
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from all_eqns(sub)


def dot_generals(jaxpr):
    """(lhs dtype, rhs dtype, out dtype, out shape) of every dot_general."""
    return [(e.invars[0].aval.dtype, e.invars[1].aval.dtype, e.outvars[0].aval.dtype,
             e.outvars[0].aval.shape) for e in all_eqns(jaxpr) if e.primitive.name == "dot_general"]


# ------------------------------------------------------------------ precision modes ----------

def test_all_bf16_training_keeps_params_and_adam_state_in_bf16():
    """param_dtype = dtype = bfloat16 through build_setup + make_train_step: every float leaf of
    params and of the AdamW state (mu, nu) is bf16, as build_setup's initial state and after
    steps (only the step counters are int32); losses are finite and fall; the first loss is the
    fp32 model's on the same weights."""
    setup = make_setup(param_dtype="bfloat16", dtype="bfloat16")
    batch = packed_batch(setup.cfg.vocab_size)
    # setup.abstract_state is jax.eval_shape of setup.init_state: the dtypes it creates.
    initial = setup.abstract_state
    assert dtypes(initial["params"]) == dtypes(initial["opt_state"]) == {"bfloat16"}
    adam = initial["opt_state"][1][0]  # chain(clip, adamw=chain(scale_by_adam, ...))
    assert dtypes(adam.mu) == dtypes(adam.nu) == {"bfloat16"}
    params = random_params(initial["params"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": setup.optimizer.init(params), "rng": jax.random.key(0)}
    assert jax.tree.structure(state) == jax.tree.structure(initial)
    state = jax.device_put(state, setup.state_shardings)  # as init_state lays it out: one compile

    # fp32 reference for the first loss: the same (bf16-representable) weights upcast, fp32 math.
    fp32 = CausalLM(dataclasses.replace(setup.cfg, param_dtype="float32", dtype="float32"))
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    norm = setup.objective.normalizers(batch)
    ref_sum, ref_count = jax.jit(lambda p: setup.objective.loss(
        fp32, p, batch, jax.random.key(0), norm, True)[1]["loss"])(params32)
    ref = float(ref_sum) / float(ref_count)

    step, losses = make_train_step(setup), []
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        for _ in range(4):
            state, metrics = step(state, batch)
            num, den = jax.device_get(metrics["loss"])
            losses.append(float(num) / float(den))
    assert dtypes(state["params"]) == dtypes(state["opt_state"]) == {"bfloat16"}
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # Tolerance: bf16 keeps 8 significant bits (one rounding <= 2^-9 relative); through this
    # one-layer net the logits (|logit| ~ 1) end up off by a few 1e-3, and so is each token's
    # loss (softmax and loss are fp32). Averaging 64 tokens' independent errors shrinks that
    # ~8x, to ~3e-4 (measured: 2e-4 of a 9.17 loss). rtol 1e-3 (~0.009) leaves margin, also
    # for TF32 "fp32" matmuls on GPUs, and is ~100x below one training step's change (~0.9).
    assert losses[0] == pytest.approx(ref, rel=1e-3), (losses[0], ref)
    assert abs(losses[0] - np.log(setup.cfg.vocab_size)) > 0.05  # the check is not vacuous


def test_mixed_precision_has_fp32_state_and_bf16_matmuls():
    """param_dtype=float32, dtype=bfloat16: params and AdamW state are float32 (also after a
    step, by its traced output), every matmul takes bf16 operands and gives bf16 outputs, except
    the attention scores q.k, which attention accumulates in float32 for the softmax (as
    jax.nn.dot_product_attention does); the logits the loss sees are float32."""
    setup = make_setup(dtype="bfloat16")
    batch = packed_batch(setup.cfg.vocab_size)
    assert dtypes(setup.abstract_state["params"]) == {"float32"}
    assert dtypes(setup.abstract_state["opt_state"]) == {"float32"}
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        after, _ = jax.eval_shape(make_train_step(setup), setup.abstract_state, batch)
        assert dtypes(after["params"]) == dtypes(after["opt_state"]) == {"float32"}
        params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), setup.abstract_state["params"])
        model = setup.model
        logits = jax.eval_shape(lambda p: model.apply({"params": p}, batch["inputs"]), params)
        assert logits.dtype == jnp.float32
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, batch["inputs"],
                                                     segment_ids=batch["segment_ids"]))(params)
    dots = dot_generals(jaxpr.jaxpr)
    # per layer q, k, v, out, wi, wo and, per causal query block, scores = q.k and probs @ v;
    # plus the tied output projection
    layers, blocks = setup.cfg.num_layers, query_blocks(setup.cfg, SEQ)
    assert len(dots) == (6 + 2 * blocks) * layers + 1
    assert all(d[:2] == (jnp.bfloat16, jnp.bfloat16) for d in dots), dots
    scores = [d for d in dots if d[2] == jnp.float32]
    assert len(scores) == blocks * layers
    assert sum(np.prod(d[3]) for d in scores) == (
        BATCH * setup.cfg.num_heads * causal_block_elements(SEQ, blocks) * layers)
    assert sum(d[2] == jnp.bfloat16 for d in dots) == (6 + blocks) * layers + 1


def test_all_bf16_adam_caveats_are_real():
    """What README documents for all-bf16: in bf16 arithmetic AdamW's b2=0.999 rounds to 1.0
    (and a 0.1% decay is below bf16 resolution anyway), so nu never decays; an update smaller
    than half an ulp of its parameter is rounded away (a norm scale of 1.0 stays 1.0 at lr 1e-3)
    while the same update moves a float32 parameter."""
    assert 0.999 * jnp.ones((), jnp.bfloat16) == 1.0  # optax's `b2 * nu` in bf16
    # b1/b2/eps explicit: make_optimizer is gin-configurable and another test in this worker
    # may have left e.g. pretrain_causal.gin's make_optimizer.b2 = 0.95 bound.
    opt, _ = make_optimizer(1e-3, 100, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                            clip_norm=None)
    for dtype in (jnp.float32, jnp.bfloat16):
        params = {"scale": jnp.ones((4,), dtype)}
        state = opt.init(params)
        ones = {"scale": jnp.ones((4,), dtype)}
        updates, state = opt.update(ones, state, params)
        new = optax.apply_updates(params, updates)
        moved = bool(jnp.any(new["scale"] != params["scale"]))
        assert moved == (dtype == jnp.float32)
        adam = state[0][0]  # chain(adamw) -> adamw = chain(scale_by_adam, ...)
        nu0 = adam.nu["scale"]
        for _ in range(3):
            _, state = opt.update({"scale": jnp.zeros((4,), dtype)}, state, params)
        nu = state[0][0].nu["scale"]
        assert nu.dtype == dtype
        assert bool(jnp.all(nu < nu0)) == (dtype == jnp.float32)  # fp32: 0.999^3 decay


# ----------------------------------------------------------------- attention impls ----------

def packed_segments(b=2, t=16):
    """Several documents per row and trailing padding (segment 0), as the data pipeline packs."""
    rows = [[1] * 5 + [2] * 6 + [3] * 3 + [0] * 2, [1] * 9 + [2] * 7][:b]
    seg = np.asarray(rows, np.int32)
    pos = np.zeros_like(seg)
    for r in range(b):
        for i in range(1, t):
            pos[r, i] = 0 if seg[r, i] != seg[r, i - 1] else pos[r, i - 1] + 1
    return jnp.asarray(seg), jnp.asarray(pos)


def forward_and_grads(cfg, params, toks, seg, pos, **apply_kw):
    """Hidden states and d(sum(hidden * fixed weights))/d(params) of a TransformerStack."""
    stack = TransformerStack(cfg)
    w = jax.random.normal(jax.random.key(3), toks.shape + (cfg.d_model,), jnp.float32)

    def f(p):
        out = stack.apply({"params": p}, toks, segment_ids=seg, positions=pos, **apply_kw)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return out, grads


def attention_case(causal, **overrides):
    cfg = TransformerConfig(**{**SMALL, "num_kv_heads": 2, "causal": causal, "position": "rotary",
                               **overrides})
    toks = jnp.asarray(np.random.default_rng(0).integers(4, 97, (2, 16)), jnp.int32)
    seg, pos = packed_segments()
    abstract = jax.eval_shape(lambda: nn.unbox(TransformerStack(cfg).init(
        jax.random.key(0), toks, segment_ids=seg, positions=pos)["params"]))
    return cfg, random_params(abstract, std=0.2), toks, seg, pos


@functools.lru_cache(maxsize=None)
def one_block_float32(causal, kv_heads):
    """(cfg, params, output, grads) of attention_case(causal, kv_heads) in float32 with one
    query block: the reference several tests compare with, computed once per process."""
    cfg, params, toks, seg, pos = attention_case(causal, num_kv_heads=kv_heads, dtype="float32",
                                                 attention_query_blocks=1)
    return (cfg, params, *forward_and_grads(cfg, params, toks, seg, pos))


def reference_for(cfg, params):
    """`one_block_float32` for `cfg` made float32 with one query block, after checking that
    its parameters are `params` (attention_case's parameters do not depend on the dtype or the
    blocks)."""
    ref_cfg, ref_params, out, grads = one_block_float32(cfg.causal, cfg.kv_heads)
    assert dataclasses.replace(cfg, dtype="float32", attention_query_blocks=1) == ref_cfg
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(ref_params)))
    return out, grads


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_default_attention_equals_jax_xla_attention(causal, kv_heads, dtype):
    """The CPU's default attention (research.models.attention.softmax_attention, heads-major)
    computes what jax.nn.dot_product_attention's XLA implementation computes: forward and every
    parameter gradient, packed documents with padding, MHA and grouped KV heads (one query
    block; the blocks are checked against one block below). float32: only the summation order
    differs, so they agree to 1e-5 relative (measured <= 1.6e-6). bfloat16: a different
    summation order moves the bf16 roundings, so each side is compared with the same model in
    float32 instead: ours may be no further from it than JAX's plus one bf16 rounding (2^-8),
    for the output and every gradient. (The key bias's gradient, a sum of many rounded terms,
    is the worst leaf on both: measured 1.8-4.3% from float32 for ours, 1.9-4.3% for JAX's;
    ours and JAX's differ by up to 1.4% there, which is why they are not compared directly.)"""
    cfg, params, toks, seg, pos = attention_case(causal, num_kv_heads=kv_heads, dtype=dtype,
                                                 attention_query_blocks=1)
    assert select_impl(cfg, q_len=16, kv_len=16, decode=False, dropout=False) == "einsum"
    ours, g_ours = (reference_for(cfg, params) if dtype == "float32"
                    else forward_and_grads(cfg, params, toks, seg, pos))
    jaxs, g_jax = forward_and_grads(dataclasses.replace(cfg, attention_impl="xla"), params,
                                    toks, seg, pos)
    assert ours.dtype == jaxs.dtype == jnp.dtype(dtype)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g_ours)[0]]
    if dtype == "float32":
        assert rel_err(ours, jaxs) < 1e-5
        for path, a, b in zip(paths, jax.tree.leaves(g_ours), jax.tree.leaves(g_jax)):
            assert rel_err(a, b) < 1e-5, path
        return
    exact, g_exact = reference_for(cfg, params)
    one_rounding = 2.0 ** -8
    assert rel_err(ours, exact) <= rel_err(jaxs, exact) + one_rounding
    for path, a, b, ref in zip(paths, jax.tree.leaves(g_ours), jax.tree.leaves(g_jax),
                               jax.tree.leaves(g_exact)):
        assert rel_err(a, ref) <= rel_err(b, ref) + one_rounding, path


def test_default_attention_scores_have_no_group_axis_for_mha():
    """With one query head per KV head the score matmul is 4-D [B, N, T, S]: a size-1 group axis
    (as jax.nn.dot_product_attention's XLA path vmaps over) makes XLA:CPU transpose the
    [B, N, T, S] tensors, ~5% of a gpt_small train step. Grouped KV heads keep [B, K, G, T, S]."""
    for kv_heads, rank in ((4, 4), (2, 5)):
        cfg, params, toks, seg, pos = attention_case(True, num_kv_heads=kv_heads,
                                                     attention_query_blocks=1)
        jaxpr = jax.make_jaxpr(lambda p: TransformerStack(cfg).apply(  # noqa: B023
            {"params": p}, toks, segment_ids=seg, positions=pos))(params)
        scores = [d[3] for d in dot_generals(jaxpr.jaxpr) if d[3].count(16) == 2]  # T = S = 16
        assert scores and all(len(shape) == rank for shape in scores), scores


@pytest.mark.parametrize("blocks", [4, 3, 16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_query_blocks_equal_one_block(blocks, kv_heads):
    """attention_query_blocks splits causal self-attention into query blocks that skip the
    masked keys: forward and every gradient equal one block (float32, summation order only),
    packed documents with padding, T = 16 split evenly (4), unevenly (3: 5/6/5 queries) and
    into single queries (16); the score matmuls really shrink to the causal prefix."""
    cfg, params, toks, seg, pos = attention_case(True, num_kv_heads=kv_heads,
                                                 attention_query_blocks=blocks)
    blocked, g_blocked = forward_and_grads(cfg, params, toks, seg, pos)
    one, g_one = reference_for(cfg, params)
    assert rel_err(blocked, one) < 1e-5
    flat = jax.tree_util.tree_flatten_with_path(g_blocked)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(g_one)):
        assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)
    jaxpr = jax.make_jaxpr(lambda p: TransformerStack(cfg).apply(
        {"params": p}, toks, segment_ids=seg, positions=pos))(params)
    score_elems = sum(int(np.prod(e.outvars[0].aval.shape)) for e in all_eqns(jaxpr.jaxpr)
                      if e.primitive.name == "exp")  # the softmax's, one per score element
    per_head = causal_block_elements(16, blocks)
    assert score_elems == 2 * 4 * per_head  # batch 2 x 4 heads x the causal prefix blocks
    assert per_head < 16 * 16


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_heads_major_layout_equals_token_major(causal, kv_heads, blocks, dropout, monkeypatch):
    """On CPU the einsum kernel computes heads-major (`attention.heads_major_attention`: q, k,
    v taken to [B,N,T,H] once); elsewhere token-major ([B,T,N,H] einsums, causal query blocks in
    `causal_blocked_attention`). Both give the same forward and parameter gradients (float32,
    summation order only): MHA and grouped KV heads, causal and bidirectional, one and three
    query blocks, packed documents with padding, and with attention dropout in training (the
    same mask: the probabilities have one layout in both)."""
    from research.models import attention

    cfg, params, toks, seg, pos = attention_case(causal, num_kv_heads=kv_heads,
                                                 attention_query_blocks=blocks,
                                                 attention_dropout_rate=dropout)
    kw = {"deterministic": False, "rngs": {"dropout": jax.random.key(5)}} if dropout else {}
    calls = []
    heads_major_kernel = attention.heads_major_attention
    monkeypatch.setattr(attention, "heads_major_attention",
                        lambda *a: calls.append(1) or heads_major_kernel(*a))
    assert attention.einsum_heads_major() and not attention.einsum_heads_major("gpu")
    hm, g_hm = forward_and_grads(cfg, params, toks, seg, pos, **kw)
    assert calls, "the CPU did not take the heads-major kernel"
    monkeypatch.setattr(attention, "einsum_heads_major", lambda: False)
    tm, g_tm = forward_and_grads(cfg, params, toks, seg, pos, **kw)
    assert len(calls) == 1  # traced once, under the first jit only
    assert rel_err(hm, tm) < 1e-5
    flat = jax.tree_util.tree_flatten_with_path(g_hm)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(g_tm)):
        assert rel_err(a, b) < 1e-5, jax.tree_util.keystr(path)


def test_query_blocks_apply_only_to_causal_self_attention():
    """Bidirectional attention ignores attention_query_blocks (one block); a value below 1 is
    refused with the fix named. (KV-cache decoding, also one block, is checked against the
    blocked full forward by tests/test_generate.py::test_kv_cache_equals_no_cache.)"""
    cfg, params, toks, seg, pos = attention_case(False, attention_query_blocks=4)
    a = TransformerStack(cfg).apply({"params": params}, toks, segment_ids=seg, positions=pos)
    b = TransformerStack(dataclasses.replace(cfg, attention_query_blocks=1)).apply(
        {"params": params}, toks, segment_ids=seg, positions=pos)
    np.testing.assert_array_equal(a, b)
    for bad in (0, 2.0):
        with pytest.raises(ConfigError, match="attention_query_blocks must be an integer >= 1"):
            TransformerConfig(attention_query_blocks=bad)


@pytest.mark.parametrize("seq", [128, 256, 1024])
def test_default_query_blocks_follow_the_length_on_cpu(seq):
    """With attention_query_blocks=None a causal model on CPU scores its queries in
    query_blocks(cfg, T) blocks (1, 2 and 4 here): the score products cover exactly those
    blocks' causal prefixes."""
    assert jax.default_backend() == "cpu"
    cfg = TransformerConfig(**{**SMALL, "max_len": seq, "causal": True})
    toks = jnp.zeros((1, seq), jnp.int32)
    seg, pos = jnp.ones((1, seq), jnp.int32), jnp.arange(seq)[None]
    stack = TransformerStack(cfg)
    params = jax.eval_shape(lambda: stack.init(jax.random.key(0), toks, segment_ids=seg,
                                               positions=pos)["params"])
    jaxpr = jax.make_jaxpr(lambda p: stack.apply({"params": p}, toks, segment_ids=seg,
                                                 positions=pos))(params)
    scores = [d[3] for d in dot_generals(jaxpr.jaxpr) if d[2] == jnp.float32 and len(d[3]) == 4
              and d[3][-1] != cfg.dim_per_head]
    blocks = query_blocks(cfg, seq)
    assert blocks == max(1, int(np.sqrt(seq // 64)))
    assert len(scores) == blocks
    assert sum(np.prod(s) for s in scores) == cfg.num_heads * causal_block_elements(seq, blocks)


def test_explicit_softmax_path_matches_fused_attention_causal_packed():
    """The explicit masked-softmax path (used for attention-probability dropout) equals the
    fused XLA attention for the causal mask with several documents per row and padding, in the
    forward and the gradients (test_model covers the bidirectional mask, forward only)."""
    cfg, params, toks, seg, pos = attention_case(True, attention_impl="xla")
    fused, g_fused = forward_and_grads(cfg, params, toks, seg, pos)
    # a rate so small nothing is dropped; an RBG key: threefry's dropout bits compile slowly
    explicit, g_exp = forward_and_grads(
        dataclasses.replace(cfg, attention_dropout_rate=1e-9), params, toks, seg, pos,
        deterministic=False, rngs={"dropout": jax.random.key(0, impl="unsafe_rbg")})
    np.testing.assert_allclose(explicit, fused, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_exp), jax.tree.leaves(g_fused)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN attention runs only on NVIDIA GPUs (backend is "
                           f"{jax.default_backend()!r})")
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_attention_matches_xla_in_bf16(causal):
    """cuDNN flash attention vs XLA attention, bf16, packed documents with padding (the segment
    mask reaches cuDNN as a bias, causality as its CAUSAL mask type): the forward and every
    parameter gradient agree to bf16 precision (passed on an H200, JAX 0.11.2, 2026-11-26).

    Tolerances (relative Frobenius error): on CPU this config in bf16 vs float32 (every op
    rounded, not just attention) differs by ~0.9% in the output and <= ~3% in the q/k
    gradients; cuDNN and XLA share the bf16 projections and differ only inside attention, so
    2% / 5% leave margin. A masking error (documents merged) gives 70-80%, so they still bite.
    """
    cfg, params, toks, seg, pos = attention_case(causal, dtype="bfloat16", head_dim=16,
                                                 d_model=64)
    cudnn_cfg = dataclasses.replace(cfg, attention_impl="cudnn")
    hlo = jax.jit(lambda p: TransformerStack(cudnn_cfg).apply(
        {"params": p}, toks, segment_ids=seg, positions=pos)).lower(params).as_text()
    assert "__cudnn$fmha" in hlo  # really the cuDNN kernel, not a fallback
    out_cudnn, g_cudnn = forward_and_grads(cudnn_cfg, params, toks, seg, pos)
    out_xla, g_xla = forward_and_grads(dataclasses.replace(cfg, attention_impl="xla"),
                                       params, toks, seg, pos)
    assert out_cudnn.dtype == out_xla.dtype == jnp.bfloat16
    assert rel_err(out_cudnn, out_xla) < 2e-2
    flat_cudnn = jax.tree_util.tree_flatten_with_path(g_cudnn)[0]
    for (path, a), b in zip(flat_cudnn, jax.tree.leaves(g_xla)):
        assert rel_err(a, b) < 5e-2, jax.tree_util.keystr(path)


def test_cudnn_attention_errors_name_the_fix():
    """attention_impl='cudnn' off a GPU fails with a ConfigError that says to use 'auto' or
    'einsum' (JAX itself says only "cuDNN is not detected"), at model init and so already in
    build_setup; a float32 compute dtype or an unknown name fail at config time."""
    with pytest.raises(ConfigError, match=r"16-bit compute dtype"):
        TransformerConfig(attention_impl="cudnn", dtype="float32")  # never supported by cuDNN
    with pytest.raises(ConfigError, match="attention_impl"):
        TransformerConfig(attention_impl="flash")
    if jax.default_backend() == "gpu":
        return  # there attention_impl='cudnn' is valid
    cfg = TransformerConfig(**SMALL, dtype="bfloat16", attention_impl="cudnn")
    toks = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ConfigError, match=r"needs an NVIDIA GPU.*use attention_impl='auto'"):
        jax.eval_shape(CausalLM(cfg).init, jax.random.key(0), toks)
    with pytest.raises(ConfigError, match=r"attention_impl='auto' \(the default"):
        make_setup(dtype="bfloat16", attention_impl="cudnn")


# ------------------------------------------------------------------- remat offload ----------

def test_offload_policy_moves_saved_activations_to_host_memory():
    """remat_policy='offload' saves the tagged matmul/attention outputs in the host memory
    space (device_put to MemorySpace.Host in the backward's jaxpr). On CPU jax 0.10.2 accepts
    this (host memory is the device's memory, so nothing moves) and the gradients equal the
    plain ones: tests/test_model.py's remat-equality test includes 'offload'."""
    cfg = TransformerConfig(**SMALL, remat_policy="offload")
    toks = jnp.zeros((2, 8), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(CausalLM(cfg).init(jax.random.key(0), toks)["params"]))
    grad = jax.grad(lambda p: jnp.mean(CausalLM(cfg).apply({"params": p}, toks)))

    def to_host(fn):
        return [e for e in all_eqns(jax.make_jaxpr(fn)(params).jaxpr)
                if e.primitive.name == "device_put" and jax.memory.Space.Host in e.params["devices"]]

    assert len(to_host(grad)) >= 3 * cfg.num_layers  # attention_out + 2 of the matmul_outs at least
    save = CausalLM(dataclasses.replace(cfg, remat_policy="save_matmuls"))
    assert not to_host(jax.grad(lambda p: jnp.mean(save.apply({"params": p}, toks))))
