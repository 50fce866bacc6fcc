"""A loaded classification / regression split (`Examples`) and `load_examples(spec)`.

The spec names the reader (`readers`); the labels are converted by `labels`; the rules
are in the `research.data.classification` package docstring.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from research.data.classification.labels import class_labels, regression_labels
from research.data.classification.readers import RawRows, read_files, read_tfds
from research.data.local_builder import DataSourceError
from research.data.sources import expand_glob

log = logging.getLogger(__name__)

FILE_FORMATS = ("tsv", "csv", "jsonl")
PREFIXES = FILE_FORMATS + ("tfds",)


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



def load_examples(spec: str, *, text_fields: Sequence[str] = ("text",),
                  label_field: str = "label", split: str | None = None,
                  label_names: Sequence[str] | None = None, regression: bool = False,
                  data_dir: str | None = None, allow_unlabeled: bool = False) -> Examples:
    """Loads a classification / regression split named by `spec` (see the package docstring).

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
    _check_text_fields(text_fields)
    label_names = _checked_label_names(label_names)
    prefix, rest = _parse_spec(spec)
    if prefix == "tfds":
        rows, tfds_names, name = read_tfds(rest, split, text_fields, label_field, data_dir,
                                           allow_unlabeled)
        if label_names is None and not regression:
            label_names = tfds_names
    else:
        if split is not None:
            raise DataSourceError(
                f"split={split!r} was passed for the file spec {spec!r}, but files have no "
                "splits: name each split's file instead (e.g. 'tsv:data/x/validation.tsv').")
        paths = expand_glob(rest, prefix)
        rows = read_files(prefix, paths, text_fields, label_field, allow_unlabeled)
        name = spec if len(paths) == 1 else f"{spec} ({len(paths)} files)"
    examples = _to_examples(rows, spec, name, text_fields, label_field, label_names,
                            regression, allow_unlabeled)
    log.info("Loaded %r.", examples)
    return examples


def _check_text_fields(text_fields: tuple[str, ...]) -> None:
    if len(text_fields) not in (1, 2) or not all(isinstance(f, str) for f in text_fields):
        raise DataSourceError(
            f"text_fields={text_fields!r}: give 1 (single sentence) or 2 (sentence pair) "
            "field names, e.g. ('text',) or ('sentence1', 'sentence2').")


def _checked_label_names(label_names: Sequence[str] | None) -> list[str] | None:
    if label_names is None:
        return None
    label_names = [str(n) for n in label_names]
    if len(set(label_names)) != len(label_names):
        raise DataSourceError(f"label_names {label_names} has duplicates; each class "
                              "name must appear once (index = class id).")
    return label_names


def _parse_spec(spec: str) -> tuple[str, str]:
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in PREFIXES or not rest:
        raise DataSourceError(
            f"Unknown classification data spec {spec!r}. Use 'tsv:PATH', 'csv:PATH' (first "
            "row names the columns), 'jsonl:PATH' (one JSON object per line) or "
            "'tfds:NAME[/CONFIG][:SPLIT]' (a prepared TFDS dataset, e.g. "
            "'tfds:glue/sst2:validation'); PATH may be a glob.")
    return prefix, rest


def _to_examples(rows: RawRows, spec: str, name: str, text_fields: tuple[str, ...],
                 label_field: str, label_names: list[str] | None, regression: bool,
                 allow_unlabeled: bool) -> Examples:
    if not rows.texts:
        raise DataSourceError(f"{spec!r} has no examples; check the path / split.")
    if regression:
        labels, names = regression_labels(rows, allow_unlabeled, label_field), None
    else:
        labels, names = class_labels(rows, label_names, allow_unlabeled, label_field)
    return Examples(rows.texts, labels, names, name, text_fields, regression)
