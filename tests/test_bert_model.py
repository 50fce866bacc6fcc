"""BERT pretraining model and objective: parameter counts, configs, losses against numpy,
sharded and accumulated train steps, and the CLI end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from research.training import partitioning
from research.models.bert import BertPretrainer, bert_param_count
from research.objectives.bert_pretraining import BertPretrainingObjective
from research.config import parse_gin
from research.data.sources import DocumentList
from research.objectives.losses import summarize
from research.models.transformer import TransformerConfig, count_params
from research.training.loop import build_setup, make_train_step

from .conftest import ROOT, austen_paragraphs, xla_flags

BERT_SIZES = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512),
              "base": (12, 768), "large": (24, 1024)}
TINY = TransformerConfig(vocab_size=120, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                         max_len=64, activation="gelu_exact", norm_eps=1e-12,
                         norm_placement="post", type_vocab_size=2, embedding_norm=True,
                         causal=False, dropout_rate=0.1, attention_dropout_rate=0.1,
                         vocab_multiple=8)
SEQ, BATCH, PREDS = 32, 8, 5


def paper_config(layers: int, d: int, vocab: int = 30522) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab, num_layers=layers, d_model=d, num_heads=d // 64,
                             mlp_dim=4 * d, max_len=512, activation="gelu_exact",
                             norm_eps=1e-12, norm_placement="post", type_vocab_size=2,
                             embedding_norm=True, causal=False)


def abstract_params(objective, cfg, seq_len=16):
    model = objective.make_model(cfg)
    batch = objective.dummy_batch(1, seq_len)
    key = jax.random.key(0)
    return nn.unbox(jax.eval_shape(
        lambda: objective.init(model, {"params": key, "dropout": key}, batch))["params"])


def init_params(objective, model, batch, seed=0):
    """Initialized (unboxed) parameters; jitted, as eager init is slow on CPU."""
    key = jax.random.key(seed)
    return nn.unbox(jax.jit(lambda: objective.init(model, {"params": key}, batch))()["params"])


def synthetic_batch(seed=0, b=4, length=16, preds=PREDS, vocab=120):
    """A fixed BERT batch: [CLS] A [SEP] B [SEP] rows of varied length, padding after them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(7, vocab, (b, length)).astype(np.int32)
    mask = np.zeros((b, length), np.int32)
    types = np.zeros((b, length), np.int32)
    positions = np.zeros((b, preds), np.int32)
    labels = np.zeros((b, preds), np.int32)
    weights = np.zeros((b, preds), np.float32)
    for i in range(b):
        n = length - 3 * i if i < b - 1 else length  # last row unpadded
        split = n // 2
        ids[i, 0], ids[i, split], ids[i, n - 1] = 4, 5, 5
        ids[i, n:] = 0
        mask[i, :n] = 1
        types[i, split + 1:n] = 1
        m = min(preds, 1 + i)
        pos = np.sort(rng.choice(np.arange(1, n - 1), m, replace=False))
        positions[i, :m], labels[i, :m], weights[i, :m] = pos, ids[i, pos], 1.0
        ids[i, pos] = 6  # [MASK]
    return {"input_ids": ids, "input_mask": mask, "segment_ids": types,
            "masked_lm_positions": positions, "masked_lm_ids": labels,
            "masked_lm_weights": weights,
            "next_sentence_labels": rng.integers(0, 2, b).astype(np.int32)}


# ------------------------------------------------------------------ sizes and configs ------

def test_bert_base_has_the_papers_110m_parameters():
    """Encoder + pooler (the paper's convention, = Hugging Face BertModel) with vocab 30522:
    embeddings 30522*768 + 512*768 + 2*768 + LN 2*768 = 23,837,184; per layer
    4*(768*768+768) + 2*768*3072 + 3072 + 768 + 2 LNs 2*2*768 = 7,087,872 (x12 = 85,054,464);
    pooler 768*768 + 768 = 590,592. Total 109,482,240. The pretraining heads add
    MLM transform 590,592 + LN 1,536 + output bias 30,522 + NSP 1,538 = 624,188."""
    objective = BertPretrainingObjective()
    cfg = paper_config(12, 768)
    params = abstract_params(objective, cfg)
    encoder_pooler = count_params({k: params[k] for k in ("encoder", "pooler")})
    assert encoder_pooler == 109_482_240 == bert_param_count(cfg)
    assert 109e6 <= encoder_pooler <= 111e6
    assert count_params(params) == 110_106_428 == bert_param_count(cfg, heads=True)


@pytest.mark.parametrize("size", list(BERT_SIZES))
def test_bert_model_configs_parse_and_build(size, clean_gin):
    parse_gin([f"configs/models/bert_{size}.gin", "configs/runs/pretrain_mlm_nsp.gin"], [],
              finalize=False)
    cfg = TransformerConfig().with_vocab(8000)
    layers, d = BERT_SIZES[size]
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.mlp_dim) == (layers, d, d // 64, 4 * d)
    assert (cfg.causal, cfg.norm_placement, cfg.activation, cfg.norm_eps, cfg.type_vocab_size,
            cfg.embedding_norm, cfg.max_len, cfg.vocab_size) == (
        False, "post", "gelu_exact", 1e-12, 2, True, 512, 8064)
    objective = BertPretrainingObjective()
    assert objective.next_sentence and objective.max_predictions_per_seq == 20
    if size == "tiny":  # really initialized (the train-step and CLI tests run models too)
        params = init_params(objective, objective.make_model(cfg), objective.dummy_batch(1, 8))
    else:  # traced through init with abstract arrays only: fast, and no memory for large
        params = abstract_params(objective, cfg)
    assert count_params(params) == bert_param_count(cfg, heads=True)


@pytest.fixture(scope="module")
def tiny():
    """(objective, model, params, batch, run) for TINY on `synthetic_batch()`; `run(params,
    batch)` is jitted once and returns ((mlm, nsp logits), (sequence, pooled), (loss, metrics))."""
    objective = BertPretrainingObjective()
    model = objective.make_model(TINY)
    batch = synthetic_batch()

    @jax.jit
    def run(params, batch):
        args = (batch["input_ids"], batch["input_mask"], batch["segment_ids"])
        logits = model.apply({"params": params}, *args, batch["masked_lm_positions"])
        encoded = model.apply({"params": params}, *args, method=BertPretrainer.encode)
        loss = objective.loss(model, params, batch, jax.random.key(1),
                              objective.normalizers(batch), deterministic=True)
        return logits, encoded, loss

    return objective, model, init_params(objective, model, batch), batch, run


def test_mlm_only_run_config(clean_gin, tiny):
    parse_gin(["configs/models/bert_tiny.gin", "configs/runs/pretrain_mlm.gin"], [],
              finalize=False)
    objective = BertPretrainingObjective()
    assert objective.next_sentence is False
    _, model, params, batch, _ = tiny
    total, metrics = jax.jit(lambda p, b: objective.loss(
        model, p, b, jax.random.key(1), objective.normalizers(b), deterministic=True))(params, batch)
    assert set(metrics) == {"loss", "masked_lm_loss", "masked_lm_accuracy"}
    mlm = metrics["masked_lm_loss"]
    np.testing.assert_allclose(total, mlm[0] / (mlm[1] + 1e-5), rtol=1e-6)


def test_causal_or_typeless_config_is_refused():
    with pytest.raises(ValueError, match="causal must be False"):
        BertPretrainingObjective().make_model(TransformerConfig(vocab_size=120))
    with pytest.raises(ValueError, match="type_vocab_size"):
        BertPretrainingObjective().make_model(TransformerConfig(vocab_size=120, causal=False))


# ------------------------------------------------------------- losses against numpy ------

def np_layernorm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_losses_and_heads_match_numpy(tiny):
    _, _, params, batch, run = tiny
    (mlm_logits, nsp_logits), (sequence, pooled), (total, metrics) = run(params, batch)
    assert mlm_logits.shape == (4, PREDS, 120) and mlm_logits.dtype == jnp.float32
    assert nsp_logits.shape == (4, 2) and sequence.shape == (4, 16, 32)

    # Heads in float64 numpy on full-sequence logits, then gathered at the masked positions.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    seq = np.asarray(sequence, np.float64)
    h = seq @ p["mlm_transform"]["kernel"] + p["mlm_transform"]["bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    ln = p["mlm_norm"]["LayerNorm_0"]
    h = np_layernorm(h, ln["scale"], ln["bias"], TINY.norm_eps)
    full = h @ p["encoder"]["token_embed"]["embedding"].T + p["mlm_output_bias"]  # [B, L, V]
    gathered = np.take_along_axis(full, batch["masked_lm_positions"][..., None], axis=1)
    np.testing.assert_allclose(mlm_logits, gathered, atol=1e-4, rtol=1e-4)
    ref_pooled = np.tanh(seq[:, 0] @ p["pooler"]["kernel"] + p["pooler"]["bias"])
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-5)
    np.testing.assert_allclose(nsp_logits, ref_pooled @ p["nsp"]["kernel"] + p["nsp"]["bias"],
                               atol=1e-5)

    # Losses exactly as run_pretraining.py, from the model's own logits.
    logp = np_log_softmax(np.asarray(mlm_logits, np.float64))
    ce = -np.take_along_axis(logp, batch["masked_lm_ids"][..., None], -1)[..., 0]
    w = batch["masked_lm_weights"]
    ref_mlm = (w * ce).sum() / (w.sum() + 1e-5)
    nsp_logp = np_log_softmax(np.asarray(nsp_logits, np.float64))
    ref_nsp = -nsp_logp[np.arange(4), batch["next_sentence_labels"]].mean()
    np.testing.assert_allclose(total, ref_mlm + ref_nsp, rtol=1e-5)
    means = summarize(jax.device_get(metrics))
    np.testing.assert_allclose(means["masked_lm_loss"], (w * ce).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(means["next_sentence_loss"], ref_nsp, rtol=1e-5)
    np.testing.assert_allclose(means["loss"], ref_mlm + ref_nsp, rtol=1e-5)
    correct = np.argmax(mlm_logits, -1) == batch["masked_lm_ids"]
    np.testing.assert_allclose(means["masked_lm_accuracy"], (w * correct).sum() / w.sum())
    nsp_correct = np.argmax(nsp_logits, -1) == batch["next_sentence_labels"]
    np.testing.assert_allclose(means["next_sentence_accuracy"], nsp_correct.mean())


def test_padding_does_not_reach_real_tokens(tiny):
    _, _, params, batch, run = tiny
    changed = dict(batch, input_ids=np.where(batch["input_mask"] == 1, batch["input_ids"], 9),
                   segment_ids=np.where(batch["input_mask"] == 1, batch["segment_ids"], 1))
    (mlm, nsp), _, (loss, _) = run(params, batch)
    (mlm2, nsp2), _, (loss2, _) = run(params, changed)
    np.testing.assert_allclose(mlm2, mlm, atol=1e-6)
    np.testing.assert_allclose(nsp2, nsp, atol=1e-6)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)


# ------------------------------------------------- sharded / accumulated train steps ------

def run_steps(setup, microbatches=1, steps=3):
    """`steps` train steps from a fresh state on the first Austen BERT batches."""
    objective = setup.objective
    it = objective.make_iterator(DocumentList(austen_paragraphs(300)), setup.tokenizer,
                                 seq_len=SEQ, global_batch_size=BATCH, seed=0)
    step = make_train_step(setup, microbatches)
    history = []
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        state = setup.init_state()
        for _ in range(steps):
            state, metrics = step(state, partitioning.global_batch(next(it), setup.mesh))
            history.append(summarize(jax.device_get(metrics)))
    return jax.device_get(state["params"]), history


def make_setup(sp_model, mesh_shape, devices):
    # No dropout: microbatches draw their own dropout masks, so only then do they match the
    # full batch exactly. (Sharding-invariant dropout is covered by tests/test_train.py.)
    cfg = dataclasses.replace(TINY, vocab_size=None, dropout_rate=0.0,
                              attention_dropout_rate=0.0)  # vocab from the 1000-piece sp_model
    return build_setup(model_config=cfg, objective=BertPretrainingObjective(
        max_predictions_per_seq=PREDS), vocab=sp_model, seq_len=SEQ, batch_size=BATCH, seed=0,
        mesh_shape=mesh_shape, learning_rate=1e-2, num_steps=10, warmup_steps=1,
        devices=devices)


@pytest.fixture(scope="module")
def single_device_run(sp_model):
    setup = make_setup(sp_model, {"data": 1}, jax.devices()[:1])
    return setup, run_steps(setup)


def test_sharded_train_step_equals_single_device(sp_model, single_device_run):
    _, (single_params, single) = single_device_run
    setup = make_setup(sp_model, {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    params, sharded = run_steps(setup)
    for name in ("loss", "masked_lm_loss", "next_sentence_loss", "masked_lm_accuracy",
                 "grad_norm"):
        np.testing.assert_allclose([h[name] for h in sharded], [h[name] for h in single],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    assert sharded[-1]["loss"] < sharded[0]["loss"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
    # The heads are really sharded: D -> D kernels ('mlp', 'embed') -> (tensor, fsdp) (the
    # layout research/models/bert.py explains), the output bias over tensor, NSP ('embed', 'classes').
    shardings, spec = setup.state_shardings["params"], jax.sharding.PartitionSpec
    for head in ("pooler", "mlm_transform"):
        assert shardings[head]["kernel"].spec == spec("tensor", "fsdp")
    assert shardings["mlm_output_bias"].spec == spec("tensor")
    assert shardings["nsp"]["kernel"].spec == spec("fsdp", None)


def test_microbatches_give_the_full_batch_loss_and_gradients(single_device_run):
    setup, (full_params, full) = single_device_run
    params, accum = run_steps(setup, microbatches=2)
    for name in full[0]:
        np.testing.assert_allclose([h[name] for h in accum], [h[name] for h in full],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


# -------------------------------------------------------------- Hugging Face parity ------

def test_forward_matches_hugging_face_bert_for_pretraining():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = TINY
    hf_config = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim, hidden_act="gelu",
        max_position_embeddings=cfg.max_len, type_vocab_size=2, layer_norm_eps=cfg.norm_eps,
        attn_implementation="eager")
    hf = transformers.BertForPreTraining(hf_config).eval()
    objective = BertPretrainingObjective()
    model = objective.make_model(cfg)
    batch = synthetic_batch()
    params = jax.device_get(init_params(objective, model, batch, seed=3))
    # Perturbed so that biases and norms are non-trivial and activations O(1): then even the
    # tanh-approximate GELU would differ by ~1e-3 (exact erf GELU agrees to ~2e-6).
    params = jax.tree.map(lambda a: a + 0.2 * np.random.default_rng(a.size).standard_normal(
        a.shape).astype(np.float32), params)
    load_into_hugging_face(hf, params, cfg)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["input_mask"], dtype=torch.long),
                 token_type_ids=torch.tensor(batch["segment_ids"], dtype=torch.long))
    hf_mlm = np.take_along_axis(out.prediction_logits.numpy(),
                                batch["masked_lm_positions"][..., None], axis=1)
    mlm, nsp = model.apply({"params": params}, batch["input_ids"], batch["input_mask"],
                           batch["segment_ids"], batch["masked_lm_positions"])
    np.testing.assert_allclose(mlm, hf_mlm, atol=1e-4)
    np.testing.assert_allclose(nsp, out.seq_relationship_logits.numpy(), atol=1e-4)


def load_into_hugging_face(hf, params, cfg: TransformerConfig) -> None:
    """Copies our parameters into a transformers BertForPreTraining (torch Linear = [out, in])."""
    import torch
    d = cfg.d_model
    enc, sd = params["encoder"], {}

    def linear(prefix, kernel, bias):  # kernel [in, out] (heads flattened), bias [out]
        sd[prefix + ".weight"] = np.asarray(kernel).T
        sd[prefix + ".bias"] = np.asarray(bias).reshape(-1)

    def norm(prefix, p):
        sd[prefix + ".weight"] = p["LayerNorm_0"]["scale"]
        sd[prefix + ".bias"] = p["LayerNorm_0"]["bias"]

    sd["bert.embeddings.word_embeddings.weight"] = enc["token_embed"]["embedding"]
    sd["bert.embeddings.position_embeddings.weight"] = enc["position_embed"]["embedding"]
    sd["bert.embeddings.token_type_embeddings.weight"] = enc["type_embed"]["embedding"]
    norm("bert.embeddings.LayerNorm", enc["embedding_norm"])
    for i in range(cfg.num_layers):
        layer, pre = enc[f"layer_{i}"], f"bert.encoder.layer.{i}"
        att, mlp = layer["attention"], layer["mlp"]
        for name in ("query", "key", "value"):  # [D, N, H] -> [D, N*H]: head-major like HF
            linear(f"{pre}.attention.self.{name}", att[name]["kernel"].reshape(d, -1),
                   att[name]["bias"])
        linear(f"{pre}.attention.output.dense", att["out"]["kernel"].reshape(-1, d),
               att["out"]["bias"])
        norm(f"{pre}.attention.output.LayerNorm", layer["attention_norm"])
        linear(f"{pre}.intermediate.dense", mlp["wi"]["kernel"], mlp["wi"]["bias"])
        linear(f"{pre}.output.dense", mlp["wo"]["kernel"], mlp["wo"]["bias"])
        norm(f"{pre}.output.LayerNorm", layer["mlp_norm"])
    linear("bert.pooler.dense", params["pooler"]["kernel"], params["pooler"]["bias"])
    linear("cls.predictions.transform.dense", params["mlm_transform"]["kernel"],
           params["mlm_transform"]["bias"])
    norm("cls.predictions.transform.LayerNorm", params["mlm_norm"])
    sd["cls.predictions.decoder.weight"] = enc["token_embed"]["embedding"]  # tied
    sd["cls.predictions.bias"] = sd["cls.predictions.decoder.bias"] = params["mlm_output_bias"]
    linear("cls.seq_relationship", params["nsp"]["kernel"], params["nsp"]["bias"])
    state = {k: torch.tensor(np.array(v, np.float32)) for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    assert not missing and not unexpected, (missing, unexpected)


# ------------------------------------------------------------------ CLI end to end ------

def test_cli_pretrains_bert_tiny(tmp_path):
    """The shipped configs end to end on 8 CPU devices (the run config's MESH_SHAPE: data -1;
    the 3-axis mesh is covered in-process above)."""
    workdir = tmp_path / "bert"
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    args = [
        "-m", "research.train", "--gin_file=configs/models/bert_tiny.gin",
        "--gin_file=configs/runs/pretrain_mlm_nsp.gin", "--gin.TRAIN_STEPS=4",
        "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.WARMUP_STEPS=1",
        "--gin.train.log_every=2", "--gin.train.eval_every=4", "--gin.train.eval_steps=2",
        "--gin.train.checkpoint_every=4", "--gin.train.progress_bar=False",
        "--gin.BertPretrainingObjective.max_predictions_per_seq=5",
        "--gin.TRAIN_DATA='text:data/austen/northangerabbey.txt'", f"--workdir={workdir}"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    train_keys = {f"train/{k}" for k in ("loss", "masked_lm_loss", "masked_lm_accuracy",
                                          "next_sentence_loss", "next_sentence_accuracy")}
    assert train_keys <= set(metrics[0])
    assert {k.replace("train/", "eval/") for k in train_keys} <= set(metrics[1])
    assert (workdir / "checkpoints" / "4").is_dir()
    assert json.loads((workdir / "run.json").read_text())["objective"] == "bert_pretraining"
    assert "BertPretrainingObjective.next_sentence = True" in (workdir / "config.gin").read_text()
