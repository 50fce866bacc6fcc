"""Documents of one file: plain text, JSON lines (optionally compressed) and parquet.

A file is a local path or an object-store URL (`gs://bucket/x.jsonl.gz`): every file is
opened through `research.storage` and read as a stream (a URL is fetched in blocks, never
downloaded whole first; parquet is read from the same stream with ranged reads).

Each reader yields the file's documents in order, or None in place of a document skipped for
invalid UTF-8 (on_decode_error='skip'); `research.data.local_builder` builds them into a
cached TFDS dataset.

* `text`: UTF-8 plain text. One or more blank lines (empty or ASCII-whitespace-only)
  separate documents; each document is stripped; empty documents are dropped.
* `jsonl`: one JSON object per line; the document is the string field `text_field`.
  Blank lines are ignored; whitespace-only documents are dropped.
* `parquet`: the string (or UTF-8 binary) column `text_field` of every row, row groups in
  order; whitespace-only documents are dropped, a null value is an error.

Compression (text and jsonl) is detected by the file name's suffix: `.gz`, `.bz2`, `.xz`,
`.zst` / `.zstd` (zstandard, multi-frame files included); any other name is read as is.
Byte offsets in error messages then count the decompressed data.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from typing import BinaryIO

from research import storage
from research.errors import ConfigError

# Suffix -> how to open the file as a decompressed binary stream.
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
_PARQUET_BATCH_ROWS = 1024


class DataSourceError(ConfigError):
    """A data spec or the data it names cannot be used (bad spec, a glob matching nothing,
    a missing field or column, an unprepared TFDS dataset, ...); the message names the
    culprit and the fix. A ConfigError: the CLIs print one `error:` line and exit 2."""


def compression_of(path: str) -> str | None:
    """The compression suffix of `path` ('.gz', '.zst', ...), or None for an uncompressed
    file."""
    lower = path.lower()
    return next((s for s in COMPRESSED_SUFFIXES if lower.endswith(s)), None)


def _zstd_reader(f: BinaryIO) -> BinaryIO:
    try:
        import zstandard
    except ImportError:
        raise DataSourceError(
            "Reading .zst files needs the zstandard package: `pip install 'zstandard>=0.22,<1'` "
            "(it is in setup.cfg's install_requires), or decompress the files first.") from None
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
    return io.BufferedReader(reader)


@contextlib.contextmanager
def open_decompressed(path: str) -> Iterator[BinaryIO]:
    """`path` opened for binary reading, decompressed according to its suffix."""
    suffix = compression_of(path)
    with storage.open_file(path, "rb") as raw:
        if suffix == ".gz":
            f = gzip.GzipFile(fileobj=raw)
        elif suffix == ".bz2":
            f = bz2.BZ2File(raw)
        elif suffix == ".xz":
            f = lzma.LZMAFile(raw)
        elif suffix in (".zst", ".zstd"):
            f = _zstd_reader(raw)
        else:
            yield raw
            return
        with f:
            yield f


@contextlib.contextmanager
def _reading(path: str):
    """Turns I/O and decompression failures while reading `path` into a DataSourceError."""
    try:
        yield
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataSourceError(
            f"Cannot read input file {path!r}: {e}. Fix its permissions, re-create it if it "
            "is truncated or corrupt, or narrow the glob so that it excludes it.") from e
    except DataSourceError:
        raise
    except Exception as e:  # zstandard.ZstdError, pyarrow and object-store (gcsfs, aiohttp)
        # errors share no base class
        if type(e).__module__.split(".")[0] not in ("zstandard", "pyarrow", "gcsfs", "aiohttp",
                                                    "fsspec"):
            raise
        raise DataSourceError(
            f"Cannot read input file {path!r}: {type(e).__name__}: {e}. Re-create it if it "
            "is truncated or corrupt, or narrow the glob so that it excludes it.") from e


def check_readable(path: str) -> None:
    """Raises DataSourceError naming `path` if it cannot be opened for reading."""
    try:
        with storage.open_file(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise DataSourceError(
            f"Cannot read input file {path!r}: {e.strerror or e}. Fix its permissions or "
            "path (a broken symlink?), or narrow the glob so that it excludes it.") from e


def _where(path: str) -> str:
    return f"{path} (decompressed)" if compression_of(path) else path


def _decode(raw: bytes, where: str, offset: int, on_decode_error: str) -> str | None:
    """Decodes one document's bytes; None if invalid and skipping. `offset`: file offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_decode_error == "skip":
            return None
        raise DataSourceError(
            f"{where}: invalid UTF-8 at byte offset {offset + e.start} ({e.reason}). Re-encode "
            "the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or pass "
            "on_decode_error='skip' to drop the documents that contain invalid bytes.") from e


def iter_text_file(path: str, on_decode_error: str = "strict") -> Iterator[str | None]:
    """Yields the stripped, non-empty blank-line-separated documents of a text file.

    Yields None in place of a document skipped for invalid UTF-8 (on_decode_error='skip').
    Reads line by line, so files larger than memory are fine.
    """
    lines: list[bytes] = []
    start = offset = 0
    where = _where(path)
    with _reading(path), open_decompressed(path) as f:
        for line in f:
            if line.strip():
                if not lines:
                    start = offset
                lines.append(line)
            elif lines:
                yield from _finish_text_doc(lines, where, start, on_decode_error)
                lines = []
            offset += len(line)
    if lines:
        yield from _finish_text_doc(lines, where, start, on_decode_error)


def _finish_text_doc(lines: list[bytes], where: str, start: int,
                     on_decode_error: str) -> Iterator[str | None]:
    text = _decode(b"".join(lines), where, start, on_decode_error)
    if text is None:
        yield None
    elif text.strip():
        yield text.strip()


def iter_jsonl_file(path: str, text_field: str = "text",
                    on_decode_error: str = "strict") -> Iterator[str | None]:
    """Yields field `text_field` of each JSON object line (None for skipped invalid UTF-8)."""
    offset = 0
    where = _where(path)
    with _reading(path), open_decompressed(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line_offset, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            line = _decode(raw, where, line_offset, on_decode_error)
            if line is None:
                yield None
                continue
            doc = _json_field(line, text_field, where, lineno)
            if _has_lone_surrogate(doc):
                if on_decode_error == "skip":
                    yield None
                    continue
                raise DataSourceError(
                    f"{where}:{lineno}: field {text_field!r} contains an unpaired UTF-16 "
                    "surrogate escape (e.g. \"\\udc80\"), which is not valid Unicode text. "
                    "Fix the file or pass on_decode_error='skip'.")
            if doc.strip():
                yield doc


def _json_field(line: str, text_field: str, where: str, lineno: int) -> str:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataSourceError(
            f"{where}:{lineno}: not valid JSON ({e.msg}, column {e.colno}). A jsonl file must "
            "hold exactly one JSON object per line; use the text: prefix for plain text.") from e
    if not isinstance(obj, dict):
        raise DataSourceError(
            f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}. Each line "
            f"must look like {{\"{text_field}\": \"...\"}}.")
    if text_field not in obj:
        raise DataSourceError(
            f"{where}:{lineno}: JSON object has no field {text_field!r} (fields: "
            f"{sorted(obj)[:10]}). Pass text_field=... (gin: open_documents.text_field) "
            "to name the field that holds the document text.")
    doc = obj[text_field]
    if not isinstance(doc, str):
        raise DataSourceError(
            f"{where}:{lineno}: field {text_field!r} is a {type(doc).__name__}, not a string. "
            "Point text_field=... (gin: open_documents.text_field) at a string field.")
    return doc


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet_text_column(parquet_file, path: str, text_field: str) -> None:
    """DataSourceError unless `text_field` is a string or binary column of the file."""
    import pyarrow as pa
    schema = parquet_file.schema_arrow
    if text_field not in schema.names:
        raise DataSourceError(
            f"{path}: parquet file has no column {text_field!r} (columns: "
            f"{schema.names[:10]}). Pass text_field=... (gin: open_documents.text_field) to "
            "name the column that holds the document text.")
    kind = schema.field(text_field).type
    text_types = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                  pa.types.is_large_binary, getattr(pa.types, "is_string_view", lambda t: False))
    if not any(is_type(kind) for is_type in text_types):
        raise DataSourceError(
            f"{path}: parquet column {text_field!r} has type {kind}, not a string. Point "
            "text_field=... (gin: open_documents.text_field) at a string column.")


def iter_parquet_file(path: str, text_field: str = "text",
                      on_decode_error: str = "strict") -> Iterator[str | None]:
    """Yields column `text_field` of every row of a parquet file, in row order (None for a
    binary value skipped for invalid UTF-8). Reads one batch of rows at a time."""
    import pyarrow.parquet as pq
    with _reading(path), contextlib.ExitStack() as stack:
        source = (stack.enter_context(storage.open_file(path, "rb")) if storage.is_remote(path)
                  else path)
        parquet_file = pq.ParquetFile(source)
        _parquet_text_column(parquet_file, path, text_field)
        row = 0
        for batch in parquet_file.iter_batches(batch_size=_PARQUET_BATCH_ROWS,
                                               columns=[text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    raise DataSourceError(
                        f"{path}: row {row} has a null {text_field!r}. Drop such rows from "
                        "the file, or point text_field=... at a column without nulls.")
                if isinstance(value, bytes):
                    value = _decode(value, f"{path} row {row}", 0, on_decode_error)
                    if value is None:
                        yield None
                        continue
                if value.strip():
                    yield value
