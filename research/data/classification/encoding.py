"""One classification example's texts -> token ids with special tokens, truncated to seq_len.

    style 'encoder' (BERT):  [CLS] a [SEP]          [CLS] a [SEP] b [SEP]
    style 'decoder' (GPT):   [BOS] a [EOS]          [BOS] a [SEP] b [EOS]

A pair is truncated longest-first (`truncate_lengths`); no padding is added here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from research.errors import ConfigError


class TokenizerLike(Protocol):
    """What encoding needs from a tokenizer (e.g. `research.data.tokenizer.Tokenizer`)."""
    pad_id: int
    bos_id: int
    eos_id: int
    cls_id: int
    sep_id: int

    def encode(self, text: str) -> list[int]: ...


def truncate_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths after BERT's longest-first pair truncation to `len_a + len_b <= budget`.

    Equivalent to popping one token at a time from the end of the longer sequence (the
    second one on ties) until the pair fits, computed in closed form.
    """
    if len_a + len_b <= budget:
        return len_a, len_b
    if len_a > len_b and budget - len_b >= len_b:
        return budget - len_b, len_b
    if len_b >= len_a and budget - len_a >= len_a - 1:
        return len_a, budget - len_a
    return (budget + 1) // 2, budget // 2


def special_ids(tokenizer: TokenizerLike, style: str, pair: bool) -> tuple[int, int, int]:
    """(start, separator, end) ids of `style` for a single text or a pair (`pair`).

    Raises:
      ConfigError: an unknown style, or a tokenizer without the special pieces it needs.
    """
    if style == "encoder":
        needed = {"cls_id": tokenizer.cls_id, "sep_id": tokenizer.sep_id}
        ids = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.sep_id)
    elif style == "decoder":
        needed = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
        if pair:
            needed["sep_id"] = tokenizer.sep_id
        ids = (tokenizer.bos_id, tokenizer.sep_id, tokenizer.eos_id)
    else:
        raise ConfigError(f"style={style!r} is not supported; use 'encoder' ([CLS] a [SEP] b "
                          "[SEP], BERT) or 'decoder' ([BOS] a [SEP] b [EOS], GPT).")
    missing = [k for k, v in needed.items() if v is None or v < 0]
    if missing:
        raise ConfigError(f"The tokenizer has no {', '.join(missing)} (needed by style="
                          f"{style!r}); retrain it with tools/train_tokenizer.py, which adds "
                          "[PAD], <s>, </s>, [CLS], [SEP] and [MASK].")
    return ids


def assemble(pieces: Sequence[Sequence[int]], tokenizer: TokenizerLike, seq_len: int,
             style: str) -> tuple[list[int], list[int]]:
    """(input_ids, token_type_ids) of 1 or 2 tokenised texts laid out with special tokens,
    each of length <= seq_len (see the module docstring)."""
    if len(pieces) not in (1, 2):
        raise ValueError(f"Got {len(pieces)} texts; a classification example has 1 (single "
                         "sentence) or 2 (pair).")
    pair = len(pieces) == 2
    start, sep, end = special_ids(tokenizer, style, pair)
    n_special = 3 if pair else 2
    if seq_len < n_special:
        raise ConfigError(f"seq_len={seq_len} cannot hold the {n_special} special tokens of a "
                          f"{'pair' if pair else 'single'} example; use seq_len >= "
                          f"{n_special + 1}.")
    budget = seq_len - n_special
    if not pair:
        a = list(pieces[0][:budget])
        ids = [start, *a, end]
        return ids, [0] * len(ids)
    la, lb = truncate_lengths(len(pieces[0]), len(pieces[1]), budget)
    a, b = list(pieces[0][:la]), list(pieces[1][:lb])
    ids = [start, *a, sep, *b, end]
    if style == "encoder":
        types = [0] * (la + 2) + [1] * (lb + 1)
    else:
        types = [0] * len(ids)
    return ids, types


def encode_example(texts: Sequence[str], tokenizer: TokenizerLike, seq_len: int, *,
                   style: str = "encoder") -> tuple[list[int], list[int]]:
    """Tokenises one example into (input_ids, token_type_ids), each of length <= seq_len.

    style 'encoder' (BERT): `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`; token types 0 on
    [CLS] a [SEP], 1 on b [SEP]. style 'decoder' (GPT): `[BOS] a [EOS]` or
    `[BOS] a [SEP] b [EOS]`; token types all 0. Texts are cut from their ends to fit; a
    pair is truncated longest-first (`truncate_lengths`). No padding is added.
    """
    if isinstance(texts, str):
        texts = (texts,)
    return assemble([tokenizer.encode(t) for t in texts], tokenizer, seq_len, style)

