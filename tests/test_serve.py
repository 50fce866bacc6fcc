"""python -m research.serve against real HTTP clients (httpx, the `openai` client).

One causal-LM server runs as a subprocess (`python -m research.serve --port=0`) for the whole
module (its last test sends it SIGTERM with requests in flight); one classification server
runs in a thread (uvicorn.Server on a free port). Completions are checked against
research.generate.generate on the same checkpoint (greedy text), against each other (streamed
= not streamed, concurrent = one by one, choice j of n = seed + j alone), classification
against the model applied directly. Every request has a timeout; the subprocess is killed in
a finally (ChildProcesses)."""

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import select
import signal
import socket
import sys
import threading
import time

import flax.linen as nn
import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from research import serve
from research.checkpoints.manager import save_params
from research.data.classification.encoding import encode_example
from research.data.tokenizer import load_tokenizer
from research.decoding import stopping
from research.generate import generate, load_for_generation
from research.models.heads import SequenceClassifier
from research.models.transformer import CausalLM, TransformerConfig
from research.serving.app import ApiError, Served, _classify_examples, create_app
from research.serving.classifier import load_classifier
from research.serving.engine import SamplingParams

from .conftest import ROOT, ChildProcesses

VOCAB = str(ROOT / "data" / "tokenizers" / "austen_8k.model")
MAX_LEN = 32         # the LM server's context (--max_len): prompt + max_tokens
TIMEOUT = 30.0       # seconds, any one HTTP request
START_TIMEOUT = 150  # seconds for the server subprocess to compile and listen
PROMPTS = ["It is a truth", "Emma Woodhouse, handsome", "Persuasion"]
LABELS = ["happy", "neutral", "sad"]  # sorted: the names training finds in the data


def tiny_cfg(**kw) -> TransformerConfig:
    cfg = TransformerConfig(num_layers=1, d_model=32, num_heads=4, mlp_dim=64, max_len=64, **kw)
    return cfg.with_vocab(load_tokenizer(VOCAB).vocab_size).resolved()


def random_params(model, *inputs, seed: int, std: float = 0.5) -> dict:
    """N(0, std) parameters of `model`'s shapes, drawn with numpy: the shapes come from
    jax.eval_shape, so nothing compiles (XLA takes tens of seconds on a model's init here)."""
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (std * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory):
    """A causal-LM workdir as research.train leaves it: run.json and a checkpoint."""
    cfg = tiny_cfg()
    params = random_params(CausalLM(cfg), jnp.zeros((1, 4), jnp.int32), seed=3)
    path = tmp_path_factory.mktemp("serve") / "tiny_lm"
    save_params(str(path / "checkpoints"), params, step=5)
    (path / "run.json").write_text(json.dumps({"objective": "causal_lm", "vocab": VOCAB,
                                               "model_config": dataclasses.asdict(cfg)}))
    return path


@pytest.fixture(scope="module")
def cls_workdir(tmp_path_factory):
    """A 3-class classification workdir (a BERT-style encoder): run.json, config.gin whose
    label names come from the training data (string labels), and a checkpoint."""
    cfg = tiny_cfg(causal=False)
    model = SequenceClassifier(cfg, 3)
    ones = jnp.ones((1, 4), jnp.int32)
    params = random_params(model, ones, ones, ones * 0, jnp.zeros((1,), jnp.int32), seed=4)
    path = tmp_path_factory.mktemp("serve") / "tiny_cls"
    save_params(str(path / "checkpoints"), params, step=3)
    data = path / "train.tsv"
    data.write_text("label\ttext\n" + "".join(f"{lab}\tsome text {i}\n"
                                              for i, lab in enumerate(LABELS[::-1] * 2)))
    (path / "run.json").write_text(json.dumps({"objective": "classification", "vocab": VOCAB,
                                               "model_config": dataclasses.asdict(cfg),
                                               "seq_len": 16}))
    (path / "config.gin").write_text(
        f"TRAIN_DATA = 'tsv:{data}'\ntrain.train_data = %TRAIN_DATA\n"
        "ClassificationObjective.task = 'multiclass'\n"
        "ClassificationObjective.num_labels = 3\n"
        "ClassificationObjective.text_fields = ('text',)\n"
        "ClassificationObjective.label_names = None\n")
    return path


@pytest.fixture(scope="module")
def lm_child(lm_workdir):
    """`python -m research.serve` on the LM workdir, started (it compiles while the other
    fixtures load); killed at the end of the module."""
    command = [sys.executable, "-m", "research.serve", f"--workdir={lm_workdir}", "--port=0",
               "--max_batch=2", f"--max_len={MAX_LEN}"]
    with ChildProcesses([command]) as child:
        yield child


@pytest.fixture(scope="module")
def lm_server(lm_child):
    """(base URL, ChildProcesses) of the LM server, once it listens."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        found = re.search(r"serving tiny_lm \(causal_lm\) at (http://\S+)", lm_child.output(0)[1])
        if found:
            return found.group(1), lm_child
        if not lm_child.running() or time.monotonic() > deadline:
            lm_child.dump_stacks_and_kill()
            pytest.fail("the server did not start:\n" + lm_child.report(), pytrace=False)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(lm_child, lm_workdir):
    """(tokenizer, {prompt: (prompt ids, research.generate's greedy new tokens)}) for two
    prompts, computed in this process while the server compiles."""
    model, params, tok = load_for_generation(str(lm_workdir))
    prompts = [[tok.bos_id] + tok.encode(p) for p in PROMPTS[:2]]
    rows = generate(model, params, prompts, max_new_tokens=12, eos_id=tok.eos_id,
                    pad_id=tok.pad_id, temperature=0, vocab_limit=tok.vocab_size)
    return tok, {p: (ids, row) for p, ids, row in zip(PROMPTS, prompts, rows)}


@pytest.fixture(scope="module")
def cls_server(cls_workdir, lm_child):
    """(base URL, Classifier) of a classification server running in a thread of this process
    (the LM server, started first, compiles meanwhile)."""
    classifier = load_classifier(str(cls_workdir), max_batch=2)
    classifier.warmup()
    served = Served("tiny_cls", classifier=classifier)
    sock = serve.bind("127.0.0.1", 0)
    server = serve.make_server(create_app(served), served, sock, drain_timeout_s=5,
                               access_log=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the classification server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", classifier
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def post(url: str, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, timeout=TIMEOUT,
                          headers={"content-type": "application/json"}, **kw)
    return httpx.post(url + path, json=body, timeout=TIMEOUT, **kw)


def complete(url: str, **body) -> dict:
    response = post(url, "/v1/completions", body)
    assert response.status_code == 200, response.text
    return response.json()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0)


def metric_values(url: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of GET /metrics."""
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent-events response, in order."""
    out = []
    for line in response.iter_lines():
        if line:
            assert line.startswith("data: "), line
            out.append(line[len("data: "):])
    return out


# ---------------------------------------------------------------------------------------------


def test_classification_probabilities_and_label_names(cls_server):
    url, classifier = cls_server
    texts = ["What a wonderful film.", "Dull.", "It rained all day in Bath, and then some more.",
             ""]
    response = post(url, "/v1/classify", {"input": texts, "model": "ignored"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny_cls" and [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    # The model applied directly: the texts laid out as training does, padded to SEQ_LEN.
    ids, types, mask = (np.zeros((len(texts), 16), np.int32) for _ in range(3))
    for i, text in enumerate(texts):
        row, row_types = encode_example((text,), classifier.tokenizer, 16, style="encoder")
        ids[i, :len(row)], types[i, :len(row)], mask[i, :len(row)] = row, row_types, 1
    all_logits = np.asarray(jax.jit(classifier.model.apply)(
        {"params": classifier.params}, ids, mask, types, mask.sum(1) - 1))
    for logits, item in zip(all_logits, body["data"]):
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert list(item["probabilities"]) == LABELS
        probs = np.array([item["probabilities"][name] for name in LABELS])
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
        assert abs(probs.sum() - 1) < 1e-5
        assert item["label"] == LABELS[int(np.argmax(expected))]
    assert len({d["label"] for d in body["data"]}) > 1  # the head is not uniform
    [single] = post(url, "/v1/classify", {"input": texts[0]}).json()["data"]
    assert single["label"] == body["data"][0]["label"]
    np.testing.assert_allclose(list(single["probabilities"].values()),
                               list(body["data"][0]["probabilities"].values()), rtol=1e-5,
                               atol=1e-6)
    for bad in ({"input": []}, {"input": 3}, {"input": [["a", "b"]]}, {"text": "x"}):
        response = post(url, "/v1/classify", bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    assert post(url, "/v1/classify", {"input": texts[:1]}).json()["data"] == [single]


def test_concurrent_classify_requests_share_forward_passes(cls_server):
    """Eight concurrent requests of one text each, queued while a pass runs: the next passes
    take up to max_batch (2) of them, and every request gets the probabilities it gets
    alone."""
    url, classifier = cls_server
    texts = [f"Chapter {i}: it rained in Bath, and {'very ' * i}much." for i in range(8)]
    alone = [classifier.scores([(t,)]) for t in texts]
    before = classifier.forward_passes
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with classifier._lock:  # hold the forward pass: the requests queue behind it
            futures = [pool.submit(post, url, "/v1/classify", {"input": t}) for t in texts]
            deadline = time.monotonic() + TIMEOUT
            while classifier._jobs.qsize() < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
        answers = [f.result(TIMEOUT) for f in futures]
    for answer, want in zip(answers, alone):
        assert answer.status_code == 200, answer.text
        got = list(answer.json()["data"][0]["probabilities"].values())
        np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-6)
    assert classifier.forward_passes - before <= 5  # 1 + ceil(7 / 2), not 8


def test_classify_inputs_of_pair_and_single_runs():
    assert _classify_examples("a", False) == [("a",)]
    assert _classify_examples(["a", "b"], False) == [("a",), ("b",)]
    assert _classify_examples(["a", "b"], True) == [("a", "b")]
    assert _classify_examples([["a", "b"], ["c", "d"]], True) == [("a", "b"), ("c", "d")]
    assert _classify_examples([["a"], ["c", "d"]], None) == [("a",), ("c", "d")]
    for value, pair in ((["a", "b", "c"], True), ([["a"]], True), ([["a", "b"]], False),
                        ([], None)):
        with pytest.raises(ApiError):
            _classify_examples(value, pair)


def test_greedy_completion_equals_research_generate(reference, lm_server):
    url, _ = lm_server
    tok, rows = reference
    for prompt, (ids, row) in rows.items():
        out = client(url).completions.create(model="anything", prompt=prompt, max_tokens=12,
                                             temperature=0)
        assert out.object == "text_completion" and out.model == "tiny_lm"
        assert out.choices[0].text == stopping.continuation(tok.decode, ids, row)
        assert out.choices[0].finish_reason == ("stop" if tok.eos_id in row else "length")
        assert out.usage.prompt_tokens == len(ids)
        assert out.usage.completion_tokens == len(row)
        assert out.usage.total_tokens == len(ids) + len(row)


def test_mesh_shape_shards_both_kinds_and_changes_no_output(reference, lm_workdir, cls_workdir,
                                                            cls_server):
    """--mesh_shape over 8 (simulated) devices, data x tensor: the LM's greedy tokens equal
    research.generate's, the classifier's probabilities the single-device server's."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    _, classifier = cls_server
    tok, rows = reference
    mesh = "--mesh_shape={'data': 2, 'tensor': 4}"
    served, _ = serve.build_served(serve.parse_args([f"--workdir={lm_workdir}", mesh,
                                                     "--max_batch=2", f"--max_len={MAX_LEN}",
                                                     "--prefill_tokens=16"]))
    try:
        assert served.engine.prefill_rows(16) == 1  # --prefill_tokens reaches the engine
        assert served.engine.layout.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 4}
        sharded = [leaf.sharding.spec for leaf in jax.tree.leaves(served.engine.params)]
        assert any("tensor" in str(spec) for spec in sharded)
        for ids, row in rows.values():
            got = served.engine.submit(ids, SamplingParams(max_tokens=12, temperature=0))
            assert got.result(TIMEOUT)[0] == list(row)
    finally:
        served.engine.shutdown(timeout=TIMEOUT)
    other, _ = serve.build_served(serve.parse_args([f"--workdir={cls_workdir}", mesh,
                                                    "--max_batch=2"]))
    texts = [("What a wonderful film.",), ("Dull.",), ("It rained all day in Bath.",)]
    assert other.classifier.layout.mesh.size == 8
    np.testing.assert_allclose(other.classifier.scores(texts), classifier.scores(texts),
                               rtol=1e-5, atol=1e-6)


def test_streaming_chunks_concatenate_to_the_completion(lm_server):
    url, _ = lm_server
    body = dict(prompt=PROMPTS[1], max_tokens=16, temperature=0.9, seed=11)
    whole = complete(url, **body)
    full = whole["choices"][0]
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                      timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 1 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == full["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    # The openai client's stream, with a usage chunk.
    stream = client(url).completions.create(model="m", stream=True,
                                            stream_options={"include_usage": True},
                                            **body)
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts if p.choices) == full["text"]
    assert parts[-1].usage.model_dump(exclude_none=True) == whole["usage"]


def test_stop_sequences_cut_the_text(lm_server):
    url, _ = lm_server
    full = complete(url, prompt=PROMPTS[0], max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and stop in full
    out = complete(url, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                   stop=["never in this text \u2603", stop])["choices"][0]
    assert out["text"] == full[:full.index(stop)]
    assert out["finish_reason"] == "stop"
    single = complete(url, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stop)
    assert single["choices"][0]["text"] == out["text"]


def test_n_choices_sample_with_seed_plus_j(lm_server):
    url, _ = lm_server
    out = complete(url, prompt=PROMPTS, max_tokens=6, temperature=1.0, n=2, seed=7)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3, 4, 5]
    for i, choice in enumerate(out["choices"]):
        prompt, j = PROMPTS[i // 2], i % 2
        alone = complete(url, prompt=prompt, max_tokens=6, temperature=1.0, seed=7 + j)
        assert choice["text"] == alone["choices"][0]["text"]
    assert out["choices"][0]["text"] != out["choices"][1]["text"]
    assert out["usage"]["completion_tokens"] <= 6 * 6


def test_concurrent_requests_equal_the_same_requests_one_by_one(lm_server):
    url, _ = lm_server
    bodies = [dict(prompt=PROMPTS[i % 3], max_tokens=8 + i, temperature=[0, 0.7, 1.0][i % 3],
                   top_k=[0, 20][i % 2], top_p=[1.0, 0.9][i // 3 % 2], seed=100 + i)
              for i in range(6)]
    alone = [complete(url, **b)["choices"][0] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: complete(url, **b)["choices"][0], bodies))
    assert together == alone


BAD_COMPLETIONS = [
    (b'{"prompt": "It is", "max_tokens": ', None),                  # malformed JSON
    (b'["It is"]', None),                                            # not an object
    ({"max_tokens": 4}, "prompt"),                                   # missing
    ({"prompt": 5}, "prompt"),                                       # wrong type
    ({"prompt": ["a", 3]}, "prompt"),
    ({"prompt": "It is", "max_tokens": "4"}, "max_tokens"),
    ({"prompt": "It is", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "It is", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "It is", "temperature": -0.5}, "temperature"),
    ({"prompt": "It is", "top_p": 0}, "top_p"),
    ({"prompt": "It is", "top_k": -1}, "top_k"),
    ({"prompt": "It is", "n": 0}, "n"),
    ({"prompt": "It is", "stream": "yes"}, "stream"),
    ({"prompt": "It is", "stop": [""]}, "stop"),
    ({"prompt": "It is", "echo": True}, "echo"),
    ({"prompt": "It is", "logprobs": 2}, "logprobs"),
    ({"prompt": "word " * 40, "max_tokens": 1}, "prompt"),           # longer than the context
    ({"prompt": "It is", "max_tokens": MAX_LEN}, "max_tokens"),      # prompt + max_tokens too
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS,
                         ids=[f"bad{i}" for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests_are_named_and_harmless(lm_server, body, param):
    url, _ = lm_server
    response = post(url, "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]
    if param:
        assert param in error["message"]
    assert complete(url, prompt="It is", max_tokens=2)["choices"][0]["finish_reason"]


def test_the_wrong_endpoint_for_the_model_is_a_400(lm_server, cls_server):
    lm_url, _ = lm_server
    cls_url, _ = cls_server
    response = post(lm_url, "/v1/classify", {"input": "a film"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    response = post(cls_url, "/v1/completions", {"prompt": "a film"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(lm_url).completions.create(model="m", prompt="x", max_tokens=0)
    # Unknown fields are ignored, unsupported ones accepted at their neutral values.
    assert complete(lm_url, prompt="It is", max_tokens=2, user="u", echo=False, logprobs=None,
                    best_of=1, presence_penalty=0.0, frequency_penalty=0, logit_bias={},
                    suffix="", something_else=[1])["choices"]
    assert post(cls_url, "/v1/classify", {"input": "a film"}).status_code == 200


def test_health_and_metrics_counters_move(lm_server, cls_server):
    url, _ = lm_server
    health = httpx.get(url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200
    assert health.json() | {"active": 0, "queued": 0} == {
        "status": "ok", "model": "tiny_lm", "kind": "causal_lm", "active": 0, "queued": 0,
        "capacity": 2}
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny_lm"]
    before = metric_values(url)
    out = complete(url, prompt=PROMPTS[2], max_tokens=5, temperature=0)
    post(url, "/v1/completions", {"prompt": "x", "max_tokens": 0})
    after = metric_values(url)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("serve_requests_total", endpoint="/v1/completions", status="200") == 1
    assert moved("serve_requests_total", endpoint="/v1/completions", status="400") == 1
    assert moved("serve_generated_tokens_total") == out["usage"]["completion_tokens"]
    assert moved("serve_prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert moved("serve_time_to_first_token_seconds_count") == 1
    assert moved("serve_request_seconds_count") == 1
    assert moved("serve_batch_occupancy_count") >= 1
    assert moved("serve_decode_steps_total") >= 1
    assert after[("serve_slots", ())] == 2
    cls_url, _ = cls_server
    assert httpx.get(cls_url + "/health", timeout=TIMEOUT).json()["kind"] == "classification"
    assert "serve_requests_total" in httpx.get(cls_url + "/metrics", timeout=TIMEOUT).text


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "no_stream"])
def test_a_client_that_disconnects_frees_its_slot(lm_server, stream):
    """A raw socket sends a long completion and closes once it runs (its first chunk came, or
    /health shows it in the engine): its choices are cancelled and the slots freed. 512
    choices on 2 slots take tens of seconds, so the request still runs when a test process
    starved by a loaded machine gets to look (32, about a second, once finished first)."""
    url, lm_child = lm_server
    before = metric_values(url)
    prompts, n = 8, 64  # n is at most 64
    body = json.dumps({"prompt": ["It is"] * prompts, "max_tokens": MAX_LEN - 4, "n": n,
                       "stream": stream}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
        else:  # until the engine holds the request (an answer already would be a failure)
            deadline = time.monotonic() + TIMEOUT
            while True:
                stats = httpx.get(url + "/health", timeout=TIMEOUT).json()
                if stats["active"] + stats["queued"] > 0:
                    break
                if select.select([sock], [], [], 0)[0]:
                    pytest.fail(f"answered before the disconnect: {sock.recv(65536)[:600]!r}\n"
                                + lm_child.report())
                assert time.monotonic() < deadline, stats
                time.sleep(0.005)
    deadline = time.monotonic() + TIMEOUT  # a loaded machine (xdist) notices a closed socket late
    while time.monotonic() < deadline:
        stats = httpx.get(url + "/health", timeout=TIMEOUT).json()
        if stats["active"] == 0 and stats["queued"] == 0:
            break
        time.sleep(0.05)
    assert stats["active"] == 0 and stats["queued"] == 0
    after = metric_values(url)
    key = ("serve_completions_total", (("finish_reason", "cancelled"),))
    assert after.get(key, 0) - before.get(key, 0) >= 1
    generated = ("serve_generated_tokens_total", ())
    assert after[generated] - before[generated] < prompts * n * (MAX_LEN - 4) // 4
    assert complete(url, prompt="It is", max_tokens=2)["choices"]


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(lm_server):
    """The last test that uses the shared server: it stops it. Five streams start; once the
    first chunk of any arrives, its thread sends the server SIGTERM. Every request it had
    accepted by then runs to its full length; any later one is refused (connection refused
    or 503), never cut short; the server exits 0."""
    url, child = lm_server
    body = {"prompt": "It is", "max_tokens": MAX_LEN - 4, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    results: dict[int, tuple] = {}
    killed = threading.Event()
    lock = threading.Lock()
    killed_at = [float("inf")]

    def stream(i: int) -> None:
        first = None
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "seed": i},
                              timeout=TIMEOUT) as response:
                events = []
                for line in response.iter_lines():
                    if line:
                        events.append(line)
                    if line and response.status_code == 200:
                        first = first or time.monotonic()
                        with lock:  # the first chunk of any request: SIGTERM, from here
                            if not killed.is_set():
                                killed_at[0] = time.monotonic()
                                child.kill(0, signal.SIGTERM)
                                killed.set()
            results[i] = (response.status_code, events, first, time.monotonic())
        except httpx.TransportError as err:  # refused: sent after the server stopped accepting
            results[i] = (None, [repr(err)], first, time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    assert killed.wait(TIMEOUT)
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(results) == list(range(5))
    in_flight = 0
    for status, events, first, done in results.values():
        if status is None or status == 503:
            assert first is None, events  # refused before it started, not cut short
            continue
        assert status == 200 and events[-1] == "data: [DONE]", events[-3:]
        assert json.loads(events[-2][len("data: "):])["usage"]["completion_tokens"] == MAX_LEN - 4
        assert json.loads(events[-3][len("data: "):])["choices"][0]["finish_reason"] == "length"
        in_flight += first <= killed_at[0] < done
    assert in_flight >= 1, results  # streaming when the signal came, and finished after it
    [result] = child.wait(30)
    assert result.returncode == 0, child.report()
    assert "draining" in result.stderr and "stopped" in result.stderr
    try:  # and nothing listens any more
        httpx.get(url + "/health", timeout=5)
        pytest.fail("the server still answers after exiting")
    except httpx.TransportError:
        pass


def test_connections_on_the_bound_socket_send_without_delay():
    """Connections that asyncio (hence uvicorn) accepts on `serve.bind`'s socket have
    TCP_NODELAY. Without it Nagle's algorithm held a stream's events back until the client's
    delayed ACK: the first token arrived ~40 ms after the headers instead of at once."""
    sock = serve.bind("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        loop = asyncio.get_running_loop()
        seen = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                option = transport.get_extra_info("socket").getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY)
                seen.set_result(option)
                transport.close()

        server = await loop.create_server(Probe, sock=sock)
        try:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            option = await asyncio.wait_for(seen, TIMEOUT)
            writer.close()
            return option
        finally:
            server.close()
            await server.wait_closed()

    try:
        assert asyncio.run(accepted_nodelay()) != 0
    finally:
        sock.close()


def test_cli_mistakes_end_with_one_error_line(lm_workdir, tmp_path, capsys):
    """Checked before anything loads: exit code 2 and one `error:` line naming the culprit."""
    other = tmp_path / "mlm"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"objective": "bert_pretraining"}))
    busy = serve.bind("127.0.0.1", 0)
    busy.listen(1)
    try:
        for argv, message in (
                ([f"--workdir={tmp_path / 'none'}"], "does not exist"),
                ([f"--workdir={tmp_path}"], "has no readable run.json"),
                ([f"--workdir={other}"], "holds a 'bert_pretraining' model"),
                ([f"--workdir={lm_workdir}", f"--port={busy.getsockname()[1]}"],
                 "cannot listen there")):
            assert serve.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("error: ") and message in err[-1], err
    finally:
        busy.close()
    for flag in ("--max_batch=0", "--port=70000", "--max_len=1", "--bogus=1",
                 "--prefill_tokens=0", "--mesh_shape=tensor", "--rules=fsdp_tensor"):
        with pytest.raises(SystemExit, match="2"):
            serve.main([f"--workdir={lm_workdir}", flag])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and flag.split("=")[0] in err


def test_a_converted_classifier_takes_pairs_and_its_hugging_face_label_names(tmp_path):
    """A classifier converted from Hugging Face (tools/convert_checkpoint.py: run.json with
    num_labels and source.hf_dir, no config.gin) serves with the id2label names of the HF
    config.json, and takes single texts and pairs ([CLS] a [SEP] b [SEP], token types 0/1):
    its probabilities equal the model applied directly."""
    cfg = tiny_cfg(causal=False, type_vocab_size=2)
    model = SequenceClassifier(cfg, 3)
    ones = jnp.ones((1, 4), jnp.int32)
    params = random_params(model, ones, ones, ones * 0, jnp.zeros((1,), jnp.int32), seed=5)
    hf_dir, out = tmp_path / "hf", tmp_path / "converted"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(
        {"id2label": {"0": "neg", "1": "neutral", "2": "pos"}}))
    save_params(str(out / "checkpoints"), params, step=0)
    (out / "run.json").write_text(json.dumps({
        "model_config": dataclasses.asdict(cfg), "objective": "classification",
        "vocab": VOCAB, "source": {"hf_dir": str(hf_dir), "model_type": "bert"},
        "num_labels": 3}))
    classifier = load_classifier(str(out), max_batch=2, max_len=16)
    assert classifier.facts.label_names == ["neg", "neutral", "pos"]
    assert classifier.facts.pair is None  # unknown: single texts and pairs both accepted
    examples = [("It is a truth universally acknowledged",), ("Emma", "Woodhouse, handsome")]
    scores = classifier.scores(examples)
    ids, types, mask = (np.zeros((2, 16), np.int32) for _ in range(3))
    for i, texts in enumerate(examples):
        row, row_types = encode_example(texts, classifier.tokenizer, 16, style="encoder")
        ids[i, :len(row)], types[i, :len(row)], mask[i, :len(row)] = row, row_types, 1
    assert types[1].max() == 1
    logits = np.asarray(jax.jit(model.apply)({"params": classifier.params}, ids, mask, types,
                                             mask.sum(1) - 1))
    expected = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
