"""The request side of the serving engine (`research.serving.engine`): sampling parameters,
bad-request errors, the token events a request streams and its handle (async iteration or a
blocking `result()`), and the metrics observer protocol."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import AsyncIterator, Callable, Protocol

from research.serving.detokenize import TextStream


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request generates. temperature 0 = greedy; top_k 0 and top_p 1 = off; `stop`:
    the text is cut before the first of these strings."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()


class RequestError(ValueError):
    """A bad request; `field` names the offending parameter ('prompt', 'max_tokens', ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ShuttingDownError(RequestError):
    """submit() after shutdown() began (field 'prompt'): the server should answer 503."""

    def __init__(self):
        super().__init__("prompt", "server is shutting down")


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """Tokens and text new since the previous event of a request; finish_reason None while it
    runs, else 'stop', 'length', 'cancelled' or 'error' (its last event)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None


class EngineObserver(Protocol):
    """Metrics hooks (called from the engine thread; keep them cheap)."""

    def on_step(self, active: int, capacity: int, new_tokens: int, seconds: float) -> None: ...

    def on_first_token(self, seconds: float) -> None: ...

    def on_finish(self, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                  seconds: float) -> None: ...


class RequestHandle:
    """One submitted request: iterate it (async, when submitted with a loop) for its events,
    or block on `result()`."""

    def __init__(self, prompt: list[int], params: SamplingParams, decode: Callable,
                 loop: asyncio.AbstractEventLoop | None):
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.params = params
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.stream = TextStream(decode, prompt, params.stop)
        self._loop = loop
        self._queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._done = threading.Event()
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ends the request (finish_reason 'cancelled') at the engine's next step; idempotent,
        no effect once it finished."""
        self._cancel.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> tuple[list[int], str, str]:
        """Blocks until the request ends: (all token ids, full text, finish_reason).
        TimeoutError if it has not ended after `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        return list(self.token_ids), self.text, self.finish_reason

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._queue is None:
            raise RuntimeError("async iteration needs submit(..., loop=the running loop)")
        while True:
            event = await self._queue.get()
            # Events that queued up meanwhile (a busy loop) go out as one.
            while event.finish_reason is None and not self._queue.empty():
                later = self._queue.get_nowait()
                event = TokenEvent(event.token_ids + later.token_ids, event.text + later.text,
                                   later.finish_reason)
            yield event
            if event.finish_reason is not None:
                return

    def _emit(self, ids: list[int], text: str, finish: str | None) -> None:
        """Records an event and delivers it (engine thread)."""
        if self._done.is_set():
            return
        self.token_ids.extend(ids)
        self.text += text
        event = TokenEvent(list(ids), text, finish)
        if finish is not None:
            self.finish_reason = finish
        if self._queue is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass
        if finish is not None:
            self._done.set()
