"""An exclusive lease on a directory that lives on object storage, where there is no flock:
the lock of a `gs://` --workdir (research/workdir.py) and of a `gs://` sweep root.

The lease is one object, DIR/.lock, holding JSON {owner, holder, heartbeat, ttl_s}:

* taking it: create the object with the precondition "does not exist" (GCS
  `ifGenerationMatch=0`); if it exists and its heartbeat is fresh, another run holds it and
  the taker is refused (WorkdirLockedError). If its heartbeat is older than its ttl, the run
  that wrote it is gone (killed, preempted): the lease is taken over with the precondition
  "still that generation", and a warning says whose lease was taken and how stale it was;
* holding it: a daemon thread rewrites the heartbeat every ttl/4 s, each write conditioned on
  the generation it wrote last (and preceded by a read of the owner). If either shows another
  owner, someone took the lease: `lost` turns True and the holder stops before writing
  anything else (`check`, called by the training loop before each metrics write and save);
* releasing it: delete, conditioned on our generation.

After every write the object is read back and its owner compared with ours, so a store that
ignores preconditions (the GCS emulator used in tests does) still refuses the second of two
runs that are not started in the same instant. Only gs:// has generations here (through
google-cloud-storage); other schemes get the read-check-write-read-back protocol alone.
Clocks: the heartbeat is the writer's wall time and the reader compares it with its own, so
hosts need NTP-synchronised clocks (cloud VMs have them); the ttl (60 s) dwarfs their skew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from research import storage
from research.errors import WorkdirLockedError

DEFAULT_TTL_S = 60.0


def holder_text() -> str:
    return f"pid={os.getpid()} host={socket.gethostname()}"


class _Conflict(Exception):
    """A conditional write or delete lost (the object changed since we read it)."""


class _GcsObject:
    """The lease object through google-cloud-storage: generations and preconditions."""

    def __init__(self, url: str):
        from google.cloud import storage as gcs
        bucket, name = url.split("://", 1)[1].split("/", 1)
        client = gcs.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "-")
        self._blob_of = lambda: client.bucket(bucket).blob(name)
        self._precondition = __import__("google.api_core.exceptions",
                                        fromlist=["PreconditionFailed"]).PreconditionFailed

    def read(self) -> tuple[dict[str, Any] | None, int | None]:
        blob = self._blob_of()
        try:
            data = blob.download_as_bytes()
        except Exception as err:
            if type(err).__name__ == "NotFound":
                return None, None
            raise
        return _parse(data), blob.generation

    def write(self, content: dict[str, Any], if_generation: int) -> int:
        blob = self._blob_of()
        try:
            blob.upload_from_string(json.dumps(content), content_type="application/json",
                                    if_generation_match=if_generation)
        except self._precondition:
            raise _Conflict() from None
        return blob.generation

    def delete(self, if_generation: int) -> None:
        try:
            self._blob_of().delete(if_generation_match=if_generation)
        except Exception as err:
            if not isinstance(err, self._precondition) and type(err).__name__ != "NotFound":
                raise


class _FileObject:
    """Any other storage: no preconditions (the read-back check still applies)."""

    def __init__(self, url: str):
        self.url = url

    def read(self) -> tuple[dict[str, Any] | None, int | None]:
        try:
            return _parse(storage.read_bytes(self.url)), 1
        except FileNotFoundError:
            return None, None

    def write(self, content: dict[str, Any], if_generation: int) -> int:
        storage.write_text(self.url, json.dumps(content))
        return 1

    def delete(self, if_generation: int) -> None:
        storage.remove(self.url)


def _parse(data: bytes) -> dict[str, Any]:
    try:
        content = json.loads(data)
        return content if isinstance(content, dict) else {}
    except ValueError:
        return {}  # torn or foreign: treated as expired


def _age(content: dict[str, Any]) -> float:
    try:
        return time.time() - float(content["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return float("inf")


def _ttl(content: dict[str, Any]) -> float:
    try:
        return float(content["ttl_s"])
    except (KeyError, TypeError, ValueError):
        return DEFAULT_TTL_S


class Lease:
    """The lease on object `url` (DIR/.lock); see the module docstring. `what` names the
    thing locked in messages ('training run', 'sweep')."""

    def __init__(self, url: str, *, ttl_s: float = DEFAULT_TTL_S, what: str = "training run"):
        self.url = url
        self.ttl_s = float(ttl_s)
        self.what = what
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._obj = _GcsObject(url) if storage.scheme(url) == "gs" else _FileObject(url)
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _content(self) -> dict[str, Any]:
        return {"owner": self.owner, "holder": holder_text(), "heartbeat": time.time(),
                "ttl_s": self.ttl_s}

    def acquire(self) -> None:
        directory = storage.dirname(self.url)
        with storage.errors(self.url, "write the lock of"):
            current, generation = self._obj.read()
            if current is not None:
                age, ttl = _age(current), _ttl(current)
                if age <= ttl:
                    raise self._refusal(directory, current, age, ttl)
                logging.warning(
                    "taking over the lease on %s from %s: its last heartbeat is %.0f s old "
                    "(> its %.0f s ttl), so that %s is gone.", directory,
                    current.get("holder", "an unknown run"), age, ttl, self.what)
            try:
                self._generation = self._obj.write(self._content(), generation or 0)
            except _Conflict:
                current, _ = self._obj.read()
                raise self._refusal(directory, current or {}, _age(current or {}),
                                    _ttl(current or {})) from None
            check, _ = self._obj.read()
        if (check or {}).get("owner") != self.owner:  # a store without preconditions raced
            raise self._refusal(directory, check or {}, _age(check or {}), _ttl(check or {}))
        self._thread = threading.Thread(target=self._heartbeat, name="lease-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _refusal(self, directory: str, content: dict[str, Any], age: float,
                 ttl: float) -> WorkdirLockedError:
        holder = content.get("holder", "unknown")
        return WorkdirLockedError(
            f"{directory} is in use by another {self.what} ({holder}; its lease {self.url} was "
            f"renewed {max(age, 0):.0f} s ago). Wait for it to finish or stop it, or pick a new "
            f"directory; if that run was killed, its lease expires {max(ttl - age, 0):.0f} s "
            "after its last heartbeat and a new run then takes it over.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            with self._lock:
                if self._generation is None:
                    return
                try:
                    current, _ = self._obj.read()  # a store without preconditions: by owner
                    if (current or {}).get("owner") != self.owner:
                        raise _Conflict()
                    self._generation = self._obj.write(self._content(), self._generation)
                except _Conflict:
                    self.lost = True
                    logging.error("lost the lease on %s: another %s took it over; this one "
                                  "stops before writing anything else.",
                                  storage.dirname(self.url), self.what)
                    return
                except Exception as err:  # a transient network error: try again next beat
                    logging.warning("could not renew the lease %s: %s", self.url, err)

    def check(self) -> None:
        """WorkdirLockedError if the lease was lost (another run took it over)."""
        if self.lost:
            raise WorkdirLockedError(
                f"{storage.dirname(self.url)}: another {self.what} took over this run's lease "
                f"({self.url}), so this one stopped without writing more. Make sure only one "
                "run uses the directory.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            if self._generation is not None and not self.lost:
                try:
                    self._obj.delete(self._generation)
                except Exception as err:  # the lease then expires on its own
                    logging.warning("could not delete the lease %s: %s", self.url, err)
            self._generation = None


def lease_held(url: str) -> bool:
    """Whether a live (heartbeat within its ttl) lease object is at `url`."""
    obj = _GcsObject(url) if storage.scheme(url) == "gs" else _FileObject(url)
    content, _ = obj.read()
    return content is not None and _age(content) <= _ttl(content)
