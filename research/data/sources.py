"""Random-access document sources named by a spec string.

    open_documents('text:data/austen/*.txt')        # blank-line separated plain text
    open_documents('jsonl:corpus/**/*.jsonl', text_field='body')
    open_documents('jsonl:shards/*.jsonl.zst')       # compressed: .gz .bz2 .xz .zst by suffix
    open_documents('parquet:fineweb/*.parquet')      # column `text_field` (default 'text')
    open_documents('tfds:lm1b:test')                 # a prepared TFDS dataset
    open_documents('tfds:wikipedia/20230601.en:train[:1%]')

Every source is a `DocumentSource`: `len(src)`, `src[i] -> str`, `src.name`.

Local files (`text:` / `jsonl:` / `parquet:`) are built once into an `array_record` TFDS
dataset cached under `data_dir` (default: `$RESEARCH_DATA_DIR`, else
`~/.cache/research/tfds`), keyed by the files' paths, sizes and mtimes (see
`research.data.local_builder`). Globs are relative to the current directory; `**` matches
any number of directories. The files may be on object storage: `jsonl:gs://bkt/data/*.jsonl.gz`
(any scheme `research.storage` supports); they are streamed once into the local cache.

`tfds:` datasets are never downloaded here: they must already be prepared in `data_dir`
(default: TFDS's own, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`). Datasets prepared in
`array_record` format are read lazily with `tfds.data_source`; datasets only available as
`tfrecord` are read once, in order, into memory (with a warning) -- prepare large ones with
`tfds build NAME --file_format=array_record`.

`open_documents` is gin-configurable (`open_documents.text_field = 'body'`); arguments
passed explicitly by code take precedence over gin bindings.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import gin
import tensorflow_datasets as tfds

from research import storage
from research.data.local_builder import (DECODE_ERROR_MODES, DataSourceError, LocalCorpus,
                                         prepare_local_dataset, quiet_tfds)

log = logging.getLogger(__name__)

__all__ = ["DataSourceError", "DocumentSource", "DocumentList", "TfdsDocuments",
           "open_documents", "default_data_dir", "parse_spec"]

PREFIXES = ("text", "jsonl", "parquet", "tfds", "tokens")
_TFDS_SPEC = re.compile(
    r"^(?P<name>[^:\[\]]+?)(?::(?P<version>\d+\.\d+\.\d+))?(?::(?P<split>.+))?$")


def default_data_dir() -> str:
    """Cache directory for locally built datasets: $RESEARCH_DATA_DIR or ~/.cache/research/tfds."""
    return os.environ.get("RESEARCH_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "research", "tfds")


class DocumentSource(Sequence):
    """A random-access sequence of document strings.

    Subclasses implement `__len__` and `_get(i)` (0 <= i < len). `name` is a short
    human-readable description.
    """

    name: str = "documents"

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not isinstance(i, (int,)) and not hasattr(i, "__index__"):
            raise TypeError(f"{type(self).__name__} indices must be integers, got {type(i)}")
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document index {i} out of range for {self.name} ({n} documents)")
        return self._get(i)

    def get_many(self, indices: Iterable[int]) -> list[str]:
        """Documents at `indices`, in that order."""
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self)} documents>"


class DocumentList(DocumentSource):
    """An in-memory list of documents."""

    def __init__(self, documents: Sequence[str], name: str = "in-memory documents"):
        self._docs = list(documents)
        self.name = name

    def __len__(self) -> int:
        return len(self._docs)

    def _get(self, i: int) -> str:
        return self._docs[i]


class TfdsDocuments(DocumentSource):
    """Documents from one feature of a TFDS random-access data source.

    Bytes are decoded as UTF-8. A TFDS source cannot drop a document without shifting
    indices, so with on_decode_error='skip' invalid bytes are replaced by U+FFFD (logged
    once) instead.
    """

    def __init__(self, data_source: Sequence[Any], text_field: str, name: str,
                 on_decode_error: str = "strict"):
        self._ds = data_source
        self._field = text_field
        self.name = name
        self._on_decode_error = on_decode_error
        self._warned = False

    def __len__(self) -> int:
        return len(self._ds)

    def _get(self, i: int) -> str:
        value = self._ds[i][self._field]
        if isinstance(value, str):
            return value
        raw = bytes(value.item() if hasattr(value, "item") else value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self._on_decode_error != "skip":
                raise DataSourceError(
                    f"{self.name}: document {i} has invalid UTF-8 at byte offset {e.start} "
                    f"({e.reason}). Pass on_decode_error='skip' to replace invalid bytes "
                    "with U+FFFD.") from e
            if not self._warned:
                log.warning("%s: document %d has invalid UTF-8; replacing bad bytes with "
                            "U+FFFD (further occurrences are not logged).", self.name, i)
                self._warned = True
            return raw.decode("utf-8", errors="replace")


def parse_spec(spec: str) -> tuple[str, str]:
    """Splits 'prefix:rest' and validates the prefix. Returns (prefix, rest)."""
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in PREFIXES or not rest:
        raise DataSourceError(
            f"Unknown document spec {spec!r}. Use one of 'text:GLOB' (blank-line separated "
            "plain text), 'jsonl:GLOB' (one JSON object per line; .gz/.zst files are "
            "decompressed), 'parquet:GLOB' (a text column) or 'tfds:NAME[/CONFIG][:SPLIT]' "
            "(a prepared TFDS dataset).")
    return prefix, rest


@gin.configurable
def open_documents(spec: str, *, split: str | None = None, text_field: str = "text",
                   data_dir: str | None = None,
                   on_decode_error: str = "strict") -> DocumentSource:
    """Opens the documents named by `spec` as a random-access `DocumentSource`.

    Args:
      spec: 'text:GLOB', 'jsonl:GLOB', 'parquet:GLOB' (a GLOB may be a URL such as
        'gs://bkt/c4/**/*.jsonl.gz'),
        'tfds:NAME[/CONFIG][:VERSION][:SPLIT]' or 'tokens:DIR' (documents pre-tokenised by
        tools/pretokenize.py; items are int token-id arrays, a `research.data.tokens.TokenSource`). Text and jsonl files named *.gz, *.bz2, *.xz,
        *.zst or *.zstd are decompressed.
      split: split to read. Local files have the single split 'train' (slicing such as
        'train[:5%]' works). For tfds:, the split if the spec names none (default 'train');
        if both name one they must agree.
      text_field: JSON field (jsonl:), column (parquet:) or TFDS feature (tfds:) holding
        the document.
      data_dir: local-file cache (default `default_data_dir()`), or for tfds: the TFDS
        data_dir holding the prepared dataset (default: TFDS's default).
      on_decode_error: 'strict' raises on invalid UTF-8 naming file and byte offset;
        'skip' drops the bad documents of local files and of tfrecord-only TFDS
        datasets (read into memory); array_record TFDS datasets cannot drop a document
        without shifting indices, so there the bad bytes become U+FFFD.

    Raises:
      DataSourceError: unknown prefix, a glob matching no file, an unreadable file, invalid
        JSON / UTF-8, a missing field or column, an unprepared TFDS dataset, or zero documents.
    """
    if on_decode_error not in DECODE_ERROR_MODES:
        raise DataSourceError(f"on_decode_error={on_decode_error!r} is not supported; use "
                              "'strict' or 'skip'.")
    prefix, rest = parse_spec(spec)
    if prefix == "tokens":  # pre-tokenised documents (tools/pretokenize.py): token-id arrays
        from research.data.tokens import open_token_source
        return open_token_source(rest)
    if prefix == "tfds":
        return _open_tfds(rest, split=split, text_field=text_field, data_dir=data_dir,
                          on_decode_error=on_decode_error)
    paths = expand_glob(rest, prefix)
    corpus = LocalCorpus(prefix, paths, text_field=text_field, on_decode_error=on_decode_error)
    builder = prepare_local_dataset(corpus, data_dir or default_data_dir())
    split = split or "train"
    try:
        data_source = builder.as_data_source(split=split)
    except (ValueError, KeyError) as e:
        raise DataSourceError(f"Bad split {split!r} for {spec!r}: {e}. Local files have the "
                              "single split 'train' (slicing like 'train[:5%]' works).") from e
    n_files = f"{len(paths)} file" + ("s" if len(paths) != 1 else "")
    source = TfdsDocuments(data_source, "text", f"{spec} ({n_files})", on_decode_error)
    if len(source) == 0:
        raise DataSourceError(f"{spec!r} split {split!r} has zero documents; widen the split.")
    log.info("Opened %s: %d documents.", source.name, len(source))
    return source


def expand_glob(pattern: str, prefix: str = "text") -> tuple[str, ...]:
    """Sorted absolute paths (or full URLs, for `gs://...` patterns) of the non-directory
    entries matching `pattern` (`**` ok)."""
    if storage.is_remote(pattern):
        matches = tuple(storage.glob(pattern))  # StorageError for a missing bucket
        if not matches:
            raise DataSourceError(
                f"{prefix}:{pattern} matches no object. Check the bucket and prefix (e.g. "
                f"`gcloud storage ls {_fixed_prefix(pattern)}`), and use '**' to match objects "
                "under deeper prefixes.")
        return matches
    pattern = os.path.expanduser(pattern)
    matches = [p for p in glob.glob(pattern, recursive=True) if not os.path.isdir(p)]
    if not matches:
        raise DataSourceError(
            f"{prefix}:{pattern} matches no file (searched relative to {os.getcwd()!r}). Check "
            "the path, quote the spec so the shell does not expand it, and use '**' to match "
            "files in subdirectories.")
    return tuple(sorted(os.path.abspath(p) for p in matches))


def _fixed_prefix(pattern: str) -> str:
    """The part of a URL pattern before its first wildcard, cut at a '/' ('gs://b/d/' for
    'gs://b/d/**/*.gz')."""
    wildcard = re.search(r"[*?\[]", pattern)
    if not wildcard:
        return storage.dirname(pattern) + "/"
    return pattern[:wildcard.start()].rsplit("/", 1)[0] + "/"


def tfds_data_source(builder, split: str, build_name: str, label: str):
    """Random access to a prepared TFDS split, or None when it is prepared only as tfrecord
    (the caller then reads it in order). Never downloads: an unprepared dataset or a bad split
    is a DataSourceError saying how to fix it."""
    try:
        return builder.as_data_source(split=split)
    except (NotImplementedError, ValueError, KeyError) as e:
        with quiet_tfds():
            prepared = builder.is_prepared()
        if not prepared:
            raise DataSourceError(
                f"TFDS dataset {builder.name!r} is not prepared in {builder.data_dir!r}; this "
                "code never downloads. Prepare it once on a machine with network access, e.g. "
                f"`tfds build {build_name} --file_format=array_record` (add --data_dir=DIR and "
                "pass data_dir=DIR here).") from e
        if not isinstance(e, NotImplementedError):
            raise DataSourceError(f"Cannot open {label}: {e}. Check the split name "
                                  f"(available: {list(builder.info.splits)}).") from e
        return None


def tfds_builder(rest: str, split: str | None, data_dir: str | None, example: str):
    """Parses `NAME[/CONFIG][:VERSION][:SPLIT]` and opens the builder (never downloads).

    Returns (builder, spec match, name, split, label such as 'tfds:glue/sst2:validation').
    """
    m = _TFDS_SPEC.match(rest)
    if not m:
        raise DataSourceError(f"Cannot parse 'tfds:{rest}'; expected "
                              f"'tfds:NAME[/CONFIG][:VERSION][:SPLIT]', e.g. '{example}'.")
    name = m["name"] + (f":{m['version']}" if m["version"] else "")
    if m["split"] and split and m["split"] != split:
        raise DataSourceError(f"'tfds:{rest}' names split {m['split']!r} but split={split!r} "
                              "was also passed; give the split in one place only.")
    split = m["split"] or split or "train"
    try:
        with quiet_tfds():
            builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad config/version
        raise DataSourceError(
            f"TFDS dataset {name!r} not found ({type(e).__name__}: {str(e)[:300]}). Check the "
            "name/config (see `tfds.list_builders()`), or pass data_dir= where it is "
            "prepared.") from e
    return builder, m, name, split, f"tfds:{name}:{split}"


def _open_tfds(rest: str, *, split: str | None, text_field: str, data_dir: str | None,
               on_decode_error: str) -> DocumentSource:
    builder, m, name, split, label = tfds_builder(rest, split, data_dir, "tfds:lm1b:test")
    features = builder.info.features
    if features is None or text_field not in features:
        have = sorted(features.keys()) if features is not None else []
        raise DataSourceError(
            f"TFDS dataset {name!r} has no feature {text_field!r} (features: {have}). Pass "
            "text_field=... (gin: open_documents.text_field) naming its text feature.")
    data_source = tfds_data_source(builder, split, m["name"], label)
    if data_source is None:
        return _read_tfrecord_into_memory(builder, split, text_field, label, on_decode_error)
    source = TfdsDocuments(data_source, text_field, label, on_decode_error)
    log.info("Opened %s (array_record, random access): %d documents.", label, len(source))
    return source


def _read_tfrecord_into_memory(builder, split: str, text_field: str, label: str,
                               on_decode_error: str) -> DocumentSource:
    log.warning(
        "%s is prepared only as tfrecord, which has no random access: reading the whole "
        "split into memory once. For large datasets prepare it with file_format="
        "'array_record' (`tfds build %s --file_format=array_record`).", label, builder.name)
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: ex[text_field])
    docs = []
    for i, raw in enumerate(tfds.as_numpy(ds)):
        try:
            docs.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if on_decode_error != "skip":
                raise DataSourceError(
                    f"{label}: document {i} has invalid UTF-8 at byte offset {e.start}. "
                    "Pass on_decode_error='skip' to drop such documents.") from e
    if not docs:
        raise DataSourceError(f"{label} has zero documents; choose another split.")
    log.info("Read %s into memory: %d documents.", label, len(docs))
    return DocumentList(docs, label)
