"""SentencePiece tokenizer with the special pieces the objectives need.

Piece layout written by `tools/train_tokenizer.py` (and expected here):

  id 0 `[PAD]`, id 1 `<unk>`, id 2 `<s>` (BOS), id 3 `</s>` (EOS),
  then the control symbols `[CLS]`, `[SEP]`, `[MASK]`.

Control symbols are never produced by encoding text: a corpus containing the string
"[MASK]" yields ordinary pieces, never the mask id.

Other SentencePiece models (Llama 2, Mistral, T5 `spiece.model`) load too: their special ids
are the model's own, overridden by the Hugging Face tokenizer configs beside the file when
there are any (`research.data.hf_tokenizer.hf_special_ids`). A model without a pad piece gets
pad = eos (else bos, else id 0; `hf_tokenizer.pad_fallback`).

`load_tokenizer` picks the class from VOCAB: a directory -> its tokenizer file
(`tokenizer_base.find_tokenizer_file`), `*.json` -> `hf_tokenizer.HFTokenizer`, `*.txt` ->
`wordpiece.WordPieceTokenizer`, anything else -> SentencePiece.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import sentencepiece as spm

from research import storage
from research.data.hf_tokenizer import HFTokenizer, hf_special_ids, pad_fallback
from research.data.tokenizer_base import (
    SpecialPieces, VocabError, check_vocab_path, find_tokenizer_file)
from research.data.wordpiece import WordPieceTokenizer

PAD_PIECE = "[PAD]"
UNK_PIECE = "<unk>"
BOS_PIECE = "<s>"
EOS_PIECE = "</s>"
CONTROL_PIECES = ("[CLS]", "[SEP]", "[MASK]")
WORD_START = "\u2581"  # SentencePiece's word-boundary marker
HOW_TO_TRAIN = ("Train one with `python tools/train_tokenizer.py --input=SPEC --vocab_size=N "
                "--output=PREFIX` and pass --gin.VOCAB=\"'PREFIX.model'\" (or a BERT vocab.txt).")


class Tokenizer(SpecialPieces):
    """A loaded SentencePiece model (a local path or a URL such as gs://bkt/spm.model) and the
    ids of its special pieces."""

    def __init__(self, model_path: str):
        check_vocab_path(model_path, HOW_TO_TRAIN)
        self.path = model_path
        try:
            if storage.is_remote(model_path):  # SentencePiece opens only local files
                self.sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(model_path))
            else:
                self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:  # "could not parse ModelProto"
            raise VocabError(f"VOCAB {model_path!r} is not a SentencePiece model ({err}). "
                             f"{HOW_TO_TRAIN}") from err
        self.vocab_size: int = self.sp.get_piece_size()
        self.pad_id = self._special(PAD_PIECE, self.sp.pad_id())
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.cls_id = self._special("[CLS]")
        self.sep_id = self._special("[SEP]")
        self.mask_id = self._special("[MASK]")
        hf_ids = hf_special_ids(storage.dirname(model_path), self._lookup)  # HF configs beside
        for name, pid in hf_ids.items():
            setattr(self, f"{name}_id", pid)
        self.pad_id, self.pad_is_special = pad_fallback(self.pad_id, self.eos_id, self.bos_id)

    def _lookup(self, piece: str) -> int | None:
        """Id of `piece`, None when the model lacks it."""
        pid = self.sp.piece_to_id(piece)
        return None if pid == self.sp.unk_id() and piece != self.sp.id_to_piece(pid) else pid

    def _special(self, piece: str, fallback: int = -1) -> int:
        pid = self.sp.piece_to_id(piece)
        if pid == self.sp.unk_id() and piece != UNK_PIECE:
            return fallback
        return pid

    def require_special(self, *names: str) -> None:
        """Raise a clear error if this model lacks one of the named special pieces."""
        missing = self.missing_special(names)
        if missing:
            raise VocabError(
                f"SentencePiece model {self.path!r} has no {', '.join(missing)} piece(s), "
                "which this objective needs. Retrain it with tools/train_tokenizer.py, which "
                f"adds {PAD_PIECE}, {BOS_PIECE}, {EOS_PIECE} and {', '.join(CONTROL_PIECES)}.")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def _decode_ids(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    @functools.cached_property
    def word_start_mask(self) -> np.ndarray:
        """bool[vocab]: True where a piece starts a new word (leading '▁') or is special.

        Whole-word masking groups a word-start piece with the continuation pieces after it.
        """
        out = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                out[i] = True
            else:
                out[i] = self.sp.id_to_piece(i).startswith(WORD_START)
        return out


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_path: str) -> Tokenizer | WordPieceTokenizer | HFTokenizer:
    """The tokenizer VOCAB names (same interface for all): a SentencePiece `.model`, a BERT
    WordPiece `vocab.txt` (`*.txt`), a Hugging Face `tokenizer.json` (or GPT-2's `vocab.json`
    with merges.txt; `*.json`), or a model directory holding one of them."""
    if not isinstance(model_path, str) or not model_path:
        raise VocabError(f"VOCAB is {model_path!r}: name a tokenizer file or a model directory. "
                         f"{HOW_TO_TRAIN}")
    if storage.isdir(model_path):
        model_path = find_tokenizer_file(model_path)
    if model_path.endswith(".txt"):
        return WordPieceTokenizer(model_path)
    if model_path.endswith(".json"):
        return HFTokenizer(model_path)
    return Tokenizer(model_path)


def train_sentencepiece(sentences, output_prefix: str, vocab_size: int, *,
                        model_type: str = "unigram", character_coverage: float = 1.0,
                        input_sentence_size: int = 2_000_000) -> Tokenizer:
    """Trains a SentencePiece model with this project's special-piece layout.

    Args:
      sentences: an iterable of training strings (documents or lines).
      output_prefix: writes `PREFIX.model` and `PREFIX.vocab`.
      vocab_size: total pieces, specials included.
    """
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        pad_id=0, pad_piece=PAD_PIECE,
        unk_id=1, unk_piece=UNK_PIECE,
        bos_id=2, bos_piece=BOS_PIECE,
        eos_id=3, eos_piece=EOS_PIECE,
        control_symbols=list(CONTROL_PIECES),
        max_sentence_length=1 << 16,
        train_extremely_large_corpus=False,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return Tokenizer(output_prefix + ".model")
