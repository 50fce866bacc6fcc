"""Raw labels as read -> class ids (int64, -1 unlabeled) or regression targets (float32, NaN).

The rules (integer labels, class names, `label_names`, unlabeled markers) are in the
`research.data.classification` package docstring. Every error names the row (`RawRows.describe`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from research.data.classification.readers import RawRows
from research.data.local_builder import DataSourceError

log = logging.getLogger(__name__)


def _parse_class_label(value: Any, rows: RawRows, i: int) -> tuple[str, int | str | None]:
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


def class_labels(rows: RawRows, label_names: list[str] | None, allow_unlabeled: bool,
                 label_field: str) -> tuple[np.ndarray, list[str] | None]:
    """int64[N] class ids (-1: unlabeled) of `rows` and the label names they index.

    The names are `label_names` when given; else, when the labels are class-name strings,
    their sorted distinct values; else None (integer labels).

    Raises:
      DataSourceError: a label not in label_names, an id out of range, integer and string
        labels mixed, a non-integral number, or (unless allow_unlabeled) a missing label.
    """
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


def regression_labels(rows: RawRows, allow_unlabeled: bool, label_field: str) -> np.ndarray:
    """float32[N] regression targets of `rows` (NaN: unlabeled).

    Raises:
      DataSourceError: a label that is not a number, or (unless allow_unlabeled) a missing one.
    """
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


def _raise_unlabeled(rows: RawRows, missing: np.ndarray, label_field: str) -> None:
    more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
    raise DataSourceError(
        f"{rows.describe(int(missing[0]))}: no label in {label_field!r} (empty, missing, NaN "
        f"or -1){more}. Fill in the label or remove the row; for an unlabeled test split "
        "pass allow_unlabeled=True (labels become -1, NaN for regression).")

