"""tools/load_test.py and its peer tools/serve_peer.py, run as subprocesses (bounded in time,
killed with their process group on a timeout):

- against a scripted SSE server in this process: TTFT is the first event with text, tokens
  follow the documented rules (usage, finish_reason 'length', chunk count), C workers keep
  exactly C requests in flight, request i carries seed SEED + i, failures are counted, a
  server that never answers is cut at --timeout, and all-failed exits 1;
- against the Flask + transformers peer on a tiny random GPT-2 (built offline from a
  GPT2Config, with the bundled SentencePiece tokenizer as the exporter writes it): every
  request succeeds with exactly max_tokens tokens although the model prefers EOS, and the peer
  is stopped afterwards;
- the peer's tokenizer gives sentencepiece's ids; bad arguments end with one `error:` line.
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import austen_paragraphs

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "load_test.py"
SPM = ROOT / "data" / "tokenizers" / "austen_8k.model"
FIELDS = ("requests_per_sec", "tokens_per_sec", "ttft_p50_s", "ttft_p99_s", "latency_p50_s",
          "latency_p99_s", "concurrency", "requests", "errors")
FIRST_TEXT_DELAY = 0.3   # the scripted server's wait before the first chunk with text
CHUNK_GAP = 0.05         # ... and between later chunks


def run_tool(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Runs load_test.py; (exit code, stdout, stderr). Its process group is killed on a
    timeout (a --peer child included) and the test fails."""
    env = {**os.environ, "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, str(TOOL), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"load_test.py {' '.join(args)} ran past {timeout}s")
    return proc.returncode, out, err


def last_json(stdout: str) -> dict:
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert all(f in summary for f in FIELDS), summary
    return summary


class ScriptedServer:
    """A /v1/completions server whose behaviour the prompt picks: 'full' streams max_tokens
    one-token chunks (after an empty one) ending 'length'; 'short' two chunks ending 'stop';
    'usage' three chunks ending 'stop' and a usage chunk saying 7; 'fail' answers 500; 'hang'
    never answers. Records bodies and the most requests in flight at once."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.bodies.append(body)
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    owner.answer(self, body)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, handler, body: dict) -> None:
        kind = body["prompt"]
        if kind == "hang":
            self.release.wait(60)
            return
        if kind == "fail":
            handler.send_response(500)
            handler.end_headers()
            handler.wfile.write(b"boom")
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        texts = {"full": ["x"] * body["max_tokens"], "short": ["a", "b"],
                 "usage": ["a", "b", "c"]}[kind]
        finish = "length" if kind == "full" else "stop"

        def send(event) -> None:
            data = event if isinstance(event, str) else json.dumps(event)
            handler.wfile.write(f"data: {data}\n\n".encode())
            handler.wfile.flush()

        send({"choices": [{"index": 0, "text": "", "finish_reason": None}]})
        time.sleep(FIRST_TEXT_DELAY)
        for i, text in enumerate(texts):
            if i:
                time.sleep(CHUNK_GAP)
            last = i == len(texts) - 1
            send({"choices": [{"index": 0, "text": text,
                               "finish_reason": finish if last else None}]})
        if kind == "usage":
            send({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 7,
                                           "total_tokens": 8}})
        send("[DONE]")

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def write_prompts(tmp_path: pathlib.Path, *lines: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_streaming_ttft_tokens_concurrency_and_seeds(tmp_path):
    with ScriptedServer() as server:
        rc, out, err = run_tool(f"--url={server.url}", "--concurrency=3", "--requests=6",
                                "--max_tokens=4", "--seed=10", "--warmup=1",
                                f"--prompts_file={write_prompts(tmp_path, 'full', 'short', 'usage')}")
    assert rc == 0, err
    s = last_json(out)
    assert (s["requests"], s["ok"], s["errors"], s["concurrency"]) == (6, 6, 0, 3)
    # 'full' ends 'length' (4 = max_tokens), 'short' counts its 2 chunks, 'usage' reports 7.
    assert s["completion_tokens"] == 2 * (4 + 2 + 7)
    assert server.max_in_flight == 3
    bodies = server.bodies[1:]  # the first is the warm-up (seed SEED + requests)
    assert server.bodies[0]["seed"] == 16
    assert sorted(b["seed"] for b in bodies) == list(range(10, 16))
    assert all(b["stream"] and b["max_tokens"] == 4 and b["temperature"] == 0
               and b["stream_options"] == {"include_usage": True} for b in bodies)
    # TTFT: the first chunk with text (after FIRST_TEXT_DELAY), not the empty first chunk.
    assert FIRST_TEXT_DELAY <= s["ttft_p50_s"] <= s["ttft_p99_s"]
    assert s["latency_p50_s"] >= s["ttft_p50_s"] + CHUNK_GAP
    assert s["latency_p99_s"] >= FIRST_TEXT_DELAY + 3 * CHUNK_GAP  # 'full': 4 chunks
    assert s["tokens_per_sec"] == pytest.approx(s["completion_tokens"] / s["wall_s"])
    assert s["requests_per_sec"] == pytest.approx(6 / s["wall_s"])
    assert "TTFT (s) p50/p90/p99" in out


def test_failures_are_counted_and_the_run_is_bounded(tmp_path):
    with ScriptedServer() as server:
        rc, out, err = run_tool(f"--url={server.url}", "--concurrency=2", "--requests=4",
                                "--max_tokens=2", "--warmup=0",
                                f"--prompts_file={write_prompts(tmp_path, 'full', 'fail')}")
        assert rc == 0, err
        s = last_json(out)
        assert (s["ok"], s["errors"], s["completion_tokens"]) == (2, 2, 4)
        assert "HTTP 500" in err

        start = time.monotonic()
        rc, out, err = run_tool(f"--url={server.url}", "--concurrency=2", "--requests=3",
                                "--warmup=0", "--prompt=hang", "--timeout=1.5")
        assert time.monotonic() - start < 15
    assert rc == 1
    s = last_json(out)
    assert (s["ok"], s["errors"], s["ttft_p50_s"]) == (0, 3, None)
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: all 3 requests failed; the first: not answered within --timeout=1.5s"]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> pathlib.Path:
    """A random GPT-2 (2 layers, width 32, the austen_8k vocabulary) saved by transformers,
    whose greedy choice is always EOS, plus tokenizer.model as the exporter writes it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("tiny_gpt2")
    cfg = transformers.GPT2Config(vocab_size=8064, n_positions=64, n_embd=32, n_layer=2,
                                  n_head=2, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # final hidden state = wte[EOS], which dominates the (tied) logits
        model.transformer.wte.weight[3] = 5.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[3])
    model.save_pretrained(str(directory))
    shutil.copy(SPM, directory / "tokenizer.model")
    return directory


def test_peer_generates_max_tokens_and_is_stopped(tiny_hf_dir):
    rc, out, err = run_tool("--peer", f"--hf_dir={tiny_hf_dir}", "--concurrency=2",
                            "--requests=4", "--max_tokens=4", "--timeout=50", timeout=58)
    assert rc == 0, err
    s = last_json(out)
    assert (s["requests"], s["ok"], s["errors"], s["stream"], s["peer"]) == (4, 4, 0, False, True)
    assert s["completion_tokens"] == 16  # EOS is the greedy choice, yet 4 tokens each
    assert s["ttft_p50_s"] == s["latency_p50_s"] > 0  # the peer does not stream
    url = re.search(r"peer: (http://\S+)", err).group(1)
    import httpx
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)


def test_peer_tokenizer_ids_equal_sentencepiece(tiny_hf_dir):
    spm = pytest.importorskip("sentencepiece")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import serve_peer
    finally:
        sys.path.remove(str(ROOT / "tools"))
    tok = serve_peer.load_tokenizer(str(tiny_hf_dir))
    sp = spm.SentencePieceProcessor(model_file=str(SPM))
    texts = austen_paragraphs(300)[200:]
    assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == \
        [sp.encode(t) for t in texts]
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == \
        (sp.eos_id(), sp.pad_id(), sp.unk_id())


def test_peer_request_checks():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import serve_peer
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert serve_peer.parse_request({"prompt": ["a", "b"], "max_tokens": 3, "seed": 4}) == {
        "prompts": ["a", "b"], "max_tokens": 3, "temperature": 0.0, "seed": 4}
    for body, field in (([], "body"), ({"prompt": 3}, "prompt"), ({"prompt": ""}, "prompt"),
                        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
                        ({"prompt": "a", "temperature": -1}, "temperature"),
                        ({"prompt": "a", "seed": "1"}, "seed"),
                        ({"prompt": "a", "stream": True}, "stream")):
        with pytest.raises(serve_peer.BadRequest) as info:
            serve_peer.parse_request(body)
        assert info.value.field == field


@pytest.mark.parametrize("args, message", [
    (["--url=http://127.0.0.1:1", "--concurrency=0"], "--concurrency=0 must be >= 1"),
    (["--url=http://127.0.0.1:1", "--requests=-1"], "--requests=-1 must be >= 1"),
    (["--url=http://127.0.0.1:1", "--max_tokens=0"], "--max_tokens=0 must be >= 1"),
    (["--url=http://127.0.0.1:1", "--timeout=0"], "--timeout=0.0 must be > 0"),
    (["--url=127.0.0.1:8000"], "must start with http://"),
    ([], "give --url"),
    (["--peer"], "--peer needs --hf_dir"),
    (["--peer", "--hf_dir=.", "--url=http://127.0.0.1:1"], "leave out --url"),
    (["--url=http://127.0.0.1:1", "--prompt=a", "--prompts_file=x"], "not both"),
    (["--url=http://127.0.0.1:1", "--prompts_file=/nonexistent/p.txt"], "cannot be read"),
    (["--url=http://127.0.0.1:1", "--concurrency=two"], "invalid int value"),
], ids=["concurrency", "requests", "max_tokens", "timeout", "scheme", "no_url", "peer_no_dir",
        "peer_and_url", "two_prompt_flags", "missing_prompts_file", "not_int"])
def test_bad_arguments_give_one_error_line(args, message):
    rc, out, err = run_tool(*args, timeout=30)
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and out == ""
