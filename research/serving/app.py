"""The FastAPI application: OpenAI-compatible completions over the continuous-batching engine
(research.serving.engine), classification, health and Prometheus metrics.

    app = create_app(Served(name, engine=engine, tokenizer=tok))        # a causal LM
    app = create_app(Served(name, classifier=classifier))               # a classifier

Endpoints:
  POST /v1/completions   OpenAI completions; `stream: true` answers with server-sent events
  POST /v1/classify      labels and probabilities of texts (classification checkpoints)
  GET  /v1/models        the one model served (for OpenAI clients)
  GET  /health           200 {"status": "ok", ...}; 503 {"status": "draining"} after SIGTERM
  GET  /metrics          Prometheus text (research.serving.metrics)

Every error is OpenAI's JSON body {"error": {"message", "type", "param", "code"}}: a body
that does not fit the request model (malformed JSON, a wrong type, a value out of range) is
a 400 whose `param` names the field; so is a request the engine refuses (a prompt longer
than the context: `engine.validate`) or one for the other kind of model.

Seeds: the j-th of the `n` completions of each prompt samples with seed `seed + j`; without
`seed`, the request draws one at random. With the same seed a completion is the same whether
it runs alone or among other requests (the engine's guarantee).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from research.serving.engine import (Engine, RequestError, RequestHandle, SamplingParams,
                                     ShuttingDownError, TokenEvent)
from research.serving.metrics import CONTENT_TYPE, RequestMetricsMiddleware, ServingMetrics
from research.serving.schemas import (ClassifyRequest, ClassifyResponse, CompletionRequest,
                                      CompletionResponse, error_body)

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/classify", "/v1/models", "/health", "/metrics")
MAX_CLASSIFY_INPUTS = 4096
MAX_CHOICES = 1024  # prompts x n of one completions request


@dataclasses.dataclass
class Served:
    """What one server serves: a causal LM (engine + tokenizer) or a classifier."""

    name: str
    engine: Engine | None = None
    tokenizer: Any = None                     # encode(str) -> ids, bos_id (causal LM)
    classifier: Any = None                    # research.serving.classifier.Classifier
    draining: bool = False                    # set on SIGTERM (research.serve)

    @property
    def kind(self) -> str:
        return "causal_lm" if self.engine is not None else "classification"


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with `status`."""

    def __init__(self, status: int, message: str, param: str | None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_response(status: int, message: str, param: str | None,
                    kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status_code=status)


def _describe_validation(errors: Sequence[dict]) -> tuple[str, str | None]:
    """(message, param) of FastAPI's validation errors: the first field at fault, and the
    distinct messages about it (a union type gives one per alternative)."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return f"The request body is not valid JSON ({reason}).", None
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = str(loc[0]) if loc else None
    if param is None:
        return f"The request body must be a JSON object: {first.get('msg')}.", None
    same = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
    messages = list(dict.fromkeys(e.get("msg", "invalid") for e in same))
    message = f"{param}: {' or '.join(messages)}"
    if first.get("type") != "missing" and "input" in first:
        message += f" (got {json.dumps(first['input'], default=str)[:80]})"
    return message + ".", param


def _install_error_handlers(app: FastAPI) -> None:
    """Every error answers an OpenAI-style JSON body {"error": {message, type, param}}."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _describe_validation(exc.errors())
        return _error_response(400, message, param)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, str(exc.detail), None, kind)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", None,
                               "server_error")


async def _complete(served: Served, body: CompletionRequest, request: Request):
    """POST /v1/completions: the engine's answers to every choice of every prompt (a JSON
    response, or server-sent events with `stream`)."""
    if served.engine is None:
        raise ApiError(400, f"{served.name} is a classification model: POST /v1/classify "
                       "with {\"input\": ...} instead of /v1/completions.", "prompt")
    if served.draining:
        raise ApiError(503, "the server is shutting down.", None, "server_error")
    unsupported = body.check_unsupported()
    if unsupported:
        raise ApiError(400, unsupported[1], unsupported[0])
    jobs = _completion_jobs(served, body)
    loop = asyncio.get_running_loop()
    handles: list[RequestHandle] = []
    try:
        for ids, params in jobs:
            handles.append(served.engine.submit(ids, params, loop=loop))
    except ShuttingDownError as err:
        _cancel(handles)
        raise ApiError(503, "the server is shutting down.", None, "server_error") from err
    except RequestError as err:
        _cancel(handles)
        raise ApiError(400, str(err), err.field) from err
    prompt_tokens = sum(len(ids) for ids, _ in jobs[::body.n])
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": served.name}
    if body.stream:
        options = (body.model_extra or {}).get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        return StreamingResponse(_stream(handles, head, prompt_tokens, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    results = await _collect(handles, request)
    if results is None:  # the client went away; its slots are freed
        return Response(status_code=499)
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, _, reason) in enumerate(results)]
    completion_tokens = sum(count for _, count, _ in results)
    return {**head, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _classify(served: Served, body: ClassifyRequest):
    """POST /v1/classify: label (or value) and probabilities of each input."""
    classifier = served.classifier
    if classifier is None:
        raise ApiError(400, f"{served.name} is a causal language model: POST "
                       "/v1/completions with {\"prompt\": ...} instead of /v1/classify.",
                       "input")
    examples = _classify_examples(body.input, classifier.facts.pair)
    scores = await asyncio.wrap_future(classifier.submit(examples))
    data = []
    for i, row in enumerate(scores):
        if classifier.regression:
            data.append({"index": i, "value": float(row[0])})
            continue
        names = classifier.facts.label_names
        probs = {names[c]: float(p) for c, p in enumerate(row)}
        data.append({"index": i, "label": names[int(row.argmax())], "probabilities": probs})
    return {"object": "list", "data": data, "model": served.name}


def make_metrics(capacity: int) -> ServingMetrics:
    """The metrics of one app; pass it to the Engine as its observer and to `create_app`."""
    return ServingMetrics(capacity, ENDPOINTS)


def create_app(served: Served, metrics: ServingMetrics | None = None) -> FastAPI:
    """The ASGI app serving `served` (`metrics`: the engine's observer, from `make_metrics`);
    its lifespan's end drains the engine (finishes the requests in flight, refuses new
    ones)."""
    if metrics is None:
        capacity = served.engine.capacity if served.engine is not None else (
            served.classifier.max_batch if served.classifier is not None else 1)
        metrics = make_metrics(capacity)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        served.draining = True
        if served.engine is not None:
            log.info("draining: finishing the requests in flight")
            await asyncio.to_thread(served.engine.shutdown, True)

    app = FastAPI(title="research.serve", lifespan=lifespan)
    app.state.served, app.state.metrics = served, metrics
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        body = {"status": "draining" if served.draining else "ok", "model": served.name,
                "kind": served.kind}
        if served.engine is not None:
            body.update(served.engine.stats())
        return JSONResponse(body, status_code=503 if served.draining else 200)

    @app.get("/metrics")
    async def prometheus():
        if served.engine is not None:
            stats = served.engine.stats()
            metrics.active.set(stats.get("active", 0))
            metrics.queued.set(stats.get("queued", 0))
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "research"}]}

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request):
        return await _complete(served, body, request)

    @app.post("/v1/classify", response_model=ClassifyResponse,
              response_model_exclude_none=True)
    async def classify(body: ClassifyRequest):
        return await _classify(served, body)

    return app


def _completion_jobs(served: Served, body: CompletionRequest
                     ) -> list[tuple[list[int], SamplingParams]]:
    """(prompt ids, sampling parameters) of each choice, in choice order (prompt-major, then
    the n samples); every one validated by the engine before any is submitted."""
    prompts = body.prompts()
    if not prompts:
        raise ApiError(400, "prompt: give a string or a non-empty list of strings.", "prompt")
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(400, f"prompt: {len(prompts)} prompts x n={body.n} is more than "
                       f"{MAX_CHOICES} completions in one request.", "prompt")
    tok = served.tokenizer
    bos = [tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []
    seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
    stops = body.stops()
    if any(not s for s in stops):
        raise ApiError(400, "stop: stop strings must be non-empty.", "stop")
    jobs = []
    for text in prompts:
        ids = bos + list(tok.encode(text))
        if not ids:
            raise ApiError(400, "prompt: a prompt must hold at least one token.", "prompt")
        for j in range(body.n):
            params = SamplingParams(max_tokens=body.max_tokens,
                                    temperature=float(body.temperature), top_p=float(body.top_p),
                                    top_k=body.top_k, seed=seed + j, stop=stops)
            try:
                served.engine.validate(ids, params)
            except RequestError as err:
                raise ApiError(400, str(err), err.field) from err
            jobs.append((ids, params))
    return jobs


def _cancel(handles: Sequence[RequestHandle]) -> None:
    for handle in handles:
        handle.cancel()


async def _drain(handle: RequestHandle) -> tuple[str, int, str]:
    """(text, completion tokens, finish reason) of one handle, consumed to its end."""
    parts, count, reason = [], 0, "length"
    async for event in handle:
        parts.append(event.text)
        count += len(event.token_ids)
        if event.finish_reason is not None:
            reason = event.finish_reason
    return "".join(parts), count, reason


async def _collect(handles: Sequence[RequestHandle], request: Request
                   ) -> list[tuple[str, int, str]] | None:
    """Every handle's result, or None (all cancelled) if the client disconnects first."""
    gathered = asyncio.gather(*(_drain(h) for h in handles))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({gathered, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gathered.done():
            return gathered.result()
        log.info("client disconnected: cancelling %d request(s)", len(handles))
        return None
    finally:
        gone.cancel()
        if not gathered.done():
            _cancel(handles)
            gathered.cancel()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read, so the next ASGI message is the
    disconnect), as Starlette's StreamingResponse listens for it."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(handles: Sequence[RequestHandle], head: dict, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text delta of any choice, a last chunk per choice
    with its finish_reason, (with include_usage) a usage chunk, then `data: [DONE]`. If the
    client disconnects, Starlette cancels this generator and `finally` frees the slots."""
    completion_tokens = 0
    try:
        async for index, event in _events(handles):
            completion_tokens += len(event.token_ids)
            if event.text or event.finish_reason is not None:
                choice = {"index": index, "text": event.text,
                          "finish_reason": event.finish_reason, "logprobs": None}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        _cancel(handles)


async def _events(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) of every handle as they come (one handle: directly; several: a
    task per handle feeding one queue). An engine failure is raised once all have ended."""
    if len(handles) == 1:
        async for event in handles[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for event in handle:
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    running = len(handles)
    try:
        while running:
            index, event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield index, event
        for task in tasks:
            task.result()  # re-raise an engine failure
    finally:
        for task in tasks:
            task.cancel()


def _classify_examples(value: Any, pair: bool | None) -> list[tuple[str, ...]]:
    """The examples (1 or 2 texts each) of /v1/classify's `input` for a single-text run
    (pair False), a sentence-pair run (True) or one whose layout is unknown (None)."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise ApiError(400, "input: give a string or a non-empty list.", "input")
    if len(value) > MAX_CLASSIFY_INPUTS:
        raise ApiError(400, f"input: at most {MAX_CLASSIFY_INPUTS} inputs per request.", "input")
    if pair and all(isinstance(v, str) for v in value):
        if len(value) != 2:
            raise ApiError(400, "input: this model classifies sentence pairs: send [a, b] or "
                           "[[a, b], ...].", "input")
        return [tuple(value)]
    examples = [tuple(v) if isinstance(v, list) else (v,) for v in value]
    allowed = {True: (2,), False: (1,), None: (1, 2)}[pair]
    for i, ex in enumerate(examples):
        if len(ex) not in allowed:
            raise ApiError(400, f"input[{i}] has {len(ex)} texts; this model takes "
                           f"{' or '.join(map(str, allowed))} per input.", "input")
    return examples
