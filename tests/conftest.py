"""Shared fixtures. Eight simulated CPU devices are set before jax is imported."""

import os

# Tests compile with LLVM's optimisation level 0: XLA's HLO passes (fusion, layouts, algebraic
# simplification, sharding) run as usual, so the tests check the same HLO programs; only their
# machine code is not optimised. A test's program compiles ~4x faster (a one-layer forward +
# backward with dropout: 7.3 s -> 1.7 s) and tiny shapes barely notice the slower code. Speed
# is measured by research.benchmark, never here. Child processes get it through `xla_flags`.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a test process: `devices` simulated CPU devices, fast compilation."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices != 1 else ""
    return count + FAST_COMPILE


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit
import shutil
import tempfile

# One JAX persistent compilation cache for the whole test session (a fresh directory, removed
# when the session ends), shared by the CLI subprocesses the tests start: they inherit these
# variables, so a `python -m research.train` that compiles the same program as an earlier one
# (same HLO, XLA flags, device count and jax version: JAX's cache key) loads the executable
# instead of spending ~15 s compiling it again. Every compilation is cached (minimum compile
# time 0). The xdist workers inherit the directory of the process that made it. A cache
# directory set by the user is used as is. The pytest processes themselves keep to their
# in-memory caches (see `_no_persistent_cache_in_process`): tests that count backend
# compilations in-process (test_serving_engine) must see every compile.
_SESSION_CACHE_ENV = "RESEARCH_TEST_JAX_CACHE_DIR"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="research-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_SESSION_CACHE_ENV] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)


def _no_persistent_cache_in_process() -> None:
    """Turns this process's use of the session's cache off (jax read JAX_COMPILATION_CACHE_DIR
    when imported, here or in the process that started this xdist worker)."""
    if os.environ.get(_SESSION_CACHE_ENV) == os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax
        jax.config.update("jax_compilation_cache_dir", None)


_no_persistent_cache_in_process()

import contextlib
import glob
import pathlib
import resource
import signal
import subprocess
import time
from typing import Sequence

import gin
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
AUSTEN = sorted(glob.glob(str(ROOT / "data" / "austen" / "*.txt")))


def austen_paragraphs(limit: int | None = None) -> list[str]:
    """Paragraphs (blank-line separated) of the bundled Austen novels, in file order."""
    out = []
    for path in AUSTEN:
        text = pathlib.Path(path).read_text(encoding="utf-8")
        out.extend(p.strip() for p in text.split("\n\n") if p.strip())
        if limit and len(out) >= limit:
            return out[:limit]
    return out


def causal_block_elements(t: int, blocks: int) -> int:
    """Attention score elements per (batch row, head) of causal self-attention over t tokens in
    `blocks` query blocks (TransformerConfig.attention_query_blocks), each block scoring its queries
    against the keys up to its last query (t * t for one block)."""
    bounds = sorted({round(i * t / blocks) for i in range(blocks + 1)})
    return sum((hi - lo) * hi for lo, hi in zip(bounds, bounds[1:]))


def env_without_hugepage_settings(**extra: str) -> dict[str, str]:
    """os.environ without GLIBC_TUNABLES / RESEARCH_HUGEPAGES (so a child process decides
    about huge-page malloc on its own, research.training.hugepages), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RESEARCH_HUGEPAGES")}
    return {**env, **extra}


@contextlib.contextmanager
def _no_core_dumps():
    """Children started inside inherit a zero core-file limit, so the SIGABRT sent on a timeout
    (to dump stacks) leaves no core file. Set here and restored, rather than in a preexec_fn:
    running Python in a forked child of this multithreaded (JAX) process could deadlock."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


class ChildProcesses:
    """Child processes started together, for tests that run several at once (a multi-process
    run). Each child's stdout and stderr go to files, so none blocks on a full pipe while the
    test waits on another, and each runs with PYTHONFAULTHANDLER=1 in its own process group.

    `wait(timeout)` returns their CompletedProcess results; if any is still running after
    `timeout` seconds it is a hang: every running child gets SIGABRT, so faulthandler writes
    all its threads' Python stacks to stderr, then SIGKILL (its whole group), and the test
    fails with each child's return code and stderr tail. Used as a context manager, leaving
    the block kills whatever still runs."""

    def __init__(self, commands: Sequence[Sequence[str]], *, cwd=ROOT,
                 env: dict[str, str] | None = None):
        self.commands = [list(c) for c in commands]
        self._files = []
        self.procs: list[subprocess.Popen] = []
        child_env = dict(os.environ if env is None else env, PYTHONFAULTHANDLER="1")
        for command in self.commands:
            out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
            self._files.append((out, err))
            with _no_core_dumps():
                self.procs.append(subprocess.Popen(command, cwd=cwd, env=child_env, stdout=out,
                                                   stderr=err, start_new_session=True))

    def __enter__(self) -> "ChildProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()
        for out, err in self._files:
            out.close()
            err.close()

    def running(self) -> list[int]:
        """Indices of the children still running."""
        return [i for i, p in enumerate(self.procs) if p.poll() is None]

    def output(self, i: int) -> tuple[str, str]:
        """Child i's (stdout, stderr) so far."""
        return tuple(_read(f) for f in self._files[i])

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to child i (not its group: a kill -9 of that one process)."""
        if self.procs[i].poll() is None:
            os.kill(self.procs[i].pid, sig)

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    def wait(self, timeout: float) -> list[subprocess.CompletedProcess]:
        """Waits up to `timeout` seconds in all for every child; see the class docstring."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = self.running()
        if hung:
            self.dump_stacks_and_kill()
            pytest.fail(f"child process(es) {hung} still running after {timeout:.0f} s: a hang. "
                        "Python stacks of every thread (faulthandler) and each child's stderr:\n"
                        + self.report(), pytrace=False)
        return [subprocess.CompletedProcess(c, p.returncode, *self.output(i))
                for i, (c, p) in enumerate(zip(self.commands, self.procs))]

    def dump_stacks_and_kill(self, grace: float = 10.0) -> None:
        """SIGABRT to every running child (faulthandler dumps its stacks), then SIGKILL."""
        for i in self.running():
            self.kill(i, signal.SIGABRT)
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill_all()

    def report(self, tail: int = 6000) -> str:
        """Each child's return code, command line and stderr tail."""
        parts = []
        for i, (command, p) in enumerate(zip(self.commands, self.procs)):
            err = self.output(i)[1]
            parts.append(f"--- child {i} (rc {p.returncode}): {' '.join(command)[:300]}\n"
                         f"{err[-tail:]}")
        return "\n".join(parts)


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read().decode("utf-8", errors="replace")


def run_processes(commands: Sequence[Sequence[str]], timeout: float, *, cwd=ROOT,
                  env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Runs the commands at once and waits for all (ChildProcesses: a hang fails the test within
    `timeout` seconds with every child's stacks)."""
    with ChildProcesses(commands, cwd=cwd, env=env) as children:
        return children.wait(timeout)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """Path of a small SentencePiece model (1000 pieces) trained on Austen."""
    from research.data.tokenizer import train_sentencepiece
    prefix = str(tmp_path_factory.mktemp("sp") / "austen1k")
    train_sentencepiece(austen_paragraphs(4000), prefix, vocab_size=1000)
    return prefix + ".model"


@pytest.fixture(autouse=True)
def clean_gin():
    """Every test starts and ends with an empty gin config: bindings parsed by one test (say
    pretrain_causal.gin's make_optimizer.b2 = 0.95) must not leak into the next one that runs
    in the same worker process."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS emulator on localhost with bucket `bkt`, one per test process (tests/gcs_emulator.py);
    its variables are in os.environ for the whole session (gcsfs reads them when it first builds
    its filesystem, and CLI subprocesses inherit them)."""
    from tests.gcs_emulator import GcsEmulator
    with GcsEmulator(buckets=["bkt"]) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def gcs(gcs_server):
    """A fresh gs://bkt/<unique>/ prefix on the session's emulator."""
    import uuid
    return f"gs://bkt/{uuid.uuid4().hex[:12]}"
