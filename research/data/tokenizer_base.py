"""What both tokenizers share (SentencePiece in tokenizer.py, BERT WordPiece in wordpiece.py):
the special ids, decoding without them, and the errors for a VOCAB they cannot use.

VOCAB may be a local path or an object-store URL (`gs://bkt/tok/spm.model`, read through
`research.storage`); the tokenizer's `path` stays the URL (it is recorded in run.json).
VOCAB may also name a model directory: `find_tokenizer_file` picks its tokenizer file.

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
    `_decode_ids(list[int]) -> str`. `pad_is_special` is False when the vocabulary has no pad
    and `pad_id` falls back to an ordinary piece (id 0), which decoding then keeps."""

    path: str
    pad_id: int
    bos_id: int
    eos_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    pad_is_special: bool = True
    add_bos_token: bool = True  # whether a prompt starts with BOS (HF tokenizers: their config)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are never real text (pad, bos, eos, cls, sep, mask; unk excluded)."""
        ids = {self.bos_id, self.eos_id, self.cls_id, self.sep_id, self.mask_id}
        if self.pad_is_special:
            ids.add(self.pad_id)
        return frozenset(i for i in ids if i >= 0)

    def missing_special(self, names: Iterable[str]) -> list[str]:
        """The named special pieces (`"bos"`, `"cls"`, ...) this vocabulary lacks."""
        return [n for n in names if getattr(self, f"{n}_id") < 0]

    def decode(self, ids) -> str:
        """Text of `ids` (any shape), special ids dropped."""
        special = self.special_ids
        return self._decode_ids([i for i in np.asarray(ids).reshape(-1).tolist()
                                 if i not in special])

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


# In a model directory, the tokenizer file used: the first of these that exists.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.txt",
                   "vocab.json")


def find_tokenizer_file(directory: str) -> str:
    """The tokenizer file in a model directory (local or a URL): the first of TOKENIZER_FILES
    there (`vocab.json` only with GPT-2's `merges.txt` beside it). VocabNotFoundError if none."""
    for name in TOKENIZER_FILES:
        path = storage.join(directory, name)
        if storage.isfile(path) and (name != "vocab.json"
                                     or storage.isfile(storage.join(directory, "merges.txt"))):
            return path
    raise VocabNotFoundError(
        f"VOCAB {directory!r} is a directory, not a tokenizer file, and holds no tokenizer "
        f"(looked for {', '.join(TOKENIZER_FILES[:-1])} and vocab.json + merges.txt). Pass a "
        "tokenizer file, or a model directory as Hugging Face save_pretrained writes it.")
