"""Model FLOP counts (by hand and against XLA's cost analysis) and the benchmark CLI.

No timing assertions: the CLI runs are checked for their output, not their speed."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import flops
from research.training import hugepages
from research.objectives.bert_pretraining import BertPretrainingObjective
from research.models.transformer import TransformerConfig
from research.objectives.causal_lm import CausalLMObjective

from .conftest import ROOT, causal_block_elements, env_without_hugepage_settings


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


def test_benchmark_cli_gpt_tiny():
    out, result = _cli("--gin_file=configs/models/gpt_tiny.gin",
                       "--gin_file=configs/runs/pretrain_causal.gin", "--gin.BATCH_SIZE=2",
                       "--gin.SEQ_LEN=32", "--steps", "2", "--warmup", "1")
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


@pytest.mark.parametrize("model,run,extra", [
    ("gpt_tiny", "pretrain_causal", ["--gin.CausalLMObjective.loss_chunk_size=16"]),
    ("bert_tiny", "pretrain_mlm_nsp", []),
])
def test_benchmark_compare_hf_torch(model, run, extra):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _, result = _cli(f"--gin_file=configs/models/{model}.gin", f"--gin_file=configs/runs/{run}.gin",
                     "--gin.BATCH_SIZE=2", "--gin.SEQ_LEN=32", "--steps", "1", "--warmup", "1",
                     "--compare=hf_torch", *extra)
    for key in KEYS:
        assert key in result, key
    assert result["compare"]["peer"] == "hf_torch"
    assert result["compare"]["params"] > 0 and result["compare_ratio"] > 0


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
    """experiments/benchmark_table.sh: header + one row per model; extra flags override the
    defaults (here: tiny shapes, so the test is quick)."""
    pytest.importorskip("transformers")
    env = env_without_hugepage_settings(XLA_FLAGS="", JAX_PLATFORMS="cpu",
                                        BENCHMARK_TABLE_DIR=str(tmp_path))
    tiny = ["--gin.TransformerConfig.num_layers=1", "--gin.TransformerConfig.d_model=32",
            "--gin.TransformerConfig.num_heads=2", "--gin.TransformerConfig.mlp_dim=64",
            "--gin.BATCH_SIZE=2", "--gin.SEQ_LEN=32", "--steps", "1", "--warmup", "1"]
    proc = subprocess.run(["bash", "experiments/benchmark_table.sh", *tiny], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("| machine | run | precision") and lines[1].startswith("|---|")
    assert len(lines) == 4, lines
    assert "gpt_small + pretrain_causal, batch 2 x 32" in lines[2] and "GPT2LMHeadModel" in lines[2]
    assert "bert_base + pretrain_mlm_nsp, batch 2 x 32" in lines[3] and "BertForPreTraining" in lines[3]
    result = json.loads((tmp_path / "bert_base.txt").read_text().strip().splitlines()[-1])
    assert result["num_layers"] == 1 and result["d_model"] == 32 and result["steps"] == 1
