"""Training-step throughput and MFU of a gin-configured run, on synthetic batches.

  python -m research.benchmark --gin_file=configs/models/gpt_small.gin \\
      --gin_file=configs/runs/pretrain_causal.gin --gin.BATCH_SIZE=8 --gin.SEQ_LEN=256 \\
      --steps 5 --warmup 2 [--compare=hf_torch]

Builds the run exactly as `python -m research.train` would (same gin files and bindings, same
`build_setup`/`make_train_step`: mesh, sharding, optimizer, dropout), but feeds random tokens
in the objective's batch shapes instead of reading data. Compiles (timed), warms up, then
times `--steps` steps, blocking on each. Prints step time (the median over the timed steps, so
one step slowed by a noisy neighbour does not decide the result; mean, min and every step time
are in the JSON; the peer is timed the same way), tokens/s (total and per device), model
FLOPs per step (`Objective.training_flops`, research/models/flops.py), MFU against the
device's peak, peak memory and the compile time; the last line is one JSON object with these
numbers.

Like research.train it re-executes itself once with huge-page malloc on Linux
(research/training/hugepages.py; RESEARCH_HUGEPAGES=0 turns it off); the JSON says which
(`host_malloc_hugepages`). So that this happens before JAX is loaded, JAX, torch and the
research modules that import JAX are imported inside the functions that use them.

MFU peak: the bf16 dense matmul peak of the accelerator (table below) on TPU/GPU; on CPU a
matmul peak measured in the same run with a large `jnp.dot` in the model's compute dtype
(before and after the timed steps; the higher is used, so a busy machine lowers the MFU
rather than raising it).

`--compare=hf_torch` also runs the same shapes (layers, width, heads, MLP, vocabulary, batch,
sequence; forward, backward, gradient clipping and an AdamW step) through Hugging Face
transformers' PyTorch GPT2LMHeadModel (causal LM) or BertForPreTraining (BERT pretraining),
built from a config (nothing downloaded), with torch using every CPU thread, and reports the
tokens/s ratio ours / peer. (BertForPreTraining computes MLM logits at every position, ours
only at the gathered ones; GPT2LMHeadModel's loss covers T - 1 positions.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any, Callable

import gin
import numpy as np

from research import cli, logs
from research.errors import ConfigError
from research.config import parse_gin, split_gin_bindings
from research.training import hugepages

# Dense bf16 matmul peaks (FLOP/s per device), by substrings of jax's `device_kind`.
PEAK_BF16_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12), ("h100", 989e12),
    ("a100", 312e12),
)


def device_peak_flops(device, dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where it came from)."""
    kind = getattr(device, "device_kind", "").lower()
    if device.platform != "cpu":
        for key, peak in PEAK_BF16_FLOPS:
            if key in kind:
                return peak, f"bf16 table ({device.device_kind})"
        return float("nan"), f"unknown device {device.device_kind!r}"
    return measure_matmul_peak(dtype), f"measured {dtype} jnp.dot on {device.device_kind}"


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` n x n @ n x n products on the default device."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def synthetic_batch(objective: Any, batch_size: int, seq_len: int, vocab_size: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """The objective's dummy batch with random tokens: ids/targets uniform over the vocabulary,
    every position real (weights and masks 1, one segment), positions 0..T-1, random MLM
    positions and binary labels."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, x in objective.dummy_batch(batch_size, seq_len).items():
        if "weight" in key or key in ("input_mask", "segment_ids"):
            out[key] = np.ones_like(x)
        elif key == "positions":
            out[key] = np.broadcast_to(np.arange(x.shape[-1], dtype=x.dtype), x.shape).copy()
        elif key == "masked_lm_positions":
            out[key] = np.sort(rng.integers(1, seq_len, x.shape), axis=-1).astype(x.dtype)
        elif "label" in key:
            out[key] = rng.integers(0, 2, x.shape).astype(x.dtype)
        elif np.issubdtype(x.dtype, np.integer):
            out[key] = rng.integers(0, vocab_size, x.shape).astype(x.dtype)
        else:
            out[key] = rng.standard_normal(x.shape).astype(x.dtype)
    return out


def peak_memory_bytes(device) -> tuple[int, str]:
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process max RSS"


def run_ours(run: dict, steps: int, warmup: int, seed: int) -> dict:
    """Builds the run as research.train does, times its train step on synthetic batches."""
    import jax

    from research.models.transformer import count_params
    from research.training import partitioning
    from research.training.setup import build_setup
    from research.training.steps import make_train_step

    batch_size, seq_len = run["batch_size"], run["seq_len"]
    num_steps = run.get("num_steps") or 1000
    setup = build_setup(model_config=run["model_config"], objective=run["objective"],
                        vocab=run["vocab"], seq_len=seq_len, batch_size=batch_size, seed=seed,
                        mesh_shape=run.get("mesh_shape") or {"data": -1},
                        learning_rate=run["learning_rate"], num_steps=num_steps,
                        warmup_steps=run.get("warmup_steps") or 0)
    cfg = setup.cfg
    microbatches = run.get("microbatches", 1) or 1
    step = make_train_step(setup, microbatches)
    host_batch = synthetic_batch(setup.objective, batch_size, seq_len, cfg.vocab_size, seed)
    n_dev = setup.mesh.devices.size
    device = setup.mesh.devices.flat[0]
    peak_before, _ = device_peak_flops(device, cfg.dtype)
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        batch = partitioning.global_batch(host_batch, setup.mesh)
        state = setup.init_state()
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics) if warmup else state)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    loss = jax.device_get(metrics["loss"])
    # Measured CPU peaks are taken before and after the timed steps and the higher one kept:
    # a neighbour stealing cycles during one measurement must not inflate the MFU.
    peak, peak_source = device_peak_flops(device, cfg.dtype)
    peak = max(peak, peak_before)
    step_time = float(np.median(times))
    model_flops = setup.objective.training_flops(cfg, batch_size, seq_len)
    memory, memory_source = peak_memory_bytes(device)
    tokens = batch_size * seq_len
    return {
        "objective": setup.objective.name, "num_layers": cfg.num_layers, "d_model": cfg.d_model,
        "num_heads": cfg.num_heads, "mlp_dim": cfg.mlp_dim, "vocab_size": cfg.vocab_size,
        "batch_size": batch_size, "seq_len": seq_len, "dtype": cfg.dtype,
        "params": count_params(state["params"]), "devices": n_dev,
        "device_kind": device.device_kind, "mesh": dict(setup.mesh.shape),
        "steps": steps, "warmup": warmup, "step_time_s": step_time,
        "step_time_min_s": float(np.min(times)), "step_time_mean_s": float(np.mean(times)),
        "step_times_s": [float(t) for t in times], "tokens_per_sec": tokens / step_time,
        "tokens_per_sec_per_device": tokens / step_time / n_dev,
        "model_flops_per_step": model_flops,
        "model_flops_per_sec": model_flops / step_time,
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "mfu": model_flops / step_time / (peak * n_dev),
        "peak_memory_bytes": memory, "peak_memory_source": memory_source,
        "compile_time_s": compile_s, "host_malloc_hugepages": hugepages.active(),
        "final_loss": float(loss[0]) / max(float(loss[1]), 1e-12),
        "_cfg": cfg, "_objective": setup.objective,
    }


def _gpt2_peer(transformers, cfg, objective, ids, act: str, rng) -> tuple[Any, dict, str]:
    """HF GPT2LMHeadModel with the shapes of `cfg` (causal LM); (model, inputs, name)."""
    del objective, rng
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=max(cfg.max_len, ids.shape[1]), n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
        activation_function=act, resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.attention_dropout_rate, layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(hf_cfg), {"input_ids": ids, "labels": ids}, "GPT2LMHeadModel"


def _bert_peer(transformers, cfg, objective, ids, act: str, rng) -> tuple[Any, dict, str]:
    """HF BertForPreTraining with the shapes of `cfg`, MLM labels at P random positions per
    row and random NSP labels; (model, inputs, name)."""
    import torch
    batch_size, seq_len = ids.shape
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, hidden_act=act,
        hidden_dropout_prob=cfg.dropout_rate,
        attention_probs_dropout_prob=cfg.attention_dropout_rate,
        max_position_embeddings=max(cfg.max_len, seq_len),
        type_vocab_size=max(cfg.type_vocab_size, 1), layer_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings)
    model = transformers.BertForPreTraining(hf_cfg)
    p = objective.max_predictions_per_seq
    labels = torch.full((batch_size, seq_len), -100, dtype=torch.int64)
    for row in range(batch_size):
        pos = rng.choice(np.arange(1, seq_len), size=min(p, seq_len - 1), replace=False)
        labels[row, pos] = ids[row, pos]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "token_type_ids": torch.ones_like(ids), "labels": labels,
              "next_sentence_label": torch.from_numpy(rng.integers(0, 2, batch_size))}
    return model, inputs, "BertForPreTraining"


def hf_peers() -> dict[type, Callable]:
    """{objective class: builder of its Hugging Face PyTorch peer}."""
    from research.objectives.bert_pretraining import BertPretrainingObjective
    from research.objectives.causal_lm import CausalLMObjective
    return {CausalLMObjective: _gpt2_peer, BertPretrainingObjective: _bert_peer}


def run_hf_torch(cfg, objective, batch_size: int, seq_len: int, steps: int, warmup: int,
                 learning_rate: float, seed: int = 0) -> dict:
    """The same shapes through HF transformers' PyTorch model with an AdamW step."""
    import torch
    import transformers

    peers = hf_peers()
    build = peers.get(type(objective))
    if build is None:
        raise ConfigError(f"--compare=hf_torch supports {', '.join(c.__name__ for c in peers)}, "
                          f"not {type(objective).__name__}; drop --compare for this run.")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    act = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}.get(cfg.activation)
    if act is None:
        raise ConfigError(f"--compare=hf_torch: no HF equivalent of activation {cfg.activation!r}; "
                          "drop --compare for this model.")
    rng = np.random.default_rng(seed)
    ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch_size, seq_len)).astype(np.int64))
    model, inputs, name = build(transformers, cfg, objective, ids, act, rng)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model = model.to(dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_time = float(np.median(times))
    return {"model": name, "transformers": transformers.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "params": sum(p.numel() for p in model.parameters()),
            "step_time_s": step_time, "step_times_s": [float(t) for t in times],
            "tokens_per_sec": batch_size * seq_len / step_time}


TABLE_HEADER = ("| machine | run | precision | step (median) | tokens/s | model FLOPs/step | MFU (peak) "
                "| peak memory | compile | peer tokens/s | ours / peer |\n|" + "---|" * 11)


def table_row(result: dict, gin_files: list[str]) -> str:
    """One Markdown row of the README performance table for a benchmark result."""
    names = " + ".join(os.path.splitext(os.path.basename(f))[0] for f in gin_files)
    machine = f"{result['devices']} x {result['device_kind']}"
    if result["device_kind"] == "cpu":
        machine += f" ({os.cpu_count()} cores)"
    peer = result.get("compare")
    peer_tps = f"{peer['tokens_per_sec']:.0f} ({peer['model']})" if peer else "-"
    ratio = f"{result['compare_ratio']:.2f}x" if peer else "-"
    return (f"| {machine} | {names}, batch {result['batch_size']} x {result['seq_len']} "
            f"| {result['dtype']} | {result['step_time_s']:.2f} s | {result['tokens_per_sec']:.0f} "
            f"| {result['model_flops_per_step']:.3e} | {100 * result['mfu']:.1f}% "
            f"({result['peak_flops_per_device'] / 1e12:.3f} TFLOP/s) "
            f"| {_fmt_bytes(result['peak_memory_bytes'])} | {result['compile_time_s']:.1f} s "
            f"| {peer_tps} | {ratio} |")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    logs.setup()
    bindings, rest = split_gin_bindings(sys.argv[1:] if argv is None else argv)
    parser = cli.ArgumentParser(prog="python -m research.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[],
                        help="gin config file (repeatable; model config then run config)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", choices=["hf_torch"], default=None,
                        help="also run the same shapes through a peer implementation")
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("pass --gin_file (a model config, then a run config)")
    parse_gin(args.gin_file, bindings)
    from research.training.run_config import RunConfig
    run = gin.get_bindings(RunConfig)
    missing = [k for k in ("model_config", "objective", "vocab", "batch_size", "seq_len",
                           "learning_rate") if run.get(k) is None]
    if missing:
        raise ConfigError(f"the gin files bind no train.{', train.'.join(missing)}; pass a model "
                          "config then a run config (configs/models/*.gin, configs/runs/*.gin).")

    result = run_ours(run, args.steps, args.warmup, args.seed)
    cfg, objective = result.pop("_cfg"), result.pop("_objective")
    print(f"model: {result['objective']} L={cfg.num_layers} D={cfg.d_model} N={cfg.num_heads} "
          f"F={cfg.mlp_dim} V={cfg.vocab_size} ({result['params'] / 1e6:.1f}M params), "
          f"batch {result['batch_size']} x seq {result['seq_len']}, {cfg.dtype}")
    print(f"devices: {result['devices']} x {result['device_kind']}, mesh {result['mesh']}")
    print(f"host malloc:         {'transparent huge pages' if result['host_malloc_hugepages'] else '4 KiB pages'} "
          f"(research.training.hugepages; RESEARCH_HUGEPAGES=0 turns it off)")
    print(f"compile time:        {result['compile_time_s']:.2f} s")
    print(f"step time:           {result['step_time_s'] * 1e3:.1f} ms (median of {args.steps}; "
          f"mean {result['step_time_mean_s'] * 1e3:.1f}, min {result['step_time_min_s'] * 1e3:.1f} ms)")
    print(f"tokens/s:            {result['tokens_per_sec']:.1f} "
          f"({result['tokens_per_sec_per_device']:.1f} per device)")
    print(f"model FLOPs/step:    {result['model_flops_per_step']:.4g} "
          f"({result['model_flops_per_sec'] / 1e12:.3f} TFLOP/s)")
    print(f"peak FLOP/s/device:  {result['peak_flops_per_device'] / 1e12:.3f} T "
          f"({result['peak_flops_source']})")
    print(f"MFU:                 {100 * result['mfu']:.1f}%")
    print(f"peak memory:         {_fmt_bytes(result['peak_memory_bytes'])} "
          f"({result['peak_memory_source']})")
    if args.compare == "hf_torch":
        peer = run_hf_torch(cfg, objective, result["batch_size"], result["seq_len"], args.steps,
                            args.warmup, run["learning_rate"], args.seed)
        ratio = result["tokens_per_sec"] / peer["tokens_per_sec"]
        print(f"hf_torch ({peer['model']}, torch {peer['torch']}, {peer['threads']} threads, "
              f"{peer['params'] / 1e6:.1f}M params): step {peer['step_time_s'] * 1e3:.1f} ms, "
              f"{peer['tokens_per_sec']:.1f} tokens/s")
        print(f"ours / hf_torch tokens/s: {ratio:.2f}x")
        result["compare"] = {"peer": "hf_torch", **peer, "ratio_tokens_per_sec": ratio}
        result["compare_ratio"] = ratio
    print(f"table row: {table_row(result, args.gin_file)}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    hugepages.reexec_module("research.benchmark")
    sys.exit(main())
