"""Initialising a fine-tuning model from a pretraining checkpoint."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import errors
from research.checkpoints import init_from as init_checkpoint
from research.checkpoints import manager
from research.checkpoints.manager import Checkpointer
from research.training import partitioning
from research.models.heads import SequenceClassifier
from research.models.transformer import CausalLM, TransformerConfig

CFG = TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=16)


def sharded_params(model, init_args, mesh_shape, seed):
    """Initialises `model` directly onto a mesh with the fsdp_tensor rules."""
    mesh = partitioning.make_mesh(mesh_shape)
    rules = partitioning.logical_axis_rules()
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(seed), *init_args)["params"])
    shardings = partitioning.logical_to_shardings(boxed, mesh, rules)
    fn = jax.jit(lambda: nn.unbox(model.init(jax.random.key(seed), *init_args)["params"]),
                 out_shardings=shardings)
    return fn()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A causal-LM 'pretraining run' directory saved under MESH data=8."""
    workdir = tmp_path_factory.mktemp("pretrain")
    params = sharded_params(CausalLM(CFG), (jnp.zeros((1, 4), jnp.int32),), {"data": 8}, seed=1)
    ckpt = Checkpointer(str(workdir / "checkpoints"), save_every=1, async_save=False)
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": {"mu": jax.tree.map(jnp.zeros_like, params)}, "rng": jax.random.key(0)}
    ckpt.save(10, state, None, force=True)
    ckpt.close()
    (workdir / "run.json").write_text(json.dumps({
        "model_config": {"vocab_size": 64}, "objective": "causal_lm", "vocab": "/x/sp.model"}))
    return workdir, jax.device_get(params)


def classifier_params(mesh_shape, cfg=CFG):
    model = SequenceClassifier(cfg, num_outputs=3)
    z = jnp.zeros((1, 4), jnp.int32)
    return sharded_params(model, (z, z, z, jnp.zeros((1,), jnp.int32)), mesh_shape, seed=7)


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"fsdp": 4, "tensor": 2}])
def test_restored_weights_are_bit_identical_and_the_head_is_fresh(pretrained, mesh_shape):
    workdir, saved = pretrained
    fresh = classifier_params(mesh_shape)
    params, restored = init_checkpoint.restore_into(
        fresh, str(workdir), [("classifier/.*", None), ("(.*)", r"\1")])
    assert restored and all(p.startswith("decoder/") for p in restored)
    for a, b in zip(jax.tree.leaves(params["decoder"]), jax.tree.leaves(saved["decoder"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(params["classifier"]["kernel"], fresh["classifier"]["kernel"])
    # Restored leaves land on the new model's shardings (resharded from data=8).
    wi = params["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert wi.sharding == fresh["decoder"]["layer_0"]["mlp"]["wi"]["kernel"].sharding


def test_step_directory_and_checkpoints_directory_resolve(pretrained):
    workdir, _ = pretrained
    assert init_checkpoint.resolve(str(workdir)) == (str(workdir / "checkpoints"), 10)
    assert init_checkpoint.resolve(str(workdir / "checkpoints" / "10")) == (str(workdir / "checkpoints"), 10)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_checkpoint.resolve(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        init_checkpoint.resolve(str(tmp_path))
    (tmp_path / "params.npz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
        init_checkpoint.resolve(str(tmp_path / "params.npz"))


def test_init_checkpoint_mistakes_are_config_errors(pretrained, tmp_path):
    """A wrong INIT_CHECKPOINT, assignment map or VOCAB is a user error (one `error:` line,
    exit 2), its message unquoted and naming the parameter."""
    workdir, _ = pretrained
    with pytest.raises(errors.ConfigError, match="does not exist"):
        init_checkpoint.resolve(str(tmp_path / "nope"))
    with pytest.raises(errors.ConfigError) as missing:
        init_checkpoint.restore_into(classifier_params({"data": 8}), str(workdir),
                                     [("classifier/.*", None), ("decoder/(.*)", r"encoder/\1")])
    assert str(missing.value).startswith("parameter 'decoder/")
    with pytest.raises(errors.ConfigError, match="restores nothing"):
        init_checkpoint.restore_into(classifier_params({"data": 8}), str(workdir),
                                     [(".*", None)])
    with pytest.raises(errors.ConfigError, match="vocab size 64"):
        init_checkpoint.check_vocab(str(workdir), 1000, 1024)


def test_param_shapes_reads_the_checkpoint_metadata(pretrained):
    workdir, saved = pretrained
    directory, step = init_checkpoint.resolve(str(workdir))
    shapes = manager.param_shapes(directory, step)
    kernel = saved["decoder"]["layer_0"]["mlp"]["wi"]["kernel"]
    assert shapes["decoder/layer_0/mlp/wi/kernel"] == (kernel.shape, kernel.dtype)
    assert len(shapes) == len(jax.tree.leaves(saved))


def test_missing_key_is_named(pretrained):
    workdir, _ = pretrained
    with pytest.raises(KeyError, match="decoder/final_norm/LayerNorm_0/bias.*encoder/final_norm/LayerNorm_0/bias.*closest"):
        init_checkpoint.restore_into(classifier_params({"data": 8}), str(workdir),
                                     [("classifier/.*", None), ("decoder/(.*)", r"encoder/\1")])


def test_shape_mismatch_is_named(pretrained):
    workdir, _ = pretrained
    wider = TransformerConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, mlp_dim=128,
                              max_len=16)
    with pytest.raises(ValueError, match=r"decoder/layer_0/mlp/wi/bias.*\(128,\).*\(64,\)"):
        init_checkpoint.restore_into(classifier_params({"data": 8}, wider), str(workdir),
                                     [("classifier/.*", None), ("(.*)", r"\1")])


def test_vocab_mismatch_is_named(pretrained):
    workdir, _ = pretrained
    init_checkpoint.check_vocab(str(workdir), 60, 64)  # same model vocab: fine
    with pytest.raises(ValueError, match="vocab size 64"):
        init_checkpoint.check_vocab(str(workdir), 1000, 1024)
