"""Attention alone on the CPU: forward + backward of one layer's attention, ours against PyTorch.

  python experiments/cpu_attention.py [--batch 8] [--seq 256] [--heads 12] [--head_dim 64]
      [--causal] [--query_blocks N] [--reps 9]

Ours is the kernel a CPU train step runs (research.models.attention_select): the einsum
softmax attention computed heads-major (`attention.heads_major_attention`), in query blocks
when causal (as many as a CPU train step uses at that length, `attention_select.query_blocks`,
unless --query_blocks says), float32, one jitted forward + backward. The peers are PyTorch's
`scaled_dot_product_attention` (what HF's models run with `attn_implementation='sdpa'`: on CPU
a fused, blocked kernel) and the unfused math (matmul, softmax, matmul), both float32 with
autograd. No dropout, no padding mask. The three are timed interleaved in one process (one
call of each, again), so a host that speeds up or slows down affects all alike;
each figure is the median. q, k, v and the output cotangent are the same numbers for all three,
and the outputs and gradients are checked against the PyTorch math's before timing. GFLOP/s
counts the six full [T, T] x H products (two forward, four backward), also when causal.

Like research.benchmark, the script re-executes itself once with huge-page malloc
(research.training.hugepages) and gives PyTorch as many threads as JAX's CPU client uses.
Prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from research.training import hugepages  # noqa: E402  (after the path; imports no JAX)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--causal", action="store_true", help="causal attention (GPT); default BERT's")
    p.add_argument("--query_blocks", type=int, default=None,
                   help="query blocks of the causal kernel (default: what a CPU train step uses "
                        "at this length, research.models.attention_select.query_blocks)")
    p.add_argument("--reps", type=int, default=9, help="timed calls of each (default 9)")
    return p.parse_args(argv)


def ours(mask, blocks: int):
    """Our CPU kernel's forward + backward in `blocks` query blocks, jitted: (q, k, v, g) ->
    (out, (dq, dk, dv)); all [B, T, N, H]."""
    import jax

    from research.models.attention import heads_major_attention

    def step(q, k, v, g):
        out, vjp = jax.vjp(lambda q, k, v: heads_major_attention(q, k, v, mask, blocks), q, k, v)
        return out, vjp(g)
    return jax.jit(step)


def torch_kernels(causal: bool, head_dim: int) -> dict:
    """{name: (q, k, v, g) -> (out, (dq, dk, dv))} on torch tensors [B, N, T, H]."""
    import torch

    def run(attend):
        def step(q, k, v, g):
            q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
            out = attend(q, k, v)
            return out, torch.autograd.grad(out, (q, k, v), g)
        return step

    def math(q, k, v):
        scores = (q @ k.transpose(-1, -2)) / head_dim ** 0.5
        if causal:
            t = q.shape[-2]
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"torch sdpa": run(lambda q, k, v: sdpa(q, k, v, is_causal=causal)),
            "torch math": run(math)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from research.models.attention import attention_mask
    from research.models.attention_select import query_blocks
    from research.models.transformer_config import TransformerConfig

    torch.set_num_threads(os.cpu_count() or 1)
    b, t, n, h = args.batch, args.seq, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(4)]
    segments = jnp.ones((b, t), jnp.int32)
    blocks = 1
    if args.causal:
        blocks = args.query_blocks or query_blocks(TransformerConfig(), t, "cpu")
    ours_step = ours(attention_mask(segments, segments, args.causal), blocks)
    jax_args = [jnp.asarray(x) for x in host]
    torch_args = [torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in host]
    peers = torch_kernels(args.causal, h)

    def call_ours():
        return jax.block_until_ready(ours_step(*jax_args))

    def call_peer(name):
        return lambda: peers[name](*torch_args)

    def as_numpy(result) -> list:
        """(out, grads) of either side as numpy [B, N, T, H] arrays."""
        out, grads = result
        if isinstance(out, torch.Tensor):
            return [x.detach().numpy() for x in (out, *grads)]
        return [np.asarray(x).transpose(0, 2, 1, 3) for x in (out, *grads)]

    calls = {"ours": call_ours, **{name: call_peer(name) for name in peers}}
    reference = as_numpy(calls["torch math"]())
    errors = {name: max(float(np.max(np.abs(a - r))) for a, r in zip(as_numpy(call()), reference))
              for name, call in calls.items() if name != "torch math"}
    times = {name: [] for name in calls}
    for _ in range(args.reps):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    medians = {name: float(np.median(ts)) for name, ts in times.items()}
    flops = 6 * 2 * b * n * t * t * h  # six [T,T] x H products: 2 forward, 4 backward
    print(f"attention forward + backward, float32, B{b} x T{t}, {n} heads x {h}, "
          f"{f'causal ({blocks} query blocks)' if args.causal else 'bidirectional'}, "
          f"{os.cpu_count()} CPU threads, "
          f"median of {args.reps}{', huge-page malloc' if hugepages.active() else ''}")
    print("| kernel | ms | GFLOP/s (6 products) | ours ms / this ms | max abs diff vs torch math |")
    print("|---|---|---|---|---|")
    for name, s in medians.items():
        error = f"{errors[name]:.1e}" if name in errors else "-"
        print(f"| {name} | {s * 1e3:.1f} | {flops / s / 1e9:.1f} | {medians['ours'] / s:.2f}x "
              f"| {error} |")
    print(json.dumps({"batch": b, "seq": t, "heads": n, "head_dim": h, "causal": args.causal,
                      "query_blocks": blocks, "reps": args.reps, "median_s": medians,
                      "max_abs_diff": errors}))
    return 0


if __name__ == "__main__":
    hugepages.reexec_module("experiments.cpu_attention")
    sys.exit(main())
