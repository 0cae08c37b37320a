"""Run checkpoints: an orbax `CheckpointManager` under `<workdir>/checkpoints`.

What a checkpoint holds (one orbax step directory, committed atomically: orbax writes a
temporary directory and renames it once every item and every host is done, so a killed save
leaves nothing that `latest_step` would pick):

- `state`: the train state's trainable parameters, optimizer state, step and PRNG key data,
  each array with its global shape (restored onto any mesh: the target shardings come from
  the restoring run's own state);
- `data`: every host's input-pipeline position (`DevicePrefetch.get_state`, the batch after
  the last one consumed), one file per process as grain's orbax handler writes them;
- `meta`: the step, the reward thresholds in force at it, the run config (JSON) and the
  run's W&B id (`metrics.wandb`: a resumed run continues the same W&B run).

Not saved, because they never change and the run's start checkpoint (`model.checkpoint` or
the tiny one) gives them back: the frozen parameters (`model.freeze_vision_tower`) and the
reference tree (a copy of the start parameters). A run initialised from another run's
checkpoint (`model.init_from`, `load_params`) saves its reference tree too (`ref_params`):
the other run's checkpoints may be gone when this one resumes.

Usage (the loop, `train.train_loop`)::

    ckpt = Checkpointer(workdir, config)
    restored = ckpt.restore_latest(state)       # None: fresh run
    ...
    ckpt.maybe_save(step, state, pipe.get_state())   # every `checkpoint.every` steps, async
    ckpt.close()                                     # waits for the last save
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from visionr1_jax.sections.run import checkpoint_config, validate_checkpoint

# ------------------------------------------------------------------------------ data item


class DataStateHandler(ocp.CheckpointHandler):
    """Each host's input-pipeline state (bytes), one `process_{i}-of-{n}.json` per host."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_bytes(args.state)

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> bytes:
        del args
        path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(
                f"{path} is missing: the checkpoint's data state was saved by {found}; resume "
                "with the same number of processes"
            )
        return path.read_bytes()

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: bytes


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------------ the manager


def saved_tree(state: Any, with_ref: bool = False) -> dict[str, Any]:
    """The arrays of a `state.TrainState` a checkpoint holds (see the module docstring);
    `with_ref`: the reference tree too (when it is not the start checkpoint's)."""
    tree = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": jax.random.key_data(state.rng),
    }
    if with_ref and state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def checkpoints_dir(workdir: str) -> epath.Path:
    """`<workdir>/checkpoints`, the run's orbax directory (absolute unless remote: orbax's
    array store wants absolute local paths)."""
    if "://" not in workdir:
        workdir = os.path.abspath(workdir)
    return epath.Path(workdir) / "checkpoints"


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
    """A read-only manager of `<workdir>/checkpoints` (FileNotFoundError when it holds none)."""
    directory = checkpoints_dir(workdir)
    if directory.exists():
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
        if manager.all_steps():
            return manager
        manager.close()
    raise FileNotFoundError(
        f"no checkpoint in {workdir}: {directory} holds no complete checkpoint (a run saves "
        "there with a `checkpoint` config section)"
    )


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the run's complete checkpoints, ascending."""
    manager = read_only_manager(workdir)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def load_params(workdir: str, step: int | None, like: Any) -> tuple[Any, int]:
    """Another run's trainable parameters (`model.init_from`): the `params` of its checkpoint
    `step` (None: the newest complete one) read straight into the shapes and shardings of
    `like` (this run's trainable parameters, any mesh). Returns `(params, step)`.

    Raises:
      FileNotFoundError: no checkpoint there (or not that step; the message lists them).
      ValueError: the saved parameters do not have `like`'s structure or shapes (another
        architecture).
    """
    directory = checkpoints_dir(workdir)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    handlers = {  # every item has its handler: orbax warns of an item it could not read
        "state": ocp.PyTreeCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
        "data": DataStateHandler(),
    }
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    try:
        steps = list(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"model.init_from: no complete checkpoint in {directory}")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"model.init_step={step}: no such checkpoint in {directory} (has {sorted(steps)})"
            )
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)["params"]
        flat_saved = {k: v.shape for k, v in _flat(saved).items()}
        flat_like = {k: tuple(v.shape) for k, v in _flat(like).items()}
        if flat_saved != flat_like:
            diff = sorted(set(flat_saved.items()) ^ set(flat_like.items()))[:4]
            raise ValueError(
                f"model.init_from={workdir}: the checkpoint's parameters differ from this "
                f"model's (another architecture?), e.g. {diff}"
            )
        target = {"params": _abstract(like)}
        out = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )
    finally:
        manager.close()
    return out["state"]["params"], step


def _flat(tree: Any) -> dict[str, Any]:
    """`{"a/b/c": leaf}` of a nested mapping / nnx.State (leaves: arrays or metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict)
    )[0]
    key = lambda path: "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    return {key(path).removesuffix("/value"): leaf for path, leaf in leaves}  # nnx.Variable


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` gives back: the train state (the restoring run's frozen
    parameters and reference kept), this host's pipeline state and the saved `meta`."""

    state: Any
    data_state: bytes
    meta: dict[str, Any]


# Replica-parallel saving (orbax's default off GPUs) has each replica of a replicated array
# write a slice of it, cut on the device by a small program compiled per array shape and
# replica on the first save: 40 s of CPU for 100 small arrays on a (2, 2, 2) CPU mesh
# (measured; 0.6 s with this bound), and hundreds of compilations for a 7B model's tensors on
# a data-parallel pod. Arrays whose per-replica slice is under this many bytes are written
# whole by one replica; big ones still in parallel.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler() -> None:
    """Registers orbax's `jax.Array` handler with `REPLICA_PARALLEL_MIN_BYTES` (once)."""
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if (
        getattr(handler, "_min_slice_bytes_for_replica_parallel", None)
        == REPLICA_PARALLEL_MIN_BYTES
    ):
        return
    bounded = ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(handler, "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
    )
    ocp.type_handlers.register_type_handler(jax.Array, bounded, override=True)


class Checkpointer:
    """Saves and restores a run's checkpoints under `<workdir>/checkpoints` (local or gs://).

    Args:
      workdir: the run's directory.
      config: the run config (its `checkpoint` section; absent = `checkpoint_config()`).
    """

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.config = config
        self.c = config.get("checkpoint") or checkpoint_config()
        self.with_ref = bool((config.get("model") or {}).get("init_from"))
        if "checkpoint" in config:
            validate_checkpoint(config)
        _register_array_handler()
        self.directory = checkpoints_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.c.keep,
            keep_period=self.c.keep_period,
            enable_async_checkpointing=bool(self.c.async_save),
            cleanup_tmp_directories=True,  # a save killed half-way is removed, never read
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        """The newest complete (committed) checkpoint's step, or None."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        """A save is due after optimizer step `step` (`checkpoint.every`)."""
        every = int(self.c.every)
        return bool(every) and step % every == 0

    def save(self, step: int, state: Any, data_state: bytes, meta: dict[str, Any]) -> None:
        """Saves `state` (its step is `step`) and this host's `data_state`; returns once the
        arrays are copied off the devices (the write goes on in the background when
        `checkpoint.async_save`). Every process calls it."""
        meta = {"step": int(step), **meta, "config": json.loads(self.config.to_json_best_effort())}
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(saved_tree(state, self.with_ref)),
                data=DataStateSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore_data(self, step: int) -> bytes:
        """This host's input-pipeline state saved at `step` (set it before reading batches)."""
        out = self.manager.restore(int(step), args=ocp.args.Composite(data=DataStateRestore()))
        return out["data"]

    def restore(self, step: int, like: Any, data: bool = True) -> Restored:
        """The checkpoint of `step` restored into the shapes and shardings of the train state
        `like` (any mesh: each array is read straight into its target shards). `data`: also
        this host's pipeline state (False: `data_state` is b"", e.g. a 1-process tool reading
        a multi-host run's checkpoint, which has no file for a 1-process host)."""
        target = _abstract(saved_tree(like, self.with_ref))
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                meta=ocp.args.JsonRestore(),
                **({"data": DataStateRestore()} if data else {}),
            ),
        )
        tree = out["state"]
        rng = jax.random.wrap_key_data(tree["rng"], impl=jax.random.key_impl(like.rng))
        state = dataclasses.replace(
            like, params=tree["params"], opt_state=tree["opt_state"], step=tree["step"], rng=rng
        )
        if "ref_params" in tree:
            state = dataclasses.replace(state, ref_params=tree["ref_params"])
        data_state = out["data"] if data else b""
        return Restored(state=state, data_state=data_state, meta=dict(out["meta"]))

    def wait(self) -> None:
        """Blocks until the last save is committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
