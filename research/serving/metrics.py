"""Prometheus metrics of one server: its own CollectorRegistry (so two apps in one process,
as in the tests, never share counters), the engine's observer, and an ASGI middleware that
counts requests by endpoint and status.

Metric names (GET /metrics, Prometheus text format):
  serve_requests_total{endpoint, status}     HTTP requests answered
  serve_prompt_tokens_total                   prompt tokens of finished completions
  serve_generated_tokens_total                tokens generated (of finished completions)
  serve_completions_total{finish_reason}      finished completions (stop, length, cancelled)
  serve_active_slots / serve_slots            KV-cache slots in use / in all (after a step)
  serve_queued_requests                       requests waiting for a slot (at the scrape)
  serve_batch_occupancy                       histogram of the active slots of each decode step
  serve_decode_steps_total, serve_decode_step_seconds   decode steps and their duration
  serve_time_to_first_token_seconds           histogram: submit -> first token
  serve_request_seconds                       histogram: submit -> finish (engine side)
  serve_http_request_seconds{endpoint}        histogram: HTTP request -> response end
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def occupancy_buckets(capacity: int) -> tuple[float, ...]:
    """Histogram bounds for active-slot counts: 0, powers of two below capacity, capacity."""
    bounds, b = {0, capacity}, 1
    while b < capacity:
        bounds.add(b)
        b *= 2
    return tuple(float(x) for x in sorted(bounds))


class ServingMetrics:
    """The server's metrics; also the engine's `EngineObserver` (its methods are called from
    the engine thread; prometheus_client metrics are thread-safe)."""

    def __init__(self, capacity: int, endpoints: tuple[str, ...]):
        self.registry = CollectorRegistry()
        self.endpoints = frozenset(endpoints)
        r = self.registry
        self.requests = Counter("serve_requests", "HTTP requests answered, by endpoint and "
                                "status code", ("endpoint", "status"), registry=r)
        self.prompt_tokens = Counter("serve_prompt_tokens", "prompt tokens of finished "
                                     "completions", registry=r)
        self.generated_tokens = Counter("serve_generated_tokens", "tokens generated (counted "
                                        "when a completion finishes)", registry=r)
        self.completions = Counter("serve_completions", "finished completions by finish "
                                   "reason", ("finish_reason",), registry=r)
        self.active = Gauge("serve_active_slots", "KV-cache slots in use after the last "
                            "decode step", registry=r)
        self.queued = Gauge("serve_queued_requests", "requests waiting for a slot (at the "
                            "last scrape)", registry=r)
        self.slots = Gauge("serve_slots", "KV-cache slots (max_batch)", registry=r)
        self.slots.set(capacity)
        self.occupancy = Histogram("serve_batch_occupancy", "active slots of each decode step",
                                   buckets=occupancy_buckets(capacity), registry=r)
        self.steps = Counter("serve_decode_steps", "decode steps run", registry=r)
        self.step_seconds = Histogram("serve_decode_step_seconds", "seconds per decode step",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("serve_time_to_first_token_seconds", "seconds from submission "
                              "to the first generated token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.request_seconds = Histogram("serve_request_seconds", "seconds from submission "
                                         "to the last token", buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.http_seconds = Histogram("serve_http_request_seconds", "seconds from an HTTP "
                                      "request to the end of its response", ("endpoint",),
                                      buckets=LATENCY_BUCKETS, registry=r)

    # EngineObserver -------------------------------------------------------------------------

    def on_step(self, active: int, capacity: int, new_tokens: int, seconds: float) -> None:
        self.active.set(active)
        self.slots.set(capacity)
        self.occupancy.observe(active)
        self.steps.inc()
        self.step_seconds.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                  seconds: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        self.completions.labels(finish_reason).inc()
        self.request_seconds.observe(seconds)

    # HTTP -----------------------------------------------------------------------------------

    def endpoint(self, path: str) -> str:
        """The metric label of a request path: the path of a known endpoint, else 'other'."""
        return path if path in self.endpoints else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)


ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]


class RequestMetricsMiddleware:
    """Pure ASGI middleware (streaming-safe, unlike BaseHTTPMiddleware): counts each HTTP
    request by endpoint and response status, and times it to the end of its response."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.metrics.endpoint(scope.get("path", ""))
        start, status = time.perf_counter(), [500]

        async def send_and_record(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.http_seconds.labels(endpoint).observe(time.perf_counter() - start)
