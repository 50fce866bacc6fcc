"""SQuAD-format extractive QA data (v1.1 and v2.0 JSON) and its document-stride windows.

    examples = load_squad('squad:data/austen_qa/train.json')        # a glob or gs:// URL too
    features = make_features(examples, tokenizer, max_seq_length=384, doc_stride=128,
                             max_query_length=64)
    batches = QAIterator(features, tokenizer, seq_len=384, global_batch_size=32, seed=0)

The file: {"data": [{"paragraphs": [{"context": str, "qas": [{"id", "question",
"answers": [{"text", "answer_start"}], "is_impossible" (v2.0, optional)}]}]}]}.

Windows follow google-research/bert `run_squad.py`. The context is split into words
(`word_spans`: runs of letters/digits, or one punctuation character) whose character spans are
kept; each word is tokenised on its own, so every piece maps back to the characters of its word.
The question is cut to `max_query_length` pieces, and the context pieces are covered by windows
of at most `max_seq_length - len(question) - 3` pieces starting `doc_stride` apart:

    [CLS] question [SEP] context window [SEP]       token types 0 ... 0 1 ... 1

The training targets are the piece positions of the first gold answer's first and last piece
when the window holds the whole answer, else 0 (the [CLS] position), as for unanswerable
questions. A context piece is its window's "max context" piece when it has more context on
both sides there (min(left, right) + 0.01 * length) than in any other window holding it; the
span search only starts answers at such pieces, so each piece is answered from one window.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from research import storage
from research.data.classification.encoding import TokenizerLike, special_ids
from research.data.classification.iterator import ClassificationIterator
from research.data.local_builder import DataSourceError
from research.data.sources import expand_glob

log = logging.getLogger(__name__)

PREFIX = "squad"
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One question. answers: (text, answer_start character) pairs, () if unanswerable."""

    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool = False


@dataclasses.dataclass
class QAExamples:
    """A loaded SQuAD split: its questions in file order and where they came from."""

    examples: list[QAExample]
    name: str

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_impossible(self) -> bool:
        """Whether any question is unanswerable (SQuAD v2.0 data)."""
        return any(ex.is_impossible for ex in self.examples)

    def gold(self) -> dict[str, list[str]]:
        """Question id -> gold answer texts ([] when unanswerable), for `squad_scores`."""
        return {ex.qid: [t for t, _ in ex.answers] for ex in self.examples}

    def __repr__(self) -> str:
        return (f"<QAExamples {self.name}: {len(self)} questions, "
                f"{sum(ex.is_impossible for ex in self.examples)} unanswerable>")


def load_squad(spec: str, allow_unlabeled: bool = False) -> QAExamples:
    """The questions of `squad:PATH` (PATH a glob or object-store URL; files in sorted order).
    `allow_unlabeled` (test splits): a question may have no (or empty) `answers` without
    being marked `is_impossible`.

    Raises:
      DataSourceError: another prefix, no matching file, invalid JSON, a missing field, an
        answer whose text is not found at its answer_start, a duplicate question id.
    """
    prefix, sep, rest = spec.partition(":")
    if prefix != PREFIX or not sep or not rest:
        raise DataSourceError(f"Unknown extractive QA data spec {spec!r}. Use 'squad:PATH' (a "
                              "SQuAD v1.1 / v2.0 JSON file; PATH may be a glob or a gs:// URL).")
    paths = expand_glob(rest, PREFIX)
    examples: list[QAExample] = []
    for path in paths:
        examples += _read_file(path, allow_unlabeled)
    if not examples:
        raise DataSourceError(f"{spec!r} holds no questions (data -> paragraphs -> qas).")
    seen: set[str] = set()
    for ex in examples:
        if ex.qid in seen:
            raise DataSourceError(f"{spec!r}: question id {ex.qid!r} appears twice; ids must "
                                  "be unique (they key the predictions).")
        seen.add(ex.qid)
    name = spec if len(paths) == 1 else f"{spec} ({len(paths)} files)"
    out = QAExamples(examples, name)
    log.info("Loaded %r.", out)
    return out


def _read_file(path: str, allow_unlabeled: bool = False) -> list[QAExample]:
    try:
        doc = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise DataSourceError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column "
                              f"{e.colno}); a SQuAD file is one JSON object.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DataSourceError(f"Cannot read {path}: {e}.") from e
    articles = _field(doc, "data", list, path)
    out = []
    for a, article in enumerate(articles):
        for p, para in enumerate(_field(article, "paragraphs", list, f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _field(para, "context", str, where)
            for q, qa in enumerate(_field(para, "qas", list, where)):
                out.append(_example(qa, context, f"{where}.qas[{q}]", allow_unlabeled))
    return out


def _field(obj: Any, key: str, kind: type, where: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise DataSourceError(f"{where}: field {key!r} is missing or not a {kind.__name__}; a "
                              "SQuAD file nests data -> paragraphs (context, qas) -> qas (id, "
                              "question, answers).")
    return value


def _example(qa: dict, context: str, where: str, allow_unlabeled: bool = False) -> QAExample:
    qid = qa.get("id") if isinstance(qa, dict) else None
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise DataSourceError(f"{where}: field 'id' is missing or not a string; every question "
                              "needs a unique id.")
    qid = str(qid)
    question = _field(qa, "question", str, where)
    impossible = bool(qa.get("is_impossible", False))
    answers = []
    for i, ans in enumerate(_field(qa, "answers", list, where)
                            if not (impossible or allow_unlabeled) else qa.get("answers") or []):
        text = _field(ans, "text", str, f"{where}.answers[{i}]")
        start = _field(ans, "answer_start", int, f"{where}.answers[{i}]")
        if context[start:start + len(text)] != text:
            raise DataSourceError(
                f"{where}.answers[{i}]: the context at answer_start={start} reads "
                f"{context[start:start + len(text)]!r}, not the answer {text!r}; fix "
                "answer_start (a character offset into the context).")
        answers.append((text, start))
    if not impossible and not answers and not allow_unlabeled:
        raise DataSourceError(f"{where}: no answers; mark an unanswerable question with "
                              "\"is_impossible\": true (SQuAD v2.0).")
    return QAExample(qid, question, context, tuple(answers), impossible)


# ------------------------------------------------------------------------------ windows

def word_spans(context: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the context's words: runs of word characters, or a
    single punctuation character; whitespace separates and belongs to no word."""
    return [m.span() for m in _WORD.finditer(context)]


@dataclasses.dataclass
class QAFeatures:
    """The windows of a split, F of them, each max_seq_length (L) positions.

    Attributes:
      input_ids, input_mask, token_type_ids: int32[F, L] ([CLS] q [SEP] window [SEP], padded).
      start_positions, end_positions: int32[F] training targets (0 = no answer here).
      example_index: int32[F] the question (index into `examples`) of each window.
      char_spans: int32[F, L, 2] the context characters [start, end) of each context piece's
        word; -1 elsewhere (special tokens, question, padding).
      max_context: bool[F, L] whether the piece is its window's max-context piece.
      examples: the questions.
    """

    input_ids: np.ndarray
    input_mask: np.ndarray
    token_type_ids: np.ndarray
    start_positions: np.ndarray
    end_positions: np.ndarray
    example_index: np.ndarray
    char_spans: np.ndarray
    max_context: np.ndarray
    examples: QAExamples

    def __len__(self) -> int:
        return len(self.example_index)

    @property
    def name(self) -> str:
        return f"{self.examples.name} windows"

    @property
    def texts(self) -> list[tuple[str, str]]:
        """(question, context) of each window (the iterator's example texts)."""
        ex = self.examples.examples
        return [(ex[i].question, ex[i].context) for i in self.example_index]


def _encode_many(tokenizer: TokenizerLike, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


def doc_windows(num_pieces: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of the windows covering `num_pieces` context pieces (run_squad.py):
    each at most `max_tokens` long, starting `doc_stride` after the previous one, the last one
    reaching the end."""
    spans, start = [], 0
    while True:
        length = min(num_pieces - start, max_tokens)
        spans.append((start, length))
        if start + length >= num_pieces:
            return spans
        start += min(length, doc_stride)


def _is_max_context(spans: Sequence[tuple[int, int]], current: int, position: int) -> bool:
    best_score, best = None, None
    for i, (start, length) in enumerate(spans):
        end = start + length - 1
        if position < start or position > end:
            continue
        score = min(position - start, end - position) + 0.01 * length
        if best_score is None or score > best_score:
            best_score, best = score, i
    return best == current


def make_features(examples: QAExamples, tokenizer: TokenizerLike, *, max_seq_length: int,
                  doc_stride: int, max_query_length: int) -> QAFeatures:
    """The document-stride windows of every question (see the module docstring).

    Raises:
      DataSourceError: max_seq_length leaves no room for context pieces, or a bad stride.
    """
    cls_id, sep_id, _ = special_ids(tokenizer, "encoder", pair=True)
    if doc_stride < 1 or max_query_length < 1:
        raise DataSourceError(f"doc_stride={doc_stride} and max_query_length="
                              f"{max_query_length} must be >= 1.")
    rows: dict[str, list] = {k: [] for k in ("ids", "types", "start", "end", "example",
                                             "chars", "max_context")}
    contexts: dict[str, tuple[list, list[int], list[int]]] = {}
    questions = _encode_many(tokenizer, [ex.question for ex in examples.examples])
    for e, ex in enumerate(examples.examples):
        if ex.context not in contexts:
            contexts[ex.context] = _tokenize_context(ex.context, tokenizer)
        words, pieces, piece_word = contexts[ex.context]
        query = questions[e][:max_query_length]
        answer = _answer_pieces(ex, words, piece_word)
        max_tokens = max_seq_length - len(query) - 3
        if max_tokens < 1:
            raise DataSourceError(
                f"question {ex.qid!r}: max_seq_length={max_seq_length} leaves no room for "
                f"context after its {len(query)} question pieces and 3 special tokens; raise "
                "SEQ_LEN or lower max_query_length.")
        spans = doc_windows(len(pieces), max_tokens, doc_stride)
        for w, (start, length) in enumerate(spans):
            offset = len(query) + 2
            ids = [cls_id, *query, sep_id, *pieces[start:start + length], sep_id]
            chars = np.full((max_seq_length, 2), -1, np.int32)
            max_ctx = np.zeros(max_seq_length, bool)
            for i in range(length):
                chars[offset + i] = words[piece_word[start + i]]
                max_ctx[offset + i] = _is_max_context(spans, w, start + i)
            s = t = 0
            if answer is not None and start <= answer[0] and answer[1] < start + length:
                s, t = answer[0] - start + offset, answer[1] - start + offset
            rows["ids"].append(ids)
            rows["types"].append([0] * offset + [1] * (length + 1))
            rows["start"].append(s)
            rows["end"].append(t)
            rows["example"].append(e)
            rows["chars"].append(chars)
            rows["max_context"].append(max_ctx)
    return _pack(rows, examples, max_seq_length, tokenizer.pad_id)


def _tokenize_context(context: str, tokenizer: TokenizerLike
                      ) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(word spans, context pieces, the word index of each piece)."""
    words = word_spans(context)
    encoded = _encode_many(tokenizer, [context[a:b] for a, b in words])
    pieces, piece_word = [], []
    for w, ids in enumerate(encoded):
        pieces += ids
        piece_word += [w] * len(ids)
    return words, pieces, piece_word


def _answer_pieces(ex: QAExample, words: list[tuple[int, int]],
                   piece_word: list[int]) -> tuple[int, int] | None:
    """(first, last) context piece of the first gold answer; None if unanswerable (or the
    answer holds no word)."""
    if ex.is_impossible or not ex.answers:
        return None
    text, start = ex.answers[0]
    end = start + len(text)
    inside = [w for w, (a, b) in enumerate(words) if a < end and b > start]
    if not inside:
        return None
    first = [p for p, w in enumerate(piece_word) if inside[0] <= w <= inside[-1]]
    return (first[0], first[-1]) if first else None


def _pack(rows: dict[str, list], examples: QAExamples, seq_len: int, pad_id: int) -> QAFeatures:
    n = len(rows["ids"])
    input_ids = np.full((n, seq_len), pad_id, np.int32)
    types = np.zeros((n, seq_len), np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    for i, (ids, tt) in enumerate(zip(rows["ids"], rows["types"])):
        input_ids[i, :len(ids)] = ids
        types[i, :len(tt)] = tt
        mask[i, :len(ids)] = 1
    return QAFeatures(input_ids, mask, types, np.asarray(rows["start"], np.int32),
                      np.asarray(rows["end"], np.int32), np.asarray(rows["example"], np.int32),
                      np.stack(rows["chars"]), np.stack(rows["max_context"]), examples)


# ------------------------------------------------------------------------------ batches

class QAIterator(ClassificationIterator):
    """Batches of windows, in the order, host split and resumable state of
    `ClassificationIterator` (whose example is here a window of `QAFeatures`).

    Each batch (leading dim b = global_batch_size // process_count): input_ids, input_mask,
    token_type_ids int32[b, L]; start_positions, end_positions int32[b]; label int32[b] (the
    window index, 0 for padding rows); weight float32[b] (0: padding row); index int32[b] (the
    window index, -1 for padding rows). Padding rows are all pad with mask 0.
    """

    def __init__(self, features: QAFeatures, tokenizer: TokenizerLike, **kwargs):
        if kwargs.get("seq_len") != features.input_ids.shape[1]:
            raise ValueError(f"QAIterator: seq_len={kwargs.get('seq_len')} but the windows "
                             f"have {features.input_ids.shape[1]} positions.")
        super().__init__(features, tokenizer, style="encoder", **kwargs)
        self.features = features

    def _make_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        f = self.features
        real = indices >= 0
        rows = np.where(real, indices, 0)
        keep = real[:, None]
        return {
            "input_ids": np.where(keep, f.input_ids[rows], self.tokenizer.pad_id).astype(np.int32),
            "input_mask": np.where(keep, f.input_mask[rows], 0).astype(np.int32),
            "token_type_ids": np.where(keep, f.token_type_ids[rows], 0).astype(np.int32),
            "start_positions": np.where(real, f.start_positions[rows], 0).astype(np.int32),
            "end_positions": np.where(real, f.end_positions[rows], 0).astype(np.int32),
            "label": rows.astype(np.int32),
            "weight": real.astype(np.float32),
            "index": indices.astype(np.int32),
        }

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "kind": "extractive_qa"}
