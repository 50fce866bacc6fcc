"""research.checkpoints.hf.llama: Llama, Mistral, Qwen2 and Gemma checkpoints in and out.

Parity: HF PyTorch models from small random configs -> save_pretrained -> the converter ->
our CausalLM, logits within 1e-4 (fp32, CPU), covering GQA/MQA, untied embeddings, Llama 3
rope scaling, attention/MLP biases, Qwen2's q/k/v-only biases, Mistral's sliding window
(shorter than the sequence, also through the KV cache) and Gemma (scaled embeddings, the
`1 + weight` RMSNorm, tanh GeGLU, head_dim != d_model / heads). Round trips: our random params
-> HF (sharded safetensors + index) -> transformers loads them and agrees -> back, bit-identical.
Parameter counts of configs/models/llama_*.gin equal transformers' for the HF configs.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from research.checkpoints.errors import ConversionError  # noqa: E402
from research.checkpoints.hf import convert as hf_convert  # noqa: E402
from research.checkpoints.hf import llama as hf_llama  # noqa: E402
from research.checkpoints.hf import rules as hf_rules  # noqa: E402
from research.checkpoints.hf import safetensors_io  # noqa: E402
from research.models.attention import llama3_frequencies  # noqa: E402
from research.models.attention_select import select_impl  # noqa: E402
from research.models.transformer import (  # noqa: E402
    CausalLM, TransformerConfig, analytic_param_count, count_params)

from .test_hf_convert import (  # noqa: E402
    assert_bit_identical, config_from_outputs, load_hf_strict, max_diff, restore, run_tool,
    torch_long)

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = 1e-4
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# id -> (HF class name, config kwargs). Sequences are 12 tokens long.
CASES = {
    "llama_gqa_untied_rope_llama3": ("Llama", dict(SMALL, rope_theta=500000.0,
                                                   rope_scaling=LLAMA3)),
    "llama_mha_tied_biases": ("Llama", dict(SMALL, num_key_value_heads=4, attention_bias=True,
                                            mlp_bias=True, tie_word_embeddings=True)),
    "mistral_window_3": ("Mistral", dict(SMALL, sliding_window=3)),
    "qwen2_qkv_biases_tied": ("Qwen2", dict(SMALL, tie_word_embeddings=True,
                                            rope_theta=1e6)),
    "gemma_mqa_head_dim_16": ("Gemma", dict(SMALL, num_key_value_heads=1, head_dim=16)),
}


def hf_model(kind: str, seed: int = 0, **kwargs):
    """A random-weight HF `{kind}ForCausalLM` (eager attention, eval mode): every parameter
    noise, RMSNorm weights 1 + noise (Gemma's, stored as w in (1 + w): noise)."""
    config = getattr(transformers, f"{kind}Config")(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            norm = p.ndim == 1 and name.endswith("norm.weight") and kind != "Gemma"
            p.copy_(1 + noise if norm else noise)
    return model.eval()


def batch(vocab: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """ids int32[2, 12] and a mask with right padding in the second row."""
    ids = np.random.default_rng(seed).integers(0, vocab, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch_long(ids), attention_mask=torch_long(mask)).logits.numpy()


def our_logits(cfg: TransformerConfig, params, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(CausalLM(cfg).apply)({"params": params}, ids, segment_ids=mask))


# ------------------------------------------------------------------------- parity ------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_transformers(tmp_path, case):
    kind, kwargs = CASES[case]
    hf = hf_model(kind, **kwargs)
    hf.save_pretrained(str(tmp_path / "hf"))
    converted = hf_convert.from_hf(str(tmp_path / "hf"))
    cfg, params = converted.cfg, hf_rules.nest(converted.params)
    assert converted.model_type == kind.lower() and converted.objective == "causal_lm"
    assert (cfg.kv_heads, cfg.tie_embeddings) == (kwargs["num_key_value_heads"],
                                                  hf.config.tie_word_embeddings)
    ids, mask = batch(cfg.vocab_size)
    real = mask.astype(bool)
    ref = hf_logits(hf, ids, mask)
    assert max_diff(our_logits(cfg, params, ids, mask)[real], ref[real]) <= TOL

    # The feature under test changes HF's logits, so the parity above exercised it.
    plain = {"llama_gqa": dict(rope_scaling=None), "mistral": dict(sliding_window=None)}
    for prefix, change in plain.items():
        if case.startswith(prefix):
            other = hf_model(kind, **{**kwargs, **change})
            other.load_state_dict(hf.state_dict())
            assert max_diff(hf_logits(other, ids, mask)[real], ref[real]) > 100 * TOL


def test_converter_cli_writes_what_rebuilds_the_model(tmp_path):
    """tools/convert_checkpoint.py --from_hf on a Llama 3 checkpoint: model.gin / run.json
    rebuild the config (rope scaling included), scanned params restore and agree with HF."""
    hf = hf_model("Llama", **CASES["llama_gqa_untied_rope_llama3"][1])
    hf.save_pretrained(str(tmp_path / "hf"))
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={tmp_path / 'hf'}", f"--to={out}", "--scan_layers")
    cfg = config_from_outputs(out)
    assert (cfg.rope_scaling, cfg.rope_theta, cfg.rope_original_max_len, cfg.num_kv_heads,
            cfg.activation, cfg.scan_layers) == ("llama3", 500000.0, 16, 2, "swiglu", True)
    assert "rope_scaling = 'llama3'" in pathlib.Path(out, "model.gin").read_text()
    ids, mask = batch(cfg.vocab_size)
    params = restore(out, CausalLM(cfg), ids)
    real = mask.astype(bool)
    assert max_diff(our_logits(cfg, params, ids, mask)[real],
                    hf_logits(hf, ids, mask)[real]) <= TOL


@pytest.mark.parametrize("head_dim, factor, original", [(128, 8.0, 8192), (64, 32.0, 8192),
                                                         (8, 8.0, 16)])
def test_llama3_rope_frequencies_equal_transformers_bit_for_bit(head_dim, factor, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(LLAMA3, factor=factor, original_max_position_embeddings=original)
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                      rope_theta=5e5, rope_scaling=scaling,
                                      max_position_embeddings=4 * original)
    want = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].numpy()
    got = llama3_frequencies(head_dim, 5e5, factor, 1.0, 4.0, original)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    unscaled = 5e5 ** (-np.arange(head_dim // 2) / (head_dim // 2))
    assert np.any(got < 0.9 * unscaled)  # the low frequencies are scaled


def test_sliding_window_through_the_kv_cache():
    """Decoding token by token with a window of 3 equals the full forward pass (both equal HF's
    within TOL, see test_logits_equal_transformers)."""
    cfg = TransformerConfig(vocab_size=50, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                            mlp_dim=48, activation="swiglu", norm="rmsnorm", position="rotary",
                            max_len=12, use_bias=False, sliding_window=3, dtype="float32")
    model = CausalLM(cfg)
    ids = np.random.default_rng(0).integers(0, 50, (1, 10)).astype(np.int32)
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), ids[:, :1],
                                                          decode=True)))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
                          abstract["params"])
    full = np.asarray(jax.jit(model.apply)({"params": params}, ids))

    @jax.jit
    def step(cache, token, position):
        logits, updates = model.apply({"params": params, "cache": cache}, token,
                                      positions=position, decode=True, mutable=["cache"])
        return logits, updates["cache"]

    cache = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract["cache"])  # index 0
    steps = []
    for t in range(ids.shape[1]):
        logits, cache = step(cache, ids[:, t:t + 1], np.full((1, 1), t, np.int32))
        steps.append(np.asarray(logits)[:, 0])
    assert max_diff(np.stack(steps, axis=1), full) <= 1e-5


# ------------------------------------------------------------------------- round trips -------


EXPORTS = {  # model_type -> TransformerConfig overrides of BASE
    "llama": dict(num_kv_heads=2, tie_embeddings=False, use_bias=True, rope_theta=5e5,
                  rope_scaling="llama3", rope_scaling_factor=4.0, rope_original_max_len=16),
    "mistral": dict(num_kv_heads=2, tie_embeddings=False, sliding_window=4),
    "qwen2": dict(num_kv_heads=2, qkv_bias=True, sliding_window=5, rope_theta=1e6),
    "gemma": dict(num_kv_heads=1, head_dim=16, activation="geglu", scale_embeddings=True,
                  norm_scale_offset=1.0, norm_eps=1e-6),
}
BASE = dict(vocab_size=80, num_layers=2, d_model=32, num_heads=4, mlp_dim=40,
            activation="swiglu", norm="rmsnorm", norm_eps=1e-5, position="rotary", max_len=64,
            use_bias=False, dropout_rate=0.0, causal=True)


@pytest.mark.parametrize("model_type", sorted(EXPORTS))
def test_round_trip_through_sharded_files_is_exact_and_hf_agrees(tmp_path, model_type):
    cfg = TransformerConfig(**{**BASE, **EXPORTS[model_type]})
    ids, mask = batch(cfg.vocab_size, seed=7)
    abstract = jax.eval_shape(lambda: nn.unbox(CausalLM(cfg).init(jax.random.key(0), ids)))
    rng = np.random.default_rng(8)
    params = jax.tree.map(lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32),
                          abstract["params"])
    config, state = hf_convert.to_hf(cfg, hf_rules.flatten(params), {"bos": 1, "eos": 2})
    assert config["model_type"] == model_type
    hf_dir = tmp_path / "hf"
    safetensors_io.write_hf_dir(str(hf_dir), config, state, max_shard_size=8_000)
    index = json.loads((hf_dir / safetensors_io.WEIGHTS_INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(state)
    assert not (hf_dir / safetensors_io.WEIGHTS_FILE).exists()

    back = hf_convert.from_hf(str(hf_dir))
    assert back.cfg == cfg
    assert_bit_identical(hf_rules.nest(back.params), params)

    cls = getattr(transformers, hf_llama.ARCHITECTURES[model_type])
    hf = load_hf_strict(cls, str(hf_dir))
    real = mask.astype(bool)
    assert max_diff(our_logits(cfg, params, ids, mask)[real],
                    hf_logits(hf, ids, mask)[real]) <= TOL

    # Rewriting the directory unsharded removes the shards and the index.
    safetensors_io.write_hf_dir(str(hf_dir), config, state)
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "model.safetensors"]
    assert_bit_identical(hf_rules.nest(hf_convert.from_hf(str(hf_dir)).params), params)


# ------------------------------------------------------------------------- model configs -----


HF_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, hidden_act="silu",
                 max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                 attention_bias=False, mlp_bias=False, bos_token_id=128000,
                 eos_token_id=128001)


def _scaling(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# gin file -> (the HF config.json fields of the model it follows, its published count)
MODEL_FILES = {
    "llama_1b.gin": (dict(HF_LLAMA3, hidden_size=2048, intermediate_size=8192,
                          num_hidden_layers=16, num_attention_heads=32, head_dim=64,
                          tie_word_embeddings=True, rope_scaling=_scaling(32.0)), 1_235_814_400),
    "llama_3b.gin": (dict(HF_LLAMA3, hidden_size=3072, intermediate_size=8192,
                          num_hidden_layers=28, num_attention_heads=24, head_dim=128,
                          tie_word_embeddings=True, rope_scaling=_scaling(32.0)), 3_212_749_824),
    "llama_8b.gin": (dict(HF_LLAMA3, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, head_dim=128,
                          tie_word_embeddings=False, rope_scaling=_scaling(8.0)), 8_030_261_248),
    "llama_tiny.gin": (dict(HF_LLAMA3, vocab_size=1024, hidden_size=64, intermediate_size=192,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                            rope_scaling=dict(_scaling(32.0),
                                              original_max_position_embeddings=256)), None),
}


def gin_config(name: str) -> TransformerConfig:
    gin.clear_config()
    try:
        gin.parse_config_file(str(ROOT / "configs" / "models" / name))
        return TransformerConfig().with_vocab(1000)
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_llama_configs_match_hf_shapes_and_parameter_counts(name):
    hf_fields, published = MODEL_FILES[name]
    cfg = gin_config(name)
    assert hf_llama.llama_config_from_hf({**hf_fields, "model_type": "llama"}) == \
        dataclasses.replace(cfg, attention_dropout_rate=0.0, init_std=0.02)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_fields))
    hf_count = hf.num_parameters()
    assert analytic_param_count(cfg) == hf_count
    assert published is None or hf_count == published
    scanned = dataclasses.replace(cfg, scan_layers=True)  # one traced block, same parameters
    ids = np.zeros((1, 8), np.int32)
    abstract = jax.eval_shape(lambda: CausalLM(scanned).init(jax.random.key(0), ids))
    assert count_params(nn.unbox(abstract["params"])) == hf_count


# ------------------------------------------------------------------------- refusals ----------


def test_unsupported_variants_are_refused_with_one_clear_error():
    base = {**SMALL, "model_type": "llama"}
    cases = {
        "rope scaling type 'yarn' is not supported; supported: none":
            dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        "rope scaling type 'linear'": dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1e4}),
        "partial_rotary_factor=0.5": dict(partial_rotary_factor=0.5),
        "attention_bias=True with mlp_bias=False": dict(attention_bias=True),
        "hidden_act='gelu' is not supported": dict(hidden_act="gelu"),
        "mixes sliding-window and full-attention layers":
            dict(model_type="qwen2", use_sliding_window=True, sliding_window=4,
                 max_window_layers=1),
    }
    for message, change in cases.items():
        with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
            hf_llama.llama_config_from_hf({**base, **change})
    # transformers 5's config.json spelling and Gemma's legacy "gelu" are understood.
    v5 = hf_llama.llama_config_from_hf({**base, "rope_parameters": dict(LLAMA3, rope_theta=5e5)})
    assert (v5.rope_scaling, v5.rope_theta, v5.rope_scaling_factor) == ("llama3", 5e5, 8.0)
    assert hf_llama.llama_config_from_hf({**base, "model_type": "gemma",
                                          "hidden_act": "gelu"}).activation == "geglu"

    gemma_like = TransformerConfig(vocab_size=64, norm="rmsnorm", position="rotary",
                                   activation="swiglu", use_bias=False, scale_embeddings=True,
                                   norm_scale_offset=1.0)
    with pytest.raises(ConversionError, match="activation='swiglu' \\(HF gemma is geglu\\)"):
        hf_convert.to_hf(gemma_like, {})


def test_a_sliding_window_runs_the_einsum_kernel():
    cfg = TransformerConfig(vocab_size=64, sliding_window=8, dtype="bfloat16", d_model=256,
                            num_heads=2)
    kw = dict(q_len=256, kv_len=256, decode=False, dropout=False)
    assert select_impl(cfg, backend="gpu", cuda=True, **kw) == "einsum"
    assert select_impl(cfg, backend="tpu", cuda=False, **kw) == "einsum"
    for impl in ("cudnn", "splash"):
        forced = dataclasses.replace(cfg, attention_impl=impl)
        assert select_impl(forced, backend="gpu", cuda=True, **kw) == "einsum"
    windowless = dataclasses.replace(cfg, sliding_window=None)
    assert select_impl(windowless, backend="gpu", cuda=True, **kw) == "cudnn"
