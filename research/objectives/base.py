"""The objective interface: what a run trains (the model), on what (the data) and towards what
(the loss and its metrics). The training loop, the benchmark and the FLOP count call only
these methods, so a new objective is one module here plus a gin line:

    train.objective = @MyObjective()

Call order (the loop's; each step returns a new objective, nothing is mutated):

    source    = objective.open_source(TRAIN_DATA, role="train")
    objective = objective.with_training_data(source)     # e.g. label names found in the data
    objective = objective.for_model(cfg)                  # e.g. encoder or decoder input layout
    model     = objective.make_model(cfg)
    ... objective.open_source(EVAL_DATA, role="eval"), objective.make_iterator(...), loss ...

Batches are dicts of arrays whose leading axis is the batch ("batch" logical axis, sharded
over data x fsdp). Losses are sums divided by whole-batch normalizers, so gradients summed
over microbatches equal the full-batch gradient exactly; metrics travel as
`{name: (numerator_sum, denominator_sum)}` (`research.objectives.losses.MetricSums`).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import numpy as np

from research.data.sources import open_documents
from research.errors import ConfigError
from research.models.transformer import TransformerConfig
from research.objectives import losses

Batch = dict[str, Any]  # {name: [B, ...] array}


class Objective(abc.ABC):
    """Base class of the training objectives (see the module docstring for the call order).

    Subclasses implement the abstract methods; the others have defaults that fit a
    document-stream pretraining objective without predictions.
    """

    name: ClassVar[str]
    """Short identifier written to DIR/run.json ("causal_lm", "bert_pretraining", ...)."""

    required_special_pieces: ClassVar[tuple[str, ...]] = ()
    """Tokenizer pieces ("bos", "pad", "cls", ...) the objective needs; checked at setup."""

    eval_perplexity: ClassVar[bool] = False
    """Whether eval metrics add eval/perplexity = exp(eval/loss) (language-model losses)."""

    reads_token_ids: ClassVar[bool] = False
    """Whether the iterator takes pre-tokenised documents (`tokens:` specs, token-id arrays)."""

    has_predictions: ClassVar[bool] = False
    """Whether `predict`, `task_metrics` and `format_prediction` are implemented: then eval
    also reports task metrics over the whole eval set and TEST_DATA gets predictions.tsv."""

    # ------------------------------------------------------------------ data ---------------

    def open_source(self, spec: str, *, role: str = "train") -> Any:
        """The data of one split: `spec` is TRAIN_DATA / EVAL_DATA / TEST_DATA and `role`
        one of "train", "eval", "test". Default: a document source (`open_documents`)."""
        del role
        source = open_documents(spec)
        if spec.strip().startswith("tokens:") and not self.reads_token_ids:
            raise ConfigError(f"{spec!r} holds pre-tokenised causal-LM documents, which "
                              f"{type(self).__name__} cannot read (it needs the text); use the "
                              "text, jsonl or parquet spec it was made from.")
        return source

    def with_training_data(self, source: Any) -> "Objective":
        """This objective with whatever it infers from the opened training split (e.g. label
        names); called once, before `for_model` and before eval/test splits are opened.
        Returns a new objective (or self when there is nothing to infer)."""
        del source
        return self

    def steps_per_epoch(self, source: Any, global_batch_size: int) -> int | None:
        """Steps in one pass over `source` (for train.num_epochs and the per-epoch eval), or
        None for an unbounded stream."""
        del source, global_batch_size
        return None

    @abc.abstractmethod
    def make_iterator(self, source: Any, tokenizer: Any, *, seq_len: int, global_batch_size: int,
                      seed: int, process_index: int, process_count: int, repeat: bool = True,
                      shuffle: bool = True) -> Any:
        """A resumable iterator of this host's batches (`dummy_batch`'s keys and dtypes, leading
        axis global_batch_size / process_count) with get_state/set_state/close. With
        repeat=False it stops after one pass, after the same number of batches on every host."""

    # ------------------------------------------------------------------ model --------------

    def for_model(self, cfg: TransformerConfig) -> "Objective":
        """This objective bound to the model config (e.g. the input layout an encoder or a
        decoder expects); `build_setup` calls it before `make_model`. Default: self."""
        del cfg
        return self

    @abc.abstractmethod
    def make_model(self, cfg: TransformerConfig) -> nn.Module:
        """The flax module to train; ConfigError if `cfg` does not fit the objective."""

    @abc.abstractmethod
    def dummy_batch(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """Zero numpy arrays with the shapes and dtypes of a [batch_size, seq_len] batch (used
        for init, the batch shardings and synthetic benchmark batches)."""

    @abc.abstractmethod
    def init(self, model: nn.Module, rngs: dict[str, jax.Array], batch: Batch) -> Any:
        """`model.init` on `batch`: the variables ({"params": boxed logical-axis params})."""

    # ------------------------------------------------------------------ loss ---------------

    @abc.abstractmethod
    def normalizers(self, batch: Batch) -> dict[str, jax.Array]:
        """Loss denominators over the whole (global) batch, computed before it is split into
        microbatches (e.g. {"tokens": sum of target weights})."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array,
             normalizers: dict[str, jax.Array],
             deterministic: bool) -> tuple[jax.Array, losses.MetricSums]:
        """(this (micro)batch's contribution to the whole-batch loss, metric sums). Metric
        "loss" is required (the loop logs and NaN-checks it)."""

    def eval_metrics(self, sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        """The eval/ means of summed eval metrics (+ eval/perplexity with `eval_perplexity`)."""
        return losses.summarize(sums, prefix="eval/", perplexity=self.eval_perplexity)

    # ------------------------------------------------------------------ predictions --------

    def predict(self, model: nn.Module, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """Per-example outputs, at least {"prediction": float32[B]} (with `has_predictions`)."""
        raise NotImplementedError(f"{type(self).__name__} makes no predictions")

    def task_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Task metrics (accuracy, F1, ...) of a whole split's predictions and labels."""
        raise NotImplementedError(f"{type(self).__name__} has no task metrics")

    def format_prediction(self, value: float) -> str:
        """One prediction as written to DIR/predictions.tsv (e.g. the label name)."""
        raise NotImplementedError(f"{type(self).__name__} makes no predictions")

    def prediction_file(self, predictions: dict[str, np.ndarray]) -> tuple[str, str]:
        """(file name, text) of the TEST split's predictions, from `predict`'s outputs over the
        whole split in example order: predictions.tsv, a header and one
        `index<TAB>format_prediction` row per example (the GLUE submission layout)."""
        rows = [f"{int(i)}\t{self.format_prediction(p)}\n"
                for i, p in zip(predictions["index"], predictions["prediction"])]
        return "predictions.tsv", "index\tprediction\n" + "".join(rows)

    # ------------------------------------------------------------------ cost ---------------

    def training_flops(self, cfg: TransformerConfig, batch_size: int, seq_len: int, *,
                       causal_half: bool | None = None) -> float:
        """Model FLOPs of one training step on a [batch_size, seq_len] batch
        (`research.models.flops`; `causal_half` None = halve causal attention)."""
        del cfg, batch_size, seq_len, causal_half
        raise ConfigError(f"{type(self).__name__} has no model FLOP count: benchmark a "
                          "pretraining run config (configs/runs/pretrain_*.gin) instead.")
