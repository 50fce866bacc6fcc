"""Evaluation during training (eval/ metrics, task metrics from predictions) and the test
split's DIR/predictions.tsv."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from research import storage
from research import workdir as workdir_lib
from research.objectives import losses
from research.training import partitioning
from research.training.setup import Setup
from research.training.steps import to_host



def evaluate(setup: Setup, eval_step: Callable, params: Any, iterator: Iterator,
             steps: int | None) -> dict[str, float]:
    """Runs `steps` eval batches (the same count on every host; None = until the iterator
    stops, which finite iterators do after the same count everywhere); returns eval/ means."""
    sums = None
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        for batch in itertools.islice(iterator, steps):
            metrics = eval_step(params, partitioning.global_batch(batch, setup.mesh))
            sums = metrics if sums is None else losses.add_sums(sums, metrics)
    return setup.objective.eval_metrics(to_host(sums)) if sums is not None else {}


def predict_all(setup: Setup, predict_step: Callable, params: Any,
                iterator: Iterator) -> dict[str, np.ndarray]:
    """Per-example outputs over a whole finite iterator, gathered from every host; padding
    rows (weight 0) dropped, sorted by example index."""
    parts = []
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        for batch in iterator:
            out = predict_step(params, partitioning.global_batch(batch, setup.mesh))
            parts.append({k: multihost_utils.process_allgather(v, tiled=True) for k, v in out.items()})
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = merged["weight"] > 0
    order = np.argsort(merged["index"][keep], kind="stable")
    return {k: v[keep][order] for k, v in merged.items()}


@dataclasses.dataclass
class Evaluator:
    """Evaluates params on one split: eval/ metric means over `eval_steps` batches (or the
    whole split when the objective makes predictions) plus its task metrics."""

    setup: Setup
    source: Any
    data_kwargs: dict[str, Any]  # seq_len, global_batch_size, seed, process_index/count
    eval_steps: int | None
    eval_step: Callable  # steps.make_eval_step
    predict_step: Callable | None  # steps.make_predict_step, with `has_predictions`

    def _batches(self):
        return self.setup.objective.make_iterator(self.source, self.setup.tokenizer,
                                                  repeat=False, shuffle=False, **self.data_kwargs)

    def __call__(self, params: Any) -> dict[str, float]:
        it = self._batches()
        out = evaluate(self.setup, self.eval_step, params, it,
                       None if self.predict_step else self.eval_steps)
        it.close()
        if self.predict_step is not None:
            preds = predict_all(self.setup, self.predict_step, params, self._batches())
            task = self.setup.objective.task_metrics(preds["prediction"], preds["label"])
            out.update({f"eval/{k}": v for k, v in task.items()})
        return out


def write_predictions(workdir: str, setup: Setup, predict_step: Callable, params: Any,
                      source: Any, data_kwargs: dict[str, Any]) -> None:
    """The test split's predictions in DIR, as the objective's `prediction_file` lays them out
    (predictions.tsv, `index<TAB>prediction` per example; extractive QA: predictions.json)."""
    it = setup.objective.make_iterator(source, setup.tokenizer, repeat=False, shuffle=False,
                                       **data_kwargs)
    preds = predict_all(setup, predict_step, params, it)
    if jax.process_index() != 0:
        return
    name, text = setup.objective.prediction_file(preds)
    path = storage.join(workdir, name)
    workdir_lib.write_text(path, text)
    logging.info("wrote %d test predictions to %s", len(preds["index"]), path)
