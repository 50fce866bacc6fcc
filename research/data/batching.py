"""Argument checks shared by the batch iterators (causal LM, BERT pretraining, classification).

Sizes and seeds come from the user's config, so a bad one is a `ConfigError` (one `error:`
line from the CLIs); a process index out of range is the framework's bug, a ValueError.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from research.errors import ConfigError


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raises ConfigError unless `value` is an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_batch_layout(*, seq_len: int, global_batch_size: int, seed: int, process_index: int,
                       process_count: int) -> None:
    """Positive sizes, a valid host index, and a global batch every host gets an equal share of."""
    check_int("seq_len", seq_len, 1)
    check_int("global_batch_size", global_batch_size, 1)
    check_int("seed", seed, 0)
    check_int("process_count", process_count, 1)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count="
                         f"{process_count}).")
    if global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not divisible by process_count="
            f"{process_count}: every host must own the same number of rows. Choose a "
            "global batch size that is a multiple of the number of processes.")
