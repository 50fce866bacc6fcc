"""A trial's train.log, ROOT/<trial>/train.log, whether ROOT is local or on object storage.

A subprocess can only write its output to a local file. With a local ROOT that file is
train.log itself (opened for append, as always). With ROOT on object storage (gs://...) the
trainer's output goes to a local staging copy, `staging_dir(ROOT)/<trial>/train.log`, that
starts as the object's current text (so attempts append as they do locally) and is uploaded
to ROOT/<trial>/train.log (one whole-object write) every `SYNC_S` seconds while the runner waits
for the trial, and when the trial ends; `status`, `collect` and users then find it there.
Whoever holds the sweep's lock is the only writer, so the upload never overwrites another's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import IO

from research import storage

LOG_FILE = "train.log"
SYNC_S = 30.0  # how often a running trial's staged log is copied to object storage


def staging_dir(root: str) -> str:
    """The local directory for files of a sweep whose ROOT is on object storage:
    $XDG_CACHE_HOME (or ~/.cache)/research/sweep/<ROOT's last part>-<12 hex of sha256(ROOT)>."""
    root = storage.resolve(root)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(root.encode("utf-8")).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in storage.basename(root))
    return os.path.join(cache, "research", "sweep", f"{name or 'root'}-{key}")


class TrialLog:
    """ROOT/<trial>/train.log of one attempt: `open` gives the file a launcher writes to,
    `sync` copies it to object storage (a no-op for a local ROOT), `close` closes and syncs."""

    def __init__(self, root: str, trial_name: str):
        self.url = storage.join(storage.resolve(root), trial_name, LOG_FILE)
        self.remote = storage.is_remote(root)
        self.path = (os.path.join(staging_dir(root), trial_name, LOG_FILE) if self.remote
                     else self.url)
        self.sync_every: float | None = SYNC_S if self.remote else None
        self._file: IO[str] | None = None
        self._synced_size = -1

    def stage(self) -> None:
        """Remote ROOT: makes the staging copy hold the object's current text ('' if none)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        data = storage.read_bytes(self.url) if storage.exists(self.url) else b""
        with open(self.path, "wb") as f:
            f.write(data)
        self._synced_size = len(data)

    def open(self) -> IO[str]:
        """The log opened for append (a remote log's staging copy starts as the object's text)."""
        if self._file is None:
            if self.remote:
                self.stage()
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def write(self, text: str) -> None:
        """Appends `text` (a newline is added when it lacks one)."""
        f = self.open()
        f.write(text if text.endswith("\n") else text + "\n")
        f.flush()

    def sync(self) -> None:
        """Uploads the staging copy when it grew since the last upload (remote ROOT only). A
        failed upload is logged and retried at the next sync."""
        if not self.remote or not os.path.exists(self.path):
            return
        if self._file is not None:
            self._file.flush()
        size = os.path.getsize(self.path)
        if size == self._synced_size:
            return
        try:
            storage.upload(self.path, self.url)
        except Exception as err:  # a network hiccup must not fail the trial
            logging.warning("could not copy %s to %s (retried later): %s", self.path, self.url, err)
            return
        self._synced_size = size

    def close(self) -> None:
        """Closes the file and uploads it (remote ROOT); the staging copy is then removed."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.sync()
        if self.remote and os.path.exists(self.path) \
                and os.path.getsize(self.path) == self._synced_size:
            os.remove(self.path)


def append(root: str, trial_name: str, text: str) -> None:
    """Appends `text` to ROOT/<trial>/train.log outside an attempt (a launcher failure)."""
    log = TrialLog(root, trial_name)
    storage.makedirs(storage.dirname(log.url))
    log.write(text)
    log.close()
