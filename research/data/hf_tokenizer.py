"""Hugging Face tokenizers (`tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt`) behind the
interface of `research.data.tokenizer`, and the special ids of a Hugging Face tokenizer
directory.

`tokenizer.json` is loaded with the `tokenizers` library (`Tokenizer.from_str`, the file read
through `research.storage`, so gs:// works): byte-level BPE (GPT-2, Llama 3, Qwen), SentencePiece-
style BPE/Unigram exports (Llama 2, Mistral, Gemma), WordPiece (BERT). A directory holding only
GPT-2's legacy `vocab.json` + `merges.txt` is loaded as GPT-2's byte-level BPE.

`encode` never adds BOS/EOS (the objectives add them) and, as with the SentencePiece and
WordPiece tokenizers, never produces a special id from text: "<|endoftext|>" in a corpus is
encoded as ordinary pieces (Hugging Face's tokenizers map it to the special id; for text
without special strings the ids are identical).

Special ids (`hf_special_ids`), per name (bos, eos, pad, unk, cls, sep, mask), the first that
gives one, all read from the tokenizer file's directory:
  1. `tokenizer_config.json` `<name>_token` (a string or an AddedToken dict; null = unset),
  2. `special_tokens_map.json` `<name>_token`,
  3. `generation_config.json`, then `config.json`, `<name>_token_id` (bos, eos, pad; a list of
     eos ids gives its first),
  4. when the directory has none of those files (a bare tokenizer.json), a well-known added
     special token (`<s>`, `</s>`, `<|endoftext|>`, `<pad>`, `[PAD]`, `<unk>`, ...;
     `_WELL_KNOWN`).
A missing pad is not an error (`pad_fallback`): pad = eos, else bos, else id 0 (then id 0
stays ordinary text in `decode`). Padding is always masked by segment ids / input masks, so
the pad id only fills unused positions. `add_bos_token` says whether Hugging Face starts an
encoded prompt with BOS (generation that matches `transformers` prepends BOS only then).
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any, Callable

import numpy as np
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers

from research import storage
from research.data.tokenizer_base import SpecialPieces, VocabError, check_vocab_path

TOKENIZER_JSON = "tokenizer.json"
BPE_VOCAB_JSON, BPE_MERGES = "vocab.json", "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ID_CONFIGS = ("generation_config.json", "config.json")
SPECIAL_NAMES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
_WELL_KNOWN = {
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "mask": ("[MASK]", "<mask>"),
}
WHERE_FROM = ("A Hugging Face VOCAB is a tokenizer.json (or the model directory holding it), "
              "e.g. the directory transformers' save_pretrained wrote.")
log = logging.getLogger(__name__)


def _read_json(path: str) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when there is no such file or it is not an object."""
    if not storage.exists(path):
        return None
    try:
        value = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        log.warning("ignoring %s: not JSON (%s)", path, err)
        return None
    return value if isinstance(value, dict) else None


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def hf_special_ids(directory: str, token_to_id: Callable[[str], int | None],
                   added_special: frozenset[str] = frozenset()) -> dict[str, int]:
    """Special ids (name -> id; names in SPECIAL_NAMES, absent when unknown) of the Hugging Face
    tokenizer files in `directory` (see the module docstring for the order of sources).

    token_to_id: the vocabulary's lookup (None for a token it lacks).
    added_special: the tokenizer's added special tokens (for the well-known-name fallback).
    """
    token_configs = [c for c in (_read_json(storage.join(directory, TOKENIZER_CONFIG)),
                                 _read_json(storage.join(directory, SPECIAL_TOKENS_MAP))) if c]
    id_configs = [c for c in (_read_json(storage.join(directory, n)) for n in ID_CONFIGS) if c]
    out: dict[str, int] = {}
    for name in SPECIAL_NAMES:
        found = None
        for config in token_configs:
            token = _token_content(config.get(f"{name}_token"))
            if token is None:
                continue
            found = token_to_id(token)
            if found is None:
                log.warning("%s: %s_token %r is not in the vocabulary; ignored.", directory,
                            name, token)
                continue
            break
        if found is None and name in ("bos", "eos", "pad"):
            for config in id_configs:
                value = config.get(f"{name}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if isinstance(value, int) and value >= 0:
                    found = value
                    break
        if found is None and not token_configs and not id_configs:
            found = next((token_to_id(t) for t in _WELL_KNOWN[name] if t in added_special), None)
        if found is not None:
            out[name] = int(found)
    return out


def pad_fallback(pad_id: int, eos_id: int, bos_id: int) -> tuple[int, bool]:
    """(pad id, whether it is a special id) for a vocabulary whose pad is `pad_id` (-1: none):
    its own pad, else eos, else bos, else 0 (an ordinary piece, kept in decoded text)."""
    for candidate in (pad_id, eos_id, bos_id):
        if candidate >= 0:
            return candidate, True
    return 0, False


def gpt2_bpe_tokenizer(vocab_json: str, merges_txt: str) -> RustTokenizer:
    """GPT-2's byte-level BPE from the legacy `vocab.json` (text of {piece: id}) and
    `merges.txt` (text: an optional `#version` line, then "a b" per merge), as transformers'
    GPT2 converter builds it."""
    vocab = json.loads(vocab_json)
    merges = [tuple(line.split(" ")) for line in merges_txt.splitlines()
              if line and not line.startswith("#version")]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class HFTokenizer(SpecialPieces):
    """A Hugging Face `tokenizer.json` (or a `vocab.json` with `merges.txt` beside it), local or
    a URL, with the special ids of the tokenizer configs beside it.

    Args:
      path: the tokenizer.json (or vocab.json) file.
    """

    def __init__(self, path: str):
        check_vocab_path(path, WHERE_FROM)
        self.path = path
        directory = storage.dirname(path)
        try:
            if storage.basename(path) == BPE_VOCAB_JSON:
                merges = storage.join(directory, BPE_MERGES)
                check_vocab_path(merges, f"{path} is GPT-2's vocab.json; its {BPE_MERGES} must "
                                 "sit beside it.")
                self._tok = gpt2_bpe_tokenizer(storage.read_text(path), storage.read_text(merges))
            else:
                self._tok = RustTokenizer.from_str(storage.read_text(path))
        except (VocabError, FileNotFoundError):
            raise
        except Exception as err:  # noqa: BLE001 - the Rust parser raises a plain Exception
            raise VocabError(f"VOCAB {path!r} is not a Hugging Face tokenizer ({err}). "
                             f"{WHERE_FROM}") from err
        self._tok.encode_special_tokens = True  # "<|endoftext|>" in text stays text
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(self._tok.get_vocab_size(with_added_tokens=True),
                                   max(vocab.values(), default=-1) + 1)
        added = frozenset(t.content for t in self._tok.get_added_tokens_decoder().values()
                          if t.special)
        ids = hf_special_ids(directory, self._tok.token_to_id, added)
        self.bos_id, self.eos_id = ids.get("bos", -1), ids.get("eos", -1)
        self.unk_id = ids.get("unk", -1)
        self.cls_id, self.sep_id = ids.get("cls", -1), ids.get("sep", -1)
        self.mask_id = ids.get("mask", -1)
        self.pad_id, self.pad_is_special = pad_fallback(ids.get("pad", -1), self.eos_id,
                                                        self.bos_id)
        self.add_bos_token: bool = self._adds_bos(directory)

    def _adds_bos(self, directory: str) -> bool:
        """Whether Hugging Face starts an encoded prompt with BOS: tokenizer_config.json's
        `add_bos_token`, else whether tokenizer.json's post-processor adds it (Llama: yes,
        GPT-2 / Qwen: no)."""
        config = _read_json(storage.join(directory, TOKENIZER_CONFIG)) or {}
        if isinstance(config.get("add_bos_token"), bool):
            return bool(config["add_bos_token"]) and self.bos_id >= 0
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return self.bos_id >= 0 and bool(ids) and ids[0] == self.bos_id

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (tokenize workers): the Rust tokenizer's pickle drops
        encode_special_tokens, so it is set again."""
        self.__dict__.update(state)
        self._tok.encode_special_tokens = True

    def require_special(self, *names: str) -> None:
        """Raise a clear error if this tokenizer lacks one of the named special tokens."""
        missing = self.missing_special(names)
        if missing:
            raise VocabError(
                f"tokenizer {self.path!r} has no {', '.join(missing)} token(s), which this "
                f"objective needs; name them in the {TOKENIZER_CONFIG} beside it (e.g. "
                f'"{missing[0]}_token": "<s>").')

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_ids(self, ids: list[int]) -> str:
        """Text of `ids`; the tokenizer's other special tokens ([UNK], chat markers) are
        dropped too, as transformers' `decode(ids, skip_special_tokens=True)` and the WordPiece
        tokenizer do."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def _word_marker(self) -> tuple[str, bool]:
        """(marker, marks_start): the piece prefix that starts a word ("Ġ" byte-level, "▁"
        SentencePiece-style) or continues one ("##" WordPiece); ("", True) when unknown."""
        spec = json.loads(self._tok.to_str())
        model = spec.get("model") or {}
        if model.get("type") == "WordPiece":
            return model.get("continuing_subword_prefix") or "##", False
        text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
        if "ByteLevel" in text:
            return "\u0120", True
        if "Metaspace" in text or "\u2581" in text or "\\u2581" in text:
            return "\u2581", True
        return "", True

    @functools.cached_property
    def word_start_mask(self) -> np.ndarray:
        """bool[vocab]: True where a piece starts a word (or is an added token); every piece
        when the tokenizer has no word marker.

        Whole-word masking groups a word-start piece with the continuation pieces after it.
        """
        marker, marks_start = self._word_marker()
        out = np.ones(self.vocab_size, dtype=bool)
        if not marker:
            return out
        added = set(self._tok.get_added_tokens_decoder())
        for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
            out[i] = i in added or piece.startswith(marker) == marks_start
        return out
