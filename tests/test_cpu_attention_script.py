"""experiments/cpu_attention.py: our CPU attention kernel's forward + backward against PyTorch's
(SDPA and the unfused math), on tiny shapes: the same outputs and gradients, and the table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT, env_without_hugepage_settings, xla_flags


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_matches_torch_and_prints_its_table(causal):
    pytest.importorskip("torch")
    args = ["--batch", "2", "--seq", "48", "--heads", "3", "--head_dim", "8", "--reps", "2"]
    if causal:
        args += ["--causal", "--query_blocks", "4"]
    proc = subprocess.run([sys.executable, "experiments/cpu_attention.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=env_without_hugepage_settings(XLA_FLAGS=xla_flags(1),
                                                            JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    kind = "causal (4 query blocks)" if causal else "bidirectional"
    assert lines[0].startswith(f"attention forward + backward, float32, B2 x T48, 3 heads x 8, "
                               f"{kind}, ")
    assert lines[1].startswith("| kernel | ms |") and lines[2].startswith("|---|")
    assert [line.split(" | ")[0] for line in lines[3:6]] == ["| ours", "| torch sdpa",
                                                             "| torch math"]
    result = json.loads(lines[-1])
    assert result["query_blocks"] == (4 if causal else 1)
    assert result["causal"] is causal and set(result["median_s"]) == {"ours", "torch sdpa",
                                                                       "torch math"}
    # Outputs and q/k/v gradients agree with PyTorch's float32 math to float32 rounding: the
    # causal case runs our query blocks (4 of them, as --query_blocks asks).
    assert result["max_abs_diff"]["ours"] < 2e-5
    assert result["max_abs_diff"]["torch sdpa"] < 2e-5
