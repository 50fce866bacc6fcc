"""Incremental detokenization for streaming: the text a request's new tokens add, released in
deltas that never end inside a stop string's possible beginning nor inside a partial UTF-8
character, and cut before the first stop string.

The text of tokens `new` after a prompt is `research.decoding.stopping.continuation` with the
prompt's last CONTEXT tokens as the prefix (enough for SentencePiece's word boundary; decoding
the whole prompt each step would cost O(prompt) per token). Likewise generated tokens settle
every 2 * CONTEXT tokens (at a whole character): a step decodes at most 3 * CONTEXT tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

from research.decoding import stopping

CONTEXT = 16  # prompt tokens decoded with the new ones
REPLACEMENT = "\ufffd"  # what decoders put for bytes that do not (yet) form a UTF-8 character


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` may still change or turn into a stop string:
    a trailing run of U+FFFD (an incomplete UTF-8 sequence) or the longest suffix that is a
    proper prefix of a stop string."""
    hold = len(text) - len(text.rstrip(REPLACEMENT))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold


class TextStream:
    """The text of one request's generated tokens, released in safe deltas.

    `add(ids)` returns (text delta, ids taken); `stopped` is set once the text holds a stop
    string (the delta then ends the text before it). `finish()` releases what was held back.
    The deltas concatenate to the final text."""

    def __init__(self, decode: Callable[[list[int]], str], prompt: Sequence[int],
                 stops: Sequence[str]):
        self.decode = decode
        self.context = list(prompt[-CONTEXT:])
        self.head = decode(self.context)
        self.stops = tuple(s for s in stops if s)
        self.settled = ""  # the text of the ids before `pending`
        self.pending: list[int] = []  # ids decoded after `context` at each step
        self.emitted = ""
        self.stopped = False

    def text(self) -> str:
        """The continuation text of every token added so far."""
        full = self.decode(self.context + self.pending)
        tail = (full[len(self.head):] if full.startswith(self.head)
                else self.decode(self.pending))
        if len(self.pending) >= 2 * CONTEXT and not tail.endswith(REPLACEMENT):
            # Settle: later tokens are decoded after these ones' last CONTEXT ids only, so a
            # step costs O(CONTEXT), not O(tokens so far).
            self.settled += tail
            self.context = (self.context + self.pending)[-CONTEXT:]
            self.head = self.decode(self.context)
            self.pending = []
            return self.settled
        return self.settled + tail

    def _release(self, upto: str) -> str:
        """The part of `upto` after what was emitted, if `upto` extends it (else nothing: the
        decoder changed text already sent, which is kept)."""
        if not upto.startswith(self.emitted) or len(upto) <= len(self.emitted):
            return ""
        delta = upto[len(self.emitted):]
        self.emitted = upto
        return delta

    def add(self, ids: Sequence[int]) -> tuple[str, int]:
        """Adds generated token ids one by one until one completes a stop string. Returns
        (text delta, how many ids were taken): fewer than len(ids) or `stopped` set means the
        last one taken completed a stop string (the text then ends before it)."""
        if not ids:
            return "", 0
        for taken, token in enumerate(ids, 1):
            self.pending.append(int(token))
            text = self.text()
            at = stopping.find_stop(text, self.stops)
            if at >= 0:
                self.stopped = True
                return self._release(text[:at]), taken
        return self._release(text[:len(text) - held_back(text, self.stops)]), len(ids)

    def finish(self) -> str:
        """The held-back rest of the text (no stop string occurred)."""
        return self._release(self.text())
