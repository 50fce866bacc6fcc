#!/usr/bin/env python
"""The common recipe for serving a causal LM, as the peer of `tools/load_test.py --peer`: a
`transformers.pipeline('text-generation')` behind a Flask route, speaking enough of OpenAI's
POST /v1/completions for the load test to drive it.

    python tools/serve_peer.py --hf_dir=hf/gpt_mini [--host=127.0.0.1] [--port=0]

HF_DIR is a Hugging Face checkpoint directory, e.g. one written by
`python tools/convert_checkpoint.py --from=WORKDIR --to_hf=HF_DIR` (config.json,
model.safetensors and the run's tokenizer files). On start it prints one line
`serve_peer: listening on http://HOST:PORT` to stdout (with --port=0 the port is a free one the
OS picked); everything else goes to stderr.

What it serves:
  POST /v1/completions  {"prompt": str | [str], "max_tokens": int >= 1, "temperature": >= 0
                         (0 = greedy, the default), "seed": int}; never streams (`stream: true`
                         is answered 400). Generates exactly max_tokens tokens per prompt
                         (min_new_tokens = max_new_tokens, so EOS cannot end a row early) and
                         reports the real counts in `usage`. A list of prompts runs one by one.
  GET /health           {"status": "ok"}

One request at a time: Flask's server is threaded (requests are accepted concurrently), but the
pipeline call is guarded by one lock, which is what the common recipe amounts to (a pipeline
object is not safe to call from several threads at once, and without batching concurrent calls
would only share the CPU). Concurrent clients therefore queue; there is no batching.

Tokenizer: `AutoTokenizer.from_pretrained(HF_DIR)` (the exporter writes a tokenizer_config.json
for this project's SentencePiece runs), except for a directory whose only tokenizer file is a
SentencePiece `tokenizer.model` (an export from before that: no tokenizer_config.json, no
tokenizer.json). For such a directory
AutoTokenizer follows config.json's model_type to GPT2Tokenizer, which turns the SentencePiece
model into a byte-level BPE with other ids and spaces lost; the peer loads it as a
`T5Tokenizer` instead (plain SentencePiece, no extra ids, special tokens named after the model's
pieces), whose ids equal the `sentencepiece` library's (tested). Prompts are tokenised without
special tokens (`add_special_tokens=False`; T5Tokenizer would otherwise append EOS), so the peer
sees the prompt's own tokens; `python -m research.serve` puts the run's BOS first, one token
more.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

try:
    import research  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from research import cli  # noqa: E402
from research.errors import ConfigError  # noqa: E402

READY_PREFIX = "serve_peer: listening on "
# Tokenizer files other than a SentencePiece model that AutoTokenizer reads correctly.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


class BadRequest(ValueError):
    """A request field the peer cannot use; answered 400 naming `field`."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def load_tokenizer(hf_dir: str):
    """The tokenizer of HF_DIR for the pipeline (see the module docstring for the SentencePiece
    case)."""
    import transformers
    files = set(os.listdir(hf_dir))
    if "tokenizer.model" not in files or files & set(_HF_TOKENIZER_FILES):
        return transformers.AutoTokenizer.from_pretrained(hf_dir)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=os.path.join(hf_dir, "tokenizer.model"))
    special = {name: sp.id_to_piece(i) for name, i in (
        ("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
        ("pad_token", sp.pad_id())) if i >= 0}
    return transformers.T5Tokenizer.from_pretrained(hf_dir, extra_ids=0, **special)


def build_pipeline(hf_dir: str):
    """transformers.pipeline('text-generation') on HF_DIR's model and `load_tokenizer`, CPU."""
    import transformers
    tokenizer = load_tokenizer(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    model.eval()
    return transformers.pipeline("text-generation", model=model, tokenizer=tokenizer,
                                 device="cpu")


def parse_request(body: Any) -> dict:
    """Checks a /v1/completions body; {"prompts": [str], "max_tokens", "temperature", "seed"}.
    Raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("body", "the body must be a JSON object")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p
                                                               for p in prompts):
        raise BadRequest("prompt", "prompt must be a non-empty string or a list of them")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens", "max_tokens must be an integer >= 1")
    temperature = body.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or temperature < 0:
        raise BadRequest("temperature", "temperature must be a number >= 0")
    seed = body.get("seed", 0)
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadRequest("seed", "seed must be an integer")
    if body.get("stream", False):
        raise BadRequest("stream", "this peer does not stream; send stream: false")
    return {"prompts": prompts, "max_tokens": max_tokens, "temperature": float(temperature),
            "seed": seed}


def complete(pipe, lock: threading.Lock, req: dict) -> dict:
    """Runs the pipeline on each prompt of `req` (under `lock`); the OpenAI-style response."""
    import transformers
    choices, prompt_tokens, completion_tokens = [], 0, 0
    k = req["max_tokens"]
    sampling = {"do_sample": True, "temperature": req["temperature"]} \
        if req["temperature"] > 0 else {"do_sample": False}
    for index, prompt in enumerate(req["prompts"]):
        with lock:
            transformers.set_seed(req["seed"] + index)
            out = pipe(prompt, max_new_tokens=k, min_new_tokens=k, return_tensors=True,
                       add_special_tokens=False,
                       **sampling)[0]["generated_token_ids"]
        n_prompt = len(pipe.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        new_ids = list(out)[n_prompt:]
        prompt_tokens += n_prompt
        completion_tokens += len(new_ids)
        choices.append({"index": index, "logprobs": None,
                        "text": pipe.tokenizer.decode(new_ids, skip_special_tokens=True),
                        "finish_reason": "length" if len(new_ids) >= k else "stop"})
    return {"object": "text_completion", "model": "peer", "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def make_app(pipe):
    """The Flask app: POST /v1/completions and GET /health around `pipe`."""
    import flask
    app = flask.Flask("serve_peer")
    lock = threading.Lock()

    @app.get("/health")
    def health():
        return flask.jsonify(status="ok")

    @app.post("/v1/completions")
    def completions():
        try:
            body = json.loads(flask.request.get_data(as_text=True) or "null")
            req = parse_request(body)
        except json.JSONDecodeError as e:
            return _error("body", f"malformed JSON: {e}")
        except BadRequest as e:
            return _error(e.field, str(e))
        return flask.jsonify(complete(pipe, lock, req))

    return app


def _error(field: str, message: str):
    import flask
    body = {"error": {"message": message, "type": "invalid_request_error", "param": field,
                      "code": None}}
    return flask.jsonify(body), 400


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="serve_peer.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_dir", required=True, metavar="DIR",
                        help="Hugging Face checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        raise ConfigError(f"--hf_dir={args.hf_dir!r} has no config.json; export a workdir with "
                          "`python tools/convert_checkpoint.py --from=WORKDIR --to_hf=DIR`.")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port={args.port} is not a port number (0-65535).")
    return args


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from werkzeug.serving import make_server
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    pipe = build_pipeline(args.hf_dir)
    server = make_server(args.host, args.port, make_app(pipe), threaded=True)
    print(f"{READY_PREFIX}http://{args.host}:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
