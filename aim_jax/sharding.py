"""Device meshes, logical-axis sharding rules and multi-process setup.

Model code names logical axes only (`"embed"`, `"mlp"`, `"batch"`, ...). This module owns the
mapping from those names to the axes of a `jax.sharding.Mesh`:

* `create_mesh` builds the mesh from `config.mesh`, for example
  `{"data": -1, "fsdp": 1, "tensor": 1}`.
* `DEFAULT_LOGICAL_AXIS_RULES` is the one table of logical-to-mesh rules; `config.sharding.rules`
  replaces it.
* `state_shardings` turns an abstract train state whose leaves are `nn.LogicallyPartitioned` boxes
  (parameters and the optax states that mirror them) into a `NamedSharding` pytree for the unboxed
  state. A dimension that the mesh axes do not divide evenly is replicated instead.
* `batch_sharding`, `host_local_batch_to_global` and `activation_sharding` place inputs and
  constrain activations.
* `initialize_distributed` starts `jax.distributed` when the job runs as several processes.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Mesh axes in outer-to-inner order. `create_device_mesh` keeps the last axis on the
# best-connected devices, so `tensor` (communication in every layer) is innermost and `data`
# (one gradient all-reduce per step) is outermost, where it may cross hosts.
MESH_AXES = ("data", "fsdp", "tensor")

# Mesh axes that split the global batch. FSDP shards parameters over `fsdp` and the batch over
# both axes, so every device in a (data, fsdp) group processes different examples.
BATCH_AXES = ("data", "fsdp")

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

# Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated). Rules are
# applied in order and a mesh axis is used at most once per array, so `batch` comes first.
# An activation named ("batch", "length", "embed") then has its batch on `fsdp` and `embed`
# replicated. A parameter named ("embed", "mlp") has no batch dimension and gets
# ("fsdp", "tensor").
DEFAULT_LOGICAL_AXIS_RULES: LogicalRules = (
    ("batch", BATCH_AXES),  # activations: examples
    ("length", None),  # activations: tokens (patches)
    ("kv", None),  # activations: per-head feature width
    ("embed", "fsdp"),  # model width D: FSDP parameter sharding
    ("mlp", "tensor"),  # MLP hidden width 4D: tensor parallel
    ("qkv", "tensor"),  # fused q/k/v projection output 3D: tensor parallel
    ("heads", "tensor"),  # attention projection width D: tensor parallel
    ("vocab", "tensor"),  # classes or predicted pixels per patch
    ("norm", None),  # norm scale and bias: small, replicated
    ("patch", None),  # patch-embedding kernel spatial and channel dims
    ("layers", None),  # stacked scan axis: every device stores all layers
)

# Keys of the "dimension not divisible" messages already logged, so each is logged once.
_LOGGED_FALLBACKS: set[tuple[Any, ...]] = set()


def create_mesh(
    mesh_config: Mapping[str, int] | Sequence[tuple[str, int]],
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Build a device mesh from axis sizes, with -1 meaning "all remaining devices".

    Args:
        mesh_config: axis name -> size, with at most one size -1. A mapping (dict, or
            `ConfigDict`, whose keys iterate in sorted order) may only use the names in
            `MESH_AXES` and is laid out in that order. A sequence of `(name, size)` pairs is
            laid out in the given order and may use any names.
        devices: devices to lay out. Defaults to `jax.devices()`, all devices of all processes.

    Returns:
        A `jax.sharding.Mesh` with `AxisType.Auto` axes, so GSPMD propagates shardings.

    Raises:
        ValueError: if a size is invalid or the sizes do not multiply to the device count.
    """
    axes = _ordered_mesh_axes(mesh_config)
    if devices is None:
        devices = jax.devices()
    num_devices = len(devices)

    names = [name for name, _ in axes]
    sizes = [size for _, size in axes]
    for name, size in axes:
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(
                f"Invalid mesh size {size!r} for axis {name!r}: use a positive int or -1 "
                "(all remaining devices)."
            )
    fill = [i for i, size in enumerate(sizes) if size == -1]
    if len(fill) > 1:
        raise ValueError(
            f"Mesh {dict(axes)} sets -1 on {len(fill)} axes; at most one axis may be -1."
        )
    fixed = math.prod(size for size in sizes if size != -1)
    if fill:
        if num_devices % fixed != 0:
            raise ValueError(
                f"Mesh {dict(axes)} is invalid: the fixed axis sizes multiply to {fixed}, which "
                f"does not divide the device count {num_devices} (jax.device_count() = "
                f"{jax.device_count()}). Change the sizes in config.mesh."
            )
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"Mesh {dict(zip(names, sizes, strict=True))} has {math.prod(sizes)} devices but "
            f"{num_devices} are available (jax.device_count() = {jax.device_count()}). "
            "Make the sizes in config.mesh multiply to the device count, or set one to -1."
        )

    device_array = mesh_utils.create_device_mesh(sizes, devices=list(devices))
    mesh = Mesh(device_array, tuple(names))
    logging.info("Created mesh %s over %d devices.", dict(mesh.shape), num_devices)
    return mesh


def _ordered_mesh_axes(
    mesh_config: Mapping[str, int] | Sequence[tuple[str, int]],
) -> list[tuple[str, int]]:
    if hasattr(mesh_config, "items"):
        given = dict(mesh_config.items())
        unknown = sorted(set(given) - set(MESH_AXES))
        if unknown:
            raise ValueError(
                f"Unknown mesh axes {unknown} in config.mesh; the known axes are {MESH_AXES}. "
                "To use other names, pass a sequence of (name, size) pairs in mesh order."
            )
        return [(name, int(given[name])) for name in MESH_AXES if name in given]
    axes = [(str(name), int(size)) for name, size in mesh_config]
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"Mesh axis names must be unique, got {names}.")
    return axes


def logical_axis_rules(config: Any = None) -> LogicalRules:
    """Return the logical-to-mesh rules: `config.sharding.rules` if set, else the defaults.

    Args:
        config: a `ConfigDict` or None. When `config.sharding.rules` is set, it replaces
            `DEFAULT_LOGICAL_AXIS_RULES` as a whole. It is a sequence of
            `(logical_name, mesh_axes)` pairs, where `mesh_axes` is a mesh axis name, a
            sequence of names, or None.

    Returns:
        The rules as a tuple of `(str, str | tuple[str, ...] | None)` pairs.
    """
    rules = None
    sharding_config = getattr(config, "sharding", None) if config is not None else None
    if sharding_config is not None:
        rules = sharding_config.get("rules", None)
    if rules is None:
        return DEFAULT_LOGICAL_AXIS_RULES
    return _normalize_rules(rules)


def _normalize_rules(rules: Sequence[Sequence[Any]]) -> LogicalRules:
    normalized = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(
                f"Invalid sharding rule {rule!r}: expected a (logical_name, mesh_axes) pair."
            )
        logical, mesh_axes = rule
        if mesh_axes is not None and not isinstance(mesh_axes, str):
            mesh_axes = tuple(str(axis) for axis in mesh_axes)
        normalized.append((logical, mesh_axes))
    return tuple(normalized)


def _mesh_axes_of(entry: MeshAxes) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def rules_for_mesh(rules: LogicalRules, mesh: Mesh) -> LogicalRules:
    """Drop from `rules` the axes of `MESH_AXES` that `mesh` does not have.

    A mesh without a `tensor` axis then simply has no tensor parallelism. A rule entry left
    with no axis becomes None (replicated).

    Raises:
        ValueError: if a rule names an axis that is neither in `mesh` nor in `MESH_AXES`,
            which is usually a typo.
    """
    adapted = []
    for logical, mesh_axes in rules:
        axes = _mesh_axes_of(mesh_axes)
        unknown = [axis for axis in axes if axis not in mesh.shape and axis not in MESH_AXES]
        if unknown:
            raise ValueError(
                f"Sharding rule ({logical!r}, {mesh_axes!r}) names mesh axes {unknown} that the "
                f"mesh {dict(mesh.shape)} does not have. Add them to config.mesh or change "
                "config.sharding.rules."
            )
        kept = tuple(axis for axis in axes if axis in mesh.shape)
        if len(kept) == len(axes):
            adapted.append((logical, mesh_axes))
        elif not kept:
            adapted.append((logical, None))
        else:
            adapted.append((logical, kept))
    return tuple(adapted)


def logical_to_mesh_spec(
    logical_names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: LogicalRules | None = None,
    *,
    name: str = "",
) -> PartitionSpec:
    """Map the logical axis names of one array to a `PartitionSpec` on `mesh`.

    A dimension whose size is not divisible by the product of its mesh axis sizes is replicated
    instead, and that fallback is logged once per (name, dimension, size, mesh axes).

    Args:
        logical_names: one logical name (or None) per array dimension.
        shape: the array shape.
        mesh: the device mesh.
        rules: logical-to-mesh rules; defaults to `DEFAULT_LOGICAL_AXIS_RULES`.
        name: label for log messages, for example the parameter path.

    Returns:
        A `PartitionSpec` with one entry per dimension.

    Raises:
        ValueError: if a rule names a mesh axis that `mesh` lacks.
    """
    rules = rules_for_mesh(DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules, mesh)
    logical_names = tuple(logical_names)
    if len(logical_names) != len(shape):
        _log_once(
            ("rank", name, logical_names, tuple(shape)),
            "Replicating %s: logical names %s do not match its shape %s.",
            name or "an array",
            logical_names,
            tuple(shape),
        )
        return PartitionSpec()

    return _replicate_indivisible(
        _apply_rules(logical_names, rules), shape, mesh, name, logical_names
    )


def _apply_rules(logical_names: Sequence[str | None], rules: LogicalRules) -> list[MeshAxes]:
    """Assign mesh axes to dimensions with Flax's priority semantics, allowing repeated names.

    Rules apply in order, each mesh axis at most once per array, and a dimension keeps the
    first rule that assigns it (None counts as an assignment). Unlike
    `nn.logical_to_mesh_axes`, a logical name may appear on several dimensions (for example
    "patch" on every spatial dimension of a convolution kernel); each occurrence is matched
    independently.
    """
    entries: list[MeshAxes] = [None] * len(logical_names)
    assigned = [False] * len(logical_names)
    used: set[str] = set()
    for logical, mesh_axes in rules:
        axes = _mesh_axes_of(mesh_axes)
        for position, name in enumerate(logical_names):
            if name != logical or assigned[position] or used.intersection(axes):
                continue
            entries[position] = mesh_axes
            assigned[position] = True
            used.update(axes)
    return entries


def _replicate_indivisible(
    entries: Sequence[MeshAxes],
    shape: Sequence[int],
    mesh: Mesh,
    name: str,
    logical_names: Sequence[str | None] | None = None,
) -> PartitionSpec:
    checked = []
    for dim, (entry, size) in enumerate(zip(entries, shape, strict=True)):
        axes = _mesh_axes_of(entry)
        num_shards = math.prod(mesh.shape[axis] for axis in axes)
        if num_shards > 1 and size % num_shards != 0:
            logical = logical_names[dim] if logical_names is not None else None
            _log_once(
                ("divisible", name, dim, size, axes, num_shards),
                "Replicating dimension %d (%s, size %d) of %s: it is not divisible by the %d "
                "devices of mesh axes %s.",
                dim,
                logical,
                size,
                name or "an array",
                num_shards,
                axes,
            )
            entry = None
        checked.append(entry)
    return PartitionSpec(*checked)


def _log_once(key: tuple[Any, ...], message: str, *args: Any) -> None:
    if key in _LOGGED_FALLBACKS:
        return
    _LOGGED_FALLBACKS.add(key)
    logging.warning(message, *args)


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def unbox(tree: Any) -> Any:
    """Strip `nn.Partitioned` boxes from a pytree without applying sharding constraints.

    Unlike `nn.meta.unbox`, it adds no `with_logical_constraint` when a mesh is set, so it also
    works on `jax.ShapeDtypeStruct` leaves and inside `activation_sharding`.
    """
    return jax.tree.map(
        lambda leaf: leaf.value if _is_partitioned(leaf) else leaf, tree, is_leaf=_is_partitioned
    )


def state_shardings(
    abstract_state: Any,
    mesh: Mesh,
    rules: LogicalRules | None = None,
) -> Any:
    """Compute a `NamedSharding` for every leaf of a (boxed) abstract train state.

    `abstract_state` usually comes from `jax.eval_shape(init_fn)`. Parameters are
    `nn.LogicallyPartitioned` boxes; optax states built with `tx.init(boxed_params)` keep the
    same boxes around their moment estimates, so they get the parameters' shardings. Any leaf
    without a box (step counters, optax counts, RNG keys) is replicated, and so is a boxed leaf
    whose rank differs from its logical names (for example a factored second-moment estimate).

    Args:
        abstract_state: pytree of `jax.ShapeDtypeStruct` or arrays, possibly inside
            `nn.Partitioned` / `nn.LogicallyPartitioned` boxes.
        mesh: the device mesh.
        rules: logical-to-mesh rules; defaults to `DEFAULT_LOGICAL_AXIS_RULES`.

    Returns:
        A pytree with the structure of `nn.meta.unbox(abstract_state)` whose leaves are
        `NamedSharding`s.
    """
    rules = DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules

    def leaf_sharding(path: Any, leaf: Any) -> NamedSharding:
        label = jax.tree_util.keystr(path)
        if _is_partitioned(leaf):
            value = leaf.value
            names = leaf.names
            if not isinstance(leaf, nn.LogicallyPartitioned):
                # `nn.Partitioned` names mesh axes directly, not logical ones.
                return NamedSharding(mesh, _checked_mesh_spec(names, value.shape, mesh, label))
            spec = logical_to_mesh_spec(names, value.shape, mesh, rules, name=label)
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state, is_leaf=_is_partitioned)


def _checked_mesh_spec(
    mesh_names: Sequence[MeshAxes], shape: Sequence[int], mesh: Mesh, label: str
) -> PartitionSpec:
    if len(mesh_names) != len(shape):
        return PartitionSpec()
    missing = [
        axis for entry in mesh_names for axis in _mesh_axes_of(entry) if axis not in mesh.shape
    ]
    if missing:
        raise ValueError(
            f"{label} is partitioned over mesh axes {missing} that the mesh {dict(mesh.shape)} "
            "does not have."
        )
    return _replicate_indivisible(mesh_names, shape, mesh, label)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Return the sharding of `(B, ...)` arrays: the batch split over `BATCH_AXES`.

    Mesh axes in `BATCH_AXES` that the mesh lacks are skipped, so a mesh with only a `data`
    axis shards the batch over `data`.
    """
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    """Return a sharding that places a full copy of an array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def host_local_batch_to_global(batch: Any, mesh: Mesh) -> Any:
    """Assemble per-process numpy batches into global `jax.Array`s sharded over the batch axes.

    Every process passes its own slice of the global batch, and all slices have the same size.
    The global batch is their concatenation in process order. With one process this is a
    sharded `device_put`.

    Args:
        batch: pytree of numpy arrays shaped `(B_local, ...)`.
        mesh: the device mesh.

    Returns:
        The same pytree of `jax.Array`s shaped `(B_local * jax.process_count(), ...)`.

    Raises:
        ValueError: if the global batch size is not divisible by the batch-axis devices.
    """
    sharding = batch_sharding(mesh)
    num_batch_shards = math.prod(mesh.shape[axis] for axis in _mesh_axes_of(sharding.spec[0]))

    def to_global(path: Any, local: Any) -> jax.Array:
        local = np.asarray(local)
        if local.ndim == 0:
            raise ValueError(
                f"Batch leaf {jax.tree_util.keystr(path)} is a scalar; every batch leaf needs a "
                "leading batch dimension."
            )
        global_size = local.shape[0] * jax.process_count()
        if global_size % num_batch_shards != 0:
            raise ValueError(
                f"Batch leaf {jax.tree_util.keystr(path)} has global batch size {global_size} "
                f"({local.shape[0]} per process x {jax.process_count()} processes), which is not "
                f"divisible by the {num_batch_shards} devices of mesh axes {sharding.spec[0]}. "
                "Change the batch size or config.mesh."
            )
        global_shape = (global_size, *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree_util.tree_map_with_path(to_global, batch)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: LogicalRules | None = None) -> Iterator[None]:
    """Set `mesh` and the logical rules so that `nn.with_logical_constraint` takes effect.

    Enter it outside `jax.jit` (JAX rejects `jax.set_mesh` inside a trace) and call the jitted
    step inside it. Outside this context Flax treats logical constraints on activations as
    no-ops.

    Args:
        mesh: the device mesh.
        rules: logical-to-mesh rules; defaults to `DEFAULT_LOGICAL_AXIS_RULES`.
    """
    rules = rules_for_mesh(DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# Environment variables that show the job was started as several processes. Their presence
# alone does not start `jax.distributed`; the process count must also be above one.
_SLURM_PROCESS_COUNT = "SLURM_NTASKS"
_OMPI_PROCESS_COUNT = "OMPI_COMM_WORLD_SIZE"
_TPU_WORKER_HOSTNAMES = "TPU_WORKER_HOSTNAMES"


def _launched_as_multiple_processes() -> bool:
    for variable in (_SLURM_PROCESS_COUNT, _OMPI_PROCESS_COUNT):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            return True
    hostnames = os.environ.get(_TPU_WORKER_HOSTNAMES, "")
    if len([host for host in hostnames.split(",") if host]) > 1:
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(config: Any = None) -> bool:
    """Start `jax.distributed` when the job runs as several processes; no-op for one process.

    When `config.distributed.num_processes` is above one, the process layout comes from
    `config.distributed` (`coordinator_address`, `num_processes`, `process_id`, optional
    `local_device_ids`). Otherwise, when the environment shows several processes (SLURM,
    Open MPI, `TPU_WORKER_HOSTNAMES` or `JAX_COORDINATOR_ADDRESS`) or
    `config.distributed.auto_detect` is True, `jax.distributed.initialize` detects the layout
    itself. On CPU it selects gloo for cross-process collectives. Call it before any other JAX
    call.

    Args:
        config: a `ConfigDict` or None.

    Returns:
        True if `jax.distributed.initialize` was called, False for a single-process run or when
        JAX's distributed runtime was already running.
    """
    distributed = getattr(config, "distributed", None) if config is not None else None
    explicit = {}
    if distributed is not None:
        for key in ("coordinator_address", "num_processes", "process_id", "local_device_ids"):
            value = distributed.get(key, None)
            if value is not None:
                explicit[key] = value
    num_processes = explicit.get("num_processes")
    use_explicit = num_processes is not None and int(num_processes) > 1
    # NOTE: multi-host Cloud TPU VMs outside GKE may set none of the variables checked here
    # (JAX finds their layout through the TPU metadata server). Set auto_detect there.
    auto_detect = bool(distributed.get("auto_detect", False)) if distributed is not None else False
    if not use_explicit and not auto_detect and not _launched_as_multiple_processes():
        logging.info("Single-process run: not initializing jax.distributed.")
        return False
    if jax.distributed.is_initialized():
        logging.info("jax.distributed is already initialized.")
        return False

    # Gloo ships with jaxlib and is the default `jax_cpu_collectives_implementation` in jax
    # 0.10. Setting it keeps CPU multi-process runs working if that default changes. GPU and
    # TPU backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if use_explicit:
        missing = [key for key in ("coordinator_address", "process_id") if key not in explicit]
        if missing:
            raise ValueError(
                f"config.distributed sets num_processes={num_processes} but not {missing}. Set "
                "coordinator_address ('host:port' of process 0) and this process's process_id."
            )
        logging.info(
            "Initializing jax.distributed: process %s of %s, coordinator %s.",
            explicit["process_id"],
            num_processes,
            explicit["coordinator_address"],
        )
        jax.distributed.initialize(
            coordinator_address=str(explicit["coordinator_address"]),
            num_processes=int(num_processes),
            process_id=int(explicit["process_id"]),
            local_device_ids=explicit.get("local_device_ids"),
        )
    else:
        logging.info("Initializing jax.distributed from the cluster environment.")
        jax.distributed.initialize()
    logging.info(
        "jax.distributed is running: process %d of %d, %d local and %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
