"""Training-step throughput and MFU of a gin-configured run, on synthetic batches.

  python -m research.benchmark --gin_file=configs/models/gpt_small.gin \\
      --gin_file=configs/runs/pretrain_causal.gin --gin.BATCH_SIZE=8 --gin.SEQ_LEN=256 \\
      --steps 5 --warmup 2 [--compare=hf_torch|hf_torch_compile] [--profile_steps=0:2]

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
(research/training/hugepages.py; RESEARCH_HUGEPAGES=0 turns it off, =keep also keeps freed
memory in malloc's heap); the JSON says which (`host_malloc_hugepages`,
`host_malloc_keeps_heap`). So that this happens before JAX is loaded, JAX, torch and the
research modules that import JAX are imported inside the functions that use them.
On the CPU it runs with --xla_cpu_enable_concurrency_optimized_scheduler=false, as
research.train does (research.config.prepare_cpu_xla_flags); the JSON's `xla_flags` has the
XLA_FLAGS it ran with.

MFU peak (`device_peak_flops`; the JSON's peak_flops_source says which was used): on GPU/TPU
the dense matmul peak of the accelerator for the compute dtype: the bf16 table below for
bfloat16/float16; for float32 on GPU the TF32 tensor-core table, because XLA's default float32
dot precision on GPU is TF32; for float32 on TPU the bf16 table, because TPU float32 dots run
as bf16 passes by default. On CPU a matmul peak measured in the same run with a large
`jnp.dot` in the compute dtype (before and after the timed steps; the higher is used, so a
busy machine lowers the MFU rather than raising it).

`--compare=hf_torch` also runs the same shapes (layers, width, heads, MLP, vocabulary, batch,
sequence, dropout; forward, backward, gradient clipping and an AdamW step) through Hugging Face
transformers' PyTorch GPT2LMHeadModel (causal LM) or BertForPreTraining (BERT pretraining),
built from a config (nothing downloaded), and reports the tokens/s ratio ours / peer and the
peer's MFU (our model FLOPs per step / its step time / the same peak; it runs on one device).
Where torch sees a GPU the peer runs there (float32 weights, bf16 autocast when ours computes
in bfloat16, TF32 for float32 as XLA does, fused AdamW, SDPA attention); on CPU with weights
in the compute dtype on every thread. `--compare=hf_torch_compile` adds torch.compile (its
warm-up, at least one step, includes the compilation); `--compare=hf_torch,hf_torch_compile`
runs both (JSON: `peers`, by name; `compare` is the first). The peer runs in this process.
On CPU its timed steps alternate with ours (one of ours, one of each peer's, and again; JSON
`interleaved`), so a shared host that slows down or speeds up during the run weighs on both
sides alike and the ratio compares like with like. On an accelerator each side is timed on its
own, pipelined, ours first; with --compare JAX does not preallocate GPU memory there
(XLA_PYTHON_CLIENT_PREALLOCATE=false unless set; the JSON's jax_gpu_preallocate). Details:
research/benchmark_peer.py.

`--profile_steps=N:M` writes a jax.profiler trace of the timed steps N..M-1 (0-based, after
compilation and warm-up) to --profile_dir (default runs/profile), viewable in TensorBoard's
profile plugin or XProf (research/profiling.py). The traced steps are timed too: tracing adds
some host overhead to them.

`--data_only` times the input pipeline alone (research/benchmark_data.py): the objective's
training iterator over the run's TRAIN_DATA at BATCH_SIZE x SEQ_LEN, `--warmup` batches
untimed, then `--data_batches` timed; no model is built. The JSON reports
`data_tokens_per_sec`. `--data_only=with_step` also runs the train-step benchmark above and
prints `data_to_step_ratio` = data_tokens_per_sec / tokens_per_sec (above 1: the input
pipeline keeps up with the accelerator).
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

from research import benchmark_data, benchmark_peer, cli, logs, profiling
from research.errors import ConfigError
from research.config import parse_gin, prepare_backend_flags, split_gin_bindings
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
# Dense TF32 tensor-core peaks (FLOP/s per device) of GPUs: what float32 dots run at under
# XLA's default precision on GPU.
PEAK_TF32_FLOPS = (
    ("h200", 494.7e12),
    ("h100 pcie", 378e12), ("h100", 494.7e12),
    ("a100", 156e12),
)
GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def device_peak_flops(device, dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device for compute dtype `dtype`, where it came from).

    GPU/TPU: the dense matmul peak from a table by `device.device_kind`. bfloat16/float16: the
    bf16 table. float32 on GPU: the TF32 table, as XLA's default float32 dot precision on GPU
    is TF32 (tensor cores); float32 on TPU: the bf16 table, as TPU float32 dots run as bf16
    passes by default. An unknown accelerator: NaN. CPU: measured (`measure_matmul_peak`)."""
    kind = getattr(device, "device_kind", "").lower()
    if device.platform == "cpu":
        return measure_matmul_peak(dtype), f"measured {dtype} jnp.dot on {device.device_kind}"
    if dtype == "float32" and device.platform in GPU_PLATFORMS:
        table = PEAK_TF32_FLOPS
        source = "tf32 table ({}; XLA runs float32 dots on GPU in TF32 by default)"
    else:
        table = PEAK_BF16_FLOPS
        source = ("bf16 table ({}; TPU float32 dots run as bf16 passes by default)"
                  if dtype == "float32" else "bf16 table ({})")
    for key, peak in table:
        if key in kind:
            return peak, source.format(device.device_kind)
    return float("nan"), f"unknown device {device.device_kind!r}"


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


def run_ours(run: dict, steps: int, warmup: int, seed: int,
             profile: profiling.StepProfiler | None = None,
             interleave: Callable[[Any, Any], Callable[[], Any]] | None = None) -> dict:
    """Builds the run as research.train does, times its train step on synthetic batches;
    `profile` traces its window of the timed steps. `interleave(cfg, objective)`, called after
    our warm-up, returns what runs after each of our timed steps, outside its timed span (the
    peers' steps, on CPU: see `main`); the peak memory is then read before the peers are built
    (after at least one step of ours)."""
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
        between = None
        if interleave is not None:
            # Our memory before the peers', which would share a process max RSS with ours.
            if not warmup:
                state, metrics = compiled(state, batch)
                jax.block_until_ready((state, metrics))
            ours_memory = peak_memory_bytes(device)
            between = interleave(cfg, setup.objective)
        state, metrics, times = time_steps(compiled, state, batch, steps, profile,
                                           pipelined=pipelined_timing(), between=between)
    loss = jax.device_get(metrics["loss"])
    # Measured CPU peaks are taken before and after the timed steps and the higher one kept:
    # a neighbour stealing cycles during one measurement must not inflate the MFU.
    peak, peak_source = device_peak_flops(device, cfg.dtype)
    peak = max(peak, peak_before)
    step_time = float(np.median(times))
    model_flops = setup.objective.training_flops(cfg, batch_size, seq_len)
    memory, memory_source = peak_memory_bytes(device) if interleave is None else ours_memory
    tokens = batch_size * seq_len
    return {
        "objective": setup.objective.name, "num_layers": cfg.num_layers, "d_model": cfg.d_model,
        "num_heads": cfg.num_heads, "mlp_dim": cfg.mlp_dim, "vocab_size": cfg.vocab_size,
        "batch_size": batch_size, "seq_len": seq_len, "dtype": cfg.dtype,
        "dropout_rate": cfg.dropout_rate, "attention_dropout_rate": cfg.attention_dropout_rate,
        "params": count_params(state["params"]), "devices": n_dev,
        "device_kind": device.device_kind, "mesh": dict(setup.mesh.shape),
        "steps": steps, "warmup": warmup, "step_time_s": step_time,
        "timing": "pipelined" if pipelined_timing() else "blocking",
        "step_time_min_s": float(np.min(times)), "step_time_mean_s": float(np.mean(times)),
        "step_times_s": [float(t) for t in times], "tokens_per_sec": tokens / step_time,
        "tokens_per_sec_per_device": tokens / step_time / n_dev,
        "model_flops_per_step": model_flops, "model_flops_per_sec": model_flops / step_time,
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "mfu": model_flops / step_time / (peak * n_dev),
        "peak_memory_bytes": memory, "peak_memory_source": memory_source,
        "compile_time_s": compile_s, **hugepages.malloc_settings(),
        "jax_gpu_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "final_loss": float(loss[0]) / max(float(loss[1]), 1e-12),
        "_cfg": cfg, "_objective": setup.objective,
    }


def pipelined_timing(backend: str | None = None) -> bool:
    """Whether steps are timed pipelined (GPU/TPU: dispatch overlaps the device's work, as in
    training) rather than one by one (CPU, where dispatch is negligible next to a step and
    blocking keeps a noisy neighbour's effect to single steps)."""
    import jax

    return (backend or jax.default_backend()) != "cpu"


def time_steps(compiled: Any, state: Any, batch: Any, steps: int,
               profile: profiling.StepProfiler | None = None, pipelined: bool = False,
               between: Callable[[], Any] | None = None) -> tuple[Any, Any, list[float]]:
    """Runs `steps` timed train steps; (state, last metrics, seconds per step).

    Blocking (`pipelined=False`, the CPU's way): each step is dispatched and waited for;
    `between` (blocking only) runs after each, untimed.
    Pipelined (GPU/TPU): step i+1 is dispatched before step i is waited for, as the training
    loop runs (it never waits on a step), so the host's dispatch overlaps the device's work;
    a step's time is the interval between the completions of consecutive steps. Two untimed
    steps fill and drain the pipeline. The profiler's trace starts and stops outside the timed spans
    (in pipelined mode its waits cost the steps next to the window some overlap).
    """
    import jax

    times, metrics = [], None
    if pipelined and between is not None:
        raise ValueError("time_steps: `between` needs blocking timing")
    if not pipelined:
        for i in range(steps):
            if profile is not None:
                profile.before(i, state)
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            if profile is not None:
                profile.after(i, (state, metrics))
            if between is not None:
                between()
    else:
        state, metrics = compiled(state, batch)  # untimed: fills the pipeline
        done_at = None
        for i in range(steps + 1):
            if profile is not None and i < steps:
                profile.before(i, state)
            previous = metrics
            state, metrics = compiled(state, batch)  # dispatched while `previous` runs
            jax.block_until_ready(previous)
            now = time.perf_counter()
            if done_at is not None:
                times.append(now - done_at)
            done_at = now
            if profile is not None and i < steps:
                profile.after(i, (state, metrics))
        jax.block_until_ready((state, metrics))
    if profile is not None:
        profile.close()
    return state, metrics, times


TABLE_HEADER = ("| machine | run | precision | step (median) | tokens/s | model FLOPs/step | MFU (peak) "
                "| peak memory | compile | peer tokens/s | peer MFU | ours / peer |\n|" + "---|" * 12)


def table_row(result: dict, gin_files: list[str]) -> str:
    """One Markdown row of the README performance table for a benchmark result."""
    names = " + ".join(os.path.splitext(os.path.basename(f))[0] for f in gin_files)
    machine = f"{result['devices']} x {result['device_kind']}"
    if result["device_kind"] == "cpu":
        machine += f" ({os.cpu_count()} cores)"
    peer = result.get("compare")
    peer_tps = peer_mfu = ratio = "-"
    if peer:
        how = ", torch.compile" if peer.get("compiled") else ""
        peer_tps = f"{peer['tokens_per_sec']:.0f} ({peer['model']}{how})"
        peer_mfu = f"{100 * peer['mfu']:.1f}%"
        ratio = f"{result['compare_ratio']:.2f}x"
    drop = (f", dropout {result['dropout_rate']:g}/{result['attention_dropout_rate']:g}"
            if "dropout_rate" in result else "")
    return (f"| {machine} | {names}, batch {result['batch_size']} x {result['seq_len']}{drop} "
            f"| {result['dtype']} | {result['step_time_s']:.2f} s | {result['tokens_per_sec']:.0f} "
            f"| {result['model_flops_per_step']:.3e} | {100 * result['mfu']:.1f}% "
            f"({result['peak_flops_per_device'] / 1e12:.3f} TFLOP/s) "
            f"| {_fmt_bytes(result['peak_memory_bytes'])} | {result['compile_time_s']:.1f} s "
            f"| {peer_tps} | {peer_mfu} | {ratio} |")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_result(result: dict, cfg: Any) -> None:
    """The human-readable lines of our result."""
    print(f"model: {result['objective']} L={cfg.num_layers} D={cfg.d_model} N={cfg.num_heads} "
          f"F={cfg.mlp_dim} V={cfg.vocab_size} ({result['params'] / 1e6:.1f}M params), "
          f"batch {result['batch_size']} x seq {result['seq_len']}, {cfg.dtype}")
    print(f"devices: {result['devices']} x {result['device_kind']}, mesh {result['mesh']}")
    pages = "transparent huge pages" if result["host_malloc_hugepages"] else "4 KiB pages"
    kept = ", freed memory kept" if result["host_malloc_keeps_heap"] else ""
    print(f"host malloc:         {pages}{kept} (research.training.hugepages; "
          f"RESEARCH_HUGEPAGES=0 off, =keep keeps freed memory)")
    print(f"compile time:        {result['compile_time_s']:.2f} s")
    print(f"step time:           {result['step_time_s'] * 1e3:.1f} ms (median of {result['steps']}, "
          f"{result.get('timing', 'blocking')}; "
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


def _print_trace_summary(profile_dir: str) -> None:
    """Where the traced steps' device time went (research.trace_summary), top 15 kernels."""
    from research import trace_summary
    try:
        totals, source = trace_summary.kernel_times(trace_summary.newest_trace(profile_dir))
    except FileNotFoundError:
        return  # a profiler that wrote no trace.json.gz: the xplane.pb is still there
    print(f"profile ({source}):")
    print(trace_summary.summary(totals, top=15))


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
    parser.add_argument("--compare", type=benchmark_peer.parse_peers, default=None,
                        metavar="{hf_torch,hf_torch_compile}[,...]",
                        help="also run the same shapes through the Hugging Face PyTorch peer "
                             "(on the GPU when torch sees one), eager and/or torch.compile'd; "
                             "several comma-separated; on CPU their steps alternate with ours")
    parser.add_argument("--profile_steps", type=profiling.parse_steps, default=None,
                        metavar="N:M", help="jax.profiler trace of the timed steps N..M-1 "
                                            "(0-based, after warm-up) into --profile_dir")
    parser.add_argument("--profile_dir", default="runs/profile",
                        help="where --profile_steps writes its trace (default: runs/profile)")
    parser.add_argument("--data_only", nargs="?", const="alone", default=None,
                        choices=("alone", "with_step"),
                        help="time the input pipeline alone (data_tokens_per_sec); =with_step "
                             "also times the train step and prints the ratio")
    parser.add_argument("--data_batches", type=int, default=100,
                        help="timed batches of --data_only (default: 100)")
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("pass --gin_file (a model config, then a run config)")
    if args.data_only == "alone" and (args.compare or args.profile_steps):
        parser.error("--compare and --profile_steps time the train step, which --data_only "
                     "skips; use --data_only=with_step")
    profile = None
    if args.profile_steps is not None:
        profiling.check_window(args.profile_steps, args.steps, f"--steps={args.steps}")
        cli.check_output_dir(args.profile_dir, "--profile_dir")
        profile = profiling.StepProfiler(args.profile_steps, args.profile_dir)
    if args.compare:
        # The peer runs in this process beside ours; JAX's GPU memory preallocation (most of
        # the memory) would leave it little, so JAX allocates as it goes (unless set).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    parse_gin(args.gin_file, bindings)
    prepare_backend_flags()
    from research.training.run_config import RunConfig
    run = gin.get_bindings(RunConfig)
    missing = [k for k in ("model_config", "objective", "vocab", "batch_size", "seq_len",
                           "learning_rate") if run.get(k) is None]
    if missing:
        raise ConfigError(f"the gin files bind no train.{', train.'.join(missing)}; pass a model "
                          "config then a run config (configs/models/*.gin, configs/runs/*.gin).")

    if args.data_only:
        data = benchmark_data.run_data(run, args.data_batches, args.warmup, args.seed)
        benchmark_data.print_data_result(data)
        if args.data_only == "alone":
            print(json.dumps(data))
            return 0
    # On CPU (blocking timing) the peers' steps alternate with ours, so a host that slows down
    # or speeds up during the run weighs on both sides alike; on an accelerator each side is
    # timed pipelined on its own, ours first.
    peers = benchmark_peer.Peers(args.compare or [], run, args.steps, args.warmup, args.seed)
    interleaved = bool(args.compare) and not pipelined_timing()
    result = run_ours(run, args.steps, args.warmup, args.seed, profile,
                      interleave=peers.interleave if interleaved else None)
    cfg, objective = result.pop("_cfg"), result.pop("_objective")
    if profile is not None:
        result["profile"] = {"steps": list(args.profile_steps), "dir": args.profile_dir,
                             "files": profiling.trace_files(args.profile_dir)[-1:]}
    print_result(result, cfg)
    if profile is not None:
        _print_trace_summary(args.profile_dir)
    for name, peer in peers.results(cfg, objective):
        benchmark_peer.report(result, name, peer, args.steps)
    if args.data_only:
        result.update(data)
        benchmark_data.add_ratio(result)
    print(f"table row: {table_row(result, args.gin_file)}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    hugepages.reexec_module("research.benchmark")
    sys.exit(main())
