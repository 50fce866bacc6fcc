"""BERT masked-LM prediction selection (`create_masked_lm_predictions`).

Semantics follow google-research/bert's `create_pretraining_data.py`:

* candidates are all non-special positions ([CLS], [SEP], padding... are never chosen);
* with whole-word masking a candidate *group* is a word-start piece plus the continuation
  pieces that follow it; otherwise every candidate is its own group;
* groups are shuffled; `num_to_predict = min(max_predictions_per_seq,
  max(1, int(round(len(tokens) * masked_lm_prob))))` with `len(tokens)` the full instance
  length (special tokens included);
* groups are taken in shuffled order, skipping any whose addition would exceed
  `num_to_predict`;
* every chosen position independently becomes [MASK] (80%), keeps its token (10%) or
  becomes a token drawn uniformly from the non-special vocabulary (10%);
* predictions are reported sorted by position.

One deliberate difference from the reference: a continuation piece right after a special
token (e.g. the first piece of a front-truncated segment B after [SEP]) starts a new group
instead of joining the last word of the previous segment across the [SEP].
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Recorded per chosen position (test hook and diagnostics): what the procedure decided.
ACTION_MASK = 0     # replaced by [MASK]
ACTION_KEEP = 1     # original token kept
ACTION_RANDOM = 2   # replaced by a random non-special token (which may equal the original)

MASK_PROB = 0.8
KEEP_PROB = 0.1     # the remaining 0.1 is ACTION_RANDOM


@dataclasses.dataclass(frozen=True)
class MaskingVocab:
    """What masking needs to know about a vocabulary.

    Attributes:
      mask_id: id of the [MASK] piece.
      is_special: bool[V]; True for ids that are never prediction candidates.
      word_start: bool[V]; True where a piece begins a word (whole-word masking).
      replacement_ids: int32[R]; ids that random replacement draws from, uniformly.
    """
    mask_id: int
    is_special: np.ndarray
    word_start: np.ndarray
    replacement_ids: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "MaskingVocab":
        """Builds it from a `research.data.tokenizer.Tokenizer` (needs a [MASK] piece)."""
        tokenizer.require_special("mask")
        is_special = np.zeros(tokenizer.vocab_size, dtype=bool)
        is_special[sorted(tokenizer.special_ids)] = True
        replacement = np.flatnonzero(~is_special).astype(np.int32)
        return cls(mask_id=int(tokenizer.mask_id), is_special=is_special,
                   word_start=np.asarray(tokenizer.word_start_mask, dtype=bool),
                   replacement_ids=replacement)


@dataclasses.dataclass(frozen=True)
class MaskedLmPredictions:
    """Output of `create_masked_lm_predictions` (n = number of predictions).

    Attributes:
      tokens: int32[len] the instance with the chosen positions replaced.
      positions: int32[n] chosen positions, ascending.
      labels: int32[n] original ids at `positions`.
      actions: int8[n] ACTION_MASK / ACTION_KEEP / ACTION_RANDOM per position.
    """
    tokens: np.ndarray
    positions: np.ndarray
    labels: np.ndarray
    actions: np.ndarray


def num_to_predict(length: int, masked_lm_prob: float, max_predictions_per_seq: int) -> int:
    """The reference's prediction count for an instance of `length` tokens (specials included)."""
    return min(max_predictions_per_seq, max(1, int(round(length * masked_lm_prob))))


def candidate_groups(tokens: np.ndarray, vocab: MaskingVocab,
                     whole_word_mask: bool) -> list[np.ndarray]:
    """Candidate position groups, in sequence order.

    Args:
      tokens: int[len] instance ids.
    Returns:
      list of int64[g] position arrays; singletons unless `whole_word_mask`, in which case a
      group is a word-start piece plus its following continuation pieces. Groups never span
      a special token.
    """
    tokens = np.asarray(tokens)
    candidate = ~vocab.is_special[tokens]
    idx = np.flatnonzero(candidate)
    if idx.size == 0:
        return []
    if not whole_word_mask:
        return list(idx.reshape(-1, 1))
    prev_is_candidate = np.zeros_like(candidate)
    prev_is_candidate[1:] = candidate[:-1]
    starts = vocab.word_start[tokens[idx]] | ~prev_is_candidate[idx]
    starts[0] = True
    return np.split(idx, np.flatnonzero(starts)[1:])


def choose_positions(groups: list[np.ndarray], budget: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Shuffles `groups` and takes them in order while they fit in `budget` positions.

    Returns:
      int64[n <= budget] chosen positions (unsorted).
    """
    chosen: list[np.ndarray] = []
    count = 0
    for g in rng.permutation(len(groups)):
        if count >= budget:
            break
        group = groups[g]
        if count + len(group) > budget:
            continue
        chosen.append(group)
        count += len(group)
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def create_masked_lm_predictions(tokens, vocab: MaskingVocab, *, masked_lm_prob: float,
                                 max_predictions_per_seq: int, whole_word_mask: bool,
                                 rng: np.random.Generator) -> MaskedLmPredictions:
    """Chooses and corrupts the masked-LM positions of one instance.

    Args:
      tokens: int[len] `[CLS] A [SEP] B [SEP]` (or `[CLS] A [SEP]`) ids.
      vocab: see `MaskingVocab.from_tokenizer`.
      masked_lm_prob: target fraction of `len` to predict.
      max_predictions_per_seq: cap on predictions.
      whole_word_mask: choose whole words (all their pieces) at a time.
      rng: consumed deterministically.
    Returns:
      `MaskedLmPredictions`.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    budget = num_to_predict(len(tokens), masked_lm_prob, max_predictions_per_seq)
    groups = candidate_groups(tokens, vocab, whole_word_mask)
    positions = np.sort(choose_positions(groups, budget, rng))
    n = len(positions)
    u = rng.random(n)
    random_ids = vocab.replacement_ids[rng.integers(0, len(vocab.replacement_ids), size=n)]
    actions = np.where(u < MASK_PROB, ACTION_MASK,
                       np.where(u < MASK_PROB + KEEP_PROB, ACTION_KEEP, ACTION_RANDOM))
    labels = tokens[positions]
    replaced = np.where(actions == ACTION_MASK, vocab.mask_id,
                        np.where(actions == ACTION_KEEP, labels, random_ids))
    out = tokens.copy()
    out[positions] = replaced
    return MaskedLmPredictions(tokens=out, positions=positions.astype(np.int32),
                               labels=labels.astype(np.int32), actions=actions.astype(np.int8))
