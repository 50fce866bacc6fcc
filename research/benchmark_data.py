"""Input-pipeline throughput of a gin-configured run: `python -m research.benchmark --data_only`.

Opens the run's TRAIN_DATA and VOCAB as research.train does (`open_train_data`,
`with_training_data`, `load_tokenizer`, `for_model`) and builds the objective's training
iterator (`make_iterator`, repeat=True) for one process reading the whole global batch
(BATCH_SIZE x SEQ_LEN) with the run's SEED. It takes `warmup` batches untimed (opening files,
filling the prefetch queue), then times `batches` more. No model is built or run.

    data_tokens_per_sec = batches * BATCH_SIZE * SEQ_LEN / seconds

counts every position of a batch (padding included), as the train step's `tokens_per_sec`
does, so the ratio data_tokens_per_sec / tokens_per_sec says how many times over the input
pipeline keeps up with the accelerator (below 1: the step waits for data).
`--data_only=with_step` measures both in one invocation and prints that ratio.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def run_data(run: dict[str, Any], batches: int, warmup: int, seed: int) -> dict[str, Any]:
    """Times `batches` batches of the run's training iterator after `warmup` untimed ones.

    Args:
      run: the gin bindings of research.training.run_config.RunConfig (model_config,
        objective, train_data, vocab, batch_size, seq_len, seed).
      seed: data-order seed when the run binds none.
    """
    from research.data.mixture import open_train_data
    from research.data.tokenizer import load_tokenizer
    from research.errors import ConfigError

    if not run.get("train_data"):
        raise ConfigError("--data_only needs TRAIN_DATA: the gin files bind no train.train_data.")
    batch_size, seq_len = run["batch_size"], run["seq_len"]
    objective = run["objective"]
    t0 = time.perf_counter()
    source = open_train_data(objective, run["train_data"])  # one spec or a mixture
    objective = objective.with_training_data(source)
    tokenizer = load_tokenizer(run["vocab"])
    tokenizer.require_special(*objective.required_special_pieces)
    objective = objective.for_model(run["model_config"].with_vocab(tokenizer.vocab_size))
    data_seed = run["seed"] if run.get("seed") is not None else seed
    iterator = objective.make_iterator(source, tokenizer, seq_len=seq_len,
                                       global_batch_size=batch_size, seed=data_seed,
                                       process_index=0, process_count=1, repeat=True)
    open_s = time.perf_counter() - t0
    try:
        for _ in range(warmup):
            next(iterator)
        real = 0.0
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
            real += float(np.sum(_weights(batch)))
        seconds = time.perf_counter() - t0
    finally:
        iterator.close()
    tokens = batches * batch_size * seq_len
    return {"data_only": True, "objective": objective.name, "train_data": str(run["train_data"]),
            "source": getattr(source, "name", str(source)), "batch_size": batch_size,
            "seq_len": seq_len, "data_batches": batches, "data_warmup": warmup,
            "data_open_s": open_s, "data_time_s": seconds,
            "data_batch_time_s": seconds / max(batches, 1),
            "data_tokens_per_sec": tokens / seconds,
            "data_real_token_fraction": real / max(tokens, 1)}


def _weights(batch: dict[str, np.ndarray]) -> np.ndarray:
    """The batch's per-position real-token weights (1 everywhere if it has none)."""
    for key in ("weights", "input_mask"):
        if key in batch:
            return batch[key]
    return np.ones(1)


def print_data_result(result: dict[str, Any]) -> None:
    """The human-readable lines of a --data_only measurement."""
    print(f"input pipeline: {result['objective']} over {result['source']}, batch "
          f"{result['batch_size']} x seq {result['seq_len']} (one process)")
    print(f"data batches:        {result['data_batches']} timed after {result['data_warmup']} "
          f"warm-up ({result['data_batch_time_s'] * 1e3:.2f} ms per batch; opening took "
          f"{result['data_open_s']:.2f} s)")
    print(f"data tokens/s:       {result['data_tokens_per_sec']:.1f} "
          f"({100 * result['data_real_token_fraction']:.1f}% of positions are real tokens)")


def add_ratio(result: dict[str, Any]) -> None:
    """Adds and prints data_tokens_per_sec / tokens_per_sec (input pipeline over train step)."""
    ratio = result["data_tokens_per_sec"] / result["tokens_per_sec"]
    result["data_to_step_ratio"] = ratio
    verdict = "keeps up" if ratio >= 1 else "the step waits for data"
    print(f"data / step tokens/s: {ratio:.2f}x ({verdict}; input pipeline "
          f"{result['data_tokens_per_sec']:.1f} vs train step {result['tokens_per_sec']:.1f} "
          "tokens/s)")
