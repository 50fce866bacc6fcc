"""Word-level tagging metrics: accuracy, and entity-level precision / recall / F1 exactly as
`seqeval` (https://github.com/chakki-works/seqeval, MIT) computes them in its default mode
(`seqeval.metrics.{precision,recall,f1}_score(y_true, y_pred)`: micro average, prefix tags,
no strict scheme) -- the numbers HF's `run_ner` and the CoNLL literature report.

    entity_scores([['B-PER', 'I-PER', 'O']], [['B-PER', 'O', 'O']])
    -> {'precision': 0.0, 'recall': 0.0, 'f1': 0.0}

Entities (`get_entities`). seqeval concatenates the sentences with an 'O' after each and
reads one label at a time: its tag is the first character ('B', 'I', 'E', 'S', 'O', ...) and
its type what follows the first '-' ('B-PER' -> 'PER'; no type -> '_'). A chunk ends before
a label when the previous tag was E or S; when a B or I is followed by B, S or O; or when the
type changes after a tag other than O and '.'. A chunk starts at B or S; at E or I after E,
S or O (so an I- without a B- opens an entity, IOB1-style, as in conlleval); or wherever the
type changes on a tag other than O and '.'. An entity is (type, first, last) in that
concatenation; a predicted entity is correct only if the same triple is in the truth.

Scores (micro): precision = correct / predicted, recall = correct / true (0.0 when the
denominator is 0, as seqeval's zero_division='warn' gives), f1 = 2 p r / (p + r) (0.0 when
p + r = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

ENTITY_PREFIXES = ("B-", "I-", "E-", "S-")


def _tag_and_type(label: str) -> tuple[str, str]:
    """('B', 'PER') for 'B-PER'; seqeval's split: first character, text after the first '-'."""
    return label[0], label[1:].split("-", 1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk ended between the previous label and this one."""
    return (prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk started at this label."""
    return (tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def get_entities(labels: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of each chunk of one flat label sequence (inclusive positions)."""
    prev_tag, prev_type, begin = "O", "", 0
    chunks = []
    for i, label in enumerate([*labels, "O"]):
        tag, type_ = _tag_and_type(label)
        if _ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def sentence_entities(sentences: Sequence[Sequence[str]]) -> set[tuple[str, int, int]]:
    """The entities of sentences joined as seqeval joins them (an 'O' after each)."""
    flat = [label for sentence in sentences for label in [*sentence, "O"]]
    return set(get_entities(flat))


def entity_scores(y_true: Sequence[Sequence[str]],
                  y_pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 of the predicted entities (see the module docstring).

    y_true, y_pred: one label list per sentence, the same lengths.
    Raises ValueError if the sentence counts or lengths differ."""
    if len(y_true) != len(y_pred) or any(len(t) != len(p) for t, p in zip(y_true, y_pred)):
        raise ValueError("entity_scores: y_true and y_pred must hold the same number of "
                         "sentences with the same number of labels each.")
    true, pred = sentence_entities(y_true), sentence_entities(y_pred)
    correct = len(true & pred)
    precision = correct / len(pred) if pred else 0.0
    recall = correct / len(true) if true else 0.0
    denom = precision + recall
    f1 = 2.0 * precision * recall / denom if denom else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def is_entity_scheme(label_names: Sequence[str]) -> bool:
    """True for BIO / IOB2 / IOBES label sets: every label is 'O' or starts with B-, I-, E- or
    S-, and at least one is not 'O' (entity scores are then reported)."""
    return (any(n != "O" for n in label_names)
            and all(n == "O" or n.startswith(ENTITY_PREFIXES) for n in label_names))
