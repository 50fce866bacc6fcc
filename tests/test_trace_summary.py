"""research.trace_summary: device time by kernel and kind from a jax.profiler trace."""

from __future__ import annotations

import gzip
import json
import os

import jax
import jax.numpy as jnp

from research import trace_summary


def write_trace(directory, events):
    path = os.path.join(directory, "plugins", "profile", "run1")
    os.makedirs(path)
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
    with gzip.open(os.path.join(path, "host.trace.json.gz"), "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_gpu_trace_sums_device_kernels_by_name_and_kind(tmp_path):
    ev = lambda pid, name, dur: {"ph": "X", "pid": pid, "tid": 1, "name": name, "dur": dur}  # noqa: E731
    write_trace(str(tmp_path), [
        ev(1, "nvjet_sm90_tst_256x128_gemm", 300.0), ev(1, "nvjet_sm90_tst_256x128_gemm", 100.0),
        ev(1, "cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 250.0),
        ev(1, "loop_convert_multiply_fusion_23", 200.0), ev(1, "ncclAllReduceKernel", 50.0),
        ev(1, "some_kernel", 100.0),
        ev(2, "PjitFunction(step)", 5000.0),  # host events are not device time
    ])
    totals, source = trace_summary.kernel_times(trace_summary.newest_trace(str(tmp_path)))
    assert source == "/device:GPU:0"
    assert totals["nvjet_sm90_tst_256x128_gemm"] == 400.0 and "PjitFunction(step)" not in totals
    text = trace_summary.summary(totals, top=3)
    assert "device time 1.00 ms in 5 kernels" in text
    assert "| matmul | 0.40 | 40.0 |" in text and "| attention | 0.25 | 25.0 |" in text
    assert "| fusion | 0.20 | 20.0 |" in text and "| collective | 0.05 | 5.0 |" in text
    assert "| other | 0.10 | 10.0 |" in text
    assert text.count("\n| nvjet") == 1 and "some_kernel" not in text  # top 3 only


def test_cpu_trace_and_cli(tmp_path, capsys):
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((128, 128))
    f(a).block_until_ready()
    jax.profiler.start_trace(str(tmp_path))
    for _ in range(3):
        f(a).block_until_ready()
    jax.profiler.stop_trace()
    assert trace_summary.main([str(tmp_path), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "XLA CPU client threads" in out and "device time" in out
    assert trace_summary.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: no *.trace.json.gz")
