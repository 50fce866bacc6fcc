"""What both tokenizers share (SentencePiece in tokenizer.py, BERT WordPiece in wordpiece.py):
the special ids, decoding without them, and the errors for a VOCAB they cannot use.

VOCAB may be a local path or an object-store URL (`gs://bkt/tok/spm.model`, read through
`research.storage`); the tokenizer's `path` stays the URL (it is recorded in run.json).

Both errors are `research.errors.ConfigError`s, so the CLIs end with one `error:` line (exit
code 2) naming the VOCAB and the fix.
"""

from __future__ import annotations

import abc
from typing import Iterable

import numpy as np

from research import storage
from research.errors import ConfigError


class VocabNotFoundError(ConfigError, FileNotFoundError):
    """VOCAB names a file that does not exist."""


class VocabError(ConfigError):
    """VOCAB is not a tokenizer model, or lacks a special piece the objective needs."""


class SpecialPieces(abc.ABC):
    """The special ids (-1 when absent) and decoding without them. Subclasses set `path`,
    `pad_id`, `bos_id`, `eos_id`, `cls_id`, `sep_id`, `mask_id` and implement
    `_decode_ids(list[int]) -> str`."""

    path: str
    pad_id: int
    bos_id: int
    eos_id: int
    cls_id: int
    sep_id: int
    mask_id: int

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never real text (pad, bos, eos, cls, sep, mask; unk excluded)."""
        ids = {self.pad_id, self.bos_id, self.eos_id, self.cls_id, self.sep_id, self.mask_id}
        return frozenset(i for i in ids if i >= 0)

    def missing_special(self, names: Iterable[str]) -> list[str]:
        """The named special pieces (`"bos"`, `"cls"`, ...) this vocabulary lacks."""
        return [n for n in names if getattr(self, f"{n}_id") < 0]

    def decode(self, ids) -> str:
        """Text of `ids` (any shape), special ids dropped."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._decode_ids([i for i in flat if i not in self.special_ids])

    @abc.abstractmethod
    def _decode_ids(self, ids: list[int]) -> str:
        """Text of `ids`, which hold no special ids."""


def check_vocab_path(path: str, fix: str) -> None:
    """VocabNotFoundError unless `path` (local or a URL) is an existing file; `fix` says where
    a VOCAB of the expected kind comes from. StorageError for a URL whose bucket is missing."""
    if not storage.exists(path):
        storage.check_bucket(path)  # a StorageError (one `error:` line) for a missing bucket
        raise VocabNotFoundError(f"VOCAB {path!r} does not exist. {fix}")
    if storage.isdir(path):
        raise VocabError(f"VOCAB {path!r} is a directory, not a tokenizer file. {fix}")
