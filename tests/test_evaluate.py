"""python -m research.evaluate: the lm-eval adapter's loglikelihood, loglikelihood_rolling and
generate_until equal direct computations with our model (on a sharded mesh); lm-eval runs
through the CLI over local task files (offline); whole-dataset perplexity equals a direct sum
over every token."""

import dataclasses
import json
import math
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import evaluate as evaluate_cli
from research.checkpoints.manager import save_params
from research.data.sources import open_documents
from research.data.tokenizer import load_tokenizer
from research.decoding import stopping
from research.decoding.layout import Layout, run_rules
from research.evaluation.lm_adapter import ResearchLM
from research.evaluation.perplexity import dataset_perplexity
from research.evaluation.scoring import Scorer, bucket_lengths
from research.generate import generate, load_for_generation
from research.models.transformer import CausalLM, TransformerConfig

from .conftest import ROOT, run_processes, xla_flags

VOCAB = str(ROOT / "data" / "tokenizers" / "austen_8k.model")
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of "
        "such a man may be on his first entering a neighbourhood, this truth is so well fixed.")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A causal-LM workdir as research.train leaves it (as tests/test_generate.py writes one):
    run.json, a checkpoint of a randomly initialised model, config.gin."""
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64,
                            position="rotary", init_std=0.5
                            ).with_vocab(load_tokenizer(VOCAB).vocab_size).resolved()
    model = CausalLM(cfg)
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(3),
                                                        jnp.zeros((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(3)  # random N(0, 0.5) weights without compiling an init
    params = jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    path = tmp_path_factory.mktemp("eval_run")
    save_params(str(path / "checkpoints"), params, step=5)
    (path / "run.json").write_text(json.dumps({"objective": "causal_lm", "vocab": VOCAB,
                                               "model_config": dataclasses.asdict(cfg)}))
    (path / "config.gin").write_text("logical_axis_rules.preset = 'fsdp'\n")
    return path


@pytest.fixture(scope="module")
def loaded(workdir):
    """(model, params, tokenizer, layout): the checkpoint sharded over data 2 x tensor 4."""
    layout = Layout.create({"data": 2, "tensor": 4}, run_rules(str(workdir)))
    model, params, tok = load_for_generation(str(workdir), layout=layout)
    return model, params, tok, layout


@pytest.fixture(scope="module")
def direct(loaded):
    """ids -> (log-softmax float64 [T, V], logits [T, V]) of the sequence run alone through
    the model on one device, no segments, positions 0..T-1 (right-padded to max_len with
    later tokens that a causal model's earlier positions never see: one compilation)."""
    model, params, _, _ = loaded
    host = jax.device_get(params)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def run(ids):
        x = np.zeros((1, model.cfg.max_len), np.int32)
        x[0, :len(ids)] = ids
        logits = np.asarray(forward(host, x), np.float64)[0, :len(ids)]
        top = logits.max(-1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True)), logits

    return run


def req(*args):
    return types.SimpleNamespace(args=args)


def test_bucket_lengths():
    assert bucket_lengths(64) == [16, 32, 64] and bucket_lengths(100) == [16, 32, 64, 100]
    assert bucket_lengths(8) == [8]


def test_loglikelihood_equals_direct_computation(loaded, direct):
    """Sum of the continuation tokens' log-softmax with BOS + context first, is_greedy as the
    argmax over the tokenizer's ids; an empty context is BOS alone; a long one is cut from
    the left to max_length + 1 tokens. Batches of 3 over a data x tensor mesh."""
    model, params, tok, layout = loaded
    lm = ResearchLM(model, params, tok, layout, batch_size=4)
    pairs = [("It is a truth", " universally acknowledged"), ("Emma", " Woodhouse"),
             ("", "Mr. Darcy"), ("The", " end"), (TEXT * 2, " wife")]
    got = lm.loglikelihood([req(*p) for p in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        ctx = [tok.bos_id] + (tok.encode(context) if context else [])
        whole = [tok.bos_id] + tok.encode(context + continuation)
        if not context:
            whole = ctx + tok.encode(continuation)
        n = len(whole) - len(ctx)
        whole = whole[-(model.cfg.max_len + 1):]
        table, logits = direct(whole[:-1])
        targets = whole[1:]
        want = sum(table[t, targets[t]] for t in range(len(targets) - n, len(targets)))
        want_greedy = all(np.argmax(logits[t, :tok.vocab_size]) == targets[t]
                          for t in range(len(targets) - n, len(targets)))
        assert logp == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy

    # is_greedy is True exactly for the model's own greedy continuation
    prompt, cont = [tok.bos_id] + tok.encode("It is a truth"), []
    for _ in range(4):
        cont.append(int(np.argmax(direct(prompt + cont)[1][-1, :tok.vocab_size])))
    other = cont[:3] + [(cont[3] + 1) % tok.vocab_size]
    (_, yes), (_, no) = lm._loglikelihood_tokens([(None, prompt, cont), (None, prompt, other)])
    assert yes and not no


def test_loglikelihood_rolling_equals_a_direct_sum(loaded, direct):
    """Windows of 16 tokens: every token predicted once, the first from BOS, each later chunk
    with the longest context that fits (lm-eval's rolling windows)."""
    model, params, tok, layout = loaded
    lm = ResearchLM(model, params, tok, layout, batch_size=4, max_length=16)
    texts = [TEXT, "Emma Woodhouse, handsome, clever, and rich."]
    assert len(tok.encode(TEXT)) > 3 * 16
    got = lm.loglikelihood_rolling([req(t) for t in texts])
    size = 16
    for text, total in zip(texts, got):
        full = [tok.bos_id] + tok.encode(text)
        want, ends = 0.0, list(range(size + 1, len(full), size)) + [len(full)]
        start = 1
        for end in ends:  # targets full[start:end], each from the window ending at end - 1
            lo = max(0, end - 1 - size)
            table, _ = direct(full[lo:end - 1])
            want += sum(table[j - 1 - lo, full[j]] for j in range(start, end))
            start = end
        assert total == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_generate_until_equals_greedy_generation_cut_at_the_stop(loaded):
    model, params, tok, layout = loaded
    lm = ResearchLM(model, params, tok, layout, batch_size=4)
    contexts = ["It is a truth", "Emma", "She was the youngest of the two daughters"]
    prompts = [[tok.bos_id] + tok.encode(c) for c in contexts]
    rows = generate(model, params, prompts + prompts[:1], max_new_tokens=12, eos_id=tok.eos_id,
                    pad_id=tok.pad_id, temperature=0, vocab_limit=tok.vocab_size,
                    layout=layout)
    free = [stopping.continuation(tok.decode, p, r) for p, r in zip(prompts, rows)]  # 3 rows
    stop = free[0][len(free[0]) // 2:][:2]  # a stop string the first row does hold
    assert stop.strip() and stop in free[0]
    kwargs = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until([req(c, dict(kwargs)) for c in contexts])
    assert got == [stopping.truncate(text, [stop]) for text in free]
    assert len(got[0]) < len(free[0])


def write_tasks(tmp_path):
    """A multiple-choice, a generate_until and a perplexity task over local jsonl files."""
    mc = [{"question": "It is a truth universally", "choices": [" acknowledged", " denied"],
           "label": 0},
          {"question": "Emma Woodhouse, handsome, clever, and", "choices": [" rich", " poor",
                                                                           " tall"], "label": 0},
          {"question": "Mr. Darcy", "choices": [" danced", " sang"], "label": 1}]
    qa = [{"q": "Who lived at Hartfield?", "a": "Emma"}, {"q": "Who wrote Emma?", "a": "Austen"}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in qa))
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ntest_split: test\n"
    (tasks / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path}/mc.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path}/qa.jsonl\n"
        "output_type: generate_until\ndoc_to_text: \"Q: {{q}}\\nA:\"\n"
        "doc_to_target: \" {{a}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
        "  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    (tasks / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path}/text.jsonl\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return tasks


def test_cli_runs_lm_eval_over_local_task_files(workdir, tmp_path):
    """lm-eval's simple_evaluate over three local tasks through the CLI (a subprocess,
    offline): its table printed, its JSON written."""
    tasks = write_tasks(tmp_path)
    out = tmp_path / "res" / "results.json"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), XLA_FLAGS=xla_flags(2))
    [proc] = run_processes([[sys.executable, "-m", "research.evaluate", f"--workdir={workdir}",
                             "--tasks=tiny_mc,tiny_gen,tiny_ppl", f"--include_path={tasks}",
                             "--batch_size=4", "--num_fewshot=0", f"--output={out}",
                             "--mesh_shape={'data': 2}"]], timeout=150, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("tiny_mc", "tiny_gen", "tiny_ppl"):
        assert f"|{name}" in proc.stdout.replace(" ", ""), proc.stdout
    results = json.loads(out.read_text())["results"]
    assert 0 <= results["tiny_mc"]["acc,none"] <= 1
    assert results["tiny_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert results["tiny_ppl"]["bits_per_byte,none"] > 0


def test_dataset_perplexity_equals_a_direct_sum(loaded, direct, tmp_path):
    """Every target of every document counted once: documents packed end to end into windows
    of 16 tokens, a document cut by a window edge continuing from its previous token alone;
    with windows longer than every document, each document's own sum."""
    model, params, tok, layout = loaded
    (tmp_path / "a.txt").write_text(f"{TEXT}\n\nEmma Woodhouse.\n\n{TEXT[:90]}\n")
    spec = f"text:{tmp_path}/a.txt"
    docs = list(open_documents(spec, data_dir=str(tmp_path / "cache")))
    assert len(docs) == 3
    pairs = [([tok.bos_id] + tok.encode(d), tok.encode(d) + [tok.eos_id]) for d in docs]
    stream_in = [t for p in pairs for t in p[0]]
    doc_of = [i for i, p in enumerate(pairs) for _ in p[0]]
    stream_out = [t for p in pairs for t in p[1]]

    def reference(window: int) -> float:
        nll = 0.0
        for lo in range(0, len(stream_in), window):
            hi = min(lo + window, len(stream_in))
            j = lo
            while j < hi:  # one segment: the piece of one document inside this window
                k = j
                while k < hi and doc_of[k] == doc_of[j]:
                    k += 1
                table, _ = direct(stream_in[j:k])
                nll -= sum(table[t - j, stream_out[t]] for t in range(j, k))
                j = k
        return nll

    for window, batch in ((16, 4), (64, 4)):
        scorer = Scorer(model, params, layout, batch_size=batch, max_length=window,
                        vocab_limit=tok.vocab_size)
        got = dataset_perplexity(scorer, tok, spec, seq_len=window, tokenize_workers=0,
                                 data_dir=str(tmp_path / "cache"))
        want = reference(window)
        assert got["tokens"] == len(stream_out) and got["documents"] == 3
        assert got["nll"] == pytest.approx(want, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(want / len(stream_out)), rel=1e-5)
        n_bytes = sum(len(d.encode()) for d in docs)
        assert got["bytes"] == n_bytes
        assert got["bits_per_byte"] == pytest.approx(want / math.log(2) / n_bytes, rel=1e-5)
    assert len(stream_in) > 64  # documents cut at window edges in both


def test_cli_data_perplexity_and_bad_input(workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RESEARCH_DATA_DIR", str(tmp_path / "cache"))
    (tmp_path / "a.txt").write_text(f"{TEXT}\n\nEmma Woodhouse.\n")
    out = tmp_path / "ppl.json"
    args = [f"--workdir={workdir}", f"--data=text:{tmp_path}/a.txt", "--seq_len=16",
            "--batch_size=4", f"--output={out}", "--mesh_shape={'data': 2, 'tensor': 4}"]
    assert evaluate_cli.main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert "|perplexity" in printed and f"{result['perplexity']:.4f}" in printed
    assert result["documents"] == 2 and result["seq_len"] == 16
    assert result["bits_per_byte"] == pytest.approx(
        result["nll"] / math.log(2) / result["bytes"])

    def error(argv):
        try:
            code = evaluate_cli.main(argv)
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        return code, capsys.readouterr().err.strip().splitlines()[-1]

    assert error(args[:2] + ["--limit=3"]) == (
        2, "error: --limit: only for --tasks, not --data (`python -m research.evaluate "
           "--help` lists the flags).")
    code, line = error(args[:1] + ["--tasks=tiny", f"--include_path={tmp_path}/none"])
    assert (code, line) == (2, f"error: --include_path={tmp_path}/none is not a directory of "
                               "task YAMLs.")
    code, line = error([f"--workdir={tmp_path}/nothing", f"--data=text:{tmp_path}/a.txt"])
    assert code == 2 and line.startswith(f"error: --workdir={tmp_path}/nothing does not exist")
    code, line = error(args[:2] + ["--seq_len=65"])
    assert code == 2 and line.startswith("error: a window of 65 tokens exceeds the model's "
                                         "max_len 64")
