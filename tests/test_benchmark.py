"""Model FLOP counts (by hand and against XLA's cost analysis) and the benchmark CLI.

No timing assertions: the CLI runs are checked for their output, not their speed."""

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import benchmark, benchmark_peer, profiling
from research.errors import ConfigError
from research.models import flops
from research.training import hugepages
from research.objectives.bert_pretraining import BertPretrainingObjective
from research.models.transformer import TransformerConfig
from research.objectives.causal_lm import CausalLMObjective

from .conftest import ROOT, causal_block_elements, env_without_hugepage_settings, xla_flags


def test_flops_hand_count():
    # L=1, D=4, N=2 heads of H=2, F=8, V=10, T=3, B=1.
    cfg = TransformerConfig(num_layers=1, d_model=4, num_heads=2, mlp_dim=8, vocab_size=10,
                            max_len=8)
    per_token_layer = 2 * (4 * 4 + 2 * 4 * 4 + 4 * 4) + 2 * 2 * 4 * 8  # q,k,v,out + MLP = 256
    attention = 2 * 2 * 3 * 3 * 2 * 2  # QK^T and PV, full: 144
    head = 3 * 2 * 4 * 10
    assert flops.forward_flops(cfg, 1, 3) == 3 * per_token_layer + attention / 2 + head
    assert flops.training_flops(cfg, 1, 3) == 3 * (3 * per_token_layer + attention / 2 + head)
    assert flops.training_flops(cfg, 1, 3, causal_half=False) == 3 * (
        3 * per_token_layer + attention + head)
    # Bidirectional: full attention; BERT heads at P=2 predictions, pooler, NSP.
    enc = dataclasses.replace(cfg, causal=False)
    bert = 3 * per_token_layer + attention + 2 * (2 * 4 * 4 + 2 * 4 * 10) + 2 * 4 * 4 + 2 * 4 * 2
    assert flops.forward_flops(enc, 1, 3, mlm_predictions=2, next_sentence=True) == bert
    obj = BertPretrainingObjective(max_predictions_per_seq=2, next_sentence=True)
    assert obj.training_flops(enc, 1, 3) == 3 * bert
    # GQA (K=1 kv head) and a gated MLP.
    gqa = dataclasses.replace(cfg, num_kv_heads=1, activation="swiglu")
    assert flops.forward_flops(gqa, 1, 3) == 3 * (2 * (16 + 2 * 4 * 2 + 16) + 2 * 3 * 32) + 72 + 240


SMALL = dict(num_layers=2, d_model=128, num_heads=4, mlp_dim=512, max_len=128, vocab_size=2048)


@pytest.mark.parametrize("kind", ["causal", "bert"])
def test_flops_match_xla_cost_analysis(kind):
    """XLA's count of a jitted forward+backward is within [1, 1.10] x our count with the
    attention the program really computes: all of it for BERT and for causal attention in one
    query block (XLA computes the masked half too), the causal prefix blocks with
    attention_query_blocks=4 (5/8 of it at T=128). XLA also counts elementwise work (softmax,
    GELU, norms, the cross entropy) that we leave out; at this size that is 2-5%."""
    b, t = 4, 128
    if kind == "causal":
        cases = [(TransformerConfig(**SMALL, attention_query_blocks=n), n) for n in (1, 4)]
        obj = CausalLMObjective()
    else:
        cases = [(TransformerConfig(**SMALL, causal=False, type_vocab_size=2, embedding_norm=True,
                                    norm_placement="post", activation="gelu_exact"), 1)]
        obj = BertPretrainingObjective()
    for cfg, blocks in cases:
        model = obj.make_model(cfg)
        batch = {k: jnp.asarray(v) for k, v in obj.dummy_batch(b, t).items()}
        params = obj.init(model, {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                          batch)["params"]
        norm = obj.normalizers(batch)
        loss = lambda p, x: obj.loss(model, p, x, jax.random.key(0), norm,  # noqa: E731,B023
                                     deterministic=True)[0]
        cost = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        full = obj.training_flops(cfg, b, t, causal_half=False)
        attention = 2 * (full - obj.training_flops(cfg, b, t))  # 0 for BERT
        computed = causal_block_elements(t, blocks) / t ** 2
        ours = full - attention + attention * computed
        assert 1.0 <= cost["flops"] / ours <= 1.10, (blocks, cost["flops"], ours)


KEYS = ("tokens_per_sec", "tokens_per_sec_per_device", "step_time_s", "model_flops_per_step",
        "mfu", "peak_memory_bytes", "compile_time_s", "vocab_size")


def _cli(*args):
    env = env_without_hugepage_settings(XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "research.benchmark", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return proc.stdout, json.loads(last)


def test_benchmark_cli_gpt_tiny(tmp_path):
    out, result = _cli("--gin_file=configs/models/gpt_tiny.gin",
                       "--gin_file=configs/runs/pretrain_causal.gin", "--gin.BATCH_SIZE=2",
                       "--gin.SEQ_LEN=32", "--steps", "2", "--warmup", "1",
                       "--profile_steps=1:2", f"--profile_dir={tmp_path / 'profile'}")
    for key in KEYS:
        assert key in result, key
    assert result["vocab_size"] == 8064 and result["batch_size"] == 2 and result["seq_len"] == 32
    assert result["model_flops_per_step"] > 0 and result["tokens_per_sec"] > 0
    assert "table row: | 1 x cpu" in out and "gpt_tiny + pretrain_causal, batch 2 x 32" in out
    times = result["step_times_s"]  # headline = median of the timed steps
    assert len(times) == 2 and result["step_time_s"] == pytest.approx(float(np.median(times)))
    assert result["tokens_per_sec"] == pytest.approx(2 * 32 / result["step_time_s"])
    assert "MFU" in out and "tokens/s" in out
    # `python -m research.benchmark` re-executes itself with huge-page malloc where the system
    # offers it (research.training.hugepages) and says so.
    assert result["host_malloc_hugepages"] is hugepages.supported()
    assert result["host_malloc_keeps_heap"] is False  # RESEARCH_HUGEPAGES=keep is opt-in
    # research.config.prepare_backend_flags turned XLA:CPU's concurrency-optimized scheduler off.
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in result["xla_flags"]
    # --profile_steps=1:2: a jax.profiler trace of the second timed step in --profile_dir.
    files = profiling.trace_files(str(tmp_path / "profile"))
    assert len(files) == 1 and files[0].endswith(".xplane.pb"), files
    assert result["profile"] == {"steps": [1, 2], "dir": str(tmp_path / "profile"),
                                 "files": files}
    assert "profile: steps 1:2 traced to" in out
    assert "device time" in out and "| kernel | kind | ms | % |" in out  # research.trace_summary


def test_cpu_mfu_uses_the_higher_of_two_peak_measurements(monkeypatch):
    """The CPU peak is measured before and after the timed steps; the higher one divides, so a
    neighbour slowing one measurement cannot inflate the MFU."""
    import gin

    from research import benchmark
    from research.config import parse_gin
    from research.training.run_config import RunConfig

    measured = iter([1.0e9, 3.0e9])  # before, after
    monkeypatch.setattr(benchmark, "measure_matmul_peak", lambda dtype, **_: next(measured))
    gin.clear_config()
    try:
        parse_gin(["configs/models/gpt_tiny.gin", "configs/runs/pretrain_causal.gin"],
                  ["BATCH_SIZE=8", "SEQ_LEN=16", "MESH_SHAPE={'data': -1}"])
        result = benchmark.run_ours(gin.get_bindings(RunConfig), steps=1, warmup=0, seed=0)
    finally:
        gin.clear_config()
    assert result["peak_flops_per_device"] == 3.0e9
    np.testing.assert_allclose(result["mfu"],
                               result["model_flops_per_step"] / result["step_time_s"]
                               / (3.0e9 * result["devices"]))


def test_benchmark_table_script_prints_the_readme_table(tmp_path):
    """experiments/benchmark_table.sh: header + one row per model at its configured dropout and
    at dropout 0; extra flags override the defaults (here: tiny shapes, so the test is quick).
    Each row's run compares with the HF PyTorch peer (--compare=hf_torch); its JSON says how the
    peer ran and derives the peer's MFU and the ratio from the same numbers as ours. The script
    keeps freed memory in malloc's heap (RESEARCH_HUGEPAGES=keep) unless told otherwise."""
    pytest.importorskip("transformers")
    # One CPU device; LLVM optimization level 0 compiles each run's programs ~3x faster (the
    # table's shape and the configured settings are checked here, not its speed).
    env = env_without_hugepage_settings(XLA_FLAGS=xla_flags(),
                                        JAX_PLATFORMS="cpu", PYTHON=sys.executable,
                                        BENCHMARK_TABLE_DIR=str(tmp_path))
    tiny = ["--gin.TransformerConfig.num_layers=1", "--gin.TransformerConfig.d_model=32",
            "--gin.TransformerConfig.num_heads=2", "--gin.TransformerConfig.mlp_dim=64",
            "--gin.BATCH_SIZE=2", "--gin.SEQ_LEN=32", "--steps", "1", "--warmup", "1",
            # GPT's loss in chunks: the peer comparison does not depend on our loss path
            "--gin.CausalLMObjective.loss_chunk_size=16"]
    proc = subprocess.run(["bash", "experiments/benchmark_table.sh", *tiny], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| machine | run | precision") and lines[1].startswith("|---|")
    assert len(lines) == 6, lines
    assert "gpt_small + pretrain_causal, batch 2 x 32, dropout 0.1/0 " in lines[2]
    assert "gpt_small + pretrain_causal, batch 2 x 32, dropout 0/0 " in lines[3]
    assert all("GPT2LMHeadModel" in line for line in lines[2:4])
    assert "bert_base + pretrain_mlm_nsp, batch 2 x 32, dropout 0.1/0.1 " in lines[4]
    assert "bert_base + pretrain_mlm_nsp, batch 2 x 32, dropout 0/0 " in lines[5]
    assert all("BertForPreTraining" in line for line in lines[4:6])
    result = json.loads((tmp_path / "bert_base_dropout_0.txt").read_text().strip().splitlines()[-1])
    assert result["num_layers"] == 1 and result["d_model"] == 32 and result["steps"] == 1
    assert result["dropout_rate"] == result["attention_dropout_rate"] == 0.0
    for name in ("gpt_small_dropout_configured", "gpt_small_dropout_0",
                 "bert_base_dropout_configured", "bert_base_dropout_0"):
        result = json.loads((tmp_path / f"{name}.txt").read_text().strip().splitlines()[-1])
        check_peer_result(result)
        # The script runs with RESEARCH_HUGEPAGES=keep where the system gives huge pages.
        assert result["host_malloc_keeps_heap"] is hugepages.supported()


def check_peer_result(result: dict) -> None:
    """A --compare=hf_torch result on CPU: the peer ran eager in float32 with SDPA, its steps
    alternating with ours; its MFU and the ratio follow from the step times."""
    for key in KEYS:
        assert key in result, key
    peer = result["compare"]
    assert peer["peer"] == "hf_torch" and peer["params"] > 0 and result["compare_ratio"] > 0
    assert peer["device"] == "cpu" and peer["weights_dtype"] == result["dtype"] == "float32"
    assert peer["autocast"] is None and peer["compiled"] is False and peer["attention"] == "sdpa"
    # The peer's MFU: our model FLOPs per step / its step time / the same per-device peak.
    np.testing.assert_allclose(peer["mfu"], result["model_flops_per_step"] / peer["step_time_s"]
                               / result["peak_flops_per_device"])
    assert result["compare_ratio"] == pytest.approx(result["tokens_per_sec"]
                                                    / peer["tokens_per_sec"])
    assert result["peers"] == {"hf_torch": peer}
    # On CPU the peer's timed steps alternate with ours: as many of them, and flagged.
    assert peer["interleaved"] is True and len(peer["step_times_s"]) == result["steps"] == 1
    # The peer shares the process: JAX does not preallocate the GPU's memory (unless set).
    assert result["jax_gpu_preallocate"] == os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def test_compare_flag_values():
    assert benchmark_peer.parse_peers("hf_torch") == ["hf_torch"]
    assert benchmark_peer.parse_peers("hf_torch_compile,hf_torch") == ["hf_torch_compile",
                                                                         "hf_torch"]
    for bad in ("torch", "hf_torch,hf_torch", "hf_torch,", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected hf_torch or "
                                                             "hf_torch_compile"):
            benchmark_peer.parse_peers(bad)


def test_benchmark_bad_compare_is_one_error_line():
    from .test_error_path import MODEL, RUN, assert_one_line_error, run_cli
    proc = run_cli([sys.executable, "-m", "research.benchmark", MODEL, RUN, "--compare=torch"],
                   timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, "argument --compare: 'torch': expected hf_torch or "
                                "hf_torch_compile")


def _device(platform, kind):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


# Dense peaks from the vendors' spec sheets (FLOP/s): bf16 and TF32 tensor cores.
SPEC = {"NVIDIA H100 80GB HBM3": (989e12, 494.7e12), "NVIDIA H100 PCIe": (756e12, 378e12),
        "NVIDIA H200": (989e12, 494.7e12), "NVIDIA A100-SXM4-40GB": (312e12, 156e12)}


@pytest.mark.parametrize("kind", sorted(SPEC))
def test_gpu_peak_follows_the_compute_dtype(kind):
    """bf16/fp16 compute: the bf16 peak; float32: the TF32 peak (XLA's default float32 dot
    precision on GPU), and the source says which."""
    bf16, tf32 = SPEC[kind]
    for dtype in ("bfloat16", "float16"):
        peak, source = benchmark.device_peak_flops(_device("gpu", kind), dtype)
        assert peak == bf16 and source.startswith("bf16 table") and kind in source
    peak, source = benchmark.device_peak_flops(_device("gpu", kind), "float32")
    assert peak == tf32 and source.startswith("tf32 table") and "TF32" in source


def test_tpu_and_cpu_peaks(monkeypatch):
    """TPU float32 dots run as bf16 passes: the bf16 peak for every dtype. CPU: measured in
    the compute dtype. An unknown accelerator: NaN, named."""
    for dtype in ("float32", "bfloat16"):
        peak, source = benchmark.device_peak_flops(_device("tpu", "TPU v4"), dtype)
        assert peak == 275e12 and source.startswith("bf16 table (TPU v4")
    assert "bf16 passes" in benchmark.device_peak_flops(_device("tpu", "TPU v4"), "float32")[1]
    monkeypatch.setattr(benchmark, "measure_matmul_peak", lambda dtype, **_: {"float32": 1e9}[dtype])
    assert benchmark.device_peak_flops(_device("cpu", "cpu"), "float32") == (
        1e9, "measured float32 jnp.dot on cpu")
    peak, source = benchmark.device_peak_flops(_device("gpu", "Some GPU"), "float32")
    assert np.isnan(peak) and "Some GPU" in source


def _fake_torch(cuda: bool):
    """The attributes of torch that `benchmark_peer.placement` reads and sets."""
    matmul, cudnn = types.SimpleNamespace(allow_tf32=False), types.SimpleNamespace(allow_tf32=False)
    return types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: cuda),
        backends=types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=matmul), cudnn=cudnn),
        set_num_threads=lambda n: None)


def test_peer_placement():
    """GPU: float32 weights, autocast to our compute dtype, TF32 on for float32 only (as XLA
    runs float32 dots on GPU). CPU: weights in our compute dtype, no autocast."""
    torch = _fake_torch(cuda=True)
    assert benchmark_peer.placement(torch, "bfloat16") == {
        "device": "cuda:0", "weights": "float32", "autocast": "bfloat16", "tf32": False}
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert benchmark_peer.placement(torch, "float32") == {
        "device": "cuda:0", "weights": "float32", "autocast": None, "tf32": True}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert benchmark_peer.placement(_fake_torch(cuda=False), "bfloat16") == {
        "device": "cpu", "weights": "bfloat16", "autocast": None, "tf32": False}
    with pytest.raises(ConfigError, match="no torch dtype for 'int8'"):
        benchmark_peer.placement(_fake_torch(cuda=False), "int8")


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _tiny_causal():
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=2, mlp_dim=64, vocab_size=128,
                            max_len=16)
    return cfg, CausalLMObjective()


def test_compile_peer_without_a_cpp_compiler_is_a_config_error(monkeypatch):
    """On CPU torch.compile (inductor) needs a C++ compiler: without one, a ConfigError that
    says so, before anything is built or compiled."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if torch.cuda.is_available():
        pytest.skip("the peer runs on the GPU here; the C++ compiler check is for CPU")
    from torch._inductor import cpp_builder, exc

    def no_compiler():
        raise exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    cfg, objective = _tiny_causal()
    with pytest.raises(ConfigError, match="--compare=hf_torch_compile on CPU needs a C\\+\\+ "
                                          "compiler"):
        benchmark_peer.run_hf_torch(cfg, objective, 2, 8, steps=1, warmup=0, learning_rate=1e-3,
                                    peer="hf_torch_compile")


@pytest.mark.skipif(not _torch_cuda(), reason="the GPU peer needs torch with CUDA and a GPU")
@pytest.mark.parametrize("dtype,peer", [("bfloat16", "hf_torch"), ("float32", "hf_torch"),
                                        ("bfloat16", "hf_torch_compile")])
def test_gpu_peer(dtype, peer):
    """On a GPU the peer runs there: float32 weights, bf16 autocast for bfloat16 compute, TF32
    for float32, fused AdamW, SDPA; torch.compile warms up (and compiles) at least once."""
    cfg, objective = _tiny_causal()
    cfg = dataclasses.replace(cfg, dtype=dtype)
    result = benchmark_peer.run_hf_torch(cfg, objective, 2, 16, steps=2, warmup=0,
                                         learning_rate=1e-3, peer=peer)
    assert result["device"] == "cuda:0" and result["weights_dtype"] == "float32"
    assert result["autocast"] == (None if dtype == "float32" else dtype)
    assert result["tf32"] is (dtype == "float32") and result["fused_adamw"] is True
    assert result["attention"] == "sdpa" and result["compiled"] is (peer == "hf_torch_compile")
    assert result["warmup"] == (1 if peer == "hf_torch_compile" else 0)
    assert len(result["step_times_s"]) == 2 and result["tokens_per_sec"] > 0


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU for JAX")
def test_gpu_float32_peak_is_tf32():
    device = jax.devices()[0]
    peak, source = benchmark.device_peak_flops(device, "float32")
    known = any(key in device.device_kind.lower() for key, _ in benchmark.PEAK_TF32_FLOPS)
    assert source.startswith("tf32 table") if known else np.isnan(peak)


@pytest.mark.parametrize("pipelined", [False, True])
def test_time_steps_times_each_step_once(pipelined):
    """Blocking and pipelined timing both give one time per timed step; pipelined runs two
    extra untimed steps (fill and drain) and never waits on a donated state."""
    import jax
    import jax.numpy as jnp

    from research.benchmark import pipelined_timing, time_steps

    calls = []

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state, batch):
        return state + batch, {"loss": jnp.sum(state)}

    def counted(state, batch):
        calls.append(1)
        return step(state, batch)

    state, metrics, times = time_steps(counted, jnp.zeros(4), jnp.ones(4), 5, pipelined=pipelined)
    assert len(times) == 5 and all(t > 0 for t in times)
    assert len(calls) == (7 if pipelined else 5)
    np.testing.assert_array_equal(np.asarray(state), np.full(4, len(calls), np.float32))
    assert float(metrics["loss"]) == 4 * (len(calls) - 1)
    assert pipelined_timing("gpu") and pipelined_timing("tpu") and not pipelined_timing("cpu")


def test_blocking_time_steps_runs_between_after_each_step_untimed():
    """`between` (the interleaved peers on CPU) runs after each timed step, outside its span;
    pipelined timing refuses it."""
    import jax
    import jax.numpy as jnp

    from research.benchmark import time_steps

    order = []
    jitted = jax.jit(lambda state, batch: (state + batch, {"loss": jnp.sum(state)}))
    jax.block_until_ready(jitted(jnp.zeros(2), jnp.ones(2)))  # compiled before the timed steps

    def step(state, batch):
        order.append("ours")
        return jitted(state, batch)

    def between():
        order.append("peer")
        time.sleep(0.2)

    state, _, times = time_steps(step, jnp.zeros(2), jnp.ones(2), 3, between=between)
    assert order == ["ours", "peer"] * 3
    assert len(times) == 3 and max(times) < 0.2  # the peer's sleep is not in our step time
    np.testing.assert_array_equal(np.asarray(state), [3.0, 3.0])
    with pytest.raises(ValueError, match="blocking"):
        time_steps(step, jnp.zeros(2), jnp.ones(2), 1, pipelined=True, between=between)


def test_peers_not_interleaved_run_each_on_its_own_after_ours(monkeypatch):
    """On an accelerator (no `interleave` call) each peer runs on its own through
    run_hf_torch, in the --compare order, flagged not interleaved."""
    calls = []

    def fake_run(cfg, objective, batch_size, seq_len, steps, warmup, lr, seed, peer):
        calls.append((peer, batch_size, seq_len, steps, warmup, lr, seed))
        return {"model": "M", "step_time_s": 1.0}

    monkeypatch.setattr(benchmark_peer, "run_hf_torch", fake_run)
    run = {"batch_size": 4, "seq_len": 16, "learning_rate": 1e-3}
    peers = benchmark_peer.Peers(["hf_torch", "hf_torch_compile"], run, 3, 2, 7)
    out = list(peers.results("cfg", "objective"))
    assert [name for name, _ in out] == ["hf_torch", "hf_torch_compile"]
    assert all(peer["interleaved"] is False and peer["model"] == "M" for _, peer in out)
    assert calls == [("hf_torch", 4, 16, 3, 2, 1e-3, 7), ("hf_torch_compile", 4, 16, 3, 2, 1e-3, 7)]
