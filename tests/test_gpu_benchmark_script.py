"""experiments/gpu_benchmark.sh (the GPU benchmark; its cases need a GPU) and
research.benchmark_table (its Markdown table): argument errors and the table, on CPU."""

from __future__ import annotations

import json
import subprocess

from research import benchmark_table

from .conftest import ROOT


def run_script(*args, timeout=60):
    return subprocess.run(["bash", "experiments/gpu_benchmark.sh", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_script_refuses_bad_arguments_with_one_error_line(tmp_path):
    proc = run_script("--frobnicate")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown argument '--frobnicate'")
    proc = run_script("--wheels", str(tmp_path))  # an empty folder
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --wheels {tmp_path} holds no .whl files; pass the folder with the downloaded wheels"]
    proc = run_script("--variants", "scan,fast")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --variants: fast is not one of")


def result(**overrides):
    base = {"batch_size": 16, "seq_len": 1024, "dropout_rate": 0.1, "attention_dropout_rate": 0.0,
            "step_time_s": 0.1, "tokens_per_sec": 163840.0, "mfu": 0.375,
            "peak_memory_bytes": 24 * 2 ** 30, "devices": 1, "device_kind": "NVIDIA H200",
            "dtype": "bfloat16",
            "peers": {"hf_torch": {"step_time_s": 0.2, "mfu": 0.1875, "ratio_tokens_per_sec": 2.0},
                      "hf_torch_compile": {"step_time_s": 0.125, "mfu": 0.3,
                                           "ratio_tokens_per_sec": 1.25}}}
    return {**base, **overrides}


def test_table_rows_from_saved_results(tmp_path):
    (tmp_path / "gpt_medium.json").write_text(json.dumps(result()))
    (tmp_path / "bert_base.json").write_text("")  # a failed run leaves an empty file
    text = benchmark_table.table(str(tmp_path), ["gpt_medium", "bert_base", "gpt_small"])
    lines = text.splitlines()
    assert lines[0].startswith("Device: 1 x NVIDIA H200, bfloat16.")
    assert lines[2] == ("| run | ours: step | tokens/s | MFU | peak memory | HF eager "
                        "| HF + torch.compile |")
    assert lines[4] == ("| gpt_medium, B16 x 1024, dropout 0.1/0 | 100.0 ms | 163.8k | 37.5% "
                        "| 24.0 GiB | 200.0 ms, MFU 18.8% (ours 2.00x) "
                        "| 125.0 ms, MFU 30.0% (ours 1.25x) |")
    assert lines[5].startswith("| bert_base | failed (see its .log) |")
    assert all(line.count("|") == lines[2].count("|") for line in lines[3:])
    assert lines[6].startswith("| gpt_small | failed")
    assert benchmark_table.main([str(tmp_path)]) == 2
