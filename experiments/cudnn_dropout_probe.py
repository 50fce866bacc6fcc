"""Does cuDNN's fused attention with dropout run on this GPU, and under which XLA flags?

  python experiments/cudnn_dropout_probe.py            # on a machine with an NVIDIA GPU

On an H200 with JAX 0.11.2 (2026-11-26) XLA aborted the process the first time it ran cuDNN
attention with dropout ("Check failed: local_device_ordinal.has_value()" in cuda_dnn.cc), so
attention dropout runs the einsum kernel (research/models/attention_cudnn.py). The check sits
where XLA advances the per-device dropout offset of a cuDNN graph, which differs when the graph
is captured in a CUDA-graph command buffer; this probe runs a small forward + backward of
`fused_attention_stablehlo.dot_product_attention(dropout_rate=0.1)` in a child process under
each XLA flag setting below (an abort kills only the child) and prints one line per setting:
whether it ran, and whether the output is finite and differs from the dropout-free output by
about what dropout 0.1 should (a fraction of probabilities zeroed and the rest scaled).
Shapes: q/k/v [B=2, T=256, N=4, H=64] bfloat16.
"""

from __future__ import annotations

import os
import subprocess
import sys

SETTINGS = {
    "default flags": "",
    "command buffers off": "--xla_gpu_enable_command_buffer=",
}
TIMEOUT_S = 120


def child() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.cudnn import fused_attention_stablehlo as fa

    shape = (2, 256, 4, 64)
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))

    def loss(q, k, v, rate):
        out = fa.dot_product_attention(q, k, v, scale=64 ** -0.5, dropout_rate=rate,
                                       mask_type=fa.MaskType.NO_MASK)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                   static_argnums=3)
    (_, with_dropout), grads = grad(q, k, v, 0.1)
    (_, without), _ = grad(q, k, v, 0.0)
    (_, again), _ = grad(q, k, v, 0.1)  # a second run: XLA advances the dropout offset
    a, b, c = (np.asarray(x, np.float32) for x in (with_dropout, without, again))
    finite = all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads) and np.isfinite(a).all()
    rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    print(f"ran: finite={finite}, |dropout - none| / |none| = {rel:.3f} (expect ~0.1-0.4), "
          f"second run differs from first: {not np.array_equal(a, c)}")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return 0
    for name, flags in SETTINGS.items():
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(x for x in (env.get("XLA_FLAGS", ""), flags) if x)
        try:
            proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"cuDNN attention dropout, {name}: timed out after {TIMEOUT_S} s")
            continue
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        ran = [line for line in lines if line.startswith("ran:")]
        checks = [line for line in lines if "Check failed" in line]
        detail = ran[0] if ran else (checks[0] if checks else (lines[-1] if lines else ""))
        print(f"cuDNN attention dropout, {name} ({flags or 'none'}): exit {proc.returncode}; "
              f"{detail.strip()[:300]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
