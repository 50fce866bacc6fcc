"""SQuAD exact match and F1, as the official evaluation scripts compute them.

    squad_scores(gold, predictions)              # v1.1: {'exact_match', 'f1'} (percent)
    squad_scores(gold, predictions, version_2=True)
        # v2.0: also has_ans_exact_match / has_ans_f1 / no_ans_exact_match / no_ans_f1

`gold` maps a question id to its gold answer texts ([] for a v2 unanswerable question),
`predictions` a question id to the predicted text ("" = no answer). Both scripts normalise an
answer the same way (`normalize_answer`: lower case, drop punctuation, drop the articles
a/an/the, collapse whitespace), score a prediction against every gold answer and keep the best,
and average over *all* gold questions, in percent (a question without a prediction scores 0,
as in v1.1; the v2.0 script needs a prediction for every question).

v1.1 (`evaluate-v1.1.py`): F1 over the normalised whitespace tokens, 0 when nothing is shared.
v2.0 (`evaluate-v2.0.py`): gold answers that normalise to "" are dropped, and a question left
without any counts as the single gold answer ""; F1 is 1 when both the prediction's and the
gold's tokens are empty, 0 when only one is; exact match and F1 are also reported over the
answerable (HasAns: a non-empty gold answer list) and unanswerable (NoAns) questions. No no-answer probability
file is used (its default threshold 1.0 keeps every prediction as made).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

__all__ = ["normalize_answer", "exact_match_score", "f1_score", "squad_scores"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, articles removed, whitespace collapsed (the official
    order: lower, remove punctuation, remove articles, fix whitespace)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> int:
    """1 if the normalised texts are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, *, version_2: bool = False) -> float:
    """Token-level F1 of the normalised texts (see the module docstring for v1.1 / v2.0)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if version_2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _golds(answers: Sequence[str], version_2: bool) -> list[str]:
    if not version_2:
        return list(answers)
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(gold: Mapping[str, Sequence[str]], predictions: Mapping[str, str], *,
                 version_2: bool = False) -> dict[str, float]:
    """Exact match and F1 in percent over every question of `gold` (see the module docstring).

    Raises:
      ValueError: `gold` is empty, or (v1.1) a question has no gold answer.
    """
    if not gold:
        raise ValueError("squad_scores: no gold questions to score.")
    exact, f1, has_ans = {}, {}, {}
    for qid, answers in gold.items():
        if not version_2 and not answers:
            raise ValueError(f"squad_scores: question {qid!r} has no gold answer; SQuAD v1.1 "
                             "needs one (use version_2=True for unanswerable questions).")
        golds = _golds(answers, version_2)
        has_ans[qid] = bool(answers)  # the script's qid_to_has_ans: any gold answer at all
        pred = predictions.get(qid)
        if pred is None:
            exact[qid], f1[qid] = 0, 0.0
            continue
        exact[qid] = max(exact_match_score(pred, g) for g in golds)
        f1[qid] = max(f1_score(pred, g, version_2=version_2) for g in golds)
    out = _means(exact, f1, list(gold))
    if version_2:
        for name, keep in (("has_ans", True), ("no_ans", False)):
            qids = [q for q in gold if has_ans[q] == keep]
            if qids:
                sub = _means(exact, f1, qids)
                out[f"{name}_exact_match"], out[f"{name}_f1"] = sub["exact_match"], sub["f1"]
    return out


def _means(exact: Mapping[str, int], f1: Mapping[str, float],
           qids: Sequence[str]) -> dict[str, float]:
    n = len(qids)
    return {"exact_match": 100.0 * sum(exact[q] for q in qids) / n,
            "f1": 100.0 * sum(f1[q] for q in qids) / n}
