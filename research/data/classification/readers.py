"""Readers of labelled rows: tsv / csv / jsonl files (local or `gs://...`, read through
`research.storage`) and prepared TFDS datasets.

Each reader appends to a `RawRows`: the texts of every row (one string per text field) and
its raw label as read (a string, number, None, ...), plus where the row came from, so that
`labels` can convert the labels and name the culprit row of a bad one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from research import storage
from research.data.local_builder import DataSourceError
from research.data.sources import tfds_builder, tfds_data_source

_TFDS_CHUNK = 4096  # examples fetched per batched random-access read


@dataclasses.dataclass
class RawRows:
    """Rows as read, before label conversion. `where[i]` = (source index, line/example)."""

    sources: list[str] = dataclasses.field(default_factory=list)
    unit: str = "line"
    texts: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    labels: list[Any] = dataclasses.field(default_factory=list)
    where: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def describe(self, i: int) -> str:
        """Where row i came from, e.g. 'data/x/train.tsv, line 7'."""
        src, n = self.where[i]
        return f"{self.sources[src]}, {self.unit} {n}"


# ------------------------------------------------------------------------------ file input

def read_files(fmt: str, paths: Sequence[str], text_fields: tuple[str, ...],
               label_field: str, allow_unlabeled: bool) -> RawRows:
    """The rows of `paths` (in that order), each file a 'tsv', 'csv' or 'jsonl' file.

    Raises:
      DataSourceError: an unreadable / empty file, a missing column or field, a malformed
        row, invalid UTF-8 or JSON.
    """
    rows = RawRows()
    for path in paths:
        _read_file(fmt, path, text_fields, label_field, allow_unlabeled, rows)
    return rows


def _read_file(fmt: str, path: str, text_fields: tuple[str, ...], label_field: str,
               allow_unlabeled: bool, rows: RawRows) -> None:
    src = len(rows.sources)
    rows.sources.append(path)
    before = len(rows.texts)
    try:
        with _open_text(path) as f:
            if fmt == "jsonl":
                _read_jsonl(f, path, src, text_fields, label_field, allow_unlabeled, rows)
            else:
                _read_delimited(f, fmt, path, src, text_fields, label_field, allow_unlabeled,
                                rows)
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path}: invalid UTF-8 ({e.reason} at byte offset {e.start} of "
                              "a read chunk). Re-encode the file as UTF-8.") from e
    except OSError as e:
        raise DataSourceError(f"Cannot read {path}: {e}.") from e
    if len(rows.texts) == before:
        raise DataSourceError(
            f"{path} is empty (no data rows). Remove it from the glob or fill it in"
            + ("; a tsv/csv file needs a header row and at least one data row."
               if fmt != "jsonl" else "."))


def _open_text(path: str) -> io.TextIOBase:
    """`path` (a local file or an object-store URL) as UTF-8 text (a BOM is dropped),
    newlines untranslated (the csv module handles them)."""
    if not storage.is_remote(path):
        return open(path, newline="", encoding="utf-8-sig")
    return io.TextIOWrapper(storage.open_file(path, "rb"), newline="", encoding="utf-8-sig")


def _read_delimited(f, fmt: str, path: str, src: int, text_fields: tuple[str, ...],
                    label_field: str, allow_unlabeled: bool, rows: RawRows) -> None:
    if fmt == "tsv":
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(f, delimiter=",", quotechar='"', doublequote=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        cols = [_column(header, t, path, fmt, "text") for t in text_fields]
        if label_field in header:
            label_col = header.index(label_field)
        elif allow_unlabeled:
            label_col = None
        else:
            raise DataSourceError(
                f"{path}, line 1: no label column {label_field!r}; the header has columns "
                f"{header}. Pass label_field=... naming the label column, or "
                "allow_unlabeled=True for an unlabeled test file.")
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != len(header):
                hint = (" A tab inside a text field breaks tsv; write such data as csv or "
                        "jsonl." if fmt == "tsv" else " Quote fields containing commas.")
                raise DataSourceError(
                    f"{path}, line {reader.line_num}: {len(row)} fields, but the header has "
                    f"{len(header)} ({header}).{hint}")
            rows.texts.append(tuple(row[c] for c in cols))
            rows.labels.append(row[label_col] if label_col is not None else None)
            rows.where.append((src, reader.line_num))
    except csv.Error as e:
        raise DataSourceError(f"{path}, line {reader.line_num}: malformed {fmt} ({e}).") from e


def _column(header: list[str], field: str, path: str, fmt: str, what: str) -> int:
    if field not in header:
        raise DataSourceError(
            f"{path}, line 1: no {what} column {field!r}; the header has columns {header}. "
            f"Pass text_fields=(...) / label_field=... naming the {fmt} columns.")
    return header.index(field)


def _read_jsonl(f, path: str, src: int, text_fields: tuple[str, ...], label_field: str,
                allow_unlabeled: bool, rows: RawRows) -> None:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column "
                                  f"{e.colno}). Each line must be one JSON object.") from e
        if not isinstance(obj, dict):
            raise DataSourceError(f"{path}, line {lineno}: expected a JSON object, got "
                                  f"{type(obj).__name__}. Each line must be one object.")
        texts = []
        for field in text_fields:
            value = obj.get(field)
            if not isinstance(value, str):
                problem = "missing" if field not in obj else f"a {type(value).__name__}"
                raise DataSourceError(
                    f"{path}, line {lineno}: text field {field!r} is {problem}, not a string "
                    f"(fields present: {sorted(obj)}). Pass text_fields=(...) naming the "
                    "string fields.")
            texts.append(value)
        if label_field not in obj and not allow_unlabeled:
            raise DataSourceError(
                f"{path}, line {lineno}: no label field {label_field!r} (fields present: "
                f"{sorted(obj)}). Pass label_field=... naming it, or allow_unlabeled=True "
                "for an unlabeled test file.")
        rows.texts.append(tuple(texts))
        rows.labels.append(obj.get(label_field))
        rows.where.append((src, lineno))


# ------------------------------------------------------------------------------ tfds input

def read_tfds(rest: str, split: str | None, text_fields: tuple[str, ...], label_field: str,
              data_dir: str | None, allow_unlabeled: bool
              ) -> tuple[RawRows, list[str] | None, str]:
    """The rows of the prepared TFDS split named by `rest` ('NAME[/CONFIG][:VERSION][:SPLIT]').

    Returns (rows, the label feature's ClassLabel names or None, a label such as
    'tfds:glue/sst2:validation'). Never downloads.

    Raises:
      DataSourceError: an unknown or unprepared dataset, a bad split, a missing feature,
        a text feature that is not text.
    """
    builder, m, _, split, label = tfds_builder(rest, split, data_dir,
                                               "tfds:glue/sst2:validation")
    features = builder.info.features
    have = sorted(features.keys()) if features is not None else []
    for field in text_fields:
        if field not in have:
            raise DataSourceError(
                f"{label}: no text feature {field!r} (features: {have}). Pass "
                "text_fields=(...) naming its text features, e.g. ('sentence',) for "
                "glue/sst2 or ('sentence1', 'sentence2') for glue/mrpc.")
    if label_field not in have and not allow_unlabeled:
        raise DataSourceError(f"{label}: no label feature {label_field!r} (features: {have}). "
                              "Pass label_field=... naming it.")
    names = None
    if label_field in have and isinstance(features[label_field], tfds.features.ClassLabel):
        names = list(features[label_field].names)
    wanted = [*text_fields] + ([label_field] if label_field in have else [])
    rows = RawRows(sources=[label], unit="example")
    for i, ex in enumerate(_iter_tfds(builder, split, m["name"], label, wanted)):
        rows.texts.append(tuple(_to_str(ex[f], label, i, f) for f in text_fields))
        rows.labels.append(_to_scalar(ex[label_field]) if label_field in ex else None)
        rows.where.append((0, i))
    return rows, names, label


def _iter_tfds(builder, split: str, base_name: str, label: str, wanted: list[str]):
    """Yields the examples of a split (dicts of numpy values), random-access if possible."""
    source = tfds_data_source(builder, split, base_name, label)
    if source is None:
        ds = builder.as_dataset(split=split, shuffle_files=False)
        ds = ds.map(lambda ex: {k: ex[k] for k in wanted})
        yield from tfds.as_numpy(ds)
        return
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, _TFDS_CHUNK):
        keys = list(range(start, min(n, start + _TFDS_CHUNK)))
        if getitems is not None:
            try:
                chunk = getitems(keys)
            except TypeError:  # e.g. tfds.testing.mock_data's source lacks batched reads
                getitems = None
            else:
                yield from chunk
                continue
        yield from (source[k] for k in keys)


def _to_str(value: Any, label: str, i: int, field: str) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataSourceError(f"{label}, example {i}: feature {field!r} has invalid UTF-8 "
                                  f"at byte offset {e.start}.") from e
    if not isinstance(value, str):
        raise DataSourceError(f"{label}, example {i}: feature {field!r} is a "
                              f"{type(value).__name__}, not text; pass text_fields=(...) "
                              "naming text features.")
    return value


def _to_scalar(value: Any) -> Any:
    """A numpy scalar / 0-d array as the Python scalar; anything else unchanged."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.item()
    return value
