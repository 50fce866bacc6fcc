"""Serves a checkpoint over HTTP: OpenAI-compatible completions with continuous batching (a
causal LM), or classification, plus health and Prometheus metrics.

  python -m research.serve --workdir=DIR [--step=N] [--host=127.0.0.1] [--port=8000]
      [--max_batch=16] [--max_len=T] [--name=NAME] [--drain_timeout_s=S] [--access_log]
      [--mesh_shape="{'tensor': -1}"] [--rules=PRESET]

DIR is any workdir research.train writes, or a converted Hugging Face checkpoint
(tools/convert_checkpoint.py --from_hf): its run.json's objective picks what is served.

  causal_lm        POST /v1/completions. Concurrent requests share one jitted decode loop over
                   --max_batch KV-cache slots of --max_len positions each (prompt + max_tokens
                   must fit; default the model's max_len). Prompts are tokenised with the run's
                   tokenizer, its BOS first (as research.generate does).
  classification   POST /v1/classify: label and probabilities per input, label names from the
                   run; inputs are cut to the run's SEQ_LEN (or --max_len) tokens.

--mesh_shape shards the parameters (and the KV cache) over a mesh of the devices with the
run's logical-axis rules, as research.generate does; by default the model runs on the first
device.

Both: GET /health, GET /metrics (Prometheus), GET /v1/models. Everything is compiled before
the server listens; it then logs one line `serving NAME (KIND) at http://HOST:PORT`
(--port=0 picks a free port and the line names it).

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish (at
most --drain_timeout_s seconds; default: as long as they take), stops the engine and exits 0.
A wrong flag, a DIR that holds no servable run, or a port in use ends with one `error:` line,
exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import Sequence

from research import cli, logs, storage
from research import workdir as workdir_lib
from research.decoding.layout import Layout, mesh_shape_arg, run_rules
from research.errors import ConfigError
from research.training.partitioning import RULE_PRESETS

log = logging.getLogger("research.serve")

SERVABLE = ("causal_lm", "classification")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m research.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="a causal_lm or classification training workdir, or a converted "
                             "checkpoint")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step (default: the latest)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port (default 8000; 0 = any free port, logged)")
    parser.add_argument("--max_batch", type=int, default=16,
                        help="KV-cache slots: requests decoded together (classification: "
                             "inputs per forward pass); default 16")
    parser.add_argument("--max_len", type=int, default=None,
                        help="causal LM: positions per slot, prompt + max_tokens (default the "
                             "model's max_len); classification: tokens per input (default "
                             "the run's SEQ_LEN)")
    parser.add_argument("--prefill_tokens", type=int, default=128,
                        help="causal LM: prompt tokens per prefill call; prompts padded to P "
                             "tokens are prefilled max(1, N/P) at a time, a fixed shape per P "
                             "(more: a burst of requests starts sooner, a lone one later; "
                             "default 128)")
    parser.add_argument("--name", default=None,
                        help="the model name in responses and /v1/models (default: DIR's "
                             "basename)")
    parser.add_argument("--drain_timeout_s", type=int, default=None,
                        help="on SIGTERM, seconds to wait for the requests in flight before "
                             "cancelling them (default: no limit)")
    parser.add_argument("--mesh_shape", type=mesh_shape_arg, default=None,
                        help="shard the model over a mesh of the devices, axes data/fsdp/"
                             "tensor, e.g. \"{'tensor': -1}\" (every device on tensor) or "
                             "\"{'data': 2, 'tensor': 4}\" (default: the first device only)")
    parser.add_argument("--rules", choices=sorted(RULE_PRESETS), default=None,
                        help="with --mesh_shape: the logical-axis rules preset (default: the "
                             "run's config.gin, else fsdp_tensor)")
    parser.add_argument("--access_log", action="store_true",
                        help="log one line per HTTP request")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port={args.port} must be in 0..65535")
    if args.max_batch < 1:
        parser.error(f"--max_batch={args.max_batch} must be at least 1")
    if args.prefill_tokens < 1:
        parser.error(f"--prefill_tokens={args.prefill_tokens} must be at least 1")
    if args.max_len is not None and args.max_len < 2:
        parser.error(f"--max_len={args.max_len} must be at least 2")
    if args.step is not None and args.step < 0:
        parser.error(f"--step={args.step} must be >= 0")
    if args.drain_timeout_s is not None and args.drain_timeout_s < 0:
        parser.error(f"--drain_timeout_s={args.drain_timeout_s} must be >= 0")
    if args.rules is not None and args.mesh_shape is None:
        parser.error("--rules places the model on a mesh: give --mesh_shape too")
    return args


def run_objective(workdir: str) -> str:
    """run.json's objective; ConfigError unless DIR holds a servable run."""
    info = workdir_lib.read_run_info(workdir)
    if info is None:
        problem = "does not exist" if not storage.isdir(workdir) else "has no readable run.json"
        raise ConfigError(f"--workdir={workdir} {problem}; pass a directory written by python "
                          "-m research.train (or tools/convert_checkpoint.py --from_hf).")
    objective = info.get("objective")
    if objective not in SERVABLE:
        raise ConfigError(f"--workdir={workdir} holds a {objective!r} model; research.serve "
                          f"serves {' and '.join(SERVABLE)} checkpoints.")
    return objective


def build_served(args: argparse.Namespace):
    """(Served, ServingMetrics): the model loaded and compiled, an engine started."""
    from research.serving.app import Served, make_metrics

    name = args.name or os.path.basename(os.path.normpath(args.workdir)) or "model"
    layout = (Layout.create(args.mesh_shape, run_rules(args.workdir, args.rules))
              if args.mesh_shape is not None else Layout.single_device())
    if run_objective(args.workdir) == "classification":
        from research.serving.classifier import load_classifier
        classifier = load_classifier(args.workdir, args.step, max_batch=args.max_batch,
                                     max_len=args.max_len, layout=layout)
        log.info("compiling %d classifier shapes", len(classifier.lengths)
                 * len(classifier.batches))
        classifier.warmup()
        return Served(name, classifier=classifier), make_metrics(args.max_batch)
    from research.generate import load_for_generation
    from research.serving.engine import Engine
    model, params, tok = load_for_generation(args.workdir, args.step, layout)
    if args.max_len is not None and args.max_len > model.cfg.max_len:
        raise ConfigError(f"--max_len={args.max_len} exceeds the model's max_len="
                          f"{model.cfg.max_len}; pass at most that.")
    metrics = make_metrics(args.max_batch)
    engine = Engine(model, params, decode=tok.decode, eos_id=tok.eos_id, pad_id=tok.pad_id,
                    vocab_limit=tok.vocab_size, max_batch=args.max_batch, max_len=args.max_len,
                    layout=layout, observer=metrics, prefill_tokens=args.prefill_tokens)
    log.info("compiling the engine (%d slots of %d positions)", engine.capacity, engine.max_len)
    engine.warmup()
    engine.start()
    return Served(name, engine=engine, tokenizer=tok), metrics


def bind(host: str, port: int) -> socket.socket:
    """A bound TCP socket (bound before loading, so a port in use fails first); ConfigError
    naming --host/--port if it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host={host}: {err.strerror}; pass an address such as "
                          "127.0.0.1 or 0.0.0.0.") from err
    family, kind, proto, _, address = infos[0]
    # With proto IPPROTO_TCP (not socket.socket's default 0) asyncio sets TCP_NODELAY on every
    # accepted connection; without it, Nagle's algorithm held a stream's first event back until
    # the client's delayed ACK (~40 ms of time to first token).
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host={host} --port={port}: cannot listen there ({err.strerror}); "
                          "pick another --port (0 = any free one).") from err
    return sock  # uvicorn listens on it once the model is compiled


def make_server(app, served, sock: socket.socket, *, drain_timeout_s: int | None,
                access_log: bool):
    """A uvicorn.Server whose SIGTERM/SIGINT handler marks `served` draining (GET /health
    answers 503) before uvicorn stops accepting and waits for the requests in flight."""
    import anyio
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not served.draining:
                log.info("signal %d: draining (no new connections; finishing the requests in "
                         "flight)", sig)
            served.draining = True
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            # anyio imports its asyncio backend on first use, i.e. in the first streamed
            # response (~10-50 ms of that request's time to first token): do it now.
            await anyio.sleep(0)
            if self.started:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                log.info("serving %s (%s) at http://%s:%d", served.name, served.kind, host, port)

    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its startup chatter
    config = uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout_s)
    return Server(config)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    logs.setup()
    args = parse_args(argv)
    run_objective(args.workdir)  # a wrong DIR fails before any compile
    sock = bind(args.host, args.port)
    served = None
    try:
        from research.serving.app import create_app
        served, metrics = build_served(args)
        server = make_server(create_app(served, metrics), served, sock,
                             drain_timeout_s=args.drain_timeout_s, access_log=args.access_log)
        # uvicorn re-raises the signal that stopped it once it is done; by then the requests
        # in flight are finished, so it is ignored and main returns 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if served is not None and served.engine is not None:  # drained already unless failed
            served.engine.shutdown(drain=False, timeout=5.0)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
