"""Text / JSON-lines / parquet files turned into a cached, random-access TFDS dataset.

The files may be local or on object storage (`gs://...` URLs, read through
`research.storage`); the cache is always under the local DATA_DIR.

`LocalCorpus` names the files (and how to parse them); `prepare_local_dataset` builds them
once into an `array_record` TFDS dataset with one feature `text` and one split `train`,
cached under

    DATA_DIR/research_local_documents/{format}-{hash}/1.0.0/

where the hash covers (format, text_field, on_decode_error, sorted absolute paths, sizes,
mtimes). A changed file gives a new hash, hence a rebuild; an unchanged corpus is reused.
Old cache directories are never deleted automatically.

File formats (`research.data.file_readers` parses them): `text` (blank-line separated
documents), `jsonl` (field `text_field` of one JSON object per line) and `parquet` (column
`text_field`); text and jsonl files may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`),
detected by suffix.

Invalid UTF-8: with `on_decode_error='strict'` a `DataSourceError` names the file and byte
offset; with `'skip'` the offending documents are skipped and counted in the log.

Output: one line of our own says where the dataset is built or reused. TFDS's chatter
while opening or building it (absl's "Using custom data configuration" and "Variant
folder ... has no dataset_info.json", the "Downloading and preparing dataset" banner --
nothing is downloaded -- and its progress bars) is silenced at the source (`quiet_tfds`);
its other warnings pass through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from research import storage
from research.data.file_readers import (DataSourceError, check_readable, compression_of,
                                        iter_jsonl_file, iter_parquet_file, iter_text_file)

log = logging.getLogger(__name__)

BUILDER_NAME = "research_local_documents"
CACHE_FORMAT_VERSION = 1  # bump when parsing rules change, to invalidate old caches
FORMATS = ("text", "jsonl", "parquet")
FIELD_FORMATS = ("jsonl", "parquet")  # formats whose document is the field `text_field`
DECODE_ERROR_MODES = ("strict", "skip")


@dataclasses.dataclass(frozen=True)
class LocalCorpus:
    """A set of files and how to parse them into documents.

    Attributes:
      fmt: 'text', 'jsonl' or 'parquet'.
      paths: sorted absolute file paths or URLs (text and jsonl files may be compressed).
      text_field: the JSON field (jsonl) or column (parquet) holding the document.
      on_decode_error: 'strict' (raise on invalid UTF-8) or 'skip'.
    """
    fmt: str
    paths: tuple[str, ...]
    text_field: str = "text"
    on_decode_error: str = "strict"

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise DataSourceError(f"Unknown local format {self.fmt!r}; use one of {FORMATS}.")
        if self.on_decode_error not in DECODE_ERROR_MODES:
            raise DataSourceError(
                f"on_decode_error={self.on_decode_error!r} is not supported; use 'strict' "
                "(raise on invalid UTF-8) or 'skip' (drop the bad documents).")

    def fingerprint(self) -> str:
        """16 hex digits over format, field, mode and every file's path, size and mtime (and
        compression: files read as-is before compressed input was supported hash as before).

        Raises DataSourceError if a file cannot be stat-ed or opened for reading.
        """
        entries = []
        for path in self.paths:
            size, mtime_ns = _size_and_mtime(path)
            compression = compression_of(path) if self.fmt != "parquet" else None
            entries.append([path, size, mtime_ns] + ([compression] if compression else []))
        key = [CACHE_FORMAT_VERSION, self.fmt,
               self.text_field if self.fmt in FIELD_FORMATS else None,
               self.on_decode_error, entries]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def iter_documents(self) -> Iterator[str]:
        """Yields every document of every file, files in `paths` order."""
        skipped = 0
        for path in self.paths:
            if self.fmt == "text":
                docs = iter_text_file(path, self.on_decode_error)
            elif self.fmt == "jsonl":
                docs = iter_jsonl_file(path, self.text_field, self.on_decode_error)
            else:
                docs = iter_parquet_file(path, self.text_field, self.on_decode_error)
            for doc in docs:
                if doc is None:
                    skipped += 1
                else:
                    yield doc
        if skipped:
            log.warning("Skipped %d document(s) with invalid UTF-8 (on_decode_error='skip').",
                        skipped)


def _size_and_mtime(path: str) -> tuple[int, int]:
    """(bytes, last-write time in ns) of a readable local file (os.stat) or of an object (its
    metadata only: no data is fetched). DataSourceError if it cannot be read."""
    if not storage.is_remote(path):
        check_readable(path)
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    try:
        return storage.getsize(path), int(round(storage.getmtime(path) * 1e9))
    except OSError as e:
        raise DataSourceError(
            f"Cannot read input object {path!r}: {e}. Check it still exists and that this "
            "machine may read it, or narrow the glob so that it excludes it.") from e


class _EmptyCorpus(Exception):
    """Raised inside generation when the corpus has no documents."""


class LocalDocuments(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for a `LocalCorpus`: feature `text`, single split `train`, file order.

    Not registered with TFDS (so defining or instantiating it any number of times in one
    process is safe); the config name is the corpus fingerprint.
    """

    name = BUILDER_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents of local text/jsonl/parquet files."}

    def __init__(self, *, corpus: LocalCorpus, fingerprint: str, data_dir: str):
        self.corpus = corpus
        config = tfds.core.BuilderConfig(
            name=f"{corpus.fmt}-{fingerprint}", version=self.VERSION,
            description=f"{len(corpus.paths)} {corpus.fmt} file(s)")
        super().__init__(data_dir=data_dir, config=config)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Documents read from local files by research.data.sources.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # keep file order: document i is stable and meaningful
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        n = 0
        for n, doc in enumerate(self.corpus.iter_documents(), start=1):
            yield n - 1, {"text": doc}
        if n == 0:
            raise _EmptyCorpus()

    # TFDS prints a "Downloading and preparing dataset" banner before a build and a
    # "downloaded and prepared" one after it, straight to stdout. Nothing is downloaded
    # here and `prepare_local_dataset` logs its own line, so both are silent.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


# absl warnings TFDS emits while opening or building a dataset, none of them actionable:
# a `LocalDocuments` config is ours by design, and a dataset that is not prepared yet has a
# folder without dataset_info.json (for `tfds:` specs our own error says how to prepare it).
_TFDS_NOISE = ("Using custom data configuration", "Variant folder ")


class _DropTfdsNoise(logging.Filter):
    """Drops TFDS's info lines ("Generating dataset", "Done writing", ...) and the warnings
    of `_TFDS_NOISE`; every other warning and error passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        return not (isinstance(record.msg, str) and record.msg.startswith(_TFDS_NOISE))


@contextlib.contextmanager
def quiet_tfds():
    """Silences TFDS's chatter while we open or build a dataset; its other warnings pass.

    TFDS progress bars are turned off for the process: it builds no TFDS dataset but its
    own `LocalDocuments` (`tfds:` specs are read, never downloaded or built).
    """
    absl_logger = logging.getLogger("absl")
    noise = _DropTfdsNoise()
    absl_logger.addFilter(noise)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        absl_logger.removeFilter(noise)


def prepare_local_dataset(corpus: LocalCorpus, data_dir: str, *,
                          file_format: str = "array_record") -> LocalDocuments:
    """Builds (or reuses) the cached TFDS dataset of `corpus`; returns its prepared builder.

    Logs one line saying where the dataset is built or reused; TFDS's own chatter about the
    build is silenced (module docstring).

    Raises DataSourceError for unreadable files, invalid input, or a corpus with no
    documents.
    """
    fingerprint = corpus.fingerprint()
    with quiet_tfds():
        builder = LocalDocuments(corpus=corpus, fingerprint=fingerprint, data_dir=data_dir)
        if builder.is_prepared():
            log.info("Reusing cached local dataset %s (%d file(s), unchanged).",
                     builder.data_dir, len(corpus.paths))
            return builder
        log.info("Building local dataset %s from %d %s file(s) (new or changed input; later "
                 "runs reuse it while the files are unchanged).", builder.data_dir,
                 len(corpus.paths), corpus.fmt)
        return _build(builder, corpus, fingerprint, data_dir, file_format)


def _build(builder: LocalDocuments, corpus: LocalCorpus, fingerprint: str, data_dir: str,
           file_format: str) -> LocalDocuments:
    """Runs the TFDS build of `builder`; returns the prepared builder (ours, or another
    process's that won the race to finish the same build)."""
    try:
        builder.download_and_prepare(
            file_format=file_format,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except _EmptyCorpus:
        raise DataSourceError(
            f"The {corpus.fmt} files ({_describe_paths(corpus.paths)}) contain no documents. "
            + ("Documents are separated by blank lines; check the files are not empty."
               if corpus.fmt == "text" else
               f"Check the files have rows with a non-empty {corpus.text_field!r} field.")
        ) from None
    except DataSourceError:
        raise
    except Exception:
        # Another process (e.g. another host on a shared filesystem) may have won the race
        # to rename its finished build into place.
        fresh = LocalDocuments(corpus=corpus, fingerprint=fingerprint, data_dir=data_dir)
        if fresh.is_prepared():
            log.info("Local dataset %s was built concurrently by another process; reusing it.",
                     fresh.data_dir)
            return fresh
        raise
    return builder


def _describe_paths(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
