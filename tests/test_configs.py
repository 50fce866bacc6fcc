"""Every shipped gin file parses, composes with a run config, and initialises."""


import gin
import jax
import flax.linen as nn
import pytest

from research.config import parse_gin
from research.models.transformer import TransformerConfig, analytic_param_count, count_params

from .conftest import ROOT

MODELS = sorted(p.name for p in (ROOT / "configs" / "models").glob("*.gin"))
RUNS = sorted(p.name for p in (ROOT / "configs" / "runs").glob("*.gin"))
MACROS = ("TRAIN_STEPS", "BATCH_SIZE", "SEQ_LEN", "LEARNING_RATE", "WARMUP_STEPS", "SEED",
          "TRAIN_DATA", "EVAL_DATA", "VOCAB", "MESH_SHAPE")


def run_for(model_file: str) -> str:
    if model_file.startswith("bert"):
        return "pretrain_mlm_nsp.gin"
    return "pretrain_causal.gin"


def parse(*files, bindings=()):
    gin.clear_config()
    parse_gin([f"configs/{f}" for f in files], list(bindings), finalize=False)


@pytest.mark.parametrize("run", RUNS)
def test_run_configs_honour_every_macro(run):
    model = "bert_tiny.gin" if "mlm" in run else "gpt_tiny.gin"
    parse(f"models/{model}", f"runs/{run}",
          bindings=[f"{m} = {v}" for m, v in [("TRAIN_STEPS", 7), ("BATCH_SIZE", 24),
                                             ("SEQ_LEN", 48), ("SEED", 3)]])
    for macro in MACROS:
        gin.query_parameter(f"{macro}/macro.value")  # defined
    bound = {str(gin.query_parameter(f"train.{p}")).lstrip("%") for p in
             ("num_steps", "batch_size", "seq_len", "learning_rate", "warmup_steps", "seed",
              "train_data", "eval_data", "vocab", "mesh_shape")}
    assert bound == set(MACROS)
    assert gin.query_parameter("TRAIN_STEPS/macro.value") == 7


@pytest.mark.parametrize("model_file", MODELS)
def test_model_configs_build(model_file):
    parse(f"models/{model_file}", f"runs/{run_for(model_file)}")
    cfg = TransformerConfig().with_vocab(8000)
    objective = gin.query_parameter("train.objective").scoped_configurable_fn()
    model = objective.make_model(cfg)
    batch = objective.dummy_batch(1, 16)
    params = jax.eval_shape(lambda: nn.unbox(objective.init(
        model, {"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch)["params"]))
    n = count_params(params)
    assert n >= analytic_param_count(cfg)  # heads may add parameters on top of the stack
    if model_file.startswith("gpt"):
        assert n == analytic_param_count(cfg)


def test_unknown_binding_is_an_error():
    with pytest.raises(Exception, match="TransformerConfig.num_layerz|No configurable|not found"):
        parse("models/gpt_tiny.gin", "runs/pretrain_causal.gin",
              bindings=["TransformerConfig.num_layerz = 3"])
