"""Orbax checkpoints of the train state, RNG key, Grain iterator and config.

A checkpoint step directory `<workdir>/checkpoints/<step>/` contains four items:

* `state`: the train state pytree (params, opt_state, step) of possibly sharded `jax.Array`s.
* `rng`: the raw data of the training PRNG key.
* `data`: the Grain iterator state, one JSON file per process (Grain's own Orbax handler).
* `config`: the run config as JSON, for the record.

Saves are asynchronous: `save_checkpoint` returns once the arrays are copied to host memory,
and Orbax writes them in a background thread into `<step>.orbax-checkpoint-tmp`, renaming that
directory to `<step>` only after every item is written. `latest_step()` lists only renamed
directories, so a save cut short by a crash is never restored; the next `CheckpointManager` on
the directory deletes the leftover temporary directory (`cleanup_tmp_directories=True`).

`restore_or_initialize` applies the resume order: the latest complete checkpoint, else the
pretrained weights in `config.init_from`, else fresh initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import grain.checkpoint as grain_checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util

from aim_jax import sharding as sharding_lib

STATE_ITEM = "state"
RNG_ITEM = "rng"
DATA_ITEM = "data"
CONFIG_ITEM = "config"
ITEM_NAMES = (STATE_ITEM, RNG_ITEM, DATA_ITEM, CONFIG_ITEM)

CHECKPOINT_SUBDIR = "checkpoints"

# Variable collections that `init_from` copies from a pretrained directory.
PRETRAINED_COLLECTIONS = ("params", "batch_stats")


def absolute_path(path: str | os.PathLike[str]) -> epath.Path:
    """Return `path` made absolute, leaving URIs such as gs://bucket/dir unchanged.

    Orbax rejects relative checkpoint paths, and `epath.Path.absolute()` would turn a URI into
    a local path, so URIs are passed through.
    """
    if "://" in os.fspath(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(path))


def create_checkpoint_manager(
    directory: str | os.PathLike[str],
    *,
    save_interval_steps: int,
    max_to_keep: int | None,
    async_save: bool = True,
) -> ocp.CheckpointManager:
    """Open (or create) a checkpoint directory.

    Args:
        directory: the checkpoint root; step `s` is written to `directory/s`.
        save_interval_steps: `save_checkpoint` writes only at multiples of this (unless forced).
        max_to_keep: number of most recent checkpoints kept; None keeps all.
        async_save: write arrays in a background thread.

    Returns:
        An `orbax.checkpoint.CheckpointManager` with items `ITEM_NAMES`. Call
        `wait_until_finished()` before the process exits and `close()` when done.
    """
    if save_interval_steps < 1:
        raise ValueError(
            f"save_interval_steps must be a positive int, got {save_interval_steps}. Set "
            "config.checkpoint_every_steps to a positive number of steps."
        )
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(
            f"max_to_keep must be None (keep all) or positive, got {max_to_keep}. Set "
            "config.keep_checkpoints accordingly."
        )
    # Orbax's default policy also saves the first step of a run that has no checkpoint. This
    # one saves only at multiples of the interval, or when JAX's preemption service (if
    # enabled) reports a preemption.
    save_policy = ocp.checkpoint_managers.AnySavePolicy(
        [
            ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        # Deletes `<step>.orbax-checkpoint-tmp` directories left by a crashed save. Without
        # this, saving that step again fails because the temporary directory already exists.
        cleanup_tmp_directories=True,
    )
    manager = ocp.CheckpointManager(
        absolute_path(directory), options=options, item_names=ITEM_NAMES
    )
    logging.info(
        "Checkpoint directory %s: every %d steps, keeping %s; complete steps %s.",
        directory,
        save_interval_steps,
        "all" if max_to_keep is None else max_to_keep,
        list(manager.all_steps()),
    )
    return manager


def checkpoint_manager_from_config(
    workdir: str | os.PathLike[str], config: Any
) -> ocp.CheckpointManager:
    """Open `workdir/checkpoints` with `config.checkpoint_every_steps` and `keep_checkpoints`.

    Args:
        workdir: the run directory.
        config: a `ConfigDict` with `checkpoint_every_steps`, `keep_checkpoints` (None or 0
            keeps all) and optionally `async_checkpointing` (default True).

    Returns:
        The manager from `create_checkpoint_manager`.
    """
    keep = config.get("keep_checkpoints", None)
    return create_checkpoint_manager(
        epath.Path(workdir) / CHECKPOINT_SUBDIR,
        save_interval_steps=int(config.checkpoint_every_steps),
        max_to_keep=int(keep) if keep else None,
        async_save=bool(config.get("async_checkpointing", True)),
    )


def save_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    *,
    rng: jax.Array | None = None,
    data_iterator: grain.DatasetIterator | grain.DataLoaderIterator | None = None,
    config: Any = None,
    force: bool = False,
) -> bool:
    """Start saving a checkpoint at `step` if the save interval allows it.

    Call it on every process, every step; it returns quickly when no save is due. The state
    arrays and the iterator position are captured before it returns, so the caller may then
    donate or overwrite the state and advance the iterator.

    Args:
        manager: from `create_checkpoint_manager`.
        step: the number of completed training steps.
        state: pytree of `jax.Array`s (unboxed), possibly sharded across processes.
        rng: the training PRNG key (raw `uint32` or typed); saved replicated.
        data_iterator: a Grain `DatasetIterator` or `DataLoaderIterator`; each process saves
            its own iterator state.
        config: a `ConfigDict` or JSON-serialisable mapping, saved as JSON.
        force: save even if `step` is not a multiple of the interval (for the final step). It
            never overwrites an existing step.

    Returns:
        True if a save was started.
    """
    if not force and not manager.should_save(step):
        return False
    if step in manager.all_steps():
        logging.info("Checkpoint step %d already exists; not saving it again.", step)
        return False

    items: dict[str, Any] = {STATE_ITEM: ocp.args.StandardSave(state)}
    if rng is not None:
        items[RNG_ITEM] = ocp.args.StandardSave({"key_data": _rng_to_numpy(rng)})
    if data_iterator is not None:
        items[DATA_ITEM] = grain_checkpoint.CheckpointSave(data_iterator)
    if config is not None:
        items[CONFIG_ITEM] = ocp.args.JsonSave(_config_to_json(config))

    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("Started saving checkpoint step %d (items %s).", step, sorted(items))
    return saved


@dataclasses.dataclass
class RestoredCheckpoint:
    """Items read by `restore_checkpoint` from one checkpoint step.

    Attributes:
        step: the checkpoint step.
        state: the train state, placed on the requested shardings.
        rng: the PRNG key in the form of the `rng_template` passed to the restore, or None
            when no template was passed or the checkpoint has no key.
        config: the saved config as a dict, or None when it was not saved.
        data_restored: True if the passed data iterator was moved to the saved position.
    """

    step: int
    state: Any
    rng: jax.Array | None
    config: dict[str, Any] | None
    data_restored: bool


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    shardings: Any,
    *,
    rng_template: jax.Array | None = None,
    data_iterator: grain.DatasetIterator | grain.DataLoaderIterator | None = None,
) -> RestoredCheckpoint:
    """Restore checkpoint `step` onto `shardings`, whatever mesh it was saved from.

    Args:
        manager: from `create_checkpoint_manager`.
        step: a complete step, as listed by `manager.all_steps()`.
        abstract_state: the state's shapes and dtypes (from `jax.eval_shape`), boxed or not.
        shardings: a pytree of `jax.sharding.Sharding` matching the unboxed state, usually from
            `sharding.state_shardings`. The mesh may differ from the one the checkpoint was
            saved on.
        rng_template: the kind of key to return (raw `uint32` data or a typed key).
        data_iterator: a Grain iterator built exactly as at save time; its position is set in
            place to the saved one.

    Returns:
        The restored items.

    Raises:
        FileNotFoundError: if `step` is not a complete checkpoint, or the iterator state is
            requested from a checkpoint that has none.
    """
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"No complete checkpoint for step {step} in {manager.directory}; complete steps "
            f"are {list(manager.all_steps())}."
        )
    step_dir = epath.Path(manager.directory) / str(step)
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        sharding_lib.unbox(abstract_state),
        shardings,
    )
    items: dict[str, Any] = {STATE_ITEM: ocp.args.StandardRestore(target)}
    if rng_template is not None and (step_dir / RNG_ITEM).exists():
        key_data = _rng_to_numpy(rng_template)
        items[RNG_ITEM] = ocp.args.StandardRestore({"key_data": key_data})
    if data_iterator is not None:
        if not (step_dir / DATA_ITEM).exists():
            raise FileNotFoundError(
                f"Checkpoint {step_dir} has no data iterator state. Restore without "
                "data_iterator, or resume from a checkpoint saved with one."
            )
        items[DATA_ITEM] = grain_checkpoint.CheckpointRestore(data_iterator)
    if (step_dir / CONFIG_ITEM).exists():
        items[CONFIG_ITEM] = ocp.args.JsonRestore()

    restored = manager.restore(step, args=ocp.args.Composite(**items))
    rng = None
    if RNG_ITEM in items:
        rng = _rng_from_numpy(restored[RNG_ITEM]["key_data"], rng_template)
    logging.info("Restored checkpoint step %d from %s.", step, step_dir)
    return RestoredCheckpoint(
        step=step,
        state=restored[STATE_ITEM],
        rng=rng,
        config=restored[CONFIG_ITEM] if CONFIG_ITEM in items else None,
        data_restored=DATA_ITEM in items,
    )


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    shardings: Any,
    *,
    rng_template: jax.Array | None = None,
    data_iterator: grain.DatasetIterator | grain.DataLoaderIterator | None = None,
) -> RestoredCheckpoint | None:
    """Restore the latest complete checkpoint, or return None if there is none.

    Arguments are those of `restore_checkpoint`.
    """
    manager.reload()
    step = manager.latest_step()
    if step is None:
        return None
    return restore_checkpoint(
        manager,
        step,
        abstract_state,
        shardings,
        rng_template=rng_template,
        data_iterator=data_iterator,
    )


def _rng_to_numpy(rng: jax.Array) -> np.ndarray:
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.asarray(rng)


def _rng_from_numpy(key_data: np.ndarray, template: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(template.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(template))
    return jax.numpy.asarray(key_data, dtype=template.dtype)


def _config_to_json(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def load_pretrained_variables(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an Orbax pytree checkpoint of model variables into host numpy arrays.

    This is the default loader of `restore_or_initialize`. It reads `directory` itself, or
    `directory/variables` when that exists.

    Args:
        directory: a directory written by `ocp.StandardCheckpointer().save(directory, tree)`.

    Returns:
        The saved pytree (for example `{"params": ..., "batch_stats": ...}`) of numpy arrays.
    """
    directory = absolute_path(directory)
    if (directory / "variables").exists():
        directory = directory / "variables"
    if not directory.exists():
        raise FileNotFoundError(f"Pretrained checkpoint directory {directory} does not exist.")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def merge_pretrained(
    target: Any, pretrained: Mapping[str, Any], *, strict: bool = True, name: str = "params"
) -> Any:
    """Copy pretrained arrays into a freshly initialised variable tree by matching tree paths.

    Each copied array is cast to the target dtype and placed on the target leaf's sharding.

    Args:
        target: nested dict of `jax.Array`s (the fresh variables).
        pretrained: nested dict of arrays (numpy or jax) with the same paths.
        strict: if True, any path present in only one of the trees is an error. If False,
            target leaves without a pretrained value keep their fresh values and extra
            pretrained leaves are ignored; both are logged.
        name: collection name used in messages.

    Returns:
        A tree with the structure of `target`.

    Raises:
        ValueError: on a shape mismatch, or on unmatched paths when `strict` is True.
    """
    flat_target = traverse_util.flatten_dict(_to_dict(target), sep="/")
    flat_pretrained = traverse_util.flatten_dict(_to_dict(pretrained), sep="/")
    missing = sorted(set(flat_target) - set(flat_pretrained))
    unexpected = sorted(set(flat_pretrained) - set(flat_target))
    if strict and (missing or unexpected):
        raise ValueError(
            f"Pretrained {name} do not match the model: {len(missing)} model paths missing "
            f"from the checkpoint (first: {missing[:5]}), {len(unexpected)} checkpoint paths "
            f"not in the model (first: {unexpected[:5]}). Check that config.init_from was "
            "written for this model, or load non-strictly."
        )
    if missing:
        logging.warning(
            "Pretrained %s lack %d model paths, kept fresh: %s", name, len(missing), missing
        )
    if unexpected:
        logging.warning(
            "Ignoring %d pretrained %s paths not in the model: %s",
            len(unexpected),
            name,
            unexpected,
        )

    merged = {}
    for path, fresh in flat_target.items():
        if path not in flat_pretrained:
            merged[path] = fresh
            continue
        value = np.asarray(flat_pretrained[path])
        if value.shape != tuple(fresh.shape):
            raise ValueError(
                f"Pretrained {name} {path!r} has shape {value.shape} but the model expects "
                f"{tuple(fresh.shape)}. Check the model variant in the config against "
                "config.init_from."
            )
        merged[path] = _place_like(value.astype(fresh.dtype), fresh)
    return traverse_util.unflatten_dict(merged, sep="/")


def _to_dict(tree: Any) -> dict[str, Any]:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return {
        key: _to_dict(value) if isinstance(value, Mapping) else value for key, value in tree.items()
    }


def _place_like(value: np.ndarray, like: Any) -> jax.Array:
    sharding = getattr(like, "sharding", None)
    if sharding is None:
        return jax.numpy.asarray(value)
    # Every process has the full `value`, so each device reads its own slice. This works
    # for shardings that span several processes, where `jax.device_put` of host data does not.
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def apply_pretrained(state: Any, variables: Mapping[str, Any], *, strict: bool = True) -> Any:
    """Replace the variable collections of `state` with pretrained values.

    The default `apply_pretrained_fn` of `restore_or_initialize`. For each collection in
    `PRETRAINED_COLLECTIONS` found in both `variables` and `state` (as an attribute, as for
    `flax.training.train_state.TrainState`, or as a dict key), the collection is merged with
    `merge_pretrained`. Optimizer state and step stay as initialised.

    Args:
        state: the freshly initialised train state.
        variables: the pretrained variables, for example `{"params": ..., "batch_stats": ...}`.
        strict: passed to `merge_pretrained`.

    Returns:
        The state with pretrained collections.

    Raises:
        ValueError: if no collection could be copied.
    """
    updates = {}
    for collection in PRETRAINED_COLLECTIONS:
        if collection not in variables:
            continue
        current = _get_field(state, collection)
        if current is None:
            logging.warning(
                "Pretrained checkpoint has %r but the train state does not; skipping it.",
                collection,
            )
            continue
        updates[collection] = merge_pretrained(
            current, variables[collection], strict=strict, name=collection
        )
    if not updates:
        raise ValueError(
            f"No variable collection copied: the pretrained checkpoint has {sorted(variables)} "
            f"and the train state has none of {PRETRAINED_COLLECTIONS} in common."
        )
    if isinstance(state, Mapping):
        return {**state, **updates}
    return state.replace(**updates)


def _get_field(state: Any, name: str) -> Any:
    if isinstance(state, Mapping):
        return state.get(name)
    return getattr(state, name, None)


@dataclasses.dataclass
class InitializedState:
    """Result of `restore_or_initialize`.

    Attributes:
        state: the train state on the requested shardings.
        step: the first step to run (the checkpoint step, or 0).
        rng: the restored PRNG key, or the passed `rng` when not resuming from a checkpoint.
        source: "checkpoint", "init_from" or "scratch".
    """

    state: Any
    step: int
    rng: jax.Array | None
    source: str


def restore_or_initialize(
    manager: ocp.CheckpointManager,
    init_fn: Callable[[], Any],
    abstract_state: Any,
    shardings: Any,
    *,
    init_from: str | os.PathLike[str] | None = None,
    rng: jax.Array | None = None,
    data_iterator: grain.DatasetIterator | grain.DataLoaderIterator | None = None,
    load_pretrained_fn: Callable[[str], Mapping[str, Any]] = load_pretrained_variables,
    apply_pretrained_fn: Callable[[Any, Mapping[str, Any]], Any] = apply_pretrained,
) -> InitializedState:
    """Resume training, in this order: checkpoint, then pretrained weights, then fresh init.

    1. The latest complete checkpoint in `manager.directory` (usually `workdir/checkpoints`):
       state, RNG key and data iterator position are restored.
    2. Else, if `init_from` is set: `init_fn()` builds a fresh state, and the collections that
       `load_pretrained_fn(init_from)` returns are copied into it by `apply_pretrained_fn`.
    3. Else: `init_fn()`.

    Args:
        manager: from `create_checkpoint_manager`.
        init_fn: builds the fresh, unboxed, sharded train state (typically a function jitted
            with `out_shardings=shardings`).
        abstract_state: `jax.eval_shape` of the state, boxed or not.
        shardings: sharding pytree for the unboxed state.
        init_from: a pretrained directory, or None.
        rng: the fresh training key; also the template for the restored key.
        data_iterator: restored in place when resuming from a checkpoint.
        load_pretrained_fn: reads a pretrained directory into a mapping of variable
            collections.
        apply_pretrained_fn: `(state, variables) -> state`.

    Returns:
        The state, first step, key and which source was used.
    """
    restored = restore_latest(
        manager, abstract_state, shardings, rng_template=rng, data_iterator=data_iterator
    )
    if restored is not None:
        logging.info("Resuming from checkpoint step %d in %s.", restored.step, manager.directory)
        return InitializedState(
            state=restored.state,
            step=restored.step,
            rng=restored.rng if restored.rng is not None else rng,
            source="checkpoint",
        )

    state = init_fn()
    if init_from:
        logging.info("No checkpoint in %s; initialising from %s.", manager.directory, init_from)
        variables = load_pretrained_fn(str(init_from))
        state = apply_pretrained_fn(state, variables)
        return InitializedState(state=state, step=0, rng=rng, source="init_from")
    logging.info(
        "No checkpoint in %s and no init_from; initialising from scratch.", manager.directory
    )
    return InitializedState(state=state, step=0, rng=rng, source="scratch")
