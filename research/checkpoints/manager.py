"""Orbax checkpoints of the train state, data position and RNG.

Layout: `DIR/checkpoints/<step>/{params,opt_state,extra}`. `params` and `opt_state` are
sharded arrays (each host writes its shards; restore reshards onto whatever mesh the target
shardings describe); `extra` is JSON: step, RNG key data and every process's data-iterator
state (a run with another process count restores their merge, `merge_data_states`). Orbax
writes each step to a temporary directory and renames it when complete, so an interrupted
save is never restored (and `Checkpointer` deletes its leftovers on opening).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what restore should produce)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _from_host(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array with `sharding` from a host value every process holds in full."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (a no-op list on one process)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    size = multihost_utils.process_allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(size.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, size.reshape(-1))]


# Data-iterator kinds whose per-process states merge into one for any process count.
_STATE_MERGERS = {"causal_lm": "research.data.causal_lm",
                  "bert_pretraining": "research.data.bert_pretraining"}


def merge_data_states(states: list[Any], where: str = "the checkpoint") -> Any:
    """One data-iterator state for every process of a run whose process count differs from
    the one that saved `states` (one per saving process). The iterators' global batch is the
    same for any process count, so this is exact: states that do not depend on the process
    layout (classification) are equal and returned as is; per-row states (causal_lm,
    bert_pretraining) are concatenated into one covering every row, from which each
    process's `set_state` takes its own rows. Anything else is refused (ConfigMismatchError)."""
    import importlib

    from research.errors import ConfigMismatchError
    if all(s == states[0] for s in states):
        return states[0]
    kind = states[0].get("kind") if isinstance(states[0], dict) else None
    module = _STATE_MERGERS.get(kind)
    try:
        if module is None:
            raise ValueError(f"data-iterator state kind {kind!r} has no merge rule")
        return importlib.import_module(module).merge_states(states)
    except ValueError as err:
        raise ConfigMismatchError(
            f"{where} was written by {len(states)} processes and this run has "
            f"{jax.process_count()}, but its data-iterator state cannot be split across another "
            f"process count ({err}). Resume with {len(states)} processes, or pick a new "
            "--workdir.") from err


def remove_incomplete(directory: str) -> list[str]:
    """Deletes step directories a killed run left half-written (Orbax's `*.orbax-checkpoint-tmp*`
    names; complete steps are renamed to plain numbers only once fully written). Returns them."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        if TMP_MARKER in name:
            path = os.path.join(directory, name)
            logging.warning("removing incomplete checkpoint %s (a save was interrupted; resuming "
                            "from the last complete step)", path)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(name)
    return removed


TMP_MARKER = ".orbax-checkpoint-tmp"


class Checkpointer:
    """Saves every `save_every` steps (and when forced), keeps the last `keep`, async if asked."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.save_every = max(1, int(save_every))
        self._in_flight: int | None = None  # step of an async save not yet known to be committed
        if jax.process_index() == 0:
            remove_incomplete(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "extra"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether `save(step, force=force)` would write a checkpoint."""
        return (force or step % self.save_every == 0) and step not in self.manager.all_steps()

    def save(self, step: int, state: dict[str, Any], data_state: Any, *, force: bool = False) -> bool:
        """Saves at `step` if it is a save step (or `force`). Collective: call on every process."""
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False
        extra = {"step": int(step),
                 "rng": np.asarray(jax.random.key_data(state["rng"])).tolist(),
                 "data_state": allgather_json(data_state),
                 "process_count": jax.process_count()}
        self.wait()  # an earlier async save that failed is reported as that step's failure
        try:
            self._in_flight = step
            saved = self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                opt_state=ocp.args.StandardSave(state["opt_state"]),
                extra=ocp.args.JsonSave(extra)), force=True)
        except Exception as err:  # noqa: BLE001 - disk full, I/O error, orbax's wrapped errors
            raise self._save_failed(step, err) from err
        return saved

    def _save_failed(self, step: int | None, err: Exception) -> Exception:
        """Removes what the failed save of `step` left, and returns the error to raise: the
        reason, the intact earlier checkpoint, and what to do."""
        from research.errors import CheckpointSaveError
        from research.training.preemption import resume_command
        self._in_flight = None
        try:
            self.manager.wait_until_finished()  # let the save's other writers stop
        except Exception:  # noqa: BLE001 - the same failure
            pass
        if jax.process_index() == 0:
            # Writers of the failed save's other items may still be finishing: clean until the
            # directory stays clean for a moment (a leftover is removed on the next start).
            quiet_since, deadline = None, time.monotonic() + 3.0
            while time.monotonic() < deadline:
                if remove_incomplete(self.directory):
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > 0.5:
                    break
                time.sleep(0.05)
            final = os.path.join(self.directory, str(step))
            if step is not None and os.path.isdir(final):  # renamed into place but its save did not finish
                logging.warning("removing checkpoint %s: its save failed", final)
                shutil.rmtree(final, ignore_errors=True)
        try:
            self.manager.reload()
        except Exception:  # noqa: BLE001 - the steps are read from disk below anyway
            pass
        steps = sorted(int(n) for n in os.listdir(self.directory)
                       if n.isdigit() and int(n) != step) if os.path.isdir(self.directory) else []
        previous = (f"the previous checkpoint at step {steps[-1]} is intact "
                    f"({os.path.join(self.directory, str(steps[-1]))})" if steps else
                    "there is no earlier checkpoint (a re-run starts from step 0)")
        chain, e = [], err
        while e is not None and e not in chain:
            chain.append(e)
            e = e.__cause__ or e.__context__
        disk = any(isinstance(e, OSError) for e in chain) or "No space left" in str(err)
        todo = ("free space (or fix the disk error) on " + self.directory if disk
                else "fix the cause above")
        return CheckpointSaveError(
            f"checkpoint save{'' if step is None else f' at step {step}'} failed: {type(err).__name__}: {err}; {previous}; "
            f"{todo} and re-run the same command to resume: {resume_command()}")

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Restores the state onto the shardings of `abstract_state`; returns (state, data_state)."""
        logging.info("restoring checkpoint %d from %s", step, self.directory)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            extra=ocp.args.JsonRestore()))
        extra = restored["extra"]
        # Global arrays from host values that every process holds (device_put cannot target
        # another process's devices).
        rng_sharding = abstract_state["rng"].sharding
        rng = jax.jit(jax.random.wrap_key_data, out_shardings=rng_sharding)(
            _from_host(np.asarray(extra["rng"], np.uint32), rng_sharding))
        step_arr = _from_host(np.asarray(extra["step"], np.int32), abstract_state["step"].sharding)
        state = {"step": step_arr, "params": restored["params"],
                 "opt_state": restored["opt_state"], "rng": rng}
        data_states = extra["data_state"]
        if len(data_states) == jax.process_count():
            data_state = data_states[jax.process_index()]
        else:
            logging.info("checkpoint %d was written by %d process(es), this run has %d: every "
                         "process takes its rows from the merged data-iterator state.",
                         step, len(data_states), jax.process_count())
            data_state = merge_data_states(data_states, self.directory)
        return state, data_state

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Restores only the parameters (generation, fine-tuning)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))
        return restored["params"]

    def wait(self) -> None:
        """Waits for an async save; raises CheckpointSaveError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - the background commit's error surfaces here
            raise self._save_failed(self._in_flight, err) from err
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception as err:  # noqa: BLE001 - already reporting the save failure
                logging.warning("closing the checkpoint manager: %s", err)


class BestCheckpoint:
    """Keeps the parameters with the best value of one eval metric in DIR/best.

    `metric` is a metrics.jsonl key such as 'eval/accuracy' (higher is better) or, with a
    'min:' prefix, one where lower is better ('min:eval/loss'). DIR/best/best.json records
    the step and value, so a resumed run keeps comparing against the right number.
    """

    def __init__(self, directory: str, metric: str):
        self.mode = "min" if metric.startswith("min:") else "max"
        self.metric = metric.removeprefix("min:").removeprefix("max:")
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_names=("params",))
        self.record_path = os.path.join(self.directory, "best.json")
        self.record = None
        if os.path.exists(self.record_path):
            with open(self.record_path, encoding="utf-8") as f:
                self.record = json.load(f)

    def exists(self) -> bool:
        return self.manager.latest_step() is not None

    def _better(self, value: float) -> bool:
        if self.record is None:
            return True
        return value > self.record["value"] if self.mode == "max" else value < self.record["value"]

    def update(self, step: int, params: Any, metrics: dict[str, float]) -> bool:
        """Saves `params` if `metrics[metric]` beats the best so far. Collective."""
        if self.metric not in metrics:
            raise KeyError(f"best-checkpoint metric {self.metric!r} is not among the eval metrics "
                           f"{sorted(k for k in metrics if k.startswith('eval/'))}; set "
                           "train.best_metric to one of them.")
        value = float(metrics[self.metric])
        if not self._better(value):
            return False
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                          force=True)
        self.manager.wait_until_finished()
        self.record = {"step": int(step), "metric": self.metric, "value": value}
        if jax.process_index() == 0:
            with open(self.record_path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(self.record, f)
            os.replace(self.record_path + ".tmp", self.record_path)
        return True

    def restore(self, abstract_params: Any) -> Any:
        step = self.manager.latest_step()
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
