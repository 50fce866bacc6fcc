"""Stop sequences: a row's generation ends once its decoded continuation contains one of the
stop strings, and the text shown is cut before it.

The continuation is the text the new tokens add to the decoded prompt:
decode(prompt + new)[len(decode(prompt)):] when that is a prefix (it is for byte-level BPE,
SentencePiece and WordPiece decoding alike), else decode(new). Decoding the prompt with the new
tokens keeps the word boundary right (SentencePiece drops a leading space when decoding a
piece alone).
"""

from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[list[int]], str]


def continuation(decode: Decode, prompt: Sequence[int], new: Sequence[int]) -> str:
    """The text that the tokens `new` add after `prompt`."""
    full, head = decode(list(prompt) + list(new)), decode(list(prompt))
    return full[len(head):] if full.startswith(head) else decode(list(new))


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index in `text` of the earliest occurrence of any stop string, -1 if none occurs."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else -1


def truncate(text: str, stops: Sequence[str]) -> str:
    """`text` cut before its first stop string (unchanged when none occurs)."""
    at = find_stop(text, stops)
    return text if at < 0 else text[:at]


def stop_length(decode: Decode, prompt: Sequence[int], new: Sequence[int],
                stops: Sequence[str], start: int = 0) -> int:
    """The fewest of the tokens `new` whose continuation contains a stop string (checking
    lengths from `start + 1`: the first `start` tokens are known to hold none), or -1."""
    if find_stop(continuation(decode, prompt, new), stops) < 0:
        return -1
    for length in range(start + 1, len(new) + 1):
        if find_stop(continuation(decode, prompt, new[:length]), stops) >= 0:
            return length
    return len(new)
