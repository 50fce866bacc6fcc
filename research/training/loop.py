"""The training loop behind `python -m research.train` (see `research/train.py` for the CLI).

`train` reads top to bottom, as big_vision's train.py does:
  setup    the RunConfig (gin `train.*`), the training data, then tokenizer, model, mesh,
           optimizer and the sharded state initializer (training/setup.py)
  restore  the last checkpoint in DIR (params, optimizer, data position, RNG), or a fresh
           state, initialised from INIT_CHECKPOINT when one is given
  loop     the jitted train step with the state donated (training/steps.py); metrics come to
           the host only at log steps
  eval     every eval_every steps (training/evaluation.py); the best params with best_metric
  save     a checkpoint every checkpoint_every steps and at the end; then test predictions
           and DIR/final.json
`profile_steps=(N, M)` (research.train's --profile_steps=N:M) traces the loop's steps N..M-1
with jax.profiler into DIR/profile (research/profiling.py).
Re-running the same command with the same DIR resumes exactly.

Reliability (see research/workdir.py): DIR is locked (DIR/.lock) while training; a DIR with a
config.gin only resumes with the same bindings, except layout-only ones (MESH_SHAPE, axis
rules, remat, attention kernel: workdir.LAYOUT_KEYS), and under any process count;
SIGTERM/SIGINT save a checkpoint at the current step and return; DIR/final.json marks a
finished run; a NaN/Inf loss or gradient stops the run naming the step
(`train.on_nonfinite='stop'`) or skips that update (`'skip'`, counted as train/skipped_steps);
a train step, eval, checkpoint save/restore or cross-process sync that runs past
`train.hang_timeout_s` dumps the stacks to DIR/hang-<process>-<step>.txt and exits 75
(training/watchdog.py), so that a rerun resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Any

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from research import errors, profiling, storage
from research import workdir as workdir_lib
from research.checkpoints import init_from as init_checkpoint_lib
from research.checkpoints import manager as checkpointing
from research.data.mixture import open_train_data
from research.objectives import losses
from research.training import partitioning, preemption
from research.training import watchdog as watchdog_lib
from research.training.evaluation import Evaluator, write_predictions
from research.training.metrics_writer import MetricsWriter
from research.training.run_config import RunConfig, Schedule
from research.training.setup import Setup, State, build_setup, check_batch_size
from research.training.steps import make_eval_step, make_predict_step, make_train_step, to_host

__all__ = ["train", "RunConfig", "Setup", "build_setup", "make_train_step", "make_eval_step"]


def train(workdir: str, config: RunConfig | None = None, *,
          profile_steps: profiling.Window | None = None, **overrides: Any) -> dict[str, float]:
    """Trains `config` into `workdir`; returns the last logged metrics.

    `config` None: the gin-configured RunConfig (the `train.*` bindings), with `overrides`
    (RunConfig fields) taking precedence. Wrong types fail here, before any compute.
    `profile_steps` (N, M): a jax.profiler trace of the steps N..M-1 in workdir/profile.
    """
    if config is None:
        config = RunConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    create_workdir(workdir)
    with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0) as lock, \
            preemption.PreemptionGuard() as guard, \
            watchdog_lib.Watchdog(workdir, config.hang_timeout_s, host=jax.process_index()) as dog:
        return _train(workdir, config, guard, profile_steps, dog, lock)


def create_workdir(workdir: str) -> None:
    """Creates --workdir (and its parents); ConfigError if that path cannot be a directory.
    On object storage (gs://...): StorageError unless its bucket exists and takes a write."""
    if storage.is_remote(workdir):
        storage.check_writable(workdir, "--workdir")
        return
    try:
        os.makedirs(workdir, exist_ok=True)
    except FileExistsError:
        raise errors.ConfigError(f"--workdir={workdir} is an existing file, not a directory: "
                                 "pick a directory path (new or an earlier run's).") from None
    except OSError as err:
        raise errors.ConfigError(f"cannot create --workdir={workdir}: {err.strerror or err}; "
                                 "pick a path you can write to.") from None


@dataclasses.dataclass
class _Run:
    """What a run builds before restoring: its setup, step counts and data."""

    config: RunConfig
    schedule: Schedule
    setup: Setup
    vocab: str
    train_source: Any
    data_kwargs: dict[str, Any]  # this host's share of the batches: make_iterator kwargs


def _train(workdir: str, config: RunConfig, guard: preemption.PreemptionGuard,
           profile_steps: profiling.Window | None,
           dog: watchdog_lib.Watchdog, lock: workdir_lib.WorkdirLock) -> dict[str, float]:
    # Setup: data, model, mesh, optimizer; a DIR holding another run is refused here.
    run = _prepare(workdir, config)
    profiling.check_window(profile_steps, run.schedule.num_steps, "TRAIN_STEPS")
    setup = run.setup
    train_iter = setup.objective.make_iterator(run.train_source, setup.tokenizer, repeat=True,
                                               **run.data_kwargs)
    eval_source = (setup.objective.open_source(config.eval_data, role="eval")
                   if config.eval_data else None)
    ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"),
                                      save_every=config.checkpoint_every,
                                      keep=config.keep_checkpoints,
                                      async_save=config.async_checkpoints)
    best = (checkpointing.BestCheckpoint(storage.join(workdir, "best"), config.best_metric)
            if config.best_metric else None)
    # Restore: DIR's last checkpoint, else a fresh (or INIT_CHECKPOINT) state.
    resume_step = ckpt.latest_step()
    with dog.phase("checkpoint restore" if resume_step is not None else "state initialisation",
                   resume_step or 0, compiles=resume_step is None):  # initialising compiles
        state, start = _restore(run, ckpt, train_iter)
    _write_run_files(workdir, setup, vocab=run.vocab, seq_len=config.seq_len)
    # Loop: train steps, logging, eval and checkpoints until num_steps or a preemption.
    predict_step = make_predict_step(setup) if setup.objective.has_predictions else None
    evaluator = (Evaluator(setup, eval_source, run.data_kwargs, config.eval_steps,
                           make_eval_step(setup), predict_step)
                 if eval_source is not None else None)
    loop = _Loop(workdir, run, guard, ckpt, best, evaluator, train_iter,
                 make_train_step(setup, config.microbatches), dog, lock, profile_steps)
    state, last, done, preempted = loop.run(state, start)
    # Save: test predictions (with the best params) and the completion marker.
    if preempted:
        _report_preemption(guard, ckpt, done, run.schedule.num_steps)
    elif config.test_data and predict_step is not None:
        params = state["params"]
        with dog.phase("test predictions", done, compiles=True):
            if best is not None and best.exists():
                params = best.restore(setup.abstract_state["params"])
            write_predictions(workdir, setup, predict_step, params,
                              setup.objective.open_source(config.test_data, role="test"),
                              run.data_kwargs)
    if best is not None:
        best.close()
    if not preempted and (done > start or workdir_lib.read_final(workdir) is None):
        _write_final(workdir, done, run.schedule.num_steps, last, best)
    return last


def _prepare(workdir: str, config: RunConfig) -> _Run:
    """The objective bound to its training data, the step counts and the Setup; refuses a DIR
    that holds a different run (config or tokenizer) before any compute."""
    if config.init_checkpoint:
        init_checkpoint_lib.resolve(config.init_checkpoint)  # a wrong path fails before compute
    vocab = config.vocab
    if vocab is None and config.init_checkpoint:
        vocab = (init_checkpoint_lib.run_info(config.init_checkpoint) or {}).get("vocab")
    if vocab is None:
        raise errors.ConfigError("VOCAB is None: set it to a SentencePiece .model (e.g. "
                                 "--gin.VOCAB=\"'data/tokenizers/austen_8k.model'\"), or pass an "
                                 "INIT_CHECKPOINT whose run.json names its tokenizer.")
    train_source = open_train_data(config.objective, config.train_data)  # spec or mixture
    objective = config.objective.with_training_data(train_source)
    schedule = config.schedule(objective.steps_per_epoch(train_source, config.batch_size))
    setup = build_setup(model_config=config.model_config, objective=objective, vocab=vocab,
                        seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
                        mesh_shape=config.mesh_axes, learning_rate=config.learning_rate,
                        num_steps=schedule.num_steps, warmup_steps=schedule.warmup_steps)
    check_batch_size(config.batch_size, setup.mesh, config.microbatches)
    workdir_lib.check_resume_config(workdir, gin.operative_config_str())
    workdir_lib.check_resume_tokenizer(workdir, setup.tokenizer)
    data_kwargs = dict(seq_len=config.seq_len, global_batch_size=config.batch_size,
                       seed=config.seed, process_index=jax.process_index(),
                       process_count=jax.process_count())
    return _Run(config, schedule, setup, vocab, train_source, data_kwargs)


def _restore(run: _Run, ckpt: checkpointing.Checkpointer, train_iter: Any) -> tuple[State, int]:
    """(state, first step): DIR's last checkpoint (and the data position), or a fresh state
    with INIT_CHECKPOINT's parameters restored into it."""
    setup, config = run.setup, run.config
    start = ckpt.latest_step()
    if start is not None:
        state, data_state = ckpt.restore(start, setup.abstract_state)
        if data_state is not None:
            train_iter.set_state(data_state)
        logging.info("resumed from step %d", start)
        return state, start
    state = setup.init_state()
    if config.init_checkpoint:
        init_checkpoint_lib.check_vocab(config.init_checkpoint, setup.tokenizer.vocab_size,
                                        setup.cfg.vocab_size)
        state["params"], restored = init_checkpoint_lib.restore_into(
            state["params"], config.init_checkpoint, config.assignment_map)
        logging.info("restored from %s: %s", config.init_checkpoint, ", ".join(restored[:8])
                     + (" ..." if len(restored) > 8 else ""))
    return state, 0


class _Loop:
    """The step loop of one run: train steps, logging, eval, checkpoints and the stop rules
    (end of run, preemption, non-finite steps)."""

    def __init__(self, workdir: str, run: _Run, guard: preemption.PreemptionGuard,
                 ckpt: checkpointing.Checkpointer, best: checkpointing.BestCheckpoint | None,
                 evaluator: Evaluator | None, train_iter: Any, train_step: Any,
                 watchdog: watchdog_lib.Watchdog, lock: workdir_lib.WorkdirLock,
                 profile_steps: profiling.Window | None = None):
        self.workdir, self.guard, self.watchdog, self.lock = workdir, guard, watchdog, lock
        self.profiler = profiling.StepProfiler(
            profile_steps, storage.join(workdir, "profile"),
            announce=logging.info if jax.process_index() == 0 else None)
        self.config, self.schedule, self.setup = run.config, run.schedule, run.setup
        self.ckpt, self.best, self.evaluator = ckpt, best, evaluator
        self.train_iter, self.train_step = train_iter, train_step

    def run(self, state: State, start: int) -> tuple[State, dict[str, float], int, bool]:
        """Trains from step `start` to num_steps (or a preemption); returns (state, the last
        logged metrics, the steps done, whether it was preempted). Closes the data iterator
        and the metrics writer, and waits for the last checkpoint."""
        config, num_steps = self.config, self.schedule.num_steps
        log = _TrainLog(start, config.batch_size * config.seq_len,
                        skipped=_previous_skips(self.workdir, start),
                        stop_on_nonfinite=config.on_nonfinite == "stop", ckpt=self.ckpt,
                        workdir=self.workdir)
        done, preempted = start, False
        if start < num_steps:
            logging.info("training steps %d-%d into %s (metrics.jsonl, checkpoints/ every %d "
                         "steps, tensorboard/)", start + 1, num_steps, self.workdir,
                         config.checkpoint_every)
        with contextlib.ExitStack() as cleanup:
            writer = MetricsWriter(self.workdir, resume_step=start)
            cleanup.callback(writer.close)
            cleanup.callback(self.train_iter.close)
            bar = cleanup.enter_context(_progress(
                start, num_steps, enabled=config.progress_bar and jax.process_index() == 0))
            cleanup.callback(self.profiler.close)
            for step in range(start, num_steps):
                self.profiler.before(step, (state, log.pending))
                state = self._step(step + 1, state, log)
                self.profiler.after(step, (state, log.pending))
                done = step + 1
                eval_now = self.evaluator is not None and (
                    done % self.schedule.eval_every == 0 or done == num_steps)
                log_now = done % config.log_every == 0 or done == num_steps or eval_now
                with self.watchdog.phase("preemption sync", done):
                    stop = _preemption_requested(self.guard, log_now, jax.process_count())
                if log_now or stop:
                    self.lock.check()  # a run whose gs:// lease was taken over writes nothing
                    writer.write(done, self._log(done, state, log, eval_now, bar))
                bar.update(1)
                self._maybe_save(done, state, log, force=done == num_steps or stop)
                if stop:
                    preempted = True
                    break
            if start >= num_steps:
                logging.info("%s is already at step %d of %d: nothing to train (raise "
                             "TRAIN_STEPS to continue).", self.workdir, start, num_steps)
        with self.watchdog.phase("checkpoint save", done):
            self.ckpt.close()  # an async save's failure surfaces here
        return state, log.last, done, preempted

    def _step(self, number: int, state: State, log: "_TrainLog") -> State:
        """Train step `number` (1-based); its metrics stay on the device (log.pending), and
        the watchdog counts the step done when they are ready."""
        self.watchdog.begin_step(number)
        with partitioning.mesh_rules(self.setup.mesh, self.setup.rules):
            batch = partitioning.global_batch(next(self.train_iter), self.setup.mesh)
            state, metrics = self.train_step(state, batch)
        self.watchdog.end_step(metrics)
        log.pending.append(metrics)
        return state

    def _log(self, done: int, state: State, log: "_TrainLog", eval_now: bool,
             bar: tqdm) -> dict[str, float]:
        """The metrics logged at step `done`: train/ means since the last log, eval/ ones."""
        last = log.summarize(done)
        if eval_now:  # the eval's batches (and the best params' save) have one deadline
            with self.watchdog.phase("eval", done, compiles=True,
                                     scale=self.config.eval_steps or 1):
                last.update(self.evaluator(state["params"]))
                if self.best is not None:
                    self.best.update(done, state["params"], last)
            logging.info("step %d/%d: %s", done, self.schedule.num_steps,
                         ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("eval/")))
        bar.set_postfix(loss=f"{last['train/loss']:.3f}",
                        tok_s=f"{last['train/tokens_per_sec']:.0f}", refresh=False)
        return last

    def _maybe_save(self, done: int, state: State, log: "_TrainLog", *, force: bool) -> None:
        if not self.ckpt.should_save(done, force=force):
            return
        if log.stop_on_nonfinite and log.pending:  # never checkpoint past an unchecked bad step
            log.check_finite([float(f) for f in to_host([m["nonfinite"][0] for m in log.pending])])
        self.lock.check()
        with self.watchdog.phase("checkpoint save", done):
            self.ckpt.save(done, state, self.train_iter.get_state(), force=force)


class _TrainLog:
    """Host-side accounting between log steps: the steps' metrics still on the device, the
    throughput timer and the count of skipped (non-finite) steps."""

    def __init__(self, start: int, tokens_per_step: int, *, skipped: int, stop_on_nonfinite: bool,
                 ckpt: checkpointing.Checkpointer, workdir: str):
        self.pending: list[losses.MetricSums] = []
        self.last: dict[str, float] = {}
        self.t0, self.t0_step = time.time(), start
        self.tokens_per_step, self.skipped = tokens_per_step, skipped
        self.stop_on_nonfinite, self.ckpt, self.workdir = stop_on_nonfinite, ckpt, workdir

    def summarize(self, done: int) -> dict[str, float]:
        """The train/ metrics of the steps since the last log (a host sync); NonFiniteError
        first if one of them was non-finite and on_nonfinite is 'stop'."""
        host = to_host(self.pending)
        flags = [float(m.pop("nonfinite")[0]) for m in host]
        self.check_finite(flags)
        self.skipped += sum(f > 0 for f in flags)
        sums = {k: (sum(m[k][0] for m in host), sum(m[k][1] for m in host)) for k in host[0]}
        elapsed = max(time.time() - self.t0, 1e-9)
        last = losses.summarize(sums, prefix="train/")
        last["train/tokens_per_sec"] = self.tokens_per_step * (done - self.t0_step) / elapsed
        last["train/steps_per_sec"] = (done - self.t0_step) / elapsed
        last["train/skipped_steps"] = float(self.skipped)
        self.pending, self.t0, self.t0_step = [], time.time(), done
        self.last = last
        return last

    def check_finite(self, flags: list[float]) -> None:
        """Raises NonFiniteError naming the first non-finite step among the pending ones
        (flags[i] belongs to step t0_step + i + 1) when on_nonfinite is 'stop'."""
        bad = [self.t0_step + i + 1 for i, f in enumerate(flags) if f > 0]
        if not bad or not self.stop_on_nonfinite:
            return
        self.ckpt.close()  # let in-flight saves (all before the bad step) commit
        good = self.ckpt.latest_step()
        where = (f"the last good checkpoint is step {good} "
                 f"({storage.join(self.ckpt.directory, str(good))})"
                 if good is not None else "there is no checkpoint yet")
        raise errors.NonFiniteError(
            f"non-finite loss or gradient (NaN/Inf) at step {bad[0]} in {self.workdir}; that "
            f"update was not applied and {where}. Either re-run the same command with "
            "--gin.train.on_nonfinite=\"'skip'\" (resumes from that checkpoint and skips such "
            "steps), or start over in a new --workdir with a lower LEARNING_RATE or more "
            "WARMUP_STEPS.")


def _preemption_requested(guard: preemption.PreemptionGuard, log_now: bool, nproc: int) -> bool:
    """Whether to stop after this step. With several processes they must agree (the save is
    collective), so the signal is only acted on at log steps, where they compare flags."""
    if nproc == 1:
        return guard.requested
    if not log_now:
        return False
    flags = multihost_utils.process_allgather(np.asarray([guard.requested], np.int32))
    return bool(np.any(flags))


def _report_preemption(guard: preemption.PreemptionGuard, ckpt: checkpointing.Checkpointer,
                       done: int, num_steps: int) -> None:
    msg = (f"stopped by {guard.signal_name} at step {done} of {num_steps}; checkpoint saved to "
           f"{storage.join(ckpt.directory, str(done))}. Resume by re-running the same command "
           f"(same --workdir): {preemption.resume_command()}")
    logging.warning(msg)
    if jax.process_index() == 0:
        print(msg, flush=True)


def _previous_skips(workdir: str, start: int) -> int:
    """train/skipped_steps as last logged at or before `start` (so the count survives resume)."""
    count = 0
    if start:
        for record in workdir_lib.read_metrics(workdir):
            if record["step"] <= start and "train/skipped_steps" in record:
                count = int(record["train/skipped_steps"])
    return count


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
    workdir_lib.write_final(workdir, info)


def _write_run_files(workdir: str, setup: Setup, *, vocab: str, seq_len: int) -> None:
    """DIR/config.gin (the operative gin config: every binding the run used, macros included)
    and DIR/run.json (resolved model facts for tools)."""
    if jax.process_index() != 0:
        return
    workdir_lib.write_config(workdir, gin.operative_config_str())
    workdir_lib.write_run_info(workdir, {
        "model_config": dataclasses.asdict(setup.cfg), "objective": setup.objective.name,
        "vocab": storage.resolve(vocab), "seq_len": seq_len,
        "tokenizer": workdir_lib.tokenizer_fingerprint(setup.tokenizer)})


def _progress(start: int, total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0, desc="train")
