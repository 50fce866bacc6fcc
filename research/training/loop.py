"""The training loop behind `python -m research.train` (see `research/train.py` for the CLI).

One file, top to bottom: parse config → mesh → tokenizer and data → sharded state (created
already sharded) → restore if DIR has a checkpoint → jitted train step with the state donated →
log / eval / checkpoint. Re-running the same command with the same DIR resumes exactly.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from research import errors
from research import workdir as workdir_lib
from research.training import preemption
from research.training import run_config
from research.checkpoints import manager as checkpointing
from research.objectives import losses
from research.training import partitioning
from research.checkpoints import init_from as init_checkpoint_lib
from research.data.sources import open_documents
from research.data.tokenizer import load_tokenizer
from research.training.metrics_writer import MetricsWriter
from research.models.transformer import TransformerConfig
from research.training.optim import make_optimizer

State = dict[str, Any]  # {"step": int32[], "params": ..., "opt_state": ..., "rng": key[]}


@dataclasses.dataclass
class Setup:
    """Everything derived from the config that the loop, the tests and the tools reuse."""

    cfg: TransformerConfig
    objective: Any
    model: nn.Module
    tokenizer: Any
    mesh: jax.sharding.Mesh
    rules: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    abstract_state: Any
    init_state: Any  # jitted: () -> sharded State


def build_setup(*, model_config: TransformerConfig, objective: Any, vocab: str, seq_len: int,
                batch_size: int, seed: int, mesh_shape: dict, learning_rate: float,
                num_steps: int, warmup_steps: int, devices: list | None = None) -> Setup:
    """Model, mesh, optimizer and the sharded state initializer for a run.

    `devices` restricts the mesh to a subset (tests compare 1 device with 8).
    """
    tokenizer = load_tokenizer(vocab)
    tokenizer.require_special(*objective.required_special_pieces)
    cfg = model_config.with_vocab(tokenizer.vocab_size)
    if cfg.max_len < seq_len and cfg.position == "learned":
        raise ValueError(f"SEQ_LEN={seq_len} exceeds TransformerConfig.max_len={cfg.max_len}.")
    mesh = partitioning.make_mesh(mesh_shape, devices)
    rules = partitioning.logical_axis_rules()
    model = objective.make_model(cfg)
    optimizer, schedule = make_optimizer(learning_rate, num_steps, warmup_steps)
    dummy = objective.dummy_batch(1, seq_len)

    def init_boxed(rng):
        params_rng, dropout_rng = jax.random.split(rng)
        return objective.init(model, {"params": params_rng, "dropout": dropout_rng}, dummy)["params"]

    base_rng = jax.random.key(seed)
    # Initialisation runs outside the mesh context: out_shardings below decide the layout.
    abstract_boxed = jax.eval_shape(init_boxed, base_rng)
    param_shardings = partitioning.logical_to_shardings(abstract_boxed, mesh, rules)
    abstract_params = nn.unbox(abstract_boxed)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    repl = partitioning.replicated(mesh)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: repl)
    state_shardings = {"step": repl, "params": param_shardings, "opt_state": opt_shardings, "rng": repl}

    def init_state() -> State:
        params = nn.unbox(init_boxed(jax.random.fold_in(base_rng, 0)))
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params), "rng": base_rng}

    abstract_state = jax.eval_shape(init_state)
    abstract_state = checkpointing.abstract_like(abstract_state, state_shardings)
    init_fn = jax.jit(init_state, out_shardings=state_shardings)
    return Setup(cfg, objective, model, tokenizer, mesh, rules, optimizer, schedule,
                 state_shardings, abstract_state, init_fn)


NONFINITE_MODES = ("stop", "skip")


def make_train_step(setup: Setup, microbatches: int = 1):
    """The jitted update: (state, batch) -> (state, metric sums). The state is donated.

    A step whose loss or gradient norm is NaN/Inf leaves params and optimizer state unchanged
    (only the step counter moves) and reports metrics["nonfinite"] = (1, 1); the loop then stops
    or counts the skip (train.on_nonfinite). No extra host sync: the flag rides with the metrics.
    """
    objective, model, optimizer = setup.objective, setup.model, setup.optimizer

    def step_fn(state: State, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state["rng"], state["step"])
        normalizers = objective.normalizers(batch)

        def micro_loss(params, micro, micro_rng):
            return objective.loss(model, params, micro, micro_rng, normalizers, deterministic=False)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if microbatches == 1:
            (_, metrics), grads = grad_fn(state["params"], batch, rng)
        else:
            split = jax.tree.map(
                lambda x: x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:]), batch)

            def accumulate(carry, xs):
                micro, i = xs
                (_, m), g = grad_fn(state["params"], micro, jax.random.fold_in(rng, i))
                grads, metrics = carry
                return (jax.tree.map(jnp.add, grads, g), losses.add_sums(metrics, m)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
            first = jax.tree.map(lambda x: x[0], split)
            _, metric_shape = jax.eval_shape(micro_loss, state["params"], first, rng)
            zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape)
            (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, zero_metrics),
                                               (split, jnp.arange(microbatches)))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm)

        def apply_update(_):
            updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
            return optax.apply_updates(state["params"], updates), opt_state

        # A branch, not a select: a finite step never reads params and optimizer state twice.
        params, opt_state = jax.lax.cond(
            finite, apply_update, lambda _: (state["params"], state["opt_state"]), None)
        one = jnp.ones((), jnp.float32)
        metrics = dict(metrics)
        metrics["grad_norm"] = (grad_norm, one)
        metrics["nonfinite"] = (1.0 - finite.astype(jnp.float32), one)
        metrics["learning_rate"] = (setup.schedule(state["step"]), one)
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
                     "rng": state["rng"]}
        return new_state, metrics

    batch_shardings = _batch_shardings(setup)
    return jax.jit(step_fn, in_shardings=(setup.state_shardings, batch_shardings),
                   out_shardings=(setup.state_shardings, None), donate_argnums=(0,))


def make_eval_step(setup: Setup):
    """The jitted eval: (params, batch) -> metric sums (dropout off)."""
    objective, model = setup.objective, setup.model

    def eval_fn(params, batch):
        normalizers = objective.normalizers(batch)
        _, metrics = objective.loss(model, params, batch, jax.random.key(0), normalizers,
                                    deterministic=True)
        return metrics

    return jax.jit(eval_fn, in_shardings=(setup.state_shardings["params"], _batch_shardings(setup)))


def _batch_shardings(setup: Setup):
    dummy = setup.objective.dummy_batch(1, 1)
    return {k: partitioning.batch_sharding(setup.mesh, v.ndim) for k, v in dummy.items()}


def _check_batch(batch_size: int, mesh: jax.sharding.Mesh, microbatches: int) -> None:
    dp = partitioning.data_parallel_size(mesh)
    if batch_size % (dp * microbatches):
        raise ValueError(
            f"BATCH_SIZE={batch_size} must be divisible by the data-parallel size ({dp} = data x fsdp "
            f"of MESH_SHAPE) times train.microbatches ({microbatches}); use a multiple of "
            f"{dp * microbatches}.")
    if batch_size % jax.process_count():
        raise ValueError(f"BATCH_SIZE={batch_size} must be divisible by the {jax.process_count()} "
                         "processes (each host reads an equal share).")


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def evaluate(setup: Setup, eval_step, params, iterator, steps: int | None) -> dict[str, float]:
    """Runs `steps` eval batches (the same count on every host; None = until the iterator
    stops, which finite iterators do after the same count everywhere); returns eval/ means."""
    sums = None
    with partitioning.mesh_rules(setup.mesh, setup.rules):
        for batch in itertools.islice(iterator, steps):
            metrics = eval_step(params, partitioning.global_batch(batch, setup.mesh))
            sums = metrics if sums is None else losses.add_sums(sums, metrics)
    lm = setup.objective.name == "causal_lm"
    return losses.summarize(_to_host(sums), prefix="eval/", perplexity=lm) if sums is not None else {}


def make_predict_step(setup: Setup):
    """Jitted (params, batch) -> per-example outputs incl. label/weight/index, for task metrics."""
    objective, model = setup.objective, setup.model

    def predict_fn(params, batch):
        out = objective.predict(model, params, batch)
        return {**out, "label": batch["label"], "weight": batch["weight"], "index": batch["index"]}

    return jax.jit(predict_fn, in_shardings=(setup.state_shardings["params"], _batch_shardings(setup)))


def predict_all(setup: Setup, predict_step, params, iterator) -> dict[str, np.ndarray]:
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


def _open(objective: Any, spec: str, role: str):
    """The objective's own reader (labelled examples) or the document reader."""
    if hasattr(objective, "open_source"):
        return objective.open_source(spec, role=role)
    return open_documents(spec)


DEFAULT_ASSIGNMENT_MAP = (("classifier/.*", None), ("(.*)", r"\1"))


@gin.configurable(denylist=["workdir"])
def train(workdir: str, *,
          model_config: TransformerConfig = gin.REQUIRED,
          objective: Any = gin.REQUIRED,
          train_data: str = gin.REQUIRED,
          eval_data: str | None = None,
          test_data: str | None = None,
          vocab: str | None = gin.REQUIRED,
          num_steps: int | None = gin.REQUIRED,
          num_epochs: float | None = None,
          batch_size: int = gin.REQUIRED,
          seq_len: int = gin.REQUIRED,
          learning_rate: float = gin.REQUIRED,
          warmup_steps: int | None = 0,
          warmup_fraction: float | None = None,
          seed: int = 0,
          mesh_shape: dict | None = None,
          microbatches: int = 1,
          init_checkpoint: str | None = None,
          assignment_map: Any = DEFAULT_ASSIGNMENT_MAP,
          best_metric: str | None = None,
          log_every: int = 50,
          eval_every: int | None = 500,
          eval_steps: int | None = 20,
          checkpoint_every: int = 1000,
          keep_checkpoints: int = 3,
          async_checkpoints: bool = True,
          progress_bar: bool = True,
          on_nonfinite: str = "stop") -> dict[str, float]:
    """Trains `objective` on `train_data`; returns the last logged metrics.

    Args mirror the run-config macros: TRAIN_STEPS (num_steps), BATCH_SIZE (global, in
    sequences), SEQ_LEN, LEARNING_RATE, WARMUP_STEPS, SEED, TRAIN_DATA, EVAL_DATA, VOCAB,
    MESH_SHAPE. `microbatches` splits each step's batch for gradient accumulation.
    Fine-tuning adds: `num_epochs` (used when num_steps is None), `warmup_fraction` (used
    when warmup_steps is None), `eval_every` None (once per epoch), `init_checkpoint` + `assignment_map` (see
    research.checkpoints.init_from; vocab None = the pretraining run's), `best_metric` (e.g.
    'eval/accuracy': the best parameters are kept in DIR/best) and `test_data`
    (predictions written to DIR/predictions.tsv). `eval_steps` None evaluates the whole set.

    Reliability (see research/workdir.py): DIR is locked (DIR/.lock) while training; a DIR
    with a config.gin only resumes with the same bindings, except layout-only ones (MESH_SHAPE,
    axis rules, remat, attention kernel: workdir_lib.LAYOUT_KEYS), and under any process count;
    SIGTERM/SIGINT save a checkpoint at the current step and return; DIR/final.json marks a
    finished run; a NaN/Inf loss or gradient stops the run naming the step
    (`on_nonfinite='stop'`) or skips that update (`'skip'`, counted as train/skipped_steps).
    """
    if on_nonfinite not in NONFINITE_MODES:
        raise ValueError(f"train.on_nonfinite={on_nonfinite!r}: use one of {NONFINITE_MODES}.")
    kwargs = {k: v for k, v in locals().items() if k != "workdir"}
    run_config.validate_train_args(kwargs)  # wrong types fail here, before any compute
    os.makedirs(workdir, exist_ok=True)
    with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0), \
            preemption.PreemptionGuard() as guard:
        return _train(workdir, guard, **kwargs)


def _train(workdir: str, guard: preemption.PreemptionGuard, *, model_config, objective,
           train_data, eval_data, test_data, vocab, num_steps, num_epochs, batch_size, seq_len,
           learning_rate, warmup_steps, warmup_fraction, seed, mesh_shape, microbatches,
           init_checkpoint, assignment_map, best_metric, log_every, eval_every, eval_steps,
           checkpoint_every, keep_checkpoints, async_checkpoints, progress_bar,
           on_nonfinite) -> dict[str, float]:
    if vocab is None and init_checkpoint:
        info = init_checkpoint_lib.run_info(init_checkpoint) or {}
        vocab = info.get("vocab")
    if vocab is None:
        raise ValueError("VOCAB is None: set it to a SentencePiece .model (or pass an "
                         "INIT_CHECKPOINT whose run.json names its tokenizer).")
    train_source = _open(objective, train_data, "train")
    epoch_steps = (objective.steps_per_epoch(train_source, batch_size)
                   if hasattr(objective, "steps_per_epoch") else None)
    if not num_steps and num_epochs and epoch_steps:
        num_steps = int(np.ceil(num_epochs * epoch_steps))
    if not num_steps:
        raise ValueError("set TRAIN_STEPS (train.num_steps), or train.num_epochs for objectives "
                         "with epochs (fine-tuning).")
    if warmup_steps is None:
        warmup_steps = int(round((warmup_fraction or 0.0) * num_steps))
    if eval_every is None:
        eval_every = epoch_steps or num_steps
    setup = build_setup(model_config=model_config, objective=objective, vocab=vocab,
                        seq_len=seq_len, batch_size=batch_size, seed=seed,
                        mesh_shape=mesh_shape or {"data": -1}, learning_rate=learning_rate,
                        num_steps=num_steps, warmup_steps=warmup_steps)
    _check_batch(batch_size, setup.mesh, microbatches)
    # Before any compute: a DIR that holds a run only resumes that same run.
    operative_config = gin.operative_config_str()
    workdir_lib.check_resume_config(workdir, operative_config)
    workdir_lib.check_resume_tokenizer(workdir, setup.tokenizer)
    pid, nproc = jax.process_index(), jax.process_count()
    data_kwargs = dict(seq_len=seq_len, global_batch_size=batch_size, seed=seed,
                       process_index=pid, process_count=nproc)
    train_iter = objective.make_iterator(train_source, setup.tokenizer, repeat=True, **data_kwargs)
    eval_source = _open(objective, eval_data, "eval") if eval_data else None

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=checkpoint_every,
                                      keep=keep_checkpoints, async_save=async_checkpoints)
    best = checkpointing.BestCheckpoint(os.path.join(workdir, "best"), best_metric) if best_metric else None
    start = ckpt.latest_step()
    if start is not None:
        state, data_state = ckpt.restore(start, setup.abstract_state)
        if data_state is not None:
            train_iter.set_state(data_state)
        logging.info("resumed from step %d", start)
    else:
        start = 0
        state = setup.init_state()
        if init_checkpoint:
            init_checkpoint_lib.check_vocab(init_checkpoint, setup.tokenizer.vocab_size,
                                            setup.cfg.vocab_size)
            state["params"], restored = init_checkpoint_lib.restore_into(
                state["params"], init_checkpoint, assignment_map)
            logging.info("restored from %s: %s", init_checkpoint, ", ".join(restored[:8])
                         + (" ..." if len(restored) > 8 else ""))
    _write_run_files(workdir, setup, vocab=vocab, seq_len=seq_len)
    stop_on_nonfinite = on_nonfinite == "stop"
    skipped_total = _previous_skips(workdir, start)

    train_step = make_train_step(setup, microbatches)
    eval_step = make_eval_step(setup) if eval_source is not None else None
    predict_step = make_predict_step(setup) if hasattr(objective, "predict") else None

    def run_eval(params) -> dict[str, float]:
        it = objective.make_iterator(eval_source, setup.tokenizer, repeat=False, shuffle=False,
                                     **data_kwargs)
        out = evaluate(setup, eval_step, params, it, None if predict_step else eval_steps)
        it.close()
        if predict_step is not None:
            it = objective.make_iterator(eval_source, setup.tokenizer, repeat=False,
                                         shuffle=False, **data_kwargs)
            preds = predict_all(setup, predict_step, params, it)
            out.update({f"eval/{k}": v for k, v in
                        objective.task_metrics(preds["prediction"], preds["label"]).items()})
        return out

    writer = MetricsWriter(workdir, resume_step=start)
    bar = _progress(start, num_steps, enabled=progress_bar and pid == 0)
    tokens_per_step = batch_size * seq_len
    pending, last, t0, t0_step = [], {}, time.time(), start
    done, preempted = start, False
    for step in range(start, num_steps):
        with partitioning.mesh_rules(setup.mesh, setup.rules):
            batch = partitioning.global_batch(next(train_iter), setup.mesh)
            state, metrics = train_step(state, batch)
        pending.append(metrics)
        done = step + 1
        eval_now = eval_step is not None and (done % eval_every == 0 or done == num_steps)
        log_now = done % log_every == 0 or done == num_steps or eval_now
        stop = _preemption_requested(guard, log_now, nproc)
        if log_now or stop:
            host = _to_host(pending)
            flags = [float(m.pop("nonfinite")[0]) for m in host]
            _check_finite(flags, t0_step, stop_on_nonfinite, ckpt, workdir)
            skipped_total += sum(f > 0 for f in flags)
            sums = {k: (sum(m[k][0] for m in host), sum(m[k][1] for m in host)) for k in host[0]}
            elapsed = time.time() - t0
            last = losses.summarize(sums, prefix="train/")
            last["train/tokens_per_sec"] = tokens_per_step * (done - t0_step) / max(elapsed, 1e-9)
            last["train/steps_per_sec"] = (done - t0_step) / max(elapsed, 1e-9)
            last["train/skipped_steps"] = float(skipped_total)
            pending, t0, t0_step = [], time.time(), done
            if eval_now:
                last.update(run_eval(state["params"]))
                if best is not None:
                    best.update(done, state["params"], last)
            writer.write(done, last)
            bar.set_postfix(loss=f"{last['train/loss']:.3f}",
                            tok_s=f"{last['train/tokens_per_sec']:.0f}", refresh=False)
        bar.update(1)
        force = done == num_steps or stop
        if ckpt.should_save(done, force=force):
            if stop_on_nonfinite and pending:  # never checkpoint past an unchecked bad step
                flags = [float(f) for f in _to_host([m["nonfinite"][0] for m in pending])]
                _check_finite(flags, t0_step, True, ckpt, workdir)
            try:
                ckpt.save(done, state, train_iter.get_state(), force=force)
            except errors.CheckpointSaveError:  # disk full...: stop; earlier ones intact
                bar.close()
                train_iter.close()
                writer.close()
                raise
        if stop:
            preempted = True
            break
    bar.close()
    if start >= num_steps:
        logging.info("%s is already at step %d of %d: nothing to train (raise TRAIN_STEPS to "
                     "continue).", workdir, start, num_steps)
    train_iter.close()
    try:
        ckpt.close()  # an async save's failure surfaces here
    except errors.CheckpointSaveError:
        writer.close()
        raise
    if preempted:
        msg = (f"stopped by {guard.signal_name} at step {done} of {num_steps}; checkpoint saved to "
               f"{os.path.join(ckpt.directory, str(done))}. Resume by re-running the same command "
               f"(same --workdir): {preemption.resume_command()}")
        logging.warning(msg)
        if pid == 0:
            print(msg, flush=True)
        if best is not None:
            best.close()
        writer.close()
        return last
    if test_data and predict_step is not None:
        params = state["params"]
        if best is not None and best.exists():
            params = best.restore(setup.abstract_state["params"])
        _write_predictions(workdir, setup, predict_step, params,
                           _open(objective, test_data, "test"), data_kwargs)
    if best is not None:
        best.close()
    writer.close()
    if done > start or not os.path.exists(os.path.join(workdir, "final.json")):
        _write_final(workdir, done, num_steps, last, best)
    return last


def _write_final(workdir: str, step: int, num_steps: int, last: dict[str, float],
                 best: checkpointing.BestCheckpoint | None) -> None:
    """DIR/final.json, written only when a run reaches num_steps (never on preemption or error):
    the completion marker research.sweep uses to skip finished trials. Holds the last logged
    metrics and, with train.best_metric, the best step and its metrics."""
    if jax.process_index() != 0:
        return
    info = {"step": step, "num_steps": num_steps, "metrics": last, "finished_at": time.time()}
    if best is not None and best.record is not None:
        info["best"] = best.record
    path = os.path.join(workdir, "final.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    os.replace(path + ".tmp", path)


def _preemption_requested(guard: preemption.PreemptionGuard, log_now: bool, nproc: int) -> bool:
    """Whether to stop after this step. With several processes they must agree (the save is
    collective), so the signal is only acted on at log steps, where they compare flags."""
    if nproc == 1:
        return guard.requested
    if not log_now:
        return False
    flags = multihost_utils.process_allgather(np.asarray([guard.requested], np.int32))
    return bool(np.any(flags))


def _check_finite(flags: list[float], first_step: int, stop: bool,
                  ckpt: checkpointing.Checkpointer, workdir: str) -> None:
    """Raises NonFiniteError naming the first non-finite step among steps first_step+1...
    (flags[i] belongs to step first_step + i + 1) when `stop`."""
    bad = [first_step + i + 1 for i, f in enumerate(flags) if f > 0]
    if not bad or not stop:
        return
    ckpt.close()  # let in-flight saves (all before the bad step) commit
    good = ckpt.latest_step()
    where = (f"the last good checkpoint is step {good} ({os.path.join(ckpt.directory, str(good))})"
             if good is not None else "there is no checkpoint yet")
    raise errors.NonFiniteError(
        f"non-finite loss or gradient (NaN/Inf) at step {bad[0]} in {workdir}; that update was "
        f"not applied and {where}. Either re-run the same command with "
        "--gin.train.on_nonfinite=\"'skip'\" (resumes from that checkpoint and skips such "
        "steps), or start over in a new --workdir with a lower LEARNING_RATE or more WARMUP_STEPS.")


def _previous_skips(workdir: str, start: int) -> int:
    """train/skipped_steps as last logged at or before `start` (so the count survives resume)."""
    path = os.path.join(workdir, "metrics.jsonl")
    count = 0
    if start and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("step", start + 1) <= start and "train/skipped_steps" in record:
                    count = int(record["train/skipped_steps"])
    return count


def _write_predictions(workdir, setup: Setup, predict_step, params, source, data_kwargs) -> None:
    """DIR/predictions.tsv: `index<TAB>prediction` per test example (GLUE submission layout)."""
    it = setup.objective.make_iterator(source, setup.tokenizer, repeat=False, shuffle=False,
                                       **data_kwargs)
    preds = predict_all(setup, predict_step, params, it)
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "predictions.tsv")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("index\tprediction\n")
        for i, p in zip(preds["index"], preds["prediction"]):
            f.write(f"{int(i)}\t{setup.objective.format_prediction(float(p))}\n")
    os.replace(path + ".tmp", path)
    logging.info("wrote %d test predictions to %s", len(preds["index"]), path)


def _write_run_files(workdir: str, setup: Setup, *, vocab: str, seq_len: int) -> None:
    """DIR/config.gin (the operative gin config: every binding the run used, macros included)
    and DIR/run.json (resolved model facts for tools)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "config.gin"), "w", encoding="utf-8") as f:
        f.write(gin.operative_config_str())
    info = {"model_config": dataclasses.asdict(setup.cfg), "objective": setup.objective.name,
            "vocab": os.path.abspath(vocab), "seq_len": seq_len,
            "tokenizer": workdir_lib.tokenizer_fingerprint(setup.tokenizer)}
    with open(os.path.join(workdir, "run.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)


def _progress(start: int, total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0, desc="train")
