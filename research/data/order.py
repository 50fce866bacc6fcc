"""The epoch order every batch iterator reads its documents / examples in.

The order of N items is infinite: the concatenation over epochs e = 0, 1, 2, ... of

    perm_e = np.random.default_rng([seed, e]).permutation(N)      (shuffled)
    perm_e = range(N)                                            (not shuffled)

so global position g is item `perm_{g // N}[g % N]`. It depends on (N, seed, shuffled) only,
never on the process layout, which is what lets every iterator give the same global batches
under any process count and resume from a position. The causal-LM, BERT pretraining and
classification iterators all read it through `EpochOrder`.
"""

from __future__ import annotations

import functools

import numpy as np

_PERMUTATIONS_CACHED = 4  # epochs whose permutation is kept (row streams straddle epochs)


class EpochOrder:
    """Global position -> (epoch, item index) of the infinite order of `num_items` items."""

    def __init__(self, num_items: int, seed: int, shuffled: bool):
        if num_items < 1:
            raise ValueError(f"An epoch order needs at least one item, got {num_items}.")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.shuffled = bool(shuffled)
        self._cached_permutation = functools.lru_cache(maxsize=_PERMUTATIONS_CACHED)(
            self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def permutation(self, epoch: int) -> np.ndarray:
        """int64[num_items]: the item order of epoch `epoch` (read-only; do not modify)."""
        return self._cached_permutation(int(epoch))

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, item index) at global position `position` >= 0."""
        epoch, offset = divmod(int(position), self.num_items)
        item = int(self.permutation(epoch)[offset]) if self.shuffled else offset
        return epoch, item

    def locate_many(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epochs, item indices), each int64 shaped like `positions` (>= 0): `locate` of
        every position, vectorised."""
        epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.num_items)
        if not self.shuffled:
            return epochs, offsets
        items = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            selected = epochs == epoch
            items[selected] = self.permutation(int(epoch))[offsets[selected]]
        return epochs, items
