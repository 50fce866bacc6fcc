"""KV-cache decoding equals recomputation; sampling filters behave; decoding sharded over 8
(simulated CPU) devices equals one device; stop strings end rows; the CLI's new flags.
(Parity with Hugging Face's generate: tests/test_generate_hf_parity.py.)"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from research import generate as generate_cli
from research.checkpoints.manager import save_params
from research.data.tokenizer import load_tokenizer
from research.decoding import sampling, stopping
from research.decoding.layout import Layout, run_rules
from research.generate import generate, left_pad, sample_logits
from research.models.transformer import CausalLM, TransformerConfig
from research.training import partitioning

from .conftest import ROOT

PROMPTS = [[2, 5, 6, 7, 8, 9], [2, 10], [2, 3, 4]]


def model_and_params(**kw):
    cfg = TransformerConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                            max_len=64, init_std=0.5, **kw)
    model = CausalLM(cfg)
    return model, nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])


@pytest.mark.parametrize("options", [dict(), dict(position="rotary", num_kv_heads=1, scan_layers=True)])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0),
                                      dict(temperature=1.0, top_k=20, top_p=0.9, seed=3)])
def test_kv_cache_equals_no_cache(options, sampling):
    model, params = model_and_params(**options)
    kw = dict(max_new_tokens=12, eos_id=3, pad_id=0, **sampling)
    cached = generate(model, params, PROMPTS, **kw)
    recomputed = generate(model, params, PROMPTS, use_cache=False, **kw)
    assert cached == recomputed
    assert all(1 <= len(row) <= 12 for row in cached)


def test_the_cache_holds_the_request_not_max_len():
    """A rotary model with a long max_len (Llama 3's is 131072) decodes through a cache of the
    prompt + new tokens rounded up to 256 positions, with the same tokens as no cache."""
    from research.decoding.cache import cache_sized

    model, params = model_and_params(position="rotary", num_kv_heads=2)
    model = CausalLM(dataclasses.replace(model.cfg, max_len=4096))
    assert cache_sized(model, 20).cfg.max_len == 256 and cache_sized(model, 300).cfg.max_len == 512
    assert cache_sized(model, 5000) is model
    learned, _ = model_and_params()
    assert cache_sized(learned, 20) is learned  # its position table has max_len rows
    kw = dict(max_new_tokens=12, eos_id=3, pad_id=0, temperature=0.0)
    assert generate(model, params, PROMPTS, **kw) == generate(model, params, PROMPTS,
                                                             use_cache=False, **kw)


def test_batched_prompts_equal_single_prompts():
    model, params = model_and_params()
    batched = generate(model, params, PROMPTS, max_new_tokens=10, eos_id=3, pad_id=0, temperature=0)
    for prompt, row in zip(PROMPTS, batched):
        alone = generate(model, params, [prompt], max_new_tokens=10, eos_id=3, pad_id=0, temperature=0)
        assert alone[0] == row


def test_greedy_continues_with_the_argmax_of_a_full_forward():
    model, params = model_and_params()
    row = generate(model, params, [PROMPTS[0]], max_new_tokens=1, eos_id=-1, pad_id=0, temperature=0)
    logits = model.apply({"params": params}, jnp.asarray([PROMPTS[0]]))
    assert row[0][0] == int(jnp.argmax(logits[0, -1]))


def test_ids_past_the_tokenizer_vocab_are_never_generated():
    model, params = model_and_params()
    kw = dict(max_new_tokens=12, eos_id=-1, pad_id=0, temperature=1.0, top_k=20, top_p=0.9)
    assert max(t for row in generate(model, params, PROMPTS, **kw) for t in row) >= 64
    limited = generate(model, params, PROMPTS, vocab_limit=64, **kw)
    assert max(t for row in limited for t in row) < 64


def test_left_pad_layout():
    tokens, segments = left_pad([[5, 6, 7], [8]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[5, 6, 7], [0, 0, 8]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    draws = lambda **kw: np.asarray(sample_logits(logits, jax.random.key(0), **kw))  # noqa: E731
    assert set(draws(temperature=1.0, top_k=2, top_p=1.0).tolist()) == {0, 1}
    assert set(draws(temperature=1.0, top_k=0, top_p=0.7).tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7
    assert set(draws(temperature=1.0, top_k=0, top_p=0.1).tolist()) == {0}
    free = draws(temperature=1.0, top_k=0, top_p=1.0)
    freq = np.bincount(free, minlength=4) / free.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    np.testing.assert_array_equal(draws(temperature=0.0, top_k=0, top_p=1.0), 0)


def test_too_long_request_is_refused():
    model, params = model_and_params()
    with pytest.raises(ValueError, match="max_len"):
        generate(model, params, PROMPTS, max_new_tokens=100, eos_id=3, pad_id=0)


def test_sharded_decoding_equals_one_device():
    """Parameters by the fsdp_tensor rules over data 2 x fsdp 2 x tensor 2, the KV cache over
    batch and kv heads: greedy and beam-search tokens equal one device's."""
    model, params = model_and_params(position="rotary", num_kv_heads=2, scan_layers=True)
    layout = Layout.create({"data": 2, "fsdp": 2, "tensor": 2})
    assert len(layout.mesh.devices.flat) == 8
    sharded = layout.put_params(model, params)
    query = sharded["decoder"]["layers"]["block"]["attention"]["query"]["kernel"]  # [L, D, N, H]
    assert query.sharding.spec == P(None, "fsdp", "tensor", None)
    prompts = PROMPTS + [[2, 11, 12, 13]]  # 4 rows: one per data x fsdp shard
    for kw in (dict(temperature=0.0), dict(num_beams=2, length_penalty=0.8)):
        one = generate(model, params, prompts, max_new_tokens=10, eos_id=3, pad_id=0, **kw)
        eight = generate(model, sharded, prompts, max_new_tokens=10, eos_id=3, pad_id=0,
                         layout=layout, **kw)
        assert eight == one

    tokens, segments = left_pad(prompts, pad_id=0)
    with layout.context():
        state = sampling.start(model, sharded, layout.batch(tokens), layout.batch(segments),
                               jax.random.key(0), max_new_tokens=10, pad_id=0, vocab_limit=128,
                               layout=layout)
    cached_key = state.cache["decoder"]["layers"]["block"]["attention"]["cached_key"]
    expected = NamedSharding(layout.mesh, P(None, ("data", "fsdp"), "tensor", None, None))
    assert cached_key.sharding.is_equivalent_to(expected, cached_key.ndim)  # [L, B, K, S, H]


def _tags(ids):
    return "".join(f"<{i}>" for i in ids)


def test_stop_strings_end_rows_where_their_text_first_holds_one():
    model, params = model_and_params()
    kw = dict(max_new_tokens=30, eos_id=-1, pad_id=0, temperature=0.0)
    free = generate(model, params, PROMPTS, **kw)
    # Tokens 7-8 of row 0: found only after the second host check (every 8 tokens).
    stops = [_tags(free[0][7:9]), "<never>"]
    before = sampling.run._cache_size()
    stopped = generate(model, params, PROMPTS, stop=stops, decode=_tags, **kw)
    assert sampling.run._cache_size() - before <= 1  # the chunks reuse one compilation
    for prompt, full, row in zip(PROMPTS, free, stopped):
        ends = [n for n in range(1, len(full) + 1)
                if stopping.find_stop(_tags(full[:n]), stops) >= 0]
        assert row == (full[: ends[0]] if ends else full)
        text = stopping.truncate(stopping.continuation(_tags, prompt, row), stops)
        assert text == _tags(full)[: _tags(full).find(stops[0])] if ends else _tags(full)
    assert len(stopped[0]) <= 9


def test_stop_text_keeps_the_word_boundary():
    words = {1: "It", 2: "is", 3: "a", 4: "truth"}
    decode = lambda ids: " ".join(words[i] for i in ids)  # noqa: E731 - SentencePiece-like
    assert decode([3]) == "a" and stopping.continuation(decode, [1, 2], [3, 4]) == " a truth"
    assert stopping.truncate(" a truth", [" tr", "zz"]) == " a"
    assert stopping.stop_length(decode, [1, 2], [3, 4], [" tr"]) == 2
    assert stopping.stop_length(decode, [1, 2], [3, 4], ["x"]) == -1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A causal-LM workdir as research.train leaves it: run.json, a checkpoint, config.gin."""
    vocab = str(ROOT / "data" / "tokenizers" / "austen_8k.model")
    cfg = TransformerConfig(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=64,
                            init_std=0.5).with_vocab(load_tokenizer(vocab).vocab_size).resolved()
    model = CausalLM(cfg)
    params = nn.unbox(model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
    path = tmp_path_factory.mktemp("gen_run")
    save_params(str(path / "checkpoints"), params, step=5)
    (path / "run.json").write_text(json.dumps({"objective": "causal_lm", "vocab": vocab,
                                               "model_config": dataclasses.asdict(cfg)}))
    (path / "config.gin").write_text("logical_axis_rules.preset = 'fsdp'\n")
    return path


def test_generate_cli_greedy_stop_and_beams_on_a_mesh(workdir, capsys):
    args = [f"--workdir={workdir}", "--prompt=It is a truth", "--prompt=Emma",
            "--max_new_tokens=12", "--mesh_shape={'data': 2, 'tensor': 4}"]

    def run(*extra):
        assert generate_cli.main(args + list(extra)) == 0
        sections = capsys.readouterr().out.split("--- ")[1:]
        return [s.split("\n", 1)[1].rstrip("\n") for s in sections]

    free = run("--temperature=0")
    cut = run("--temperature=0", "--stop=e", "--stop=zzz")
    for prompt, full, short in zip(("It is a truth", "Emma"), free, cut):
        head = full[: full.index(prompt) + len(prompt)]
        assert short == head + stopping.truncate(full[len(head):], ["e"])
    assert len(run("--num_beams=3", "--length_penalty=0.5")) == 2

    with pytest.raises(SystemExit, match="2"):
        generate_cli.main(args + ["--num_beams=2", "--temperature=0.5"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --num_beams=2 is deterministic beam search; drop --temperature")


def test_run_rules_come_from_config_gin(workdir):
    assert run_rules(str(workdir)) == partitioning.logical_axis_rules("fsdp")
    assert run_rules(str(workdir), "data_parallel") == partitioning.logical_axis_rules(
        "data_parallel")
    assert run_rules(str(workdir / "checkpoints")) == partitioning.logical_axis_rules()
