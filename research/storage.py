"""The one file layer: every path the framework reads or writes goes through here, so a local
path and an object-store URL (`gs://bucket/dir`, or any scheme fsspec has a filesystem for,
e.g. `s3://` with s3fs installed) work the same everywhere.

Local paths use the OS (atomic writes by temp file + rename, appends). URLs use fsspec (gcsfs
for gs://); Orbax and TensorStore reach the same objects through etils.epath and their own GCS
driver. On object storage:

* a whole-object write is atomic by itself (no temp + rename, which would be a copy);
* there is no append: `append_text` rewrites the object with the new lines (the writer keeps
  the text it wrote, so each append costs one upload of the whole object, not a download);
* listings are never served from a cache, so a resumed run or a sweep sees what other
  processes wrote a moment ago.

Emulator: with STORAGE_EMULATOR_HOST=http://HOST:PORT set (the standard variable gcsfs and
google-cloud-storage read), `configure_environment` also points TensorStore (Orbax
checkpoints) at it (TENSORSTORE_GCS_HTTP_URL, plus GOOGLE_AUTH_TOKEN_FOR_TESTING so it does not
look for credentials). It also sets EPATH_USE_TF=false, so etils.epath (Orbax) uses gcsfs
rather than tf.io.gfile, whose GCS client cannot be pointed at an emulator, and
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (gcsfs's zonal-bucket probe needs credentials).

Errors: a missing bucket, a denied read/write or an unknown scheme raise `StorageError` (a
ConfigError: one `error:` line) naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import glob as glob_lib
import os
import posixpath
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

from research.errors import ConfigError, UserError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB_CHARS = re.compile(r"[*?\[]")
# An HTTP status code standing alone in an error message (not inside a path or an object id).
_STATUS = re.compile(r"(?<![\w/.%-])(40[134])(?![\w/.%-])")


class StorageError(ConfigError):
    """A path on object storage cannot be used: missing bucket, access denied, bad scheme."""


def configure_environment() -> None:
    """Sets the variables that make every component use one GCS endpoint (see module doc).
    Idempotent; values already set win."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    # gcsfs's experimental zonal/HNS layer asks the Storage Control API for each bucket's type
    # (needing credentials an emulator has not); plain gcsfs serves every bucket.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        if not _URL.match(emulator):
            emulator = "http://" + emulator
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")


configure_environment()


def scheme(path: str) -> str | None:
    """'gs' for gs://bucket/x, None for a local path (file:// counts as local)."""
    m = _URL.match(str(path))
    if not m or m.group(1).lower() == "file":
        return None
    return m.group(1).lower()


def is_remote(path: str) -> bool:
    """Whether `path` is an object-store URL rather than a local path."""
    return scheme(path) is not None


def _local(path: str) -> str:
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.expanduser(path)


def resolve(path: str) -> str:
    """The absolute form of `path`: os.path.abspath for local paths; a URL without a trailing
    slash."""
    if is_remote(path):
        head, rest = str(path).split("://", 1)
        return f"{head.lower()}://{rest.rstrip('/')}" if rest.strip("/") else f"{head}://{rest}"
    return os.path.abspath(_local(path))


def join(base: str, *names: str) -> str:
    """`base/names...` with '/' for URLs, os.path.join for local paths."""
    if is_remote(base):
        return posixpath.join(str(base).rstrip("/"), *names)
    return os.path.join(_local(base), *names)


def basename(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_remote(path) else \
        os.path.basename(os.path.abspath(_local(path)))


def dirname(path: str) -> str:
    return posixpath.dirname(str(path).rstrip("/")) if is_remote(path) else \
        os.path.dirname(os.path.abspath(_local(path)))


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, its path) for a URL; the filesystem never caches listings."""
    import fsspec
    proto = scheme(path)
    try:
        cls = fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{path}: no filesystem for {proto}:// ({err}); use a local path or "
                           "gs://, or install the fsspec package for that scheme.") from None
    fs = cls(use_listings_cache=False, skip_instance_cache=False)
    return fs, cls._strip_protocol(str(path))


def _bucket(path: str) -> str:
    return str(path).split("://", 1)[1].split("/", 1)[0]


def _bucket_exists(path: str) -> bool:
    """Whether the bucket of URL `path` exists (True if that cannot be told)."""
    try:
        fs, _ = filesystem(path)
        return bool(fs.exists(_bucket(path)))
    except Exception:  # noqa: BLE001 - only refines an error message
        return True


def check_bucket(path: str) -> None:
    """StorageError if `path` is a URL whose bucket does not exist; no-op for local paths. For
    messages about something that was not found: a missing bucket is the likelier cause."""
    if is_remote(path) and not _bucket_exists(path):
        bucket = _bucket(path)
        raise StorageError(f"{path}: bucket {bucket!r} does not exist. Create it (`gcloud storage "
                           f"buckets create {scheme(path)}://{bucket}`) or fix the path.")


@contextlib.contextmanager
def errors(path: str, action: str) -> Iterator[None]:
    """Turns an object store's missing-bucket / access-denied failures while `action`ing
    `path` into a StorageError naming both and the fix. Local OSErrors pass through."""
    try:
        yield
    except UserError:  # ours (StorageError, a lease refusal...): already says what to do
        raise
    except Exception as err:  # gcsfs/aiohttp/google-api errors have no common base
        if not is_remote(path):
            raise
        text = f"{type(err).__name__}: {err}"
        low = text.lower()
        bucket = _bucket(path)
        statuses = set(_STATUS.findall(text)) | {str(getattr(err, "code", ""))}
        if statuses & {"401", "403"} or "permission" in low or "forbidden" in low \
                or "unauthori" in low or isinstance(err, PermissionError):
            raise StorageError(
                f"cannot {action} {path}: access denied on bucket {bucket!r} ({text.splitlines()[0][:200]}). "
                f"Grant this machine's account read/write on gs://{bucket} (roles/storage.objectAdmin) "
                "or pick a path you can write.") from None
        if "bucket" in low and ("not found" in low or "does not exist" in low or "404" in statuses) \
                or isinstance(err, FileNotFoundError) and (action.startswith("write")
                                                           or not _bucket_exists(path)):
            raise StorageError(
                f"cannot {action} {path}: bucket {bucket!r} does not exist. Create it "
                f"(`gcloud storage buckets create gs://{bucket}`) or fix the path.") from None
        raise


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(_local(path))
    fs, p = filesystem(path)
    with errors(path, "read"):
        return fs.exists(p)


def isdir(path: str) -> bool:
    """Local: a directory. URL: a prefix with at least one object under it (object stores
    have no empty directories), or a bucket root."""
    if not is_remote(path):
        return os.path.isdir(_local(path))
    fs, p = filesystem(path)
    with errors(path, "read"):
        return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(_local(path))
    fs, p = filesystem(path)
    with errors(path, "read"):
        return fs.isfile(p)


def listdir(path: str) -> list[str]:
    """The sorted names directly under `path` ([] if there is nothing)."""
    if not is_remote(path):
        local = _local(path)
        return sorted(os.listdir(local)) if os.path.isdir(local) else []
    fs, p = filesystem(path)
    with errors(path, "list"):
        try:
            entries = fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
    names = {posixpath.basename(e.rstrip("/")) for e in entries}
    return sorted(n for n in names if n)


def glob(pattern: str) -> list[str]:
    """The sorted files matching `pattern` (`*`, `?`, `[..]`, `**` for any depth), as
    absolute paths or full URLs. Directories are left out."""
    if not is_remote(pattern):
        matches = glob_lib.glob(_local(pattern), recursive=True)
        return sorted(os.path.abspath(m) for m in matches if not os.path.isdir(m))
    fs, p = filesystem(pattern)
    proto = scheme(pattern)
    with errors(pattern, "list"):
        if _GLOB_CHARS.search(p):
            found = fs.glob(p, detail=True)
            files = [k for k, v in found.items() if v.get("type") != "directory"]
        else:
            files = [p] if fs.isfile(p) else []
    return sorted(f"{proto}://{f}" for f in files)


def makedirs(path: str) -> None:
    """Creates a local directory (and parents); no-op on object storage."""
    if not is_remote(path):
        os.makedirs(_local(path), exist_ok=True)


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(_local(path), "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    with errors(path, "read"):
        return fs.cat_file(p)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


# URL -> the text this process last appended there, so the next append needs no download
# (only appended objects are kept: run logs, not checkpoints or shards). One writer per object
# (the workdir lock) makes this exact; any other write or delete through here forgets it.
_written: dict[str, bytes] = {}


def write_bytes(path: str, data: bytes) -> None:
    """Writes the whole file atomically: a reader sees the old or the new content, never half."""
    if not is_remote(path):
        local = _local(path)
        tmp = f"{local}.tmp{os.getpid()}.{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
        return
    fs, p = filesystem(path)
    _written.pop(resolve(path), None)
    with errors(path, "write"):
        fs.pipe_file(p, data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str, text: str) -> None:
    """Appends `text` to `path` (created if missing). On object storage the object is
    rewritten with the text added (see module doc)."""
    if not is_remote(path):
        with open(_local(path), "a", encoding="utf-8") as f:
            f.write(text)
        return
    key = resolve(path)
    before = _written[key] if key in _written else (read_bytes(path) if exists(path) else b"")
    after = before + text.encode("utf-8")
    write_bytes(path, after)
    _written[key] = after


def remove(path: str) -> None:
    """Deletes a file; a missing one is fine."""
    _written.pop(resolve(path), None)
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(_local(path))
        return
    fs, p = filesystem(path)
    with errors(path, "delete"), contextlib.suppress(FileNotFoundError):
        fs.rm_file(p)


def rmtree(path: str) -> None:
    """Deletes a directory (every object under the prefix); a missing one is fine."""
    if not is_remote(path):
        shutil.rmtree(_local(path), ignore_errors=True)
        return
    fs, p = filesystem(path)
    for key in [k for k in _written if k == resolve(path) or k.startswith(resolve(path) + "/")]:
        del _written[key]
    with errors(path, "delete"), contextlib.suppress(FileNotFoundError):
        fs.rm(p, recursive=True)


def getsize(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(_local(path))
    fs, p = filesystem(path)
    with errors(path, "read"):
        return int(fs.size(p))


def getmtime(path: str) -> float:
    """Seconds since the epoch of the last write."""
    if not is_remote(path):
        return os.path.getmtime(_local(path))
    fs, p = filesystem(path)
    with errors(path, "read"):
        return fs.modified(p).timestamp()


def open_file(path: str, mode: str = "rb") -> IO:
    """A file object: local `open`, or fsspec's buffered object (reads stream in blocks; a
    write becomes one upload on close)."""
    if not is_remote(path):
        return open(_local(path), mode)
    fs, p = filesystem(path)
    with errors(path, "read" if "r" in mode else "write"):
        return fs.open(p, mode)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding `path`'s content (a file or a directory tree): the path itself when
    local, else a temporary download that is deleted afterwards. For libraries that only open
    local files (SentencePiece, safetensors)."""
    if not is_remote(path):
        yield _local(path)
        return
    fs, p = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="research-") as tmp:
        target = os.path.join(tmp, basename(path))
        with errors(path, "read"):
            if fs.isdir(p):
                fs.get(p.rstrip("/") + "/", target + "/", recursive=True)
            else:
                fs.get_file(p, target)
        yield target


def upload(local_path: str, path: str) -> None:
    """Copies a local file or directory tree to `path` (a URL or a local path)."""
    if not is_remote(path):
        dest = _local(path)
        if os.path.isdir(local_path):
            shutil.copytree(local_path, dest, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            shutil.copyfile(local_path, dest)
        return
    fs, p = filesystem(path)
    with errors(path, "write"):
        if os.path.isdir(local_path):
            fs.put(local_path.rstrip("/") + "/", p.rstrip("/") + "/", recursive=True)
        else:
            fs.put_file(local_path, p)


def check_writable(path: str, flag: str, given: str | None = None) -> None:
    """ConfigError unless `path` is a directory or can be created as one: locally its nearest
    existing ancestor is a writable directory; on object storage the bucket exists and accepts
    a write (a probe object is written and deleted, StorageError otherwise). Run before any
    work, so a bad path costs nothing.

    `flag` names the flag in the message; `given` is its value when `path` is derived from it
    (the directory of an output prefix), else the value is `path`."""
    if not is_remote(path):
        subject = f"{flag}={given or path}"
        path = _local(path)
        target = existing = os.path.abspath(path)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            if existing == target and given is None:
                raise ConfigError(f"{subject} is a file, not a directory; pick a directory (a new "
                                  "path is created).")
            raise ConfigError(f"{subject} cannot be created: {existing} is a file; pick another "
                              "path.")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{subject}: {existing} is not writable; pick a directory you can "
                              "write to.")
        return
    probe = join(path, f".write-probe-{os.getpid()}")
    fs, p = filesystem(probe)
    with errors(path, "write"):
        bucket = _bucket(path)
        if not fs.exists(bucket):
            raise StorageError(
                f"{flag}={path}: bucket {bucket!r} does not exist. Create it "
                f"(`gcloud storage buckets create gs://{bucket}`) or fix the path.")
        fs.pipe_file(p, b"")
        fs.rm_file(p)
