"""The backend-aware attention choice (research/models/attention_select.py) and the cuDNN path
(research/models/attention_cudnn.py): the selection table, the cuDNN custom calls' arguments in
HLO lowered for CUDA on this CPU, splash inside the model (Pallas interpret mode), and, on an
NVIDIA GPU only (JAX_PLATFORMS=cuda), cuDNN's numbers against the einsum reference."""

from __future__ import annotations

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import attention, attention_cudnn
from research.models.attention import attention_mask, softmax_attention
from research.models.attention_select import query_blocks, select_impl
from research.models.transformer import TransformerConfig, TransformerStack
from research.training import hugepages

ON_GPU = attention_cudnn.cuda_available()  # run them with JAX_PLATFORMS=cuda (conftest picks cpu)
gpu_only = pytest.mark.skipif(not ON_GPU, reason="cuDNN attention runs only on NVIDIA GPUs "
                                                 f"(backend is {jax.default_backend()!r})")
BERTISH = dict(vocab_size=97, num_layers=2, d_model=64, num_heads=4, mlp_dim=128, max_len=64,
               causal=False, attention_dropout_rate=0.1, dtype="bfloat16")


def select(cfg, *, backend, cuda=False, dropout=False, decode=False, length=128):
    return select_impl(cfg, q_len=length, kv_len=length, decode=decode, dropout=dropout,
                       backend=backend, cuda=cuda)


def test_auto_picks_each_backends_kernel():
    """'auto': cuDNN on NVIDIA GPUs, splash on TPU, einsums on CPU; einsums wherever the fused
    kernel cannot take the call (attention dropout in training, float32 on GPU, odd head dims,
    KV-cache decoding, lengths no splash block divides)."""
    bf16 = TransformerConfig(dtype="bfloat16", d_model=256, num_heads=4)
    assert bf16.attention_impl == "auto"
    assert select(bf16, backend="gpu", cuda=True) == "cudnn"
    assert select(bf16, backend="gpu", cuda=True, dropout=True) == "einsum"
    assert select(bf16, backend="gpu", cuda=True, decode=True) == "einsum"
    assert select(bf16, backend="gpu", cuda=False) == "einsum"  # ROCm: no cuDNN
    assert select(dataclasses.replace(bf16, dtype="float32"), backend="gpu", cuda=True) == "einsum"
    assert select(TransformerConfig(dtype="bfloat16", d_model=60, num_heads=4), backend="gpu",
                  cuda=True) == "einsum"  # head dim 15
    assert select(bf16, backend="tpu") == "splash"
    assert select(bf16, backend="tpu", dropout=True) == "einsum"
    assert select(bf16, backend="tpu", length=100) == "einsum"
    assert select(bf16, backend="cpu") == "einsum"
    for impl in ("xla", "splash"):  # no dropout in these kernels: einsums when it is on
        assert select(dataclasses.replace(bf16, attention_impl=impl), backend="tpu",
                      dropout=True) == "einsum"
    cudnn = dataclasses.replace(bf16, attention_impl="cudnn")
    # XLA_FLAGS here leave cuDNN in XLA's command buffers: dropout stays on the einsum kernel
    assert select(cudnn, backend="gpu", cuda=True, dropout=True) == "einsum"


CUDNN_OUT_OF_GRAPHS = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"


def test_cudnn_dropout_needs_cudnn_out_of_command_buffers(monkeypatch):
    types = attention_cudnn.command_buffer_types
    assert types("--xla_foo=1") is None
    assert types(f"--a=1 {CUDNN_OUT_OF_GRAPHS}") == ["FUSION", "CUBLAS", "CUBLASLT", "CUSTOM_CALL"]
    assert types("--xla_gpu_enable_command_buffer=fusion,cudnn --xla_gpu_enable_command_buffer=") == []
    ok = attention_cudnn.dropout_in_models
    assert not ok("")  # XLA's default command buffers hold cuDNN's kernels
    assert not ok("--xla_gpu_enable_command_buffer=FUSION,CUDNN")
    assert ok(CUDNN_OUT_OF_GRAPHS) and ok("--xla_gpu_enable_command_buffer=")
    monkeypatch.setattr(attention_cudnn, "DROPOUT_IN_MODELS", False)  # RESEARCH_CUDNN_ATTENTION_DROPOUT=0
    assert not ok(CUDNN_OUT_OF_GRAPHS)


PREPARE = """
import json, os
import gin, jax
from research import config
from research.models import attention_cudnn
results = {}
for case, model, flags, platforms, switch in [
        ("bert", "bert_base", "--xla_force_host_platform_device_count=2", "", True),
        ("gpt", "gpt_small", "--xla_force_host_platform_device_count=2", "", True),
        ("user_flag", "bert_base", "--xla_gpu_enable_command_buffer=FUSION", "", True),
        ("cpu", "bert_base", "--xla_force_host_platform_device_count=2", "cpu", True),
        ("switched_off", "bert_base", "--xla_force_host_platform_device_count=2", "", False),
        ("gpu", "gpt_small", "--xla_force_host_platform_device_count=2", "cuda", True),
        ("user_cpu_flag", "gpt_small", "--xla_cpu_enable_concurrency_optimized_scheduler=true",
         "", True)]:
    gin.clear_config()
    os.environ["XLA_FLAGS"] = flags
    jax.config.update("jax_platforms", platforms or None)
    attention_cudnn.DROPOUT_IN_MODELS = switch
    config.parse_gin([f"configs/models/{model}.gin"], [])
    results[case] = [config.prepare_backend_flags(), os.environ["XLA_FLAGS"]]
jax.config.update("jax_platforms", "cpu")
os.environ["XLA_FLAGS"] = ""
results["late"] = [attention_cudnn.prepare_xla_flags(0.1) if jax.devices() else None,
                   config.prepare_cpu_xla_flags(), os.environ["XLA_FLAGS"]]
print(json.dumps(results))
"""


def test_training_clis_set_backend_flags_before_jax_starts():
    """research.config.prepare_backend_flags (called by research.train and research.benchmark
    after the gin files, before JAX starts) keeps cuDNN out of CUDA graphs only for attention
    dropout, never over the user's own command-buffer flag, not when JAX is set to the CPU or
    the switch is off; on the CPU backend it turns XLA:CPU's concurrency-optimized scheduler off
    unless the user set that flag; and it changes nothing once the backend has started."""
    import json
    import os
    import subprocess
    import sys
    from .conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", PREPARE], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    base = "--xla_force_host_platform_device_count=2"
    cpu = " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    # JAX_PLATFORMS unset: the CPU unless a GPU/TPU device node exists (then no CPU flag).
    unset = "" if hugepages.uses_accelerator({}) else cpu
    assert results == {"bert": [True, f"{base} {CUDNN_OUT_OF_GRAPHS}{unset}"],
                       "gpt": [bool(unset), f"{base}{unset}"],
                       "user_flag": [bool(unset), f"--xla_gpu_enable_command_buffer=FUSION{unset}"],
                       "cpu": [True, f"{base}{cpu}"],
                       "switched_off": [bool(unset), f"{base}{unset}"],
                       "gpu": [False, base],
                       "user_cpu_flag": [False,
                                         "--xla_cpu_enable_concurrency_optimized_scheduler=true"],
                       "late": [False, False, ""]}


def test_cudnn_dropout_switch_sends_attention_dropout_to_cudnn(monkeypatch):
    monkeypatch.setattr(attention_cudnn, "DROPOUT_IN_MODELS", True)
    monkeypatch.setenv("XLA_FLAGS", CUDNN_OUT_OF_GRAPHS)
    bf16 = TransformerConfig(dtype="bfloat16", d_model=256, num_heads=4)
    for impl in ("auto", "cudnn"):
        assert select(dataclasses.replace(bf16, attention_impl=impl), backend="gpu", cuda=True,
                      dropout=True) == "cudnn"
    assert select(dataclasses.replace(bf16, attention_impl="xla"), backend="gpu", cuda=True,
                  dropout=True) == "einsum"
    assert select(dataclasses.replace(bf16, attention_impl=None), backend="gpu",
                  cuda=True) == "einsum"


def test_query_blocks_only_on_cpu_by_default():
    """None: isqrt(T / 64) blocks on CPU (the measured best at 256, 512 and 1024 tokens), one
    elsewhere; a configured number holds on every backend and length."""
    cfg = TransformerConfig()
    assert cfg.attention_query_blocks is None
    expected = {16: 1, 128: 1, 255: 1, 256: 2, 512: 2, 575: 2, 576: 3, 1024: 4, 2048: 5, 4096: 8}
    assert {t: query_blocks(cfg, t, "cpu") for t in expected} == expected
    assert all(query_blocks(cfg, t, b) == 1 for t in expected for b in ("gpu", "tpu"))
    fixed = dataclasses.replace(cfg, attention_query_blocks=3)
    assert {query_blocks(fixed, t, b) for t in (16, 4096) for b in ("cpu", "gpu")} == {3}


def test_auto_dtype_is_bf16_on_accelerators_only():
    from research.models.transformer_config import resolved_dtype
    assert resolved_dtype("auto", "gpu") == resolved_dtype("auto", "tpu") == "bfloat16"
    assert resolved_dtype("auto", "cpu") == "float32"
    assert resolved_dtype("float32", "gpu") == "float32"
    cfg = TransformerConfig()
    assert cfg.dtype == "auto" and cfg.resolved().dtype == resolved_dtype("auto")


def random_packed_rows(rng, b, t, max_docs):
    """int32[B, T]: documents 1, 2, ... of random lengths, then padding (0) in some rows."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        i, doc = 0, 0
        end = t - int(rng.integers(0, t // 4)) if r % 2 else t
        while i < end and doc < max_docs:
            doc += 1
            n = int(rng.integers(1, t // 2))
            seg[r, i:min(i + n, end)] = doc
            i += n
    return seg


@pytest.fixture
def cuda_lowering(monkeypatch):
    """Lets cuDNN attention be lowered for CUDA on a machine without a GPU: the version and
    capability probes (which need the CUDA plugin) answer as for cuDNN 9.10 on a Hopper GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as fused
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(attention, "check_attention_backend", lambda impl: None)
    monkeypatch.setattr(attention_cudnn, "cuda_available", lambda: True)


def cudnn_calls(hlo: str) -> list[tuple[str, dict]]:
    """(custom-call target, its cudnn_fmha_backend_config) for every cuDNN attention call."""
    calls = []
    for line in hlo.splitlines():
        match = re.search(r'custom_call @(__cudnn\$fmha\w*)\(.*?backend_config = "([^"]*)"', line)
        if match:  # MLIR writes the JSON's quotes as \22
            text = re.sub(r"\\([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)),
                          match.group(2))
            calls.append((match.group(1), json.loads(text)["cudnn_fmha_backend_config"]))
    return calls


def training_hlo_for_cuda(cfg: TransformerConfig) -> str:
    """The StableHLO of the gradient of a stack's summed output (training: dropout on),
    lowered for CUDA on this machine; batch 2 x 64, one segment."""
    toks = jnp.ones((2, 64), jnp.int32)
    stack = TransformerStack(cfg)
    params = jax.eval_shape(lambda: nn.unbox(stack.init(jax.random.key(0), toks))["params"])

    def loss(p):
        out = stack.apply({"params": p}, toks, segment_ids=toks, deterministic=False,
                          rngs={"dropout": jax.random.key(1)})
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("causal", [True, False])
def test_auto_attention_lowers_to_cudnn_with_the_segment_mask(cuda_lowering, causal):
    """A bf16 stack lowered for CUDA, forward and gradients: every attention is cuDNN's fused
    kernel (forward and backward) with the segment mask as a [B, 1, T, T] bias, the CAUSAL mask
    type when causal (cuDNN skips the tiles above the diagonal) and the scale 1/sqrt(H); the
    backward kernel computes no gradient for that bias; no einsum attention and no conditional
    (XLA:GPU reads predicates back on the host)."""
    hlo = training_hlo_for_cuda(TransformerConfig(
        **{**BERTISH, "causal": causal, "attention_dropout_rate": 0.0, "dropout_rate": 0.1}))
    calls = cudnn_calls(hlo)
    assert sorted(name for name, _ in calls) == sorted(
        ["__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"] * 2)
    for _, config in calls:
        assert config["dropout_rate"] == 0
        assert config["fmha_scale"] == pytest.approx(1 / 16 ** 0.5)
        assert config["mask_type"] == ("CAUSAL" if causal else "NO_MASK")
    assert "tensor<2x1x64x64xbf16>" in hlo  # the segment mask as a bias
    backward = [line[line.index("->"):] for line in hlo.splitlines()
                if re.search(r"custom_call @__cudnn\$fmha\w*Backward", line)]
    assert len(backward) == 2 and not any("2x1x64x64" in out for out in backward)  # no dbias
    assert "exponential" not in hlo  # no einsum softmax left
    assert "stablehlo.case" not in hlo and "stablehlo.if" not in hlo


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_padding_segments_lower_to_cudnn_lengths_not_a_mask(cuda_lowering, monkeypatch, dropout):
    """With padding_segments (BERT's input_mask), cuDNN's kernels take each row's length with
    the PADDING mask type, forward and backward, with or without attention dropout: no
    [B, 1, T, T] mask is built."""
    monkeypatch.setattr(attention_cudnn, "DROPOUT_IN_MODELS", True)
    monkeypatch.setenv("XLA_FLAGS", CUDNN_OUT_OF_GRAPHS)
    hlo = training_hlo_for_cuda(TransformerConfig(
        **{**BERTISH, "attention_dropout_rate": dropout, "padding_segments": True}))
    calls = cudnn_calls(hlo)
    assert len(calls) == 4 and sum("Backward" in name for name, _ in calls) == 2
    assert all(("Dropout" in name) == bool(dropout) and "Bias" not in name for name, _ in calls)
    assert all(config["mask_type"] == "PADDING" for _, config in calls)
    assert "x1x64x64x" not in hlo and "exponential" not in hlo


def test_attention_dropout_on_gpu_runs_the_einsum_kernel(cuda_lowering):
    """With attention dropout in training 'auto' lowers no cuDNN call on CUDA (cuDNN's dropout
    aborted XLA on JAX 0.11.2, see research/models/attention_cudnn.py); evaluation still does."""
    cfg = TransformerConfig(**BERTISH)
    toks = jnp.ones((2, 64), jnp.int32)
    stack = TransformerStack(cfg)
    params = jax.eval_shape(lambda: nn.unbox(stack.init(jax.random.key(0), toks))["params"])

    def lowered(deterministic):
        return jax.jit(lambda p: stack.apply(
            {"params": p}, toks, deterministic=deterministic,
            rngs={"dropout": jax.random.key(1)})).trace(params).lower(
            lowering_platforms=("cuda",)).as_text()

    assert cudnn_calls(lowered(False)) == []
    assert [name for name, _ in cudnn_calls(lowered(True))] == ["__cudnn$fmhaScaleBiasSoftmax"] * 2


def test_cudnn_attention_dropout_lowers_into_the_fused_kernel(cuda_lowering, monkeypatch):
    """With the DROPOUT_IN_MODELS switch on, attention dropout in training: cuDNN's fused kernel, forward
    and backward, with the dropout rate and a different seed in each layer; no einsum softmax
    and no dropout bits drawn by JAX for the probabilities."""
    monkeypatch.setattr(attention_cudnn, "DROPOUT_IN_MODELS", True)
    monkeypatch.setenv("XLA_FLAGS", CUDNN_OUT_OF_GRAPHS)
    hlo = training_hlo_for_cuda(TransformerConfig(**BERTISH))
    calls = cudnn_calls(hlo)
    assert len(calls) == 4 and all("Dropout" in name for name, _ in calls)
    assert all(config["dropout_rate"] == pytest.approx(0.1) for _, config in calls)
    seeds = {name: sorted(int(config["seed"]) for n, config in calls if n == name)
             for name, _ in calls}
    assert all(len(set(v)) == 2 for v in seeds.values())  # one seed per layer
    assert "exponential" not in hlo


# --------------------------------------------------------------- on an NVIDIA GPU only ------

def random_qkv(rng, b=2, t=128, n=4, k=2, h=64):
    q = jax.random.normal(rng, (b, t, n, h), jnp.float32)
    kk = jax.random.normal(jax.random.fold_in(rng, 1), (b, t, k, h), jnp.float32)
    v = jax.random.normal(jax.random.fold_in(rng, 2), (b, t, k, h), jnp.float32)
    return q.astype(jnp.bfloat16), kk.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@gpu_only
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("max_docs", [1, 12])
def test_cudnn_matches_einsum_reference(causal, max_docs):
    """Forward and q/k/v gradients of cuDNN attention against the float32 einsum
    reference on the same bf16 inputs, one or up to 12 packed documents per row with padding,
    GQA. bf16 inputs and output: relative error within a few bf16 roundings (2^-8 each)."""
    q, k, v = random_qkv(jax.random.key(0))
    seg = jnp.asarray(random_packed_rows(np.random.default_rng(0), 2, 128, max_docs))
    ct = jax.random.normal(jax.random.key(5), q.shape, jnp.float32)

    def ours(q, k, v):
        out = attention_cudnn.cudnn_attention(q, k, v, seg, causal=causal)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    def ref(q, k, v):
        q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
        out = softmax_attention(q32, k32, v32, attention_mask(seg, seg, causal))
        return jnp.sum(out * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(q, k, v)
    (_, want), want_grads = jax.jit(jax.value_and_grad(ref, (0, 1, 2), has_aux=True))(q, k, v)
    assert rel_err(out, want) < 2e-2
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < 3e-2


def test_splash_in_the_model_equals_einsum_attention():
    """attention_impl='splash' inside the transformer stack (Pallas interpret mode off a TPU)
    gives the einsum attention's hidden states: packed documents with padding, causal, float32."""
    cfg = TransformerConfig(vocab_size=97, num_layers=1, d_model=128, num_heads=2, mlp_dim=256,
                            max_len=128, dtype="float32", attention_impl="splash")
    toks = jnp.asarray(np.random.default_rng(0).integers(1, 97, (2, 128)), jnp.int32)
    seg = jnp.asarray(random_packed_rows(np.random.default_rng(1), 2, 128, max_docs=4))
    stack = TransformerStack(cfg)
    params = nn.unbox(stack.init(jax.random.key(0), toks, segment_ids=seg))["params"]
    splash = stack.apply({"params": params}, toks, segment_ids=seg)
    einsum = TransformerStack(dataclasses.replace(cfg, attention_impl="einsum")).apply(
        {"params": params}, toks, segment_ids=seg)
    assert rel_err(splash, einsum) < 1e-5


def test_splash_runs_per_shard_under_a_mesh():
    """Under a data x tensor mesh, splash runs under shard_map on each device's batch rows and
    heads (a Pallas call is opaque to XLA's partitioner) and equals the unsharded result; the
    compiled program gathers no activations (no all-gather)."""
    from research.models.attention_splash import splash_attention
    from research.training import partitioning
    mesh = partitioning.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
    rules = partitioning.logical_axis_rules("fsdp_tensor")
    q, k, v = (x.astype(jnp.float32) for x in random_qkv(jax.random.key(2), b=2, t=128, n=4,
                                                           k=2, h=64))
    seg = jnp.asarray(random_packed_rows(np.random.default_rng(3), 2, 128, max_docs=3))
    attend = jax.jit(lambda q, k, v, s: splash_attention(q, k, v, s, s, causal=True,
                                                         interpret=True))
    want = attend(q, k, v, seg)
    with partitioning.mesh_rules(mesh, rules):
        shard = lambda x, axes: jax.device_put(x, jax.sharding.NamedSharding(  # noqa: E731
            mesh, nn.logical_to_mesh_axes(axes)))
        args = (shard(q, ("act_batch", None, "act_heads", None)),
                shard(k, ("act_batch", None, "act_kv_heads", None)),
                shard(v, ("act_batch", None, "act_kv_heads", None)),
                shard(seg, ("act_batch", None)))
        lowered = attend.lower(*args)
        got = attend(*args)
    assert "all-gather" not in lowered.compile().as_text()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@gpu_only
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_attention_dropout_runs_and_averages_to_no_dropout(causal):
    """cuDNN's attention dropout (rate 0.1): finite outputs and gradients, a fresh mask on each
    run (XLA advances the offset), and the mean over 64 runs close to the dropout-free output
    (inverted dropout keeps the expectation), far closer than one run."""
    q, k, v = random_qkv(jax.random.key(0))
    seg = jnp.asarray(random_packed_rows(np.random.default_rng(0), 2, 128, 4))

    @jax.jit
    def dropped(q, k, v):
        return attention_cudnn.cudnn_attention(q, k, v, seg, causal=causal, dropout_rate=0.1,
                                               seed=7)

    plain = attention_cudnn.cudnn_attention(q, k, v, seg, causal=causal)
    runs = [np.asarray(dropped(q, k, v), np.float32) for _ in range(64)]
    assert not np.array_equal(runs[0], runs[1])
    one, mean = rel_err(runs[0], plain), rel_err(np.mean(runs, axis=0), plain)
    assert 0.05 < one < 0.6 and mean < one / 4
    grads = jax.grad(lambda q, k, v: jnp.sum(dropped(q, k, v).astype(jnp.float32)),
                     (0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


@gpu_only
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cudnn_lengths_match_the_segment_mask_on_real_tokens(causal, dropout):
    """padding_segments' path (cuDNN masking by row length) against the segment-mask path on
    right-padded rows: equal outputs and q/k/v gradients at the real tokens (with dropout: the
    same rows masked, so finite, fresh and unbiased), and padding queries output exact zeros
    with zero gradients, so nothing non-finite reaches the weights through them."""
    q, k, v = random_qkv(jax.random.key(0))
    lengths = jnp.array([128, 77], jnp.int32)
    seg = (jnp.arange(128)[None] < lengths[:, None]).astype(jnp.int32)
    real = np.asarray(seg, bool)[:, :, None, None]
    ct = jax.random.normal(jax.random.key(5), q.shape, jnp.float32) * real

    def run(lengths_arg):
        def f(q, k, v):
            out = attention_cudnn.cudnn_attention(q, k, v, seg, causal=causal,
                                                  dropout_rate=dropout, seed=3,
                                                  lengths=lengths_arg)
            return jnp.sum(out.astype(jnp.float32) * ct), out
        return jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)

    (_, out), grads = run(lengths)
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in (out, *grads))
    assert not np.asarray(out, np.float32)[~real[..., 0, 0]].any()  # padding queries: zeros
    assert not np.asarray(grads[0], np.float32)[~real[..., 0, 0]].any()
    if dropout:
        return
    (_, want), want_grads = run(None)
    out, want = np.asarray(out, np.float32) * real, np.asarray(want, np.float32) * real
    assert rel_err(out, want) < 1e-2
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < 2e-2
