"""BERT WordPiece vocabularies (`vocab.txt`) behind the interface of `research.data.tokenizer`.

Wraps the `tokenizers` library's `BertWordPieceTokenizer` (BERT's basic tokenizer: text
cleaning, optional lowercasing and accent stripping, CJK characters split, punctuation split,
then greedy longest-match WordPiece with `##` continuation pieces), so Hugging Face BERT
checkpoints converted by tools/convert_checkpoint.py train with their own vocabulary:
`--gin.VOCAB="'hf/bert-base-uncased/vocab.txt'"` (`load_tokenizer` picks this class for
`*.txt` paths).

Special ids come from the pieces `[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`; BERT has no
BOS/EOS, so `bos_id = eos_id = -1` (objectives that need them say so via `require_special`).

As with the SentencePiece tokenizer, special pieces are never produced by encoding text: the
string "[MASK]" in a corpus gives the pieces `[`, `mask`, `]`. This is the one deliberate
difference from Hugging Face's `BertTokenizerFast`, which maps such strings to special ids.

vocab.txt may be a local path or a URL (`gs://bkt/bert/vocab.txt`, read through
`research.storage`), with its tokenizer_config.json beside it.

Lowercasing: the `lowercase` argument; by default `do_lower_case` (and `strip_accents`,
`tokenize_chinese_chars`) from the `tokenizer_config.json` next to vocab.txt (the Hugging
Face checkpoint's), else uncased (lowercase, strip accents) as `bert-base-uncased`.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import numpy as np
from tokenizers import BertWordPieceTokenizer
from tokenizers.models import WordPiece

from research import storage
from research.data.tokenizer_base import SpecialPieces, VocabError, check_vocab_path
from research.storage import StorageError

PAD_PIECE, UNK_PIECE, CLS_PIECE = "[PAD]", "[UNK]", "[CLS]"
SEP_PIECE, MASK_PIECE = "[SEP]", "[MASK]"
CONTINUATION = "##"
TOKENIZER_CONFIG = "tokenizer_config.json"
WHERE_FROM = ("A WordPiece VOCAB is the vocab.txt of a BERT checkpoint "
              "(tools/convert_checkpoint.py records it in run.json).")


def hf_tokenizer_options(vocab_path: str) -> dict[str, Any]:
    """Normaliser options from the `tokenizer_config.json` next to `vocab_path` ({} if none):
    keys among lowercase, strip_accents, handle_chinese_chars."""
    path = storage.join(storage.dirname(vocab_path), TOKENIZER_CONFIG)
    if not storage.exists(path):
        return {}
    config = json.loads(storage.read_text(path))
    names = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
             "tokenize_chinese_chars": "handle_chinese_chars"}
    return {ours: config[theirs] for theirs, ours in names.items()
            if theirs in config and (config[theirs] is not None or ours == "strip_accents")}


def _looks_cased(vocab: dict[str, int]) -> bool:
    """True when more than 1% of the ordinary pieces contain an upper-case letter."""
    pieces = [p for p in vocab if not (p.startswith("[") and p.endswith("]"))]
    upper = sum(any(c.isupper() for c in p) for p in pieces)
    return bool(pieces) and upper > 0.01 * len(pieces)


class WordPieceTokenizer(SpecialPieces):
    """A BERT WordPiece vocabulary with the same interface as `research.data.tokenizer.Tokenizer`.

    Args:
      vocab_path: a `vocab.txt` (one piece per line; the line number is the id).
      lowercase: lowercase (and strip accents) before WordPiece; None = from the
        tokenizer_config.json next to the vocab, else True (uncased).
    """

    def __init__(self, vocab_path: str, lowercase: bool | None = None):
        check_vocab_path(vocab_path, WHERE_FROM)
        self.path = vocab_path
        try:
            with storage.local_copy(vocab_path) as local:  # the Rust reader opens local files
                vocab = WordPiece.read_file(local)
        except StorageError:
            raise
        except Exception as err:  # noqa: BLE001 - the Rust reader raises a plain Exception
            raise VocabError(f"VOCAB {vocab_path!r} is not a WordPiece vocab.txt (one piece "
                             f"per line) ({err}). {WHERE_FROM}") from err
        options = hf_tokenizer_options(vocab_path)
        if lowercase is not None:
            options["lowercase"] = lowercase
        elif "lowercase" not in options:
            options["lowercase"] = True
            if _looks_cased(vocab):
                logging.warning("%s has many upper-case pieces but no tokenizer_config.json says "
                                "do_lower_case; lowercasing anyway (uncased). Pass lowercase=False "
                                "for a cased vocabulary.", vocab_path)
        self.lowercase: bool = bool(options["lowercase"])
        missing = [p for p in (UNK_PIECE, CLS_PIECE, SEP_PIECE) if p not in vocab]
        if missing:
            raise VocabError(f"WordPiece vocabulary {vocab_path!r} lacks {missing}; a BERT "
                             "vocab.txt has [PAD], [UNK], [CLS], [SEP] and [MASK] lines.")
        self._tok = BertWordPieceTokenizer(vocab, wordpieces_prefix=CONTINUATION, **options)
        self._tok._tokenizer.encode_special_tokens = True  # "[MASK]" in text stays text
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._special(PAD_PIECE)
        self.unk_id = self._special(UNK_PIECE)
        self.bos_id = -1
        self.eos_id = -1
        self.cls_id = self._special(CLS_PIECE)
        self.sep_id = self._special(SEP_PIECE)
        self.mask_id = self._special(MASK_PIECE)

    def _special(self, piece: str) -> int:
        pid = self._tok.token_to_id(piece)
        return -1 if pid is None else int(pid)

    def require_special(self, *names: str) -> None:
        """Raise a clear error if this vocabulary lacks one of the named special pieces."""
        missing = self.missing_special(names)
        if not missing:
            return
        if set(missing) & {"bos", "eos"}:
            raise VocabError(
                f"WordPiece vocabulary {self.path!r} has no {', '.join(missing)} piece(s): BERT "
                "vocabularies have no BOS/EOS, which this objective needs. Use a SentencePiece "
                "VOCAB from tools/train_tokenizer.py (or an encoder objective).")
        raise VocabError(f"WordPiece vocabulary {self.path!r} has no "
                         f"{', '.join(f'[{n.upper()}]' for n in missing)} line(s), which this "
                         "objective needs; add them to vocab.txt.")

    def encode(self, text: str) -> list[int]:
        """Piece ids of `text`, without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        """`##` pieces joined (called by SpecialPieces.decode with specials dropped)."""
        return self._tok.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    @functools.cached_property
    def word_start_mask(self) -> np.ndarray:
        """bool[vocab]: True where a piece starts a word (no leading '##'; specials included).

        Whole-word masking groups a word-start piece with the `##` pieces after it.
        """
        out = np.ones(self.vocab_size, dtype=bool)
        for piece, i in self._tok.get_vocab(with_added_tokens=True).items():
            out[i] = not piece.startswith(CONTINUATION)
        return out
