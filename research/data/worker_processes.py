"""A small pool of worker processes that run module-level functions on pickled arguments.

    pool = WorkerPool(2, init=(setup_function, payload))
    future = pool.submit(some_function, argument)    # a concurrent.futures.Future
    future.result()
    pool.shutdown()

Each worker is a fresh interpreter (`python -c ... worker_main()`), started with
`subprocess`: never a fork (the parent holds JAX / TensorFlow threads), and not
multiprocessing's 'spawn' either, which re-runs the parent's main script in every child (so
every script would need an `if __name__ == "__main__"` guard). The parent talks to a worker
over its stdin/stdout pipes, one thread of the parent per worker taking tasks from a shared
queue; functions travel as (module, name) and are imported in the worker.

An exception in a task comes back as a `RemoteError` (its type name, message and traceback);
a worker that ends (killed, out of memory) fails its task and every later one with
`BrokenWorkerError`. Workers exit when `shutdown` closes their stdin, and by themselves when
the parent dies (their stdin reaches EOF).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

SHUTDOWN_GRACE_S = 5.0  # a worker still busy this long after shutdown is killed


class BrokenWorkerError(RuntimeError):
    """A worker process ended (was killed, ran out of memory) before answering."""


class RemoteError(RuntimeError):
    """An exception raised in a worker: its type name, message and traceback."""

    def __init__(self, kind: str, message: str, trace: str):
        super().__init__(f"{kind}: {message}\n--- worker traceback ---\n{trace}")
        self.kind, self.message, self.trace = kind, message, trace


def _reference(fn: Callable) -> tuple[str, str]:
    """(module, name) of a module-level function, which a worker imports."""
    module, name = fn.__module__, fn.__qualname__
    if module == "__main__" or "<" in name or "." in name:
        raise ValueError(f"{fn!r} is not a module-level function of an importable module; "
                         "a worker process cannot import it.")
    return module, name


def _resolve(ref: tuple[str, str]) -> Callable:
    return getattr(importlib.import_module(ref[0]), ref[1])


def worker_main() -> None:
    """A worker: runs the init call, then answers (function, argument) requests from stdin on
    the original stdout with ('ok', result) or ('error', type name, message, traceback);
    exits at EOF. Whatever the worker prints goes to stderr (stdout carries the replies)."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        init = pickle.load(requests)
        if init is not None:
            _resolve(init[0])(init[1])
        while True:
            ref, arg = pickle.load(requests)
            try:
                reply: tuple = ("ok", _resolve(ref)(arg))
            except Exception as e:  # noqa: BLE001 - sent to the parent
                reply = ("error", type(e).__name__, str(e), traceback.format_exc())
            pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
            replies.flush()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass


class WorkerPool:
    """`workers` worker processes fed from one task queue (see the module docstring)."""

    def __init__(self, workers: int, init: tuple[Callable, Any] | None = None):
        """
        Args:
          workers: processes to start (>= 1).
          init: (function, argument) each worker calls once at start; it should not raise
            (keep fallible work for the tasks, whose errors reach the parent).
        """
        if workers < 1:
            raise ValueError(f"WorkerPool needs at least one worker, got {workers}.")
        self._tasks: queue.Queue = queue.Queue()
        self._broken: str | None = None
        payload = pickle.dumps(None if init is None else (_reference(init[0]), init[1]),
                               protocol=pickle.HIGHEST_PROTOCOL)
        bootstrap = (f"import sys; sys.path[:0] = {sys.path!r}; "
                     "from research.data.worker_processes import worker_main; worker_main()")
        self.procs: list[subprocess.Popen] = []
        self._threads: list[threading.Thread] = []
        for n in range(workers):
            proc = subprocess.Popen([sys.executable, "-c", bootstrap], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, close_fds=True)
            self.procs.append(proc)
            thread = threading.Thread(target=self._serve, args=(proc, payload),
                                      name=f"worker-pool-{proc.pid}", daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [p.pid for p in self.procs]

    def submit(self, fn: Callable, arg: Any) -> cf.Future:
        """A future of `fn(arg)` run in some worker (`fn` a module-level function)."""
        future: cf.Future = cf.Future()
        if self._broken is not None:
            future.set_exception(BrokenWorkerError(self._broken))
        else:
            self._tasks.put((future, _reference(fn), arg))
        return future

    def _serve(self, proc: subprocess.Popen, payload: bytes) -> None:
        """Sends the worker its init call, then one queued task at a time."""
        try:
            proc.stdin.write(payload)
            proc.stdin.flush()
        except OSError:
            pass  # a dead worker shows as EOF below
        while True:
            item = self._tasks.get()
            if item is None:
                return
            future, ref, arg = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                pickle.dump((ref, arg), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
                reply = pickle.load(proc.stdout)
            except (EOFError, OSError, pickle.UnpicklingError) as e:
                self._broken = (f"worker process {proc.pid} ended (exit code {proc.poll()}; "
                                f"{type(e).__name__})")
                future.set_exception(BrokenWorkerError(self._broken))
                self._fail_queued()
                return
            if reply[0] == "ok":
                future.set_result(reply[1])
            else:
                future.set_exception(RemoteError(*reply[1:]))

    def _fail_queued(self) -> None:
        """Fails every queued task (the pool is broken)."""
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                return
            if item is None:  # another thread's stop signal: leave it for that thread
                self._tasks.put(None)
                return
            item[0].set_exception(BrokenWorkerError(self._broken))

    def shutdown(self, wait: bool = True) -> None:
        """Cancels queued tasks and ends the workers by closing their stdin; with `wait`,
        waits for them (killing one still busy after SHUTDOWN_GRACE_S)."""
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._tasks.put(None)
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if not wait:
            return
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for thread in self._threads:
            thread.join(timeout=SHUTDOWN_GRACE_S)
        for proc in self.procs:
            proc.stdout.close()
