"""A real GCS server on localhost for tests: the `gcp-storage-emulator` package's server in a
child process (tests/gcs_emulator_server.py: with the generation header and preconditions real
GCS has), on a free port, in memory, stopped (killed after a grace period) on exit.

    with GcsEmulator(buckets=["bkt"]) as gcs:
        env = gcs.env()            # STORAGE_EMULATOR_HOST and the variables research.storage derives
        ...

Every component reaches it through STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage),
TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING (TensorStore, i.e. Orbax) and
EPATH_USE_TF=false (etils.epath through gcsfs): research.storage.configure_environment sets
the last three from the first.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    def __init__(self, buckets: list[str] | tuple[str, ...] = ("bkt",)):
        self.buckets = list(buckets)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The variables a process needs to use this server for gs://."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "EPATH_USE_TF": "false"}

    def __enter__(self) -> "GcsEmulator":
        self._proc = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator_server.py"),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"the GCS emulator did not start on {self.url}")
                time.sleep(0.1)
        for bucket in self.buckets:
            self.create_bucket(bucket)
        return self

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=test",
                                     data=f'{{"name": "{name}"}}'.encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
            self._proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(timeout=5)
        self._proc = None
