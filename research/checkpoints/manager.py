"""Orbax checkpoints of the train state, data position and RNG: the one module that calls Orbax.

Layout: `DIR/checkpoints/<step>/{params,opt_state,extra}`. `params` and `opt_state` are
sharded arrays (each host writes its shards; restore reshards onto whatever mesh the target
shardings describe); `extra` is JSON: step, RNG key data and every process's data-iterator
state (a run with another process count restores their merge, `merge_data_states`). Orbax
writes each step to a temporary directory and renames it when complete, so an interrupted
save is never restored (and `Checkpointer` deletes its leftovers on opening).

Besides `Checkpointer` (the training run's checkpoints) and `BestCheckpoint` (DIR/best), the
params-only functions serve fine-tuning (research.checkpoints.init_from) and the Hugging Face
converter (research.checkpoints.hf): `param_shapes`, `restore_param_subset`,
`restore_params_on_host` and `save_params`. Parameter paths are slash-separated
(`encoder/layer_0/attention/query/kernel`, `path_str`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from research import storage
from research.checkpoints.errors import UnknownMetricError
from research.data import bert_pretraining, causal_lm
from research.errors import CheckpointSaveError, ConfigMismatchError
from research.training.preemption import resume_command
from research.workdir import read_json, write_text


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


# Data-iterator kinds whose per-process states merge into one for any process count:
# {state["kind"]: merge_states(states) -> state}.
_STATE_MERGERS = {"causal_lm": causal_lm.merge_states,
                  "bert_pretraining": bert_pretraining.merge_states}


def merge_data_states(states: list[Any], where: str = "the checkpoint") -> Any:
    """One data-iterator state for every process of a run whose process count differs from
    the one that saved `states` (one per saving process). The iterators' global batch is the
    same for any process count, so this is exact: states that do not depend on the process
    layout (classification) are equal and returned as is; per-row states (causal_lm,
    bert_pretraining) are concatenated into one covering every row, from which each
    process's `set_state` takes its own rows. Anything else is refused (ConfigMismatchError)."""
    if all(s == states[0] for s in states):
        return states[0]
    kind = states[0].get("kind") if isinstance(states[0], dict) else None
    merge = _STATE_MERGERS.get(kind)
    try:
        if merge is None:
            raise ValueError(f"data-iterator state kind {kind!r} has no merge rule")
        return merge(states)
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
    for name in storage.listdir(directory):
        if TMP_MARKER in name:
            path = storage.join(directory, name)
            logging.warning("removing incomplete checkpoint %s (a save was interrupted; resuming "
                            "from the last complete step)", path)
            if storage.isdir(path):
                storage.rmtree(path)
            else:
                storage.remove(path)
            removed.append(name)
    return removed


TMP_MARKER = ".orbax-checkpoint-tmp"


class Checkpointer:
    """Saves every `save_every` steps (and when forced), keeps the last `keep`, async if asked."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = storage.resolve(directory)
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
            final = storage.join(self.directory, str(step))
            if step is not None and storage.isdir(final):  # renamed into place but its save did not finish
                logging.warning("removing checkpoint %s: its save failed", final)
                storage.rmtree(final)
        try:
            self.manager.reload()
        except Exception:  # noqa: BLE001 - the steps are read from disk below anyway
            pass
        steps = sorted(int(n) for n in storage.listdir(self.directory)
                       if n.isdigit() and int(n) != step)
        previous = (f"the previous checkpoint at step {steps[-1]} is intact "
                    f"({storage.join(self.directory, str(steps[-1]))})" if steps else
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
        self.directory = storage.resolve(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
            item_names=("params",))
        self.record_path = storage.join(self.directory, "best.json")
        self.record = read_json(self.record_path)

    def exists(self) -> bool:
        return self.manager.latest_step() is not None

    def _better(self, value: float) -> bool:
        if self.record is None:
            return True
        return value > self.record["value"] if self.mode == "max" else value < self.record["value"]

    def update(self, step: int, params: Any, metrics: dict[str, float]) -> bool:
        """Saves `params` if `metrics[metric]` beats the best so far. Collective."""
        if self.metric not in metrics:
            raise UnknownMetricError(
                f"best-checkpoint metric {self.metric!r} is not among the eval metrics "
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
            write_text(self.record_path, json.dumps(self.record))
        return True

    def restore(self, abstract_params: Any) -> Any:
        step = self.manager.latest_step()
        return self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------- params-only checkpoints ---


def path_str(path: tuple) -> str:
    """The slash path (`encoder/layer_0/mlp/wi/kernel`) of a jax.tree_util key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def params_dir(directory: str, step: int) -> str:
    """`directory/<step>/params`: one step's parameters in a checkpoints directory."""
    return storage.join(directory, str(step), "params")


def _params_metadata(directory: str, step: int) -> Any:
    """The nested tree of array metadata (.shape, .dtype) of the parameters stored at `step`."""
    meta = ocp.PyTreeCheckpointer().metadata(params_dir(directory, step))
    tree = getattr(meta, "item_metadata", meta)
    return getattr(tree, "tree", tree)


def param_shapes(directory: str, step: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{slash path: (shape, dtype)} of the parameters stored at `step` (nothing is read but
    the metadata)."""
    flat = jax.tree_util.tree_flatten_with_path(_params_metadata(directory, step))[0]
    return {path_str(p): (tuple(m.shape), m.dtype) for p, m in flat}


def restore_param_subset(directory: str, step: int, item: dict) -> dict:
    """Reads only the parameters `item` names (a nested dict of jax.ShapeDtypeStruct with
    shardings, a subset of the stored tree) directly onto those shardings and dtypes."""
    return ocp.PyTreeCheckpointer().restore(
        params_dir(directory, step), args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))


def restore_params_on_host(directory: str, step: int) -> dict:
    """Every parameter stored at `step` as a nested dict of host numpy arrays."""
    tree = _params_metadata(directory, step)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ocp.PyTreeCheckpointer().restore(
        params_dir(directory, step), args=ocp.args.PyTreeRestore(restore_args=restore_args))


def save_params(directory: str, params: dict, step: int = 0) -> None:
    """Writes a params-only checkpoint, `directory/<step>/params`, in the layout `Checkpointer`
    writes (CheckpointManager, Composite item `params`), so `Checkpointer.restore_params`,
    INIT_CHECKPOINT and research.generate read it. `params` (nested dict of arrays) is saved
    from the host CPU."""
    cpu = jax.devices("cpu")[0]
    tree = jax.tree.map(lambda x: jax.device_put(x, cpu), params)
    manager = ocp.CheckpointManager(
        storage.resolve(directory),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
        item_names=("params",))
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(tree)), force=True)
    manager.wait_until_finished()
    manager.close()
