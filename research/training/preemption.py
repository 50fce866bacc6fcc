"""Preemption: SIGTERM/SIGINT during training finish the step, save a checkpoint and exit
cleanly; `resume_command` is the command line to print in 'resume with ...' messages."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import threading


def resume_command() -> str:
    """The command line that started this process, for 'resume with ...' messages."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("research", "train.py")):
        return "python -m research.train " + shlex.join(argv[1:])
    return shlex.join([os.path.basename(sys.executable), *argv])


class PreemptionGuard:
    """Context manager: while active (main thread only), SIGTERM and SIGINT set `requested`
    instead of killing the process; the previous handlers come back on exit. A second
    signal raises KeyboardInterrupt (stop now, no checkpoint)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {name}: stopping now without a checkpoint")
        self.signal_name = name
        logging.warning("received %s: finishing the current step, then saving a checkpoint "
                        "and exiting (send it again to stop at once without saving).", name)

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
