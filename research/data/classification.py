"""Sentence and sentence-pair classification / regression data for fine-tuning.

    ex = load_examples('tsv:data/rotten_tomatoes/train.tsv')           # columns label, text
    ex = load_examples('csv:mrpc/*.csv', text_fields=('text_a', 'text_b'))
    ex = load_examples('jsonl:nli/dev.jsonl', text_fields=('premise', 'hypothesis'),
                       label_names=train.label_names)
    ex = load_examples('tfds:glue/stsb:validation', text_fields=('sentence1', 'sentence2'),
                       regression=True)
    it = make_classification_iterator(ex, tokenizer, seq_len=128, global_batch_size=32, seed=0)

Specs. `tsv:PATH` (tab separated, no quoting), `csv:PATH` (comma separated, `"` quoting as
written by Python's csv module / spreadsheets) -- the first row of each file names the
columns; `jsonl:PATH` -- one JSON object per line; `tfds:NAME[/CONFIG][:VERSION][:SPLIT]` --
a TFDS dataset already prepared in `data_dir` (never downloaded). PATH may be a glob
(`**` recursive); the matching files are concatenated in sorted path order.

Labels (classification). A label that is an integer (JSON/TFDS int, an integral float, or
a string such as "1") is the class id as-is. Any other string is a class *name*: it is
mapped through `label_names` (index = id) when given, otherwise through the sorted list of
the distinct string labels of the files being loaded, which becomes `Examples.label_names`.
So load the train split first and pass its `label_names` to eval/test splits, or their ids
may disagree. When `label_names` is given, a string found in it is always looked up there
(even "1"). TFDS `ClassLabel` features supply their names. An empty / missing label, a NaN,
or the integer -1 (GLUE's test splits) means "unlabeled": allowed only with
`allow_unlabeled=True`, and stored as -1 (classification) or NaN (regression).

Labels (regression, `regression=True`). Parsed as float32.

Batches (`make_classification_iterator`). The global batch of B rows holds the next B
positions of the concatenation over epochs e = 0, 1, ... of the example order
`np.random.default_rng([seed, e]).permutation(N)` (identity without shuffle). Host p of P
yields rows [p*B/P, (p+1)*B/P) and tokenises only those, so the concatenation of the host
batches equals the P=1 batch for any P. The state is the number of batches yielded, so it
can even be restored under a different process count.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from research.data.batching import check_batch_layout

from research.data.local_builder import DataSourceError
from research.data.sources import expand_glob, tfds_builder, tfds_data_source

log = logging.getLogger(__name__)

__all__ = ["DataSourceError", "Examples", "load_examples", "encode_example",
           "ClassificationIterator", "make_classification_iterator", "epoch_steps"]

FILE_FORMATS = ("tsv", "csv", "jsonl")
PREFIXES = FILE_FORMATS + ("tfds",)
STYLES = ("encoder", "decoder")
STATE_VERSION = 1
_PERM_CACHE_SIZE = 4
_TFDS_CHUNK = 4096
Batch = dict[str, np.ndarray]


# ================================================================================ examples

@dataclasses.dataclass
class Examples:
    """A loaded classification / regression split.

    Attributes:
      texts: N tuples, one string per text field (1 field: single sentence, 2: a pair).
      labels: int64[N] class ids (-1: unlabeled) or, for regression, float32[N] (NaN:
        unlabeled).
      label_names: class names (index = id), or None (integer labels, regression).
      name: the spec the examples came from (and the file count for globs).
      text_fields: the column / field / feature names of the texts.
      regression: whether `labels` are real-valued targets.
    """

    texts: list[tuple[str, ...]]
    labels: np.ndarray
    label_names: list[str] | None
    name: str
    text_fields: tuple[str, ...] = ("text",)
    regression: bool = False

    def __post_init__(self):
        if len(self.texts) != len(self.labels):
            raise ValueError(f"Examples {self.name!r}: {len(self.texts)} texts but "
                             f"{len(self.labels)} labels; they must align one to one.")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int | None:
        """len(label_names), else 1 + the largest label id; None for regression."""
        if self.regression:
            return None
        if self.label_names is not None:
            return len(self.label_names)
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def num_unlabeled(self) -> int:
        if self.regression:
            return int(np.isnan(self.labels).sum())
        return int((self.labels < 0).sum())

    def __repr__(self) -> str:
        kind = "regression" if self.regression else f"{self.num_classes} classes"
        return (f"<Examples {self.name}: {len(self)} rows, fields {self.text_fields}, "
                f"{kind}>")


@dataclasses.dataclass
class _RawRows:
    """Rows as read, before label conversion. `where[i]` = (source index, line/example)."""

    sources: list[str] = dataclasses.field(default_factory=list)
    unit: str = "line"
    texts: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    labels: list[Any] = dataclasses.field(default_factory=list)
    where: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def describe(self, i: int) -> str:
        src, n = self.where[i]
        return f"{self.sources[src]}, {self.unit} {n}"


def load_examples(spec: str, *, text_fields: Sequence[str] = ("text",),
                  label_field: str = "label", split: str | None = None,
                  label_names: Sequence[str] | None = None, regression: bool = False,
                  data_dir: str | None = None, allow_unlabeled: bool = False) -> Examples:
    """Loads a classification / regression split named by `spec` (see module docstring).

    Args:
      spec: 'tsv:PATH', 'csv:PATH', 'jsonl:PATH' (PATH may be a glob) or
        'tfds:NAME[/CONFIG][:VERSION][:SPLIT]', e.g. 'tfds:glue/sst2:validation'.
      text_fields: 1 (single sentence) or 2 (pair) column / field / feature names.
      label_field: the label column / field / feature.
      split: TFDS split when the spec names none (default 'train'); files have no splits.
      label_names: class names, index = id; string labels are mapped through it. Default:
        the TFDS ClassLabel names, else the sorted distinct string labels (if any).
      regression: float targets instead of class ids.
      data_dir: the TFDS data_dir holding a prepared dataset (tfds: only).
      allow_unlabeled: accept rows without a label (test splits); they get label -1 (NaN
        for regression). A missing label column then means every row is unlabeled.

    Raises:
      DataSourceError: unknown spec, no matching file, an empty file, a missing column
        (the columns present are listed), a malformed row, a missing label (unless
        allow_unlabeled), a label not in label_names, an unprepared TFDS dataset.
    """
    text_fields = tuple(text_fields)
    if len(text_fields) not in (1, 2) or not all(isinstance(f, str) for f in text_fields):
        raise DataSourceError(
            f"text_fields={text_fields!r}: give 1 (single sentence) or 2 (sentence pair) "
            "field names, e.g. ('text',) or ('sentence1', 'sentence2').")
    if label_names is not None:
        label_names = [str(n) for n in label_names]
        if len(set(label_names)) != len(label_names):
            raise DataSourceError(f"label_names {label_names} has duplicates; each class "
                                  "name must appear once (index = class id).")
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in PREFIXES or not rest:
        raise DataSourceError(
            f"Unknown classification data spec {spec!r}. Use 'tsv:PATH', 'csv:PATH' (first "
            "row names the columns), 'jsonl:PATH' (one JSON object per line) or "
            "'tfds:NAME[/CONFIG][:SPLIT]' (a prepared TFDS dataset, e.g. "
            "'tfds:glue/sst2:validation'); PATH may be a glob.")
    if prefix == "tfds":
        rows, tfds_names, name = _read_tfds(rest, split, text_fields, label_field, data_dir,
                                            allow_unlabeled)
        if label_names is None and not regression:
            label_names = tfds_names
    else:
        if split is not None:
            raise DataSourceError(
                f"split={split!r} was passed for the file spec {spec!r}, but files have no "
                "splits: name each split's file instead (e.g. 'tsv:data/x/validation.tsv').")
        paths = expand_glob(rest, prefix)
        rows = _RawRows()
        for path in paths:
            _read_file(prefix, path, text_fields, label_field, allow_unlabeled, rows)
        name = spec if len(paths) == 1 else f"{spec} ({len(paths)} files)"
    if not rows.texts:
        raise DataSourceError(f"{spec!r} has no examples; check the path / split.")
    if regression:
        labels, names = _regression_labels(rows, allow_unlabeled, label_field), None
    else:
        labels, names = _class_labels(rows, label_names, allow_unlabeled, label_field)
    examples = Examples(rows.texts, labels, names, name, text_fields, regression)
    log.info("Loaded %r.", examples)
    return examples


# ------------------------------------------------------------------------------ file input

def _read_file(fmt: str, path: str, text_fields: tuple[str, ...], label_field: str,
               allow_unlabeled: bool, rows: _RawRows) -> None:
    src = len(rows.sources)
    rows.sources.append(path)
    before = len(rows.texts)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
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


def _read_delimited(f, fmt: str, path: str, src: int, text_fields: tuple[str, ...],
                    label_field: str, allow_unlabeled: bool, rows: _RawRows) -> None:
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
                allow_unlabeled: bool, rows: _RawRows) -> None:
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

def _read_tfds(rest: str, split: str | None, text_fields: tuple[str, ...], label_field: str,
               data_dir: str | None, allow_unlabeled: bool
               ) -> tuple[_RawRows, list[str] | None, str]:
    import tensorflow_datasets as tfds

    builder, m, name, split, label = tfds_builder(rest, split, data_dir,
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
    rows = _RawRows(sources=[label], unit="example")
    for i, ex in enumerate(_iter_tfds(builder, split, m["name"], label, wanted)):
        rows.texts.append(tuple(_to_str(ex[f], label, i, f) for f in text_fields))
        rows.labels.append(_to_scalar(ex[label_field]) if label_field in ex else None)
        rows.where.append((0, i))
    return rows, names, label


def _iter_tfds(builder, split: str, base_name: str, label: str, wanted: list[str]):
    """Yields the examples of a split (dicts of numpy values), random-access if possible."""
    import tensorflow_datasets as tfds

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
    if isinstance(value, np.ndarray):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------- labels

def _parse_class_label(value: Any, rows: _RawRows, i: int) -> tuple[str, int | str | None]:
    """Classifies one raw label: ('missing', None), ('int', id) or ('str', text)."""
    if value is None:
        return "missing", None
    if isinstance(value, (bool, int, np.integer)):
        return "int", int(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "missing", None
        if float(value).is_integer():
            return "int", int(value)
        raise DataSourceError(
            f"{rows.describe(i)}: class label {value!r} is not an integer. Pass "
            "regression=True for real-valued targets.")
    if isinstance(value, str):
        s = value.strip()
        return ("missing", None) if not s else ("str", s)
    raise DataSourceError(f"{rows.describe(i)}: label {value!r} is a {type(value).__name__}; "
                          "expected an integer class id or a class-name string.")


def _as_int(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def _class_labels(rows: _RawRows, label_names: list[str] | None, allow_unlabeled: bool,
                  label_field: str) -> tuple[np.ndarray, list[str] | None]:
    n = len(rows.labels)
    ids = np.full(n, -1, np.int64)
    lookup = {name: k for k, name in enumerate(label_names)} if label_names is not None else None
    string_rows: list[tuple[int, str]] = []  # non-integer strings, when no label_names
    first_typed_int = None
    for i, value in enumerate(rows.labels):
        kind, v = _parse_class_label(value, rows, i)
        if kind == "missing":
            continue
        if kind == "str":
            if lookup is not None and v in lookup:
                ids[i] = lookup[v]
                continue
            as_int = _as_int(v)
            if as_int is None:
                if lookup is not None:
                    raise DataSourceError(
                        f"{rows.describe(i)}: label {v!r} is not in label_names "
                        f"{label_names}. Add it to label_names (pass the train split's "
                        "label_names to eval/test splits) or fix the row.")
                string_rows.append((i, v))
                continue
            v = as_int
        elif first_typed_int is None:
            first_typed_int = i
        if v == -1:
            continue  # GLUE-style unlabeled marker
        if v < 0 or (label_names is not None and v >= len(label_names)):
            bound = f" (label_names has {len(label_names)})" if label_names is not None else ""
            raise DataSourceError(
                f"{rows.describe(i)}: class id {v} is out of range{bound}. Class ids must be "
                "0..num_classes-1 (-1 marks an unlabeled row); fix the row or label_names.")
        ids[i] = v
    names = label_names
    if string_rows:
        if first_typed_int is not None:
            raise DataSourceError(
                f"{rows.describe(first_typed_int)} has an integer label but "
                f"{rows.describe(string_rows[0][0])} has the string label "
                f"{string_rows[0][1]!r}; use one kind, or pass label_names=[...].")
        numeric = [(i, str(ids[i])) for i in range(n) if ids[i] >= 0]
        names = sorted({s for _, s in string_rows} | {s for _, s in numeric})
        lookup = {name: k for k, name in enumerate(names)}
        for i, s in string_rows + numeric:
            ids[i] = lookup[s]
        log.info("Label names from the data (sorted; pass them to the other splits): %s",
                 names)
    missing = np.flatnonzero(ids < 0)
    if len(missing) and not allow_unlabeled:
        _raise_unlabeled(rows, missing, label_field)
    return ids, names


def _regression_labels(rows: _RawRows, allow_unlabeled: bool, label_field: str) -> np.ndarray:
    out = np.full(len(rows.labels), np.nan, np.float32)
    for i, value in enumerate(rows.labels):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        try:
            out[i] = float(value)
        except (TypeError, ValueError):
            raise DataSourceError(f"{rows.describe(i)}: regression label {value!r} is not a "
                                  "number; fix the row (or drop regression=True for class "
                                  "labels).") from None
    missing = np.flatnonzero(np.isnan(out))
    if len(missing) and not allow_unlabeled:
        _raise_unlabeled(rows, missing, label_field)
    return out


def _raise_unlabeled(rows: _RawRows, missing: np.ndarray, label_field: str) -> None:
    more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
    raise DataSourceError(
        f"{rows.describe(int(missing[0]))}: no label in {label_field!r} (empty, missing, NaN "
        f"or -1){more}. Fill in the label or remove the row; for an unlabeled test split "
        "pass allow_unlabeled=True (labels become -1, NaN for regression).")


# ================================================================================ encoding

class TokenizerLike(Protocol):
    """What encoding needs from a tokenizer (e.g. `research.data.tokenizer.Tokenizer`)."""
    pad_id: int
    bos_id: int
    eos_id: int
    cls_id: int
    sep_id: int

    def encode(self, text: str) -> list[int]: ...


def truncate_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths after BERT's longest-first pair truncation to `len_a + len_b <= budget`.

    Equivalent to popping one token at a time from the end of the longer sequence (the
    second one on ties) until the pair fits, computed in closed form.
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    if len_a > len_b and budget - len_b >= len_b:
        return budget - len_b, len_b
    if len_b >= len_a and budget - len_a >= len_a - 1:
        return len_a, budget - len_a
    return (budget + 1) // 2, budget // 2


def _specials(tokenizer: TokenizerLike, style: str, pair: bool) -> tuple[int, int, int]:
    """(start, separator, end) ids for the style, validated."""
    if style == "encoder":
        needed = {"cls_id": tokenizer.cls_id, "sep_id": tokenizer.sep_id}
        ids = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.sep_id)
    elif style == "decoder":
        needed = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
        if pair:
            needed["sep_id"] = tokenizer.sep_id
        ids = (tokenizer.bos_id, tokenizer.sep_id, tokenizer.eos_id)
    else:
        raise ValueError(f"style={style!r} is not supported; use 'encoder' ([CLS] a [SEP] b "
                         "[SEP], BERT) or 'decoder' ([BOS] a [SEP] b [EOS], GPT).")
    missing = [k for k, v in needed.items() if v is None or v < 0]
    if missing:
        raise ValueError(f"The tokenizer has no {', '.join(missing)} (needed by style="
                         f"{style!r}); retrain it with tools/train_tokenizer.py, which adds "
                         "[PAD], <s>, </s>, [CLS], [SEP] and [MASK].")
    return ids


def _assemble(pieces: Sequence[Sequence[int]], tokenizer: TokenizerLike, seq_len: int,
              style: str) -> tuple[list[int], list[int]]:
    """Lays out 1 or 2 tokenised texts with special tokens, truncated to seq_len."""
    if len(pieces) not in (1, 2):
        raise ValueError(f"Got {len(pieces)} texts; a classification example has 1 (single "
                         "sentence) or 2 (pair).")
    pair = len(pieces) == 2
    start, sep, end = _specials(tokenizer, style, pair)
    n_special = 3 if pair else 2
    if seq_len < n_special:
        raise ValueError(f"seq_len={seq_len} cannot hold the {n_special} special tokens of a "
                         f"{'pair' if pair else 'single'} example; use seq_len >= "
                         f"{n_special + 1}.")
    budget = seq_len - n_special
    if not pair:
        a = list(pieces[0][:budget])
        ids = [start, *a, end]
        return ids, [0] * len(ids)
    la, lb = truncate_lengths(len(pieces[0]), len(pieces[1]), budget)
    a, b = list(pieces[0][:la]), list(pieces[1][:lb])
    ids = [start, *a, sep, *b, end]
    if style == "encoder":
        types = [0] * (la + 2) + [1] * (lb + 1)
    else:
        types = [0] * len(ids)
    return ids, types


def encode_example(texts: Sequence[str], tokenizer: TokenizerLike, seq_len: int, *,
                   style: str = "encoder") -> tuple[list[int], list[int]]:
    """Tokenises one example into (input_ids, token_type_ids), each of length <= seq_len.

    style 'encoder' (BERT): `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`; token types 0 on
    [CLS] a [SEP], 1 on b [SEP]. style 'decoder' (GPT): `[BOS] a [EOS]` or
    `[BOS] a [SEP] b [EOS]`; token types all 0. Texts are cut from their ends to fit; a
    pair is truncated longest-first (`truncate_lengths`). No padding is added.
    """
    if isinstance(texts, str):
        texts = (texts,)
    return _assemble([tokenizer.encode(t) for t in texts], tokenizer, seq_len, style)


# ================================================================================ batching

def epoch_steps(num_examples: int, global_batch_size: int) -> int:
    """Global batches in one pass over `num_examples`: ceil(num_examples / batch size)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}.")
    return -(-int(num_examples) // int(global_batch_size))


class ClassificationIterator:
    """Batches of a classification / regression split (see module docstring).

    Each batch is a dict of numpy arrays with leading dim b = global_batch_size //
    process_count:
      input_ids int32[b, seq_len] (pad_id after the text), input_mask int32[b, seq_len]
      (1 real token, 0 padding), token_type_ids int32[b, seq_len], label int32[b] (class id,
      -1 unlabeled) or float32[b] (regression, NaN unlabeled), weight float32[b] (1 real
      row, 0 padding row), index int32[b] (example index, -1 for padding rows),
      last_index int32[b] (position of the last real token; 0 for padding rows).
    Padding rows (repeat=False only) have all-pad input_ids, mask 0 and label 0.
    """

    def __init__(self, examples: Examples, tokenizer: TokenizerLike, *, seq_len: int,
                 global_batch_size: int, seed: int, style: str = "encoder",
                 process_index: int = 0, process_count: int = 1, repeat: bool = True,
                 shuffle: bool | None = None):
        check_batch_layout(seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
                           process_index=process_index, process_count=process_count)
        if len(examples) == 0:
            raise ValueError(f"Examples {examples.name!r} are empty; nothing to batch.")
        pair = len(examples.texts[0]) == 2
        _specials(tokenizer, style, pair)  # validates style and special ids early
        if tokenizer.pad_id is None or tokenizer.pad_id < 0:
            raise ValueError("The tokenizer has no [PAD] piece; retrain it with "
                             "tools/train_tokenizer.py.")
        self.examples = examples
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.style = style
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.repeat = bool(repeat)
        self.shuffle = self.repeat if shuffle is None else bool(shuffle)
        self.num_examples = len(examples)
        self.per_host = self.global_batch_size // self.process_count
        self.num_batches: int | None = (
            None if self.repeat else epoch_steps(self.num_examples, self.global_batch_size))
        self.position = 0  # global batches yielded so far
        self._row_offsets = np.arange(self.per_host, dtype=np.int64) + (
            self.process_index * self.per_host)
        self._perms: dict[int, np.ndarray] = {}

    # ----------------------------------------------------------------- example order

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            if len(self._perms) >= _PERM_CACHE_SIZE:
                del self._perms[min(self._perms)]
            self._perms[epoch] = perm
        return perm

    def batch_indices(self, step: int) -> np.ndarray:
        """int64[b]: example indices of this host's rows of global batch `step` (-1: pad)."""
        g = step * self.global_batch_size + self._row_offsets
        epoch, j = np.divmod(g, self.num_examples)
        out = np.empty_like(g)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self._perm(int(e))[j[sel]] if self.shuffle else j[sel]
        if not self.repeat:
            out[epoch > 0] = -1
        return out

    # ----------------------------------------------------------------------- batches

    def _make_batch(self, indices: np.ndarray) -> Batch:
        b, L = len(indices), self.seq_len
        input_ids = np.full((b, L), self.tokenizer.pad_id, np.int32)
        token_type_ids = np.zeros((b, L), np.int32)
        lengths = np.zeros(b, np.int64)
        real = np.flatnonzero(indices >= 0)
        if len(real):
            texts = [self.examples.texts[int(k)] for k in indices[real]]
            n_fields = len(texts[0])
            encoded = [self._encode_many([t[f] for t in texts]) for f in range(n_fields)]
            for r, row in enumerate(real):
                ids, types = _assemble([enc[r] for enc in encoded], self.tokenizer, L,
                                       self.style)
                input_ids[row, :len(ids)] = ids
                token_type_ids[row, :len(types)] = types
                lengths[row] = len(ids)
        labels = self.examples.labels
        if self.examples.regression:
            label = np.zeros(b, np.float32)
            label[real] = labels[indices[real]]
        else:
            label = np.zeros(b, np.int32)
            label[real] = labels[indices[real]]
        return {
            "input_ids": input_ids,
            "input_mask": (np.arange(L)[None, :] < lengths[:, None]).astype(np.int32),
            "token_type_ids": token_type_ids,
            "label": label,
            "weight": (indices >= 0).astype(np.float32),
            "index": indices.astype(np.int32),
            "last_index": np.maximum(lengths - 1, 0).astype(np.int32),
        }

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        batch = getattr(self.tokenizer, "encode_batch", None)
        return batch(texts) if batch is not None else [self.tokenizer.encode(t) for t in texts]

    def __iter__(self) -> ClassificationIterator:
        return self

    def __next__(self) -> Batch:
        if self.exhausted:
            raise StopIteration
        batch = self._make_batch(self.batch_indices(self.position))
        self.position += 1
        return batch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("A repeat=True classification iterator is endless; it has no "
                            "length (use epoch_steps(num_examples, global_batch_size)).")
        return self.num_batches

    @property
    def exhausted(self) -> bool:
        """True once a repeat=False pass has yielded all `num_batches` batches."""
        return self.num_batches is not None and self.position >= self.num_batches

    def close(self) -> None:
        """Nothing to release (no background thread); kept for the iterator contract."""

    # -------------------------------------------------------------------- checkpoints

    def _identity(self) -> dict[str, Any]:
        return {"kind": "classification", "version": STATE_VERSION, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "seed": self.seed,
                "num_examples": self.num_examples, "repeat": self.repeat,
                "shuffle": self.shuffle, "style": self.style}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state: batches yielded so far plus the configuration.

        The process layout is not part of it: the global batch sequence does not depend
        on it, so a state may be restored under another process count.
        """
        return {**self._identity(), "position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores `get_state()` output; the next batch is the one after the saved one.

        Raises:
          ValueError: if the state was saved under a different seq_len / batch size / seed
            / dataset size / order / style, or is malformed.
        """
        if not isinstance(state, dict):
            raise ValueError(f"Classification iterator state must be a dict, got "
                             f"{type(state).__name__}.")
        mismatched = [f"{key}: state has {state.get(key)!r}, iterator has {value!r}"
                      for key, value in self._identity().items() if state.get(key) != value]
        if mismatched:
            raise ValueError(
                "Cannot restore classification iterator state saved under a different "
                "configuration (" + "; ".join(mismatched) + "). Resume with the same "
                "seq_len, global_batch_size, seed, dataset, repeat/shuffle and style, or "
                "start the data from scratch.")
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0 or (
                self.num_batches is not None and position > self.num_batches):
            limit = f" <= {self.num_batches}" if self.num_batches is not None else ""
            raise ValueError(f"Malformed classification iterator state: 'position' must be "
                             f"an integer >= 0{limit}, got {position!r}.")
        self.position = position



def make_classification_iterator(examples: Examples, tokenizer: TokenizerLike, *,
                                 seq_len: int, global_batch_size: int, seed: int,
                                 style: str = "encoder", process_index: int = 0,
                                 process_count: int = 1, repeat: bool = True,
                                 shuffle: bool | None = None) -> ClassificationIterator:
    """Batches of [global_batch_size // process_count] rows (see `ClassificationIterator`).

    Args:
      examples: from `load_examples`.
      tokenizer: has `encode` (and optionally `encode_batch`), `pad_id` and the special
        ids of the style.
      seq_len: tokens per row (texts truncated to fit, see `encode_example`).
      global_batch_size: rows of the global batch (all processes together).
      seed: example-order seed; epoch e uses `np.random.default_rng([seed, e])`.
      style: 'encoder' (BERT layout) or 'decoder' (GPT layout).
      process_index, process_count: this host yields global rows [p*b, (p+1)*b).
      repeat: True (train): endless epochs. False (eval): one pass of `num_batches` =
        ceil(N / global_batch_size) batches (the same on every host), the last padded
        with weight-0 rows, then StopIteration.
      shuffle: permute each epoch; default True when repeat, False otherwise.
    """
    return ClassificationIterator(examples, tokenizer, seq_len=seq_len,
                                  global_batch_size=global_batch_size, seed=seed, style=style,
                                  process_index=process_index, process_count=process_count,
                                  repeat=repeat, shuffle=shuffle)
