"""The run directory: the one place that names, reads and writes its files, its lock, and the
checks that a DIR holding a run only resumes that run.

Files (process 0 writes them; every write of a whole file is atomic: temp file + rename):
  DIR/config.gin     the operative gin config            write_config / read_config
  DIR/run.json       resolved model facts for tools      write_run_info / read_run_info
  DIR/metrics.jsonl  one JSON object per logged step     append_metrics / read_metrics / truncate_metrics
  DIR/final.json     written when a run completes        write_final / read_final
  DIR/.lock          held while a run trains             WorkdirLock

DIR may be local or on object storage (gs://...; every access goes through research/storage.py).

* `WorkdirLock`: DIR/.lock, held by process 0, so two runs never train into one DIR: an
  fcntl.flock on a local DIR, a heartbeat lease object on object storage (research/lease.py).
* `check_resume_config`: a DIR that already has a config.gin only resumes with the same
  bindings (run length, logging/eval/checkpoint cadence, the progress bar and layout-only
  bindings such as MESH_SHAPE, the sharding rules and the remat policy may change).
* `check_resume_tokenizer`: ... and with a tokenizer of the same size and special ids.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from typing import Any, Iterable

from research import lease as lease_lib
from research import storage
from research.errors import ConfigMismatchError, WorkdirLockedError

CONFIG_FILE = "config.gin"
RUN_INFO_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
FINAL_FILE = "final.json"
LOCK_FILE = ".lock"


def path(workdir: str, name: str) -> str:
    """DIR/name for one of the run files above."""
    return storage.join(workdir, name)


def write_text(file: str, text: str) -> None:
    """Writes `text` to `file` atomically (a reader never sees half a file)."""
    storage.write_text(file, text)


def _read_text(file: str) -> str | None:
    try:
        return storage.read_text(file)
    except (OSError, UnicodeDecodeError):
        return None


def read_json(file: str) -> Any:
    """The JSON object in `file`, or None if it is missing or unreadable (cut short by a crash)."""
    text = _read_text(file)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def write_config(workdir: str, text: str) -> None:
    write_text(path(workdir, CONFIG_FILE), text)


def read_config(workdir: str) -> str | None:
    return _read_text(path(workdir, CONFIG_FILE))


def write_run_info(workdir: str, info: dict[str, Any]) -> None:
    write_text(path(workdir, RUN_INFO_FILE), json.dumps(info, indent=2))


def read_run_info(workdir: str) -> dict[str, Any] | None:
    return read_json(path(workdir, RUN_INFO_FILE))


def write_final(workdir: str, info: dict[str, Any]) -> None:
    write_text(path(workdir, FINAL_FILE), json.dumps(info, indent=2))


def read_final(workdir: str) -> dict[str, Any] | None:
    return read_json(path(workdir, FINAL_FILE))


def is_finished(workdir: str) -> bool:
    """Whether the run in DIR completed (DIR/final.json exists)."""
    return storage.exists(path(workdir, FINAL_FILE))


def read_metrics(workdir_or_file: str) -> list[dict[str, Any]]:
    """The records of DIR/metrics.jsonl (or of that file itself) in order; a line cut short by
    a crash, or without a step, is skipped. [] if there is no file."""
    file = workdir_or_file
    if not file.endswith(".jsonl") and storage.isdir(file):
        file = path(file, METRICS_FILE)
    records = []
    for line in (_read_text(file) or "").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def append_metrics(workdir: str, record: dict[str, Any]) -> None:
    """Appends one record (a dict with "step") to DIR/metrics.jsonl (on object storage, which
    has no append, the object is rewritten with the record added: research/storage.py)."""
    storage.append_text(path(workdir, METRICS_FILE), json.dumps(record) + "\n")


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops the records after `last_step` (and torn lines), so a resumed run's file reads as if
    it had never stopped."""
    file = path(workdir, METRICS_FILE)
    if storage.exists(file):
        kept = [r for r in read_metrics(file) if r["step"] <= last_step]
        write_text(file, "".join(json.dumps(r) + "\n" for r in kept))


class WorkdirLock:
    """Local DIR: an exclusive, non-blocking flock on DIR/.lock holding 'pid host'. The OS
    drops it when the process dies (kill -9 included), so a stale file never blocks a restart.
    DIR on object storage: a lease object DIR/.lock with a heartbeat (research/lease.py); a
    killed run's lease is taken over once its heartbeat is older than `lease_ttl_s`."""

    def __init__(self, workdir: str, enabled: bool = True,
                 lease_ttl_s: float = lease_lib.DEFAULT_TTL_S):
        self.path = path(storage.resolve(workdir), LOCK_FILE)
        self.enabled = enabled
        self._fd: int | None = None
        self.lease = (lease_lib.Lease(self.path, ttl_s=lease_ttl_s)
                      if enabled and storage.is_remote(workdir) else None)

    def check(self) -> None:
        """WorkdirLockedError if another run took this run's lease (object storage only)."""
        if self.lease is not None:
            self.lease.check()

    def acquire(self) -> None:
        if not self.enabled:
            return
        if self.lease is not None:
            self.lease.acquire()
            return
        import fcntl
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise WorkdirLockedError(
                f"{os.path.dirname(self.path)} is in use by another training run ({holder}; lock "
                f"file {self.path}). Wait for it to finish or stop it, or pick a new --workdir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
        if self._fd is not None:
            import fcntl
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_held(workdir: str) -> bool:
    """Whether a process (on any host sharing the filesystem) holds DIR/.lock, i.e. a run
    trains in DIR now. Only probes: a probe could race a trainer taking the lock, so ask only
    about a DIR whose trainer is not known to be starting. On object storage: a lease whose
    heartbeat is fresh."""
    if storage.is_remote(workdir):
        return lease_lib.lease_held(path(storage.resolve(workdir), LOCK_FILE))
    import fcntl
    try:
        fd = os.open(path(workdir, LOCK_FILE), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


# Bindings a resumed run may change: run length and cadences that do not alter the math, and
# the tokenizer worker count (where the same token ids are computed).
RESUMABLE_KEYS = frozenset({
    "TRAIN_STEPS", "train.num_steps", "train.num_epochs", "train.log_every", "train.eval_every",
    "train.eval_steps", "train.checkpoint_every", "train.keep_checkpoints",
    "train.async_checkpoints", "train.progress_bar", "train.on_nonfinite",
    "train.hang_timeout_s", "tokenize_workers.workers",
})

# Bindings that only choose how the same computation is laid out on the devices (sharding,
# rematerialisation, kernels, loss chunking): the parameter tree, the data and the loss are
# unchanged, so a checkpoint restores under new values (Orbax reshards params and optimizer
# state onto the new mesh) and training continues with the same losses up to float rounding.
# Not here, because they change the math or the checkpoint's structure: scan_layers (stacked
# parameter tree), microbatches (per-microbatch dropout RNG), dtype/param_dtype, BATCH_SIZE.
LAYOUT_KEYS = frozenset({
    "MESH_SHAPE", "train.mesh_shape",
    "logical_axis_rules.preset", "logical_axis_rules.overrides",
    "TransformerConfig.remat_policy", "TransformerConfig.attention_impl",
    "CausalLMObjective.loss_chunk_size",
})

_BINDING_START = re.compile(r"^([A-Za-z_][\w./]*)\s*=\s?(.*)$")


def parse_operative_config(text: str) -> dict[str, str]:
    """{binding name: value text} of a gin operative config (comments dropped, multi-line
    values joined)."""
    out: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _BINDING_START.match(line)
        if m and not line[0].isspace():
            key = m.group(1)
            out[key] = m.group(2).strip()
        elif key is not None:
            out[key] += " " + line.strip()
    return {k: re.sub(r"\s+", " ", v) for k, v in out.items()}


def _base_key(key: str) -> str:
    """`scope/module.Configurable.param` -> `Configurable.param` (macros unchanged)."""
    name = key.rsplit("/", 1)[-1]
    return ".".join(name.split(".")[-2:])


def check_resume_config(workdir: str, new_config: str,
                        allowed: Iterable[str] = RESUMABLE_KEYS | LAYOUT_KEYS) -> dict[str, tuple]:
    """Raises ConfigMismatchError if DIR/config.gin exists and differs from `new_config` in a
    binding outside `allowed`. A binding present on one side only counts only when it names
    a configurable the other side also has (the other side then used its default).

    Returns the allowed bindings that changed, {name: (old, new)} ('(unset)' for a side
    without it); changed LAYOUT_KEYS (mesh, sharding rules, remat...) are logged as a warning.
    """
    text = read_config(workdir)
    if text is None:
        return {}
    old = parse_operative_config(text)
    new = parse_operative_config(new_config)
    allowed = set(allowed)
    scopes_old = {k.rsplit(".", 1)[0] for k in old if "." in k}
    scopes_new = {k.rsplit(".", 1)[0] for k in new if "." in k}
    diffs, changed = [], {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key not in old or key not in new:
            scope = key.rsplit(".", 1)[0] if "." in key else None
            other = scopes_old if key not in old else scopes_new
            if scope is not None and scope not in other:
                continue  # that configurable did not run yet on the other side
        if key in allowed or _base_key(key) in allowed:
            changed[key] = (old.get(key, "(unset)"), new.get(key, "(unset)"))
            continue
        diffs.append(f"  {key}: {old.get(key, '(unset)')}  ->  {new.get(key, '(unset)')}")
    if diffs:
        raise ConfigMismatchError(
            f"{workdir} already holds a run with a different configuration "
            f"({path(workdir, CONFIG_FILE)}):\n"
            + "\n".join(diffs)
            + "\nOnly TRAIN_STEPS, the logging/eval/checkpoint cadence and layout-only bindings "
            f"({', '.join(sorted(LAYOUT_KEYS))}) may change on resume. "
            "Resume with the same command, or pick a new --workdir.")
    layout = [f"{k}: {a} -> {b}" for k, (a, b) in changed.items() if _base_key(k) in LAYOUT_KEYS]
    if layout:
        logging.warning("resuming %s with a different layout (the checkpoint is resharded onto "
                        "it; the math is unchanged): %s", workdir, "; ".join(layout))
    rest = [f"{k}: {a} -> {b}" for k, (a, b) in changed.items()
            if _base_key(k) not in LAYOUT_KEYS]
    if rest:
        logging.info("resuming %s with changed run length/cadence: %s", workdir, "; ".join(rest))
    return changed


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What a checkpoint depends on in its tokenizer: size and special-piece ids."""
    names = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
    return {"vocab_size": int(tokenizer.vocab_size),
            "special_ids": {n: int(getattr(tokenizer, f"{n}_id", -1)) for n in names}}


def check_resume_tokenizer(workdir: str, tokenizer) -> None:
    """Raises ConfigMismatchError if DIR/run.json records a tokenizer whose size or special
    ids differ from `tokenizer` (e.g. VOCAB's file was replaced at the same path)."""
    old = (read_run_info(workdir) or {}).get("tokenizer")
    new = tokenizer_fingerprint(tokenizer)
    if old is None or old == new:
        return
    diffs = [f"  vocab_size: {old.get('vocab_size')}  ->  {new['vocab_size']}"] \
        if old.get("vocab_size") != new["vocab_size"] else []
    for name, pid in new["special_ids"].items():
        before = old.get("special_ids", {}).get(name)
        if before != pid:
            diffs.append(f"  {name} id: {before}  ->  {pid}")
    raise ConfigMismatchError(
        f"{workdir} was trained with a different tokenizer than VOCAB={getattr(tokenizer, 'path', '?')!r} "
        f"({path(workdir, RUN_INFO_FILE)}):\n" + "\n".join(diffs) + "\nThe checkpoint's embeddings only fit the "
        "original tokenizer: restore that .model file, or pick a new --workdir.")
