"""From per-window start/end logits to one answer text per question (run_squad.py's
`write_predictions`).

For every question, over all of its windows: the `n_best_size` highest start logits and the
`n_best_size` highest end logits of each window form candidate spans (start, end), kept when
both ends are context pieces, the start is a max-context piece of its window, start <= end
and the span has at most `max_answer_length` pieces. A span's score is
start_logit[start] + end_logit[end]; its text is the context from its first word's first
character to its last word's last character. Candidates are ranked by score, equal texts kept
once, the best `n_best_size` returned.

SQuAD v2.0 (`version_2`): the null (no-answer) score of a question is the smallest
start_logit[0] + end_logit[0] ([CLS]) over its windows; the answer is "" when
null_score - best non-null score > `null_score_diff_threshold` (or when there is no
non-null candidate), else the best non-null span. v1.1 always answers the best span ("" only
when no candidate is valid).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research.data.squad import QAFeatures


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One candidate answer: its text, score and (window, start, end) piece positions."""

    text: str
    score: float
    window: int = -1
    start: int = 0
    end: int = 0


def window_candidates(start_logits: np.ndarray, end_logits: np.ndarray, char_spans: np.ndarray,
                      max_context: np.ndarray, context: str, window: int, *, n_best_size: int,
                      max_answer_length: int) -> list[Candidate]:
    """The valid candidate spans of one window (unsorted).

    start_logits, end_logits: float[L]; char_spans: int[L, 2] (-1: not a context piece);
    max_context: bool[L].
    """
    top_start = np.argsort(-start_logits, kind="stable")[:n_best_size]
    top_end = np.argsort(-end_logits, kind="stable")[:n_best_size]
    out = []
    for s in top_start:
        if char_spans[s, 0] < 0 or not max_context[s]:
            continue
        for e in top_end:
            if char_spans[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                continue
            text = context[char_spans[s, 0]:char_spans[e, 1]]
            out.append(Candidate(text, float(start_logits[s] + end_logits[e]), window,
                                 int(s), int(e)))
    return out


def nbest(candidates: list[Candidate], n_best_size: int) -> list[Candidate]:
    """Candidates by decreasing score, each text once, at most n_best_size."""
    out, seen = [], set()
    for c in sorted(candidates, key=lambda c: -c.score):
        if c.text in seen:
            continue
        seen.add(c.text)
        out.append(c)
        if len(out) == n_best_size:
            break
    return out


def predict_answers(start_logits: np.ndarray, end_logits: np.ndarray, features: QAFeatures, *,
                    n_best_size: int = 20, max_answer_length: int = 30,
                    version_2: bool = False, null_score_diff_threshold: float = 0.0
                    ) -> dict[str, str]:
    """Question id -> answer text ("" = no answer) for every question of `features`.

    start_logits, end_logits: float[F, L], one row per window of `features` (in order).
    """
    if start_logits.shape != end_logits.shape or start_logits.shape != features.input_ids.shape:
        raise ValueError(f"predict_answers: logits of shapes {start_logits.shape} / "
                         f"{end_logits.shape} for {features.input_ids.shape} windows.")
    by_example: dict[int, list[int]] = {}
    for w, e in enumerate(features.example_index):
        by_example.setdefault(int(e), []).append(w)
    out = {}
    for e, ex in enumerate(features.examples.examples):
        cands, null = [], np.inf
        for w in by_example.get(e, []):
            cands += window_candidates(start_logits[w], end_logits[w], features.char_spans[w],
                                       features.max_context[w], ex.context, w,
                                       n_best_size=n_best_size,
                                       max_answer_length=max_answer_length)
            null = min(null, float(start_logits[w, 0] + end_logits[w, 0]))
        best = nbest(cands, n_best_size)
        if not best:
            out[ex.qid] = ""
        elif version_2 and null - best[0].score > null_score_diff_threshold:
            out[ex.qid] = ""
        else:
            out[ex.qid] = best[0].text
    return out
