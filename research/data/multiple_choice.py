"""Multiple-choice data (SWAG style: a context, N endings, the index of the right one) and its
batches, laid out as Hugging Face `run_swag` and BERT's SWAG recipe do.

    examples = load_multiple_choice('jsonl:data/austen_mc/train.jsonl')
    batches = MultipleChoiceIterator(examples, tokenizer, seq_len=128, global_batch_size=32,
                                     seed=0)

The file: `jsonl:PATH` (PATH a glob or an object-store URL; files in sorted path order), one
JSON object per line with named fields, by default those of SWAG / HF `run_swag`:

    {"sent1": context, "sent2": start of the ending, "ending0": ..., "ending3": ..., "label": 2}

Choice i is the pair (context, question + " " + ending_i), as `run_swag` builds it (question
= `sent2`; without `question_field` the ending alone). `ending_fields` names one field per
choice, or a single field holding a JSON list of the endings (e.g. ("endings",)). Every
example must have the same number of choices N. The label is the index 0..N-1 of the right
ending (an int or a string of digits); an unlabeled test row has no label, null or -1.

Each choice is encoded as a pair, `[CLS] context [SEP] ending [SEP]`
(`research.data.classification.encoding.assemble`: longest-first truncation, token types 0
then 1), so the N choices of an example stay together in one row of a [b, N, L] batch.
Example order, host sharding and resumable state are `ClassificationIterator`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from research import storage
from research.data.classification.encoding import TokenizerLike, assemble
from research.data.classification.iterator import ClassificationIterator
from research.data.local_builder import DataSourceError
from research.data.sources import expand_glob

log = logging.getLogger(__name__)

PREFIX = "jsonl"
SWAG_ENDINGS = ("ending0", "ending1", "ending2", "ending3")
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class ChoiceExamples:
    """A loaded multiple-choice split.

    Attributes:
      contexts: N_ex context strings.
      endings: N_ex tuples of the num_choices second texts (question + " " + ending).
      labels: int64[N_ex], the right choice (-1: unlabeled).
      name: the spec the examples came from.
    """

    contexts: list[str]
    endings: list[tuple[str, ...]]
    labels: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.contexts)

    @property
    def num_choices(self) -> int:
        return len(self.endings[0]) if self.endings else 0

    @property
    def texts(self) -> list[tuple[str, ...]]:
        """(context, ending_0, ..., ending_{N-1}) per example (the iterator's view)."""
        return [(c, *e) for c, e in zip(self.contexts, self.endings)]

    def __repr__(self) -> str:
        return f"<ChoiceExamples {self.name}: {len(self)} examples, {self.num_choices} choices>"


def load_multiple_choice(spec: str, *, context_field: str = "sent1",
                         question_field: str | None = "sent2",
                         ending_fields: Sequence[str] = SWAG_ENDINGS,
                         label_field: str = "label", allow_unlabeled: bool = False
                         ) -> ChoiceExamples:
    """The examples of `jsonl:PATH` (see the module docstring).

    Raises:
      DataSourceError: another prefix, no matching file, invalid JSON, a missing or non-string
        field, a different number of choices than the first example, a label outside 0..N-1,
        a missing label (unless allow_unlabeled).
    """
    prefix, sep, rest = spec.partition(":")
    if prefix != PREFIX or not sep or not rest:
        raise DataSourceError(f"Unknown multiple-choice data spec {spec!r}. Use 'jsonl:PATH' "
                              "(one JSON object per line; PATH may be a glob or a gs:// URL).")
    ending_fields = tuple(ending_fields)
    if not ending_fields:
        raise DataSourceError("ending_fields is empty: name one field per choice (SWAG: "
                              f"{SWAG_ENDINGS}) or one field holding a list of endings.")
    contexts, endings, labels = [], [], []
    for path in expand_glob(rest, PREFIX):
        for where, obj in _read_jsonl(path):
            context = _text(obj, context_field, where)
            question = _text(obj, question_field, where) if question_field else ""
            ends = _endings(obj, ending_fields, where)
            if endings and len(ends) != len(endings[0]):
                raise DataSourceError(f"{where}: {len(ends)} endings, but the first example has "
                                      f"{len(endings[0])}; every example needs the same number.")
            contexts.append(context)
            endings.append(tuple(f"{question} {e}" if question else e for e in ends))
            labels.append(_label(obj.get(label_field), len(ends), where, label_field,
                                 allow_unlabeled))
    if not contexts:
        raise DataSourceError(f"{spec!r} holds no examples.")
    if len(endings[0]) < 2:
        raise DataSourceError(f"{spec!r}: examples have {len(endings[0])} ending; multiple "
                              "choice needs at least 2.")
    out = ChoiceExamples(contexts, endings, np.asarray(labels, np.int64), spec)
    log.info("Loaded %r.", out)
    return out


def _read_jsonl(path: str):
    """Yields ('PATH, line N', object) for each non-blank line of `path`."""
    try:
        data = storage.read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataSourceError(f"{path}: invalid UTF-8 at byte {e.start}.") from e
    except OSError as e:
        raise DataSourceError(f"Cannot read {path}: {e}.") from e
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{where}: invalid JSON ({e.msg} at column {e.colno}).") from e
        if not isinstance(obj, dict):
            raise DataSourceError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
        yield where, obj


def _text(obj: dict, field: str, where: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str):
        problem = "missing" if field not in obj else f"a {type(value).__name__}"
        raise DataSourceError(f"{where}: field {field!r} is {problem}, not a string (fields "
                              f"present: {sorted(obj)}). Set MultipleChoiceObjective's "
                              "context_field / question_field / ending_fields.")
    return value


def _endings(obj: dict, fields: tuple[str, ...], where: str) -> list[str]:
    if len(fields) == 1 and isinstance(obj.get(fields[0]), list):
        values = obj[fields[0]]
        if not all(isinstance(v, str) for v in values):
            raise DataSourceError(f"{where}: field {fields[0]!r} must be a list of strings.")
        return list(values)
    return [_text(obj, f, where) for f in fields]


def _label(value: Any, n: int, where: str, field: str, allow_unlabeled: bool) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if value is None or value == -1:
        if allow_unlabeled:
            return -1
        raise DataSourceError(f"{where}: no label in {field!r}; give the index of the right "
                              "ending (an unlabeled test split is read with allow_unlabeled).")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise DataSourceError(f"{where}: label {value!r} is not an ending index 0..{n - 1}.")
    return value


def encode_choices(context: Sequence[int], endings: Sequence[Sequence[int]],
                   tokenizer: TokenizerLike, seq_len: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, token_type_ids, input_mask) int32[N, seq_len] of one example's N tokenised
    choices, each `[CLS] context [SEP] ending [SEP]` cut longest-first to seq_len, then
    padded (pad_id, token type 0, mask 0)."""
    ids = np.full((len(endings), seq_len), tokenizer.pad_id, np.int32)
    types = np.zeros((len(endings), seq_len), np.int32)
    mask = np.zeros((len(endings), seq_len), np.int32)
    for i, ending in enumerate(endings):
        row, tt = assemble([context, ending], tokenizer, seq_len, "encoder")
        ids[i, :len(row)], types[i, :len(tt)], mask[i, :len(row)] = row, tt, 1
    return ids, types, mask


class MultipleChoiceIterator(ClassificationIterator):
    """Batches of multiple-choice examples, each a dict of numpy arrays with leading dim b =
    global_batch_size // process_count and N = num_choices:
      input_ids int32[b, N, L] (choice i of example r at [r, i]; pad_id after the text),
      input_mask int32[b, N, L] (1 real, 0 padding), token_type_ids int32[b, N, L],
      label int32[b] (the right choice; -1 unlabeled, 0 for padding rows), weight float32[b]
      (1 real row, 0 padding row), index int32[b] (example index, -1 for padding rows).
    """

    def __init__(self, examples: ChoiceExamples, tokenizer: TokenizerLike, **kwargs: Any):
        super().__init__(examples, tokenizer, style="encoder", **kwargs)  # type: ignore[arg-type]
        self.num_choices = examples.num_choices

    def _make_batch(self, indices: np.ndarray) -> Batch:
        b, n, L = len(indices), self.num_choices, self.seq_len
        input_ids = np.full((b, n, L), self.tokenizer.pad_id, np.int32)
        types = np.zeros((b, n, L), np.int32)
        mask = np.zeros((b, n, L), np.int32)
        label = np.zeros(b, np.int32)
        real = np.flatnonzero(indices >= 0)
        ex = self.examples
        rows = [int(indices[r]) for r in real]
        contexts = self._encode_many([ex.contexts[k] for k in rows]) if rows else []
        flat = [e for k in rows for e in ex.endings[k]]
        endings = self._encode_many(flat) if flat else []
        for j, (r, k) in enumerate(zip(real, rows)):
            input_ids[r], types[r], mask[r] = encode_choices(
                contexts[j], endings[j * n:(j + 1) * n], self.tokenizer, L)
            label[r] = ex.labels[k]
        return {"input_ids": input_ids, "input_mask": mask, "token_type_ids": types,
                "label": label, "weight": (indices >= 0).astype(np.float32),
                "index": indices.astype(np.int32)}

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "kind": "multiple_choice", "num_choices": self.num_choices}

