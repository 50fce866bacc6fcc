"""Schedules, the weight-decay mask and checkpoint retention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.checkpoints.manager import Checkpointer
from research.training.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


@pytest.mark.parametrize("schedule", ["cosine", "linear", "rsqrt", "constant"])
def test_warmup_then_schedule(schedule):
    lr = learning_rate_schedule(1.0, total_steps=100, warmup_steps=10, schedule=schedule,
                                final_fraction=0.1)
    values = np.array([float(lr(s)) for s in range(101)])
    np.testing.assert_allclose(values[:11], np.linspace(0, 1, 11), atol=1e-6)  # linear warmup
    if schedule == "constant":
        np.testing.assert_allclose(values[10:], 1.0)
    elif schedule == "rsqrt":
        np.testing.assert_allclose(values[40], np.sqrt(10 / 40), rtol=1e-5)
    else:
        np.testing.assert_allclose(values[100], 0.1, atol=1e-6)  # decays to final_fraction
        assert np.all(np.diff(values[10:]) <= 1e-7)
    if schedule == "cosine":
        np.testing.assert_allclose(values[55], 0.1 + 0.9 * 0.5, atol=1e-6)  # half-way point


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="schedule='cosin'"):
        learning_rate_schedule(1.0, 10, schedule="cosin")


def test_weight_decay_skips_norms_and_biases():
    params = {"decoder": {"layer_0": {"mlp": {"wi": {"kernel": 1, "bias": 1}},
                                      "attention_norm": {"LayerNorm_0": {"scale": 1, "bias": 1}}},
                          "token_embed": {"embedding": 1}}}
    mask = weight_decay_mask(params)
    assert mask["decoder"]["layer_0"]["mlp"]["wi"] == {"kernel": True, "bias": False}
    assert mask["decoder"]["layer_0"]["attention_norm"]["LayerNorm_0"] == {"scale": False, "bias": False}
    assert mask["decoder"]["token_embed"]["embedding"] is True


def test_adamw_decays_only_masked_parameters():
    opt, _ = make_optimizer(0.1, total_steps=10, warmup_steps=0, weight_decay=0.5, clip_norm=None)
    params = {"dense": {"kernel": jnp.ones(3), "bias": jnp.ones(3)}}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5)  # decay only
    np.testing.assert_allclose(updates["dense"]["bias"], 0.0)


def test_checkpointer_keeps_the_last_k(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=2, keep=2, async_save=True)
    state = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.arange(4.0)},
             "opt_state": {"m": jnp.zeros(4)}, "rng": jax.random.key(0)}
    for step in range(1, 8):
        state["params"]["w"] = state["params"]["w"] + 1
        ckpt.save(step, state, {"row": step}, force=step == 7)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    restored, data_state = ckpt.restore(7, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), state))
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0) + 7)
    assert data_state == {"row": 7}
    assert int(restored["step"]) == 7
    ckpt.close()


def test_layer_decay_and_freezing():
    from research.training.optim import update_multipliers
    params = {"encoder": {"token_embed": {"embedding": jnp.ones((4, 2))},
                          "layer_0": {"w": jnp.ones(2)}, "layer_1": {"w": jnp.ones(2)}},
              "classifier": {"kernel": jnp.ones((2, 2))}}
    f = update_multipliers(params, layer_decay=0.5)
    assert float(f["encoder"]["token_embed"]["embedding"]) == 0.5 ** 3
    assert float(f["encoder"]["layer_0"]["w"]) == 0.5 ** 2
    assert float(f["encoder"]["layer_1"]["w"]) == 0.5
    assert float(f["classifier"]["kernel"]) == 1.0
    scanned = {"encoder": {"layers": {"w": jnp.ones((3, 2))}}, "classifier": {"k": jnp.ones(1)}}
    np.testing.assert_allclose(update_multipliers(scanned, 0.5)["encoder"]["layers"]["w"][:, 0],
                               [0.125, 0.25, 0.5])
    frozen = update_multipliers(params, frozen_regex="^encoder/")
    assert float(frozen["encoder"]["layer_1"]["w"]) == 0.0 and float(frozen["classifier"]["kernel"]) == 1.0

    opt, _ = make_optimizer(0.1, 10, 0, weight_decay=0.1, frozen_regex="^encoder/")
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    assert not np.any(np.asarray(updates["encoder"]["layer_0"]["w"]))  # frozen: not even decay
    assert np.all(np.asarray(updates["classifier"]["kernel"]) < 0)
