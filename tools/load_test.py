#!/usr/bin/env python
"""Load test for an OpenAI-compatible POST /v1/completions server (`python -m research.serve`),
or, with --peer, for the common recipe on the same weights (tools/serve_peer.py: a
transformers pipeline behind a Flask route).

    python tools/load_test.py --url=http://127.0.0.1:8000 --concurrency=16 --requests=32 \\
        --max_tokens=64
    python tools/load_test.py --peer --hf_dir=hf/gpt_mini --concurrency=16 --requests=32 \\
        --max_tokens=64

C workers (asyncio, one HTTP/1.1 keep-alive connection each: tools/http11.py) send N requests
in all, request i with prompt i mod len(prompts) and seed SEED + i, after --warmup requests sent
one by one and not counted.
Prints a table and, as its last line, one JSON object: requests_per_sec, tokens_per_sec,
ttft_p50_s / p90 / p99, latency_p50_s / p90 / p99, concurrency, requests, ok, errors,
completion_tokens, wall_s, stream, peer, max_tokens.

Measures:
  latency      send -> the complete answer (streams: the end of the stream).
  TTFT         send -> the first server-sent event whose text is non-empty (--stream, the
               default); without streaming (--no-stream, and always for --peer: the peer does
               not stream) TTFT is the full latency.
  tokens       generated tokens: `usage.completion_tokens` of the response. Streams carry
               usage only where the server sends it (the request asks for it with OpenAI's
               stream_options.include_usage); otherwise a stream that ended with
               finish_reason 'length' counts max_tokens, and one that ended earlier (EOS, stop)
               counts its chunks with text, a lower bound when a chunk holds several tokens.
  rates        over the wall time from the first request sent to the last one answered:
               requests_per_sec = successful requests / wall, tokens_per_sec = their tokens /
               wall.
A request that fails (connection error, HTTP status other than 200, a malformed answer, past
--timeout) counts as an error; the run goes on. --timeout bounds the whole run (warm-up
included); requests still open then are cancelled and count as errors. The exit code is 0 when
at least one request succeeded, 1 when all failed, 2 for bad arguments (one `error:` line).

--peer starts tools/serve_peer.py --hf_dir=DIR on a free localhost port (waiting at most
--peer_start_timeout seconds for it), runs the same load against it without streaming, and
stops it afterwards (SIGTERM, then SIGKILL after 10 s), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

try:
    import research  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import http11  # noqa: E402  (tools/http11.py, beside this script)
from research import cli  # noqa: E402
from research.errors import ConfigError, RunStoppedError  # noqa: E402

DEFAULT_PROMPT = "It is a truth universally acknowledged, that"
PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_peer.py")
PEER_READY_PREFIX = "serve_peer: listening on "  # tools/serve_peer.py's READY_PREFIX
PERCENTILES = (50, 90, 99)
COMPLETIONS = "/v1/completions"
BODY_END_TIMEOUT = 5.0  # seconds to wait for a stream's end after its data: [DONE]


@dataclasses.dataclass
class Result:
    """One request's outcome: times in seconds from its send; tokens generated."""

    ok: bool
    latency_s: float = 0.0
    ttft_s: float = 0.0
    tokens: int = 0
    error: str = ""


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (numpy's default linear interpolation); None for no values."""
    import numpy as np
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else None


def summarize(results: Sequence[Result], wall_s: float, args: argparse.Namespace) -> dict:
    """The JSON summary of a run (see the module docstring)."""
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    wall = max(wall_s, 1e-9)
    out: dict[str, Any] = {
        "requests_per_sec": len(good) / wall, "tokens_per_sec": tokens / wall}
    for name, values in (("ttft", [r.ttft_s for r in good]),
                         ("latency", [r.latency_s for r in good])):
        for q in PERCENTILES:
            out[f"{name}_p{q}_s"] = percentile(values, q)
    out.update(concurrency=args.concurrency, requests=len(results), ok=len(good),
               errors=len(results) - len(good), completion_tokens=tokens, wall_s=wall_s,
               max_tokens=args.max_tokens, stream=args.stream, peer=args.peer)
    return out


def table(summary: dict) -> str:
    """The human-readable table printed before the JSON line."""
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"
    rows = [("requests", f"{summary['ok']} ok / {summary['requests']} "
                         f"({summary['errors']} errors)"),
            ("wall time (s)", fmt(summary["wall_s"])),
            ("requests/s", fmt(summary["requests_per_sec"])),
            ("generated tokens/s", f"{summary['tokens_per_sec']:.1f}"),
            ("generated tokens", str(summary["completion_tokens"]))]
    for name in ("ttft", "latency"):
        label = "TTFT (s)" if name == "ttft" else "latency (s)"
        rows.append((f"{label} p50/p90/p99", " / ".join(
            fmt(summary[f"{name}_p{q}_s"]) for q in PERCENTILES)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def request_body(args: argparse.Namespace, prompt: str, seed: int) -> dict:
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "seed": seed, "stream": args.stream}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _completion_tokens(answer: Any) -> int:
    """usage.completion_tokens of a response body; ValueError if missing."""
    try:
        tokens = answer["usage"]["completion_tokens"]
    except (KeyError, TypeError):
        raise ValueError("the response has no usage.completion_tokens") from None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"usage.completion_tokens is {tokens!r}")
    return tokens


async def _one_plain(conn: http11.Connection, body: dict) -> Result:
    start = time.perf_counter()
    async with conn.post(COMPLETIONS, body) as resp:
        answer = await resp.read()
    latency = time.perf_counter() - start
    if resp.status != 200:
        return Result(False, error=f"HTTP {resp.status}: "
                                   f"{answer.decode('utf-8', 'replace')[:200]}")
    tokens = _completion_tokens(json.loads(answer))
    return Result(True, latency_s=latency, ttft_s=latency, tokens=tokens)


async def _one_stream(conn: http11.Connection, body: dict) -> Result:
    """One streamed request: parses `data: {...}` events up to `data: [DONE]`."""
    start = time.perf_counter()
    ttft, chunks_with_text, usage_tokens, finish, done = None, 0, None, None, False
    async with conn.post(COMPLETIONS, body) as resp:
        if resp.status != 200:
            text = (await resp.read()).decode("utf-8", "replace")
            return Result(False, error=f"HTTP {resp.status}: {text[:200]}")
        async for line in resp.lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done, latency = True, time.perf_counter() - start
                break
            event = json.loads(data)
            if isinstance(event, dict) and event.get("error"):
                return Result(False, error=f"stream error: {str(event['error'])[:200]}")
            if isinstance(event, dict) and event.get("usage"):
                usage_tokens = _completion_tokens(event)
            for choice in (event.get("choices") or []) if isinstance(event, dict) else []:
                if choice.get("text"):
                    chunks_with_text += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
                finish = choice.get("finish_reason") or finish
        if done:  # the body ends right after [DONE]; read to its end to reuse the connection
            try:
                await asyncio.wait_for(resp.read(), BODY_END_TIMEOUT)
            except asyncio.TimeoutError:  # a server that keeps the stream open: it is closed
                pass
    if not done:
        return Result(False, error="the stream ended without data: [DONE]")
    if usage_tokens is not None:
        tokens = usage_tokens
    elif finish == "length":
        tokens = body["max_tokens"]
    else:
        tokens = chunks_with_text
    return Result(True, latency_s=latency, ttft_s=latency if ttft is None else ttft,
                  tokens=tokens)


async def _one(conn: http11.Connection, body: dict) -> Result:
    try:
        if body["stream"]:
            return await _one_stream(conn, body)
        return await _one_plain(conn, body)
    except (http11.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
        return Result(False, error=f"{type(e).__name__}: {e}")


async def run_load(args: argparse.Namespace, base_url: str, prompts: list[str],
                   deadline: float) -> tuple[list[Result], float]:
    """Warm-up, then N requests over C workers, one connection each; (results in request
    order, wall seconds)."""
    conns = [http11.Connection(base_url) for _ in range(args.concurrency)]
    try:
        for i in range(args.warmup):
            body = request_body(args, prompts[i % len(prompts)], args.seed + args.requests + i)
            await asyncio.wait_for(_one(conns[0], body), max(deadline - time.monotonic(), 0.01))
        results: list[Result | None] = [None] * args.requests
        queue = iter(range(args.requests))

        async def worker(conn: http11.Connection) -> None:
            for i in queue:
                results[i] = await _one(conn, request_body(
                    args, prompts[i % len(prompts)], args.seed + i))

        start = time.perf_counter()
        workers = [asyncio.ensure_future(worker(conn)) for conn in conns]
        _, pending = await asyncio.wait(workers, timeout=max(deadline - time.monotonic(), 0))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        ends = time.perf_counter()
    finally:
        await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
    filled = [r if r is not None else Result(False, error=f"not answered within --timeout="
                                                           f"{args.timeout:g}s")
              for r in results]
    return filled, ends - start


def run_all(args: argparse.Namespace, base_url: str, prompts: list[str],
            deadline: float) -> tuple[list[Result], float]:
    """`run_load` with the warm-up bounded too: a warm-up past the deadline fails every
    request."""
    try:
        return asyncio.run(run_load(args, base_url, prompts, deadline))
    except asyncio.TimeoutError:
        return [Result(False, error=f"the warm-up ran past --timeout={args.timeout:g}s")
                ] * args.requests, 0.0


class Peer:
    """tools/serve_peer.py as a subprocess on a free localhost port (a context manager that
    always stops it)."""

    def __init__(self, hf_dir: str, start_timeout: float):
        self.hf_dir, self.start_timeout = hf_dir, start_timeout
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def __enter__(self) -> "Peer":
        cmd = [sys.executable, PEER_SCRIPT, f"--hf_dir={self.hf_dir}", "--port=0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        try:
            self.url = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> str:
        """Reads the peer's ready line (in a thread, so the wait is bounded); keeps draining
        its stdout afterwards."""
        found: list[str] = []
        ready = threading.Event()
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout

        def read() -> None:
            for line in stdout:
                if not found and line.startswith(PEER_READY_PREFIX):
                    found.append(line[len(PEER_READY_PREFIX):].strip())
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(self.start_timeout)
        if found:
            return found[0]
        if self.proc.poll() is not None:
            raise RunStoppedError(f"the peer (tools/serve_peer.py --hf_dir={self.hf_dir}) "
                                  f"exited with code {self.proc.returncode} before serving; "
                                  "its error is above.")
        raise RunStoppedError(f"the peer did not start within --peer_start_timeout="
                              f"{self.start_timeout:g}s.")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts_file is None:
        return [args.prompt if args.prompt is not None else DEFAULT_PROMPT]
    try:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--prompts_file={args.prompts_file!r} cannot be read: {e}") from None
    if not prompts:
        raise ConfigError(f"--prompts_file={args.prompts_file!r} has no non-empty line; put "
                          "one prompt per line.")
    return prompts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="load_test.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=1, help="concurrent clients (default 1)")
    parser.add_argument("--requests", type=int, default=16, help="requests in all, timed (default 16)")
    parser.add_argument("--max_tokens", type=int, default=64,
                        help="tokens to generate per request (default 64)")
    parser.add_argument("--prompt", help=f"the prompt of every request (default "
                                         f"{DEFAULT_PROMPT!r})")
    parser.add_argument("--prompts_file", help="one prompt per line, used in turn")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="stream (SSE) and measure TTFT (default); --no-stream: plain "
                             "requests, TTFT = latency")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--seed", type=int, default=0, help="request i gets seed SEED + i")
    parser.add_argument("--warmup", type=int, default=1,
                        help="requests sent one by one before timing (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds for the whole run, warm-up and --peer start included "
                             "(default 600)")
    parser.add_argument("--peer", action="store_true",
                        help="run the load against tools/serve_peer.py on --hf_dir instead")
    parser.add_argument("--hf_dir", help="--peer: the HF checkpoint directory to serve")
    parser.add_argument("--peer_start_timeout", type=float, default=180.0,
                        help="--peer: seconds to wait for the peer to load (default 180)")
    args = parser.parse_args(argv)
    for name in ("concurrency", "requests", "max_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}={getattr(args, name)} must be >= 1.")
    for name in ("timeout", "peer_start_timeout"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name}={getattr(args, name)} must be > 0 seconds.")
    if args.warmup < 0:
        raise ConfigError(f"--warmup={args.warmup} must be >= 0.")
    if not args.temperature >= 0:
        raise ConfigError(f"--temperature={args.temperature} must be >= 0 (0: greedy).")
    if args.prompt is not None and args.prompts_file is not None:
        raise ConfigError("give --prompt or --prompts_file, not both.")
    if args.prompt is not None and not args.prompt:
        raise ConfigError("--prompt must not be empty.")
    if args.peer:
        if args.url is not None:
            raise ConfigError("--peer starts its own server: leave out --url.")
        if args.hf_dir is None or not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
            raise ConfigError(f"--peer needs --hf_dir=DIR with a config.json (got "
                              f"{args.hf_dir!r}); export a workdir with `python "
                              "tools/convert_checkpoint.py --from=WORKDIR --to_hf=DIR`.")
        args.stream = False
    else:
        if args.url is None:
            raise ConfigError("give --url=http://HOST:PORT (the server's base URL) or --peer "
                              "--hf_dir=DIR.")
        if not args.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url={args.url!r} must start with http:// or https://.")
        if args.hf_dir is not None:
            raise ConfigError("--hf_dir is for --peer only.")
    return args


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args)
    start = time.monotonic()
    if args.peer:
        with Peer(args.hf_dir, min(args.peer_start_timeout, args.timeout)) as peer:
            assert peer.url is not None
            deadline = start + args.timeout
            print(f"peer: {peer.url} (tools/serve_peer.py --hf_dir={args.hf_dir}; not "
                  "streaming: TTFT = latency)", file=sys.stderr, flush=True)
            results, wall = run_all(args, peer.url, prompts, deadline)
    else:
        results, wall = run_all(args, args.url, prompts, start + args.timeout)
    summary = summarize(results, wall, args)
    errors = [r.error for r in results if not r.ok]
    for err in list(dict.fromkeys(errors))[:3]:  # the first three distinct errors
        print(f"request error ({errors.count(err)}x): {err}", file=sys.stderr)
    print(table(summary))
    print(json.dumps(summary), flush=True)
    if not summary["ok"]:
        raise RunStoppedError(f"all {len(results)} requests failed; the first: {errors[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
