"""A deterministic weighted mixture of document sources: `TRAIN_DATA = [(spec, weight), ...]`.

    TRAIN_DATA = [('text:data/austen/*[!n].txt', 0.7), ('jsonl:other/*.jsonl.gz', 0.3)]

`MixtureSource(sources, weights)` is itself a `DocumentSource`: a fixed length L and a fixed
map from mixture index to (source s, document j). The iterators read it like any single
spec, so its per-epoch order (`research.data.order`), per-host rows and exact resume are
those of a single spec: identical for any process count, resumable from a position.

Length and shares (p_s = w_s / sum w, n_s documents in source s):

  * L = max_s ceil(n_s / p_s): the shortest mixture in which every source, at its share,
    shows each of its documents at least once per epoch.
  * Source s fills c_s = L * p_s slots, rounded by largest remainder (ties to the earlier
    source) so that sum c_s = L; c_s >= n_s. Its k-th slot holds its document k mod n_s:
    documents in order, wrapping around, so a small source with a large weight is repeated.

Interleaving (random access, no table): the sources are split into two halves (by list
position), and slot i of T goes to the first half iff round((i+1) a / T) > round(i a / T),
where a is the first half's slot count; the slot's rank inside that half recurses down to a
single source. Each source's slots are therefore spread evenly: every prefix of k slots holds
within ceil(log2 S) / 2 of k c_s / L of source s's, for S sources (1/2 for two), and exactly
c_s in all L. Weights are read as exact fractions of their decimal form (0.7 is
7/10), so the map is the same on every host.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from research.data.sources import DocumentSource
from research.errors import ConfigError

log = logging.getLogger(__name__)

EXAMPLE = "[('text:data/austen/*[!n].txt', 0.7), ('jsonl:other/*.jsonl.gz', 0.3)]"


def _fraction(weight: Any) -> Fraction:
    """`weight` as an exact fraction of its shortest decimal form (0.7 -> 7/10)."""
    if isinstance(weight, numbers.Integral):
        return Fraction(int(weight))
    return Fraction(repr(float(weight)))


def weight_problem(weight: Any) -> str | None:
    """Why `weight` cannot be a mixture weight, or None if it is a positive finite number."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        return f"weight {weight!r} ({type(weight).__name__}) is not a number"
    if not (math.isfinite(float(weight)) and weight > 0):
        return f"weight {weight!r} is not a positive finite number"
    return None


def mixture_problem(value: Any) -> str | None:
    """Why `value` is not a TRAIN_DATA mixture (a non-empty list of (spec, weight) pairs with
    non-empty spec strings and positive weights), or None if it is one."""
    if not isinstance(value, (list, tuple)) or not value:
        return "a mixture is a non-empty list of (spec, weight) pairs"
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            return f"{item!r} is not a (spec, weight) pair"
        spec, weight = item
        if not isinstance(spec, str) or not spec.strip():
            return f"spec {spec!r} of {item!r} is not a non-empty string"
        problem = weight_problem(weight)
        if problem:
            return f"{problem} (in {item!r})"
    return None


def check_mixture(value: Any) -> list[tuple[str, Any]]:
    """`value` as a list of (spec, weight) pairs; ConfigError naming the problem and the fix."""
    problem = mixture_problem(value)
    if problem:
        raise ConfigError(f"TRAIN_DATA = {value!r}: {problem}. Write a spec string or a list "
                          f"of (spec, weight) pairs with positive weights, e.g. "
                          f"--gin.TRAIN_DATA=\"{EXAMPLE}\".")
    return [(spec, weight) for spec, weight in value]


def _shares(sizes: Sequence[int], weights: Sequence[Fraction]) -> tuple[int, list[int]]:
    """(L, [c_s]): the mixture length and each source's slot count (module docstring)."""
    total = sum(weights)
    shares = [w / total for w in weights]
    length = max(math.ceil(n / p) for n, p in zip(sizes, shares))
    exact = [length * p for p in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in by_remainder[:length - sum(counts)]:
        counts[s] += 1
    return length, counts


class MixtureSource(DocumentSource):
    """Documents of `sources` interleaved at `weights` (module docstring): `len()` is the
    mixture length L, `self[i]` the document at mixture index i.

    Attributes:
      sources, weights: as given.
      counts: [c_s], slots (documents read) of source s per L mixture documents.
    """

    def __init__(self, sources: Sequence[DocumentSource], weights: Sequence[float],
                 name: str | None = None):
        if not sources or len(sources) != len(weights):
            raise ConfigError(f"A mixture needs one weight per source and at least one source; "
                              f"got {len(sources)} source(s) and {len(weights)} weight(s).")
        for weight in weights:
            problem = weight_problem(weight)
            if problem:
                raise ConfigError(f"Mixture {problem}: give every source a positive weight, "
                                  f"e.g. TRAIN_DATA = {EXAMPLE}.")
        sizes = [len(src) for src in sources]
        for src, n in zip(sources, sizes):
            if n == 0:
                raise ConfigError(f"Mixture source {getattr(src, 'name', src)!r} has no "
                                  "documents; remove it from the mixture or fix its spec.")
        self.sources, self.weights = list(sources), list(weights)
        self._sizes = sizes
        self._length, self.counts = _shares(sizes, [_fraction(w) for w in weights])
        self._prefix = [0]
        for c in self.counts:
            self._prefix.append(self._prefix[-1] + c)
        self.name = name or "mixture of " + ", ".join(
            f"{getattr(src, 'name', 'source')} (weight {w:g})"
            for src, w in zip(self.sources, self.weights))

    def __len__(self) -> int:
        return self._length

    def locate(self, i: int) -> tuple[int, int]:
        """(source s, document j of source s) at mixture index 0 <= i < len(self)."""
        lo, hi, k = 0, len(self.sources), int(i)
        prefix = self._prefix
        while hi - lo > 1:
            mid = (lo + hi) // 2
            total, first = prefix[hi] - prefix[lo], prefix[mid] - prefix[lo]
            before = (2 * k * first + total) // (2 * total)  # round(k * first / total)
            after = (2 * (k + 1) * first + total) // (2 * total)
            if after > before:
                hi, k = mid, before
            else:
                lo, k = mid, k - before
        return lo, k % self._sizes[lo]

    def _get(self, i: int) -> str:
        s, j = self.locate(i)
        return self.sources[s][j]


def open_train_data(objective: Any, train_data: str | Sequence[tuple[str, float]]) -> Any:
    """The training data of TRAIN_DATA: `objective.open_source(spec, role="train")` for one
    spec, a `MixtureSource` of each spec's documents for a list of (spec, weight) pairs.

    Raises ConfigError for a malformed mixture, or when the objective reads examples rather
    than documents (classification), which cannot be mixed.
    """
    if isinstance(train_data, str):
        return objective.open_source(train_data, role="train")
    pairs = check_mixture(train_data)
    sources = []
    for spec, _ in pairs:
        source = objective.open_source(spec, role="train")
        if spec.strip().startswith("tokens:"):
            raise ConfigError(f"TRAIN_DATA mixes {spec!r}: pre-tokenised (tokens:) data cannot "
                              "be part of a mixture yet; mix the text specs it was made from, "
                              "or train from the tokens: spec alone.")
        if not isinstance(source, DocumentSource):
            raise ConfigError(
                f"TRAIN_DATA is a mixture, but {type(objective).__name__} reads "
                f"{type(source).__name__} (labelled examples), which cannot be mixed; give "
                "it a single spec, e.g. --gin.TRAIN_DATA=\"'jsonl:train.jsonl'\".")
        sources.append(source)
    mixture = MixtureSource(sources, [w for _, w in pairs])
    for src, w, n, c in zip(sources, mixture.weights, mixture._sizes, mixture.counts):
        log.info("TRAIN_DATA mixture: %s, weight %g: %d of %d documents per epoch "
                 "(%.2f passes).", src.name, w, c, len(mixture), c / n)
    return mixture
