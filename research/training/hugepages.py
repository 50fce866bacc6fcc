"""Transparent huge pages for host memory, set up by re-executing an entry point once.

On the CPU backend XLA allocates each step's temporaries (gigabytes for a 100M-parameter
model) with malloc, which maps them fresh from the kernel and unmaps them after the step. With
4 KiB pages that is ~850k page faults per step for gpt_small at batch 8 x 256 — a quarter of the
CPU time spent in the kernel. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for
transparent huge pages (2 MiB) instead, which removes >99% of those faults (measured: gpt_small
step 8.1 s -> 4.9 s on a 2-core VM).

glibc reads tunables only at process start, so `python -m research.train` and
`python -m research.benchmark` re-execute themselves once with `GLIBC_TUNABLES` extended, before
importing JAX. Nothing happens when the tunable is already set, on non-Linux systems, with
glibc older than 2.35, when the kernel's THP mode is `never`, when `RESEARCH_HUGEPAGES=0`, or
when the run will use an accelerator (an NVIDIA GPU or TPU device node is present and
JAX_PLATFORMS does not pick the CPU): there XLA's temporaries live in device memory, and the
trick was measured only on the CPU backend.

`RESEARCH_HUGEPAGES=keep` also keeps freed memory in malloc's heap instead of returning it to
the kernel (`KEEP_TUNABLES`: one arena, no mmap'd chunks, no trimming), so each step reuses the
last step's temporaries instead of having fresh pages zeroed: no page faults and no kernel
time per step. It is opt-in because the process keeps its high-water mark of memory (measured,
gpt_small batch 8 x 256 on the 2-core VM: step 11.0 -> 9.5 s, median of 5, and process max RSS
3.8 -> 5.7-7.6 GiB). On a VM whose balloon driver reports free pages to the host, freed
memory left alone for a second or more comes back much slower (2 GiB touched: 0.2-0.3 s
right after its free, 2.7-5.6 s after 1-10 s), which `keep` avoids as well.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Mapping

from research.errors import ConfigError

TUNABLE = "glibc.malloc.hugetlb"
# RESEARCH_HUGEPAGES=keep: one arena (XLA frees its temporaries on worker threads, whose arenas
# would mmap anything over 64 MiB whatever mmap_max says), never mmap, never trim (1 TiB).
KEEP_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                 f"glibc.malloc.trim_threshold={1 << 40}")
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
OPT_OUT = "RESEARCH_HUGEPAGES"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def system_supports(platform: str, glibc: tuple[int, int] | None, thp: str | None) -> bool:
    """Whether malloc can be given huge pages: Linux, glibc >= 2.35, THP `always`/`madvise`."""
    return (platform.startswith("linux") and glibc is not None and glibc >= (2, 35)
            and thp in ("always", "madvise"))


def supported() -> bool:
    """system_supports() for this machine (whatever this process's environment says)."""
    return system_supports(sys.platform, glibc_version(), thp_mode())


ACCELERATOR_NODES = ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0")


def uses_accelerator(env: Mapping[str, str], nodes: tuple[str, ...] = ACCELERATOR_NODES) -> bool:
    """Whether JAX will run on a GPU/TPU: JAX_PLATFORMS names one first, or (unset) a GPU or TPU
    device node exists. Decided without importing JAX (this runs before it is loaded)."""
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] not in ("cpu", "")
    return any(os.path.exists(node) for node in nodes)


def hugepage_env(env: Mapping[str, str], platform: str, glibc: tuple[int, int] | None,
                 thp: str | None, accelerator: bool = False) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing should change: OPT_OUT '0',
    a `glibc.malloc.hugetlb` already in GLIBC_TUNABLES (left as it is, with whatever else is
    there), an accelerator, or a system without THP malloc. OPT_OUT 'keep' adds
    `KEEP_TUNABLES`; another value than those of `mode` is a ConfigError."""
    chosen = mode(env)
    if chosen == "0" or TUNABLE in env.get("GLIBC_TUNABLES", ""):
        return None
    if accelerator:
        return None
    if not system_supports(platform, glibc, thp):
        return None
    keep = KEEP_TUNABLES if chosen == "keep" else ()
    tunables = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1", *keep) if t)
    return {**env, "GLIBC_TUNABLES": tunables}


MODES = ("1", "0", "keep")


def mode(env: Mapping[str, str]) -> str:
    """RESEARCH_HUGEPAGES: '1' (default: huge pages), '0' (off) or 'keep' (huge pages, and freed
    memory kept in malloc's heap); ConfigError for anything else."""
    value = env.get(OPT_OUT, "1").strip().lower() or "1"
    if value not in MODES:
        raise ConfigError(f"{OPT_OUT}={env.get(OPT_OUT)!r} is not one of {', '.join(MODES)}; "
                          "'1' is the default (huge pages), 'keep' also keeps freed memory.")
    return value


def keeps_heap() -> bool:
    """Whether this process runs with `KEEP_TUNABLES` (freed memory stays in malloc's heap)."""
    return set(KEEP_TUNABLES) <= set(os.environ.get("GLIBC_TUNABLES", "").split(":"))


def malloc_settings() -> dict[str, bool]:
    """This process's malloc, as the benchmark's JSON reports it."""
    return {"host_malloc_hugepages": active(), "host_malloc_keeps_heap": keeps_heap()}


def active() -> bool:
    """Whether this process runs with huge-page malloc."""
    return f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")


def reexec_module(module: str) -> None:
    """Re-executes `python -m module <same args>` with huge-page malloc when it helps; returns
    (doing nothing) otherwise. Call first thing under `if __name__ == "__main__":`."""
    try:
        env = hugepage_env(os.environ, sys.platform, glibc_version(), thp_mode(),
                           accelerator=uses_accelerator(os.environ))
    except ConfigError as e:  # before the entry point's own error handling is set up
        print(f"error: {e}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    if env is None:
        return
    # sys.orig_argv keeps the interpreter's own flags (-X, -W, ...) as well as `-m module args`.
    argv = [sys.executable, *sys.orig_argv[1:]] if sys.orig_argv else [
        sys.executable, "-m", module, *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _proc_bytes(path: str, field: str) -> int | None:
    """The `field:` line (in kB) of a /proc file of this process, in bytes; None if absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def anon_huge_bytes() -> int | None:
    """Bytes of this process's anonymous memory backed by huge pages (Linux), else None."""
    return _proc_bytes("/proc/self/smaps_rollup", "AnonHugePages")


def resident_bytes() -> int | None:
    """This process's resident memory (VmRSS, Linux), else None."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def _touched(libc, size: int) -> int:
    """A plain malloc (as XLA's CPU allocator does; numpy madvises itself) of `size` bytes,
    written once."""
    import ctypes
    buf = libc.malloc(size)
    ctypes.memset(buf, 1, size)
    return buf


def _resident_after_free(libc, buf: int, size: int) -> int | None:
    """Frees `buf` (`size` bytes, resident); how many of its bytes stay resident."""
    import ctypes
    before = resident_bytes()
    libc.free(ctypes.c_void_p(buf))
    after = resident_bytes()
    return None if before is None or after is None else max(0, size - (before - after))


def main(argv: list[str]) -> int:
    """`python -m research.training.hugepages`: says whether huge-page malloc (and keeping freed
    memory) is on for the entry points and checks both with a 64 MiB malloc'd buffer: whether
    it sits on huge pages, and how much of it stays resident after its free."""
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 << 20
    buf = _touched(libc, size)
    huge = anon_huge_bytes()
    print(f"glibc {glibc_version()}, transparent huge pages mode {thp_mode()!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"huge-page malloc: {'on' if active() else 'off'}; "
          f"AnonHugePages after a 64 MiB malloc: {huge if huge is not None else 'unknown'} bytes"
          f" (args {argv})")
    kept = {"main thread": _resident_after_free(libc, buf, size)}
    # XLA frees its temporaries on worker threads: a thread's own arena would unmap them.
    worker = threading.Thread(target=lambda: kept.update(
        {"a worker thread": _resident_after_free(libc, _touched(libc, size), size)}))
    worker.start()
    worker.join()
    print(f"freed memory kept in the heap: {'on' if keeps_heap() else 'off'}; of 64 MiB freed, "
          + ", ".join(f"on {where} resident after its free: "
                      f"{'unknown' if b is None else b} bytes" for where, b in kept.items()))
    return 0


if __name__ == "__main__":
    reexec_module("research.training.hugepages")
    sys.exit(main(sys.argv[1:]))
