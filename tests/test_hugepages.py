"""research.training.hugepages: when the entry points re-execute with huge-page malloc, and that it works."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from research.errors import ConfigError
from research.training import hugepages

from .conftest import ROOT, env_without_hugepage_settings

TUNABLE = "glibc.malloc.hugetlb=1"
KEEP = (TUNABLE + ":glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0"
        f":glibc.malloc.trim_threshold={1 << 40}")


@pytest.mark.parametrize("env,platform,glibc,thp,expected", [
    ({}, "linux", (2, 36), "madvise", TUNABLE),
    ({}, "linux", (2, 35), "always", TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "linux", (2, 36), "madvise",
     "glibc.malloc.arena_max=2:" + TUNABLE),
    ({}, "linux", (2, 36), "never", None),
    ({}, "linux", (2, 36), None, None),
    ({}, "linux", (2, 34), "madvise", None),
    ({}, "linux", None, "madvise", None),  # musl or another libc
    ({}, "darwin", (2, 36), "madvise", None),
    ({"RESEARCH_HUGEPAGES": "0"}, "linux", (2, 36), "madvise", None),
    ({"RESEARCH_HUGEPAGES": "1"}, "linux", (2, 36), "madvise", TUNABLE),
    ({"RESEARCH_HUGEPAGES": "keep"}, "linux", (2, 36), "madvise", KEEP),
    ({"RESEARCH_HUGEPAGES": "Keep"}, "linux", (2, 36), "always", KEEP),
    ({"RESEARCH_HUGEPAGES": "keep"}, "linux", (2, 36), "never", None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "linux", (2, 36), "madvise", None),
])
def test_hugepage_env_decision(env, platform, glibc, thp, expected):
    out = hugepages.hugepage_env({"PATH": "/bin", **env}, platform, glibc, thp)
    if expected is None:
        assert out is None
    else:
        assert out["GLIBC_TUNABLES"] == expected and out["PATH"] == "/bin"


def test_a_misspelt_mode_is_one_error_line():
    with pytest.raises(ConfigError, match="RESEARCH_HUGEPAGES='kept' is not one of 1, 0, keep"):
        hugepages.hugepage_env({"RESEARCH_HUGEPAGES": "kept"}, "linux", (2, 36), "madvise")
    proc = subprocess.run([sys.executable, "-m", "research.training.hugepages"], cwd=ROOT,
                          env=env_without_hugepage_settings(RESEARCH_HUGEPAGES="kept"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: RESEARCH_HUGEPAGES='kept'")
    assert "Traceback" not in proc.stderr


def test_no_reexec_when_an_accelerator_runs_the_step(tmp_path):
    """Huge-page malloc was measured on the CPU backend only: with a GPU/TPU device node present
    (and JAX_PLATFORMS not picking the CPU) or JAX_PLATFORMS naming an accelerator, nothing
    changes."""
    assert hugepages.hugepage_env({}, "linux", (2, 36), "madvise", accelerator=True) is None
    node = tmp_path / "nvidiactl"
    node.write_text("")
    nodes, missing = (str(node),), (str(tmp_path / "absent"),)
    assert hugepages.uses_accelerator({}, nodes)
    assert not hugepages.uses_accelerator({}, missing)
    assert not hugepages.uses_accelerator({"JAX_PLATFORMS": "cpu"}, nodes)
    assert hugepages.uses_accelerator({"JAX_PLATFORMS": "cuda,cpu"}, missing)
    assert hugepages.uses_accelerator({"JAX_PLATFORMS": "tpu"}, missing)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(path)) == "always"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def _run_module(env_extra: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "research.training.hugepages", "a", "--b=c"], cwd=ROOT,
                          env=env_without_hugepage_settings(**env_extra), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_entry_point_reexecs_with_huge_pages_and_keeps_its_arguments():
    out = _run_module({})
    assert "(args ['a', '--b=c'])" in out
    huge = int(re.search(r"AnonHugePages after a 64 MiB malloc: (\d+)", out).group(1))
    if hugepages.supported():
        assert "huge-page malloc: on" in out and TUNABLE in out
        assert huge >= 32 << 20, out  # most of the 64 MiB buffer sits on 2 MiB pages
    else:
        assert "huge-page malloc: off" in out


def test_opt_out_leaves_malloc_alone():
    out = _run_module({"RESEARCH_HUGEPAGES": "0"})
    assert "huge-page malloc: off" in out and "(args ['a', '--b=c'])" in out
    if hugepages.supported():  # the kernel would give huge pages only when asked (THP mode madvise)
        if hugepages.thp_mode() == "madvise":
            assert "AnonHugePages after a 64 MiB malloc: 0 bytes" in out


def _kept_after_free(out: str) -> list[int]:
    """Bytes resident after the free on the main thread and on a worker thread."""
    return [int(b) for b in re.findall(r"resident after its free: (\d+) bytes", out)]


def test_keep_mode_keeps_freed_memory_resident():
    """RESEARCH_HUGEPAGES=keep: a freed 64 MiB malloc stays in the heap (resident, so the next
    one reuses its pages), on the main thread and on a worker thread (XLA frees its temporaries
    on worker threads); by default malloc maps such a buffer on its own and unmaps it."""
    default, keep = _run_module({}), _run_module({"RESEARCH_HUGEPAGES": "keep"})
    assert "freed memory kept in the heap: off" in default
    assert len(_kept_after_free(default)) == 2, default
    assert all(b < 1 << 20 for b in _kept_after_free(default)), default
    if hugepages.supported():
        assert "freed memory kept in the heap: on" in keep and KEEP in keep
        assert all(b >= 60 << 20 for b in _kept_after_free(keep)), keep  # on both threads
        assert "huge-page malloc: on" in keep and "(args ['a', '--b=c'])" in keep


def _train(tmp_path, mode: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "research.train", "--gin_file=configs/models/gpt_tiny.gin",
            "--gin_file=configs/runs/pretrain_causal.gin", "--gin.TRAIN_STEPS=2",
            "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.EVAL_DATA=None",
            "--gin.train.progress_bar=False", f"--workdir={tmp_path / 'run'}"]
    env = env_without_hugepage_settings(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                                        RESEARCH_HUGEPAGES=mode)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_train_runs_with_freed_memory_kept(tmp_path):
    """`RESEARCH_HUGEPAGES=keep python -m research.train` trains and checkpoints as usual (one
    malloc arena for every thread: data, XLA, orbax); a misspelt mode is one error line."""
    proc = _train(tmp_path, "keep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final.json").exists()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 1
    bad = _train(tmp_path / "bad", "keeep")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: RESEARCH_HUGEPAGES='keeep' is not one of 1, 0, keep; '1' is the default (huge "
        "pages), 'keep' also keeps freed memory."]
    assert not (tmp_path / "bad").exists()  # refused before anything is written
