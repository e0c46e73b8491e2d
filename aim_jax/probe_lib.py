"""Building blocks of `aim_jax.probe`: trunk loading, probe heads, metrics and the steps.

Trunk sources for probe training (`config.trunk.source`):

* "pretrain_workdir": the latest (or `config.trunk.step`) checkpoint of an `aim_jax.train`
  workdir; its `patch_embed` and `trunk` parameters, and the model config saved beside them.
* "pretrained": a directory from `save_pretrained` or `tools/convert_torch.py`; its head is
  ignored.
* "random": `config.model` initialised from `config.seed`, a baseline for the probes.

Probe training keeps the whole trunk on the host (for the final `save_pretrained`), and
places the blocks that run on the mesh. Evaluation of a converted checkpoint restores only the
blocks that run, directly onto the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from aim_jax import checkpointing, config_lib, sharding
from aim_jax.heads import AttentionProbe, BatchNorm
from aim_jax.layers import Dtype, logical
from aim_jax.models import AIM, check_images
from aim_jax.pretrained import VARIABLES_DIR, read_config
from aim_jax.registry import ModelConfig
from aim_jax.train import update_if_finite

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TRUNK_SOURCES = ("pretrain_workdir", "pretrained", "random")
HEADS = ("attention", "linear")
TRUNK_KEYS = ("patch_embed", "trunk")


def compute_dtype(name: str) -> Dtype:
    """Map `config.dtype` to a jnp dtype."""
    if name not in DTYPES:
        raise ValueError(f"config.dtype={name!r} is invalid; expected one of {sorted(DTYPES)}.")
    return DTYPES[name]


# ----------------------------------------------------------------------------------------
# Probe blocks.


def parse_probe_layers(request: Any) -> str | tuple[int, ...]:
    """Parse `config.probe_layers`: "last", "best", "checkpoint", "3,4,5" or a list of ints."""
    if isinstance(request, str):
        text = request.strip()
        if text in ("last", "best", "checkpoint"):
            return text
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(
                f"config.probe_layers={request!r} is invalid; expected 'last', 'best', "
                "'checkpoint' or comma-separated 0-based block indices such as '3,4,5'."
            ) from None
    return tuple(int(i) for i in request)


def with_requested_probe_layers(model_config: ModelConfig, request: Any) -> ModelConfig:
    """Return `model_config` with the probe blocks of `request` ("checkpoint" keeps them)."""
    layers = parse_probe_layers(request)
    if layers == "checkpoint":
        return model_config
    return model_config.with_probe_layers(layers)


def check_head_matches(stored: ModelConfig, request: Any, checkpoint: str) -> ModelConfig:
    """Check that the head of a converted checkpoint was trained on the requested blocks.

    A converted checkpoint contains one attention-probe head, trained on `stored.probe_layers`.

    Returns:
        `stored`, unchanged.

    Raises:
        ValueError: if the request resolves to other blocks.
    """
    requested = with_requested_probe_layers(stored, request).probe_layers
    if requested != stored.probe_layers:
        raise ValueError(
            f"config.probe_layers={request!r} selects blocks {list(requested)}, but the head in "
            f"{checkpoint} was trained on blocks {list(stored.probe_layers)}. Convert the "
            "checkpoint with the matching head (tools/convert_torch.py --probe_layers), or set "
            "config.probe_layers to 'checkpoint'."
        )
    return stored


# ----------------------------------------------------------------------------------------
# Restoring variables.


def _restore_partial(path: epath.Path, item: Any, restore_args: Any) -> Any:
    """Restore the leaves of `item` from the Orbax pytree at `path`, ignoring the others."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )


def _stored_tree(path: epath.Path) -> dict[str, Any]:
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.metadata(path).item_metadata.tree


def _restore_to_host(path: epath.Path, keys: Sequence[str]) -> dict[str, Any]:
    """Restore `params[key]` for `keys` from an Orbax pytree as numpy arrays."""
    stored = _stored_tree(path)
    missing = [key for key in keys if key not in stored.get("params", {})]
    if missing:
        raise ValueError(
            f"The checkpoint at {path} has no params {missing}; it has "
            f"{sorted(stored.get('params', {}))}."
        )
    item = {"params": {key: stored["params"][key] for key in keys}}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    return _restore_partial(path, item, restore_args)


def _unrolled_trunk(trunk: dict[str, Any]) -> dict[str, Any]:
    """Return trunk parameters in the unrolled layout (`blocks_0`, ...) as numpy arrays."""
    if "blocks" not in trunk:
        return dict(trunk)
    stacked = trunk["blocks"]["block"]
    total = jax.tree.leaves(stacked)[0].shape[0]
    out = {key: value for key, value in trunk.items() if key != "blocks"}
    for i in range(total):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return out


def pretrain_workdir_steps(workdir: str | os.PathLike[str]) -> list[int]:
    """List the complete checkpoint steps of an `aim_jax.train` workdir, oldest first.

    The checkpoint directory is opened read-only, so a pre-training run still writing to it is
    left alone.
    """
    directory = checkpointing.absolute_path(workdir) / checkpointing.CHECKPOINT_SUBDIR
    if not directory.exists():
        raise FileNotFoundError(
            f"{directory} not found: {workdir} is not an aim_jax.train workdir. Set "
            "config.trunk.workdir to the --workdir of a pre-training run."
        )
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(
        directory, options=options, item_names=checkpointing.ITEM_NAMES
    ) as manager:
        return sorted(manager.all_steps())


def read_pretrain_workdir(
    workdir: str | os.PathLike[str], step: int | None = None
) -> tuple[int, ModelConfig, dict[str, Any]]:
    """Read the patch embedding and trunk of a pre-training checkpoint into host memory.

    Args:
        workdir: the `--workdir` of an `aim_jax.train` run.
        step: the checkpoint step; None takes the latest complete one.

    Returns:
        `(step, model_config, {"params": {"patch_embed": ..., "trunk": ...}})` with numpy
        leaves and the trunk in the unrolled layout. The model config is the run's
        `config.model`.
    """
    steps = pretrain_workdir_steps(workdir)
    if not steps:
        raise FileNotFoundError(
            f"No complete checkpoint in {workdir}/{checkpointing.CHECKPOINT_SUBDIR}. Let the "
            "pre-training run write one (config.checkpoint_every_steps) first."
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"Step {step} is not a complete checkpoint of {workdir}; complete steps: {steps}."
        )
    step_dir = checkpointing.absolute_path(workdir) / checkpointing.CHECKPOINT_SUBDIR / str(step)
    config_file = step_dir / checkpointing.CONFIG_ITEM / "metadata"
    if not config_file.exists():
        raise FileNotFoundError(
            f"{config_file} not found: the checkpoint at {step_dir} was saved without its run "
            "config, so its architecture is unknown."
        )
    run_config = json.loads(config_file.read_text())
    model_config = config_lib.to_model_config(ml_collections.ConfigDict(run_config["model"]))
    restored = _restore_to_host(step_dir / checkpointing.STATE_ITEM, TRUNK_KEYS)
    params = dict(restored["params"])
    params["trunk"] = _unrolled_trunk(params["trunk"])
    logging.info(
        "Read the trunk of %s step %d: %d blocks, width %d.",
        workdir,
        step,
        model_config.num_blocks,
        model_config.embed_dim,
    )
    return step, model_config, {"params": params}


def read_pretrained_trunk(directory: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """Read the patch embedding and trunk of a `save_pretrained` directory into host memory."""
    model_config = read_config(directory)
    restored = _restore_to_host(epath.Path(directory).absolute() / VARIABLES_DIR, TRUNK_KEYS)
    params = dict(restored["params"])
    params["trunk"] = _unrolled_trunk(params["trunk"])
    return model_config, {"params": params}


@functools.lru_cache(maxsize=4)
def _jitted_init(model_config: ModelConfig):
    """Return a jitted full-model init, compiled once per architecture and process."""
    model = AIM(model_config, stop_after_probe=False)
    images = jnp.zeros((1, *model_config.img_size, 3), jnp.float32)
    return jax.jit(lambda rng: sharding.unbox(model.init(rng, images)))


def random_trunk(model_config: ModelConfig, seed: int) -> dict[str, Any]:
    """Initialise a full unrolled trunk from `seed` and return it as numpy arrays."""
    variables = _jitted_init(model_config)(jax.random.key(seed))
    params = {key: variables["params"][key] for key in TRUNK_KEYS}
    return {"params": jax.device_get(params)}


@dataclasses.dataclass
class TrunkSource:
    """A frozen trunk read into host memory.

    Attributes:
        model_config: the trunk's architecture (probe blocks and classes not yet set).
        variables: `{"params": {"patch_embed", "trunk"}}`, numpy, unrolled, every block.
        description: the source, used in logs and in the feature-cache key.
    """

    model_config: ModelConfig
    variables: dict[str, Any]
    description: str


def read_trunk(config: ml_collections.ConfigDict) -> TrunkSource:
    """Read the trunk that `config.trunk.source` names; see the module docstring."""
    source = config.trunk.source
    if source == "pretrain_workdir":
        workdir = os.path.abspath(config.trunk.workdir)
        step, model_config, variables = read_pretrain_workdir(workdir, config.trunk.get("step"))
        return TrunkSource(model_config, variables, f"pretrain_workdir:{workdir}@{step}")
    if source == "pretrained":
        directory = os.path.abspath(config.trunk.checkpoint)
        model_config, variables = read_pretrained_trunk(directory)
        return TrunkSource(model_config, variables, f"pretrained:{directory}")
    if source == "random":
        model_config = config_lib.to_model_config(config.model)
        variables = random_trunk(model_config, int(config.seed))
        return TrunkSource(model_config, variables, f"random:seed={config.seed}")
    raise ValueError(
        f"config.trunk.source={source!r} is invalid; expected one of {list(TRUNK_SOURCES)}."
    )


def run_layout(params: dict[str, Any], num_run: int, *, scan: bool) -> dict[str, Any]:
    """Keep the first `num_run` unrolled blocks of host params, stacked (numpy) when `scan`."""
    trunk = {f"blocks_{i}": params["trunk"][f"blocks_{i}"] for i in range(num_run)}
    if scan:
        blocks = [trunk[f"blocks_{i}"] for i in range(num_run)]
        trunk = {"blocks": {"block": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}}
    return {**params, "trunk": trunk}


def place_on_shardings(tree: Any, shardings: Any) -> Any:
    """Copy host arrays onto their shardings; each device reads only its own slice."""

    def place(value, target):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, target, lambda index: value[index])

    return jax.tree.map(place, tree, shardings)


def abstract_variables(model: nn.Module, image_size: Sequence[int]) -> Any:
    """Return `jax.eval_shape` of `model.init`, with its `nn.LogicallyPartitioned` boxes."""
    images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)


def load_for_evaluation(
    checkpoint: str | os.PathLike[str],
    probe_layers: Any,
    mesh: jax.sharding.Mesh,
    rules: Any,
    *,
    dtype: Dtype = jnp.float32,
    scan: bool = False,
) -> tuple[AIM, dict[str, Any]]:
    """Restore a converted checkpoint (trunk and head) onto the mesh for evaluation.

    Only the blocks up to the highest probe block are read. Parameters are sharded by their
    logical axis names through `sharding.state_shardings`, so `config.mesh.fsdp > 1` splits
    them FSDP-style; leaves stored in bfloat16 are cast to float32.

    Args:
        checkpoint: a directory from `save_pretrained` or `tools/convert_torch.py`.
        probe_layers: "last", "best", "checkpoint" or block indices; must match the stored
            head's blocks.
        mesh: the device mesh.
        rules: logical-to-mesh axis rules.
        dtype: compute dtype.
        scan: run the trunk under `nn.scan` (the blocks are stacked on the devices).

    Returns:
        `(model, variables)` with `model.apply(variables, images)` giving (B, classes) logits.
    """
    model_config = check_head_matches(read_config(checkpoint), probe_layers, str(checkpoint))
    stored_model = AIM(model_config, dtype=dtype, scan=False)
    stored_abstract = abstract_variables(stored_model, model_config.img_size)
    stored_shardings = sharding.state_shardings(stored_abstract, mesh, rules)
    target = jax.tree.map(
        lambda leaf, target_sharding: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=target_sharding
        ),
        sharding.unbox(stored_abstract),
        stored_shardings,
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    variables = _restore_partial(
        epath.Path(checkpoint).absolute() / VARIABLES_DIR, target, restore_args
    )
    model = AIM(model_config, dtype=dtype, scan=scan)
    if scan:
        from aim_jax.trunk import stack_blocks

        run_shardings = sharding.state_shardings(
            abstract_variables(model, model_config.img_size), mesh, rules
        )

        def stack(tree):
            params = {**tree["params"], "trunk": stack_blocks(tree["params"]["trunk"])}
            return {**tree, "params": params}

        variables = jax.jit(stack, out_shardings=run_shardings, donate_argnums=0)(variables)
    logging.info(
        "Restored %s (blocks 0-%d of %d, probe blocks %s) from %s onto mesh %s.",
        model_config.name,
        model.num_run_blocks - 1,
        model_config.num_blocks,
        list(model_config.probe_layers),
        checkpoint,
        dict(mesh.shape),
    )
    return model, variables


def trunk_fingerprint(variables: Any) -> str:
    """Return a hex digest of the parameter paths, shapes, dtypes and per-leaf sums.

    The float64 sum and sum of squares of each leaf stand in for its bytes, so that the
    fingerprint of a large trunk is cheap. A fine-tuned or retrained trunk changes them.
    """
    import hashlib

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        value = np.asarray(leaf, dtype=np.float64)
        record = (
            f"{jax.tree_util.keystr(path)}|{value.shape}|{np.asarray(leaf).dtype}|"
            f"{float(value.sum()).hex()}|{float(np.square(value).sum()).hex()}\n"
        )
        digest.update(record.encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------
# Heads.


class LinearProbe(nn.Module):
    """Linear probe baseline: BatchNorm per token, mean over tokens, bias-free linear layer.

    It uses the attention probe's BatchNorm (no affine, PyTorch's running-statistics
    update). Leaving out the bias makes it an attention probe with zero keys (uniform
    attention) and identity values, so `linear_probe_as_attention` exports it exactly.
    """

    num_classes: int
    bn_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = BatchNorm(epsilon=self.bn_eps, name="bn")(x, train=train)  # (B, N, D) float32
        pooled = x.mean(axis=1).astype(self.dtype)  # (B, D)
        logits = nn.Dense(
            self.num_classes,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.zeros_init(), "embed", "vocab"),
            name="linear",
        )(pooled)
        return logits.astype(jnp.float32)  # (B, classes)


def create_head(kind: str, model_config: ModelConfig, dtype: Dtype = jnp.float32) -> nn.Module:
    """Build a fresh probe head: "attention" (`AttentionProbe`) or "linear" (`LinearProbe`)."""
    if kind == "attention":
        return AttentionProbe(model_config.num_heads, model_config.num_classes, dtype=dtype)
    if kind == "linear":
        return LinearProbe(model_config.num_classes, dtype=dtype)
    raise ValueError(f"config.head={kind!r} is invalid; expected one of {list(HEADS)}.")


def linear_probe_as_attention(params: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    """Convert `LinearProbe` params into `AttentionProbe` params that compute the same logits.

    Zero keys give every token the same attention logit, so the softmax is uniform and the
    attention output is the token mean of the identity-projected values. The BatchNorm
    statistics keep their names (`bn/mean`, ...) and carry over unchanged.
    """
    kernel = np.asarray(params["linear"]["kernel"], np.float32)  # (D, classes)
    return {
        "cls_token": np.zeros((1, 1, embed_dim), np.float32),
        "k": {"kernel": np.zeros((embed_dim, embed_dim), np.float32)},
        "v": {"kernel": np.eye(embed_dim, dtype=np.float32)},
        "linear": {"kernel": kernel},
    }


# ----------------------------------------------------------------------------------------
# Metrics and evaluation.


def classification_sums(
    logits: jax.Array, labels: jax.Array, valid: jax.Array
) -> dict[str, jax.Array]:
    """Sum top-1 and top-5 hits, cross-entropy and the image count over valid entries.

    An image counts as a top-k hit when fewer than k classes have a strictly larger logit,
    so a tie with the label's logit counts as a hit. With fewer than 5 classes, top-5 is 1.

    Args:
        logits: (B, classes) float logits.
        labels: (B,) int labels.
        valid: (B,) bool; False for padding and unreadable images, which count nowhere.

    Returns:
        Scalars "count", "top1", "top5" (int32) and "loss" (float32 sum of cross-entropy).
    """
    logits = logits.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)  # (B, 1)
    rank = jnp.sum(logits > label_logit, axis=-1)  # (B,)
    cross_entropy = jax.nn.logsumexp(logits, axis=-1) - label_logit[:, 0]  # (B,)
    return {
        "count": jnp.sum(valid.astype(jnp.int32)),
        "top1": jnp.sum((valid & (rank < 1)).astype(jnp.int32)),
        "top5": jnp.sum((valid & (rank < 5)).astype(jnp.int32)),
        "loss": jnp.sum(jnp.where(valid, cross_entropy, 0.0)),
    }


def finalize_metrics(sums: dict[str, float]) -> dict[str, Any]:
    """Turn accumulated `classification_sums` into top1, top5, loss and num_images."""
    count = int(sums["count"])
    if count == 0:
        raise ValueError("No valid image was evaluated: the split is empty or unreadable.")
    return {
        "top1": sums["top1"] / count,
        "top5": sums["top5"] / count,
        "loss": sums["loss"] / count,
        "num_images": count,
    }


@dataclasses.dataclass
class EvalOutput:
    """Result of `evaluate_batches`.

    Attributes:
        metrics: top1, top5 (fractions), loss (mean cross-entropy) and num_images.
        logits: (num_images, classes) float32 logits ordered by image index, when collected.
        labels: (num_images,) labels in the same order, when collected.
    """

    metrics: dict[str, Any]
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None


def make_eval_step(apply_fn: Callable[[Any, jax.Array], jax.Array]):
    """Jit `step(variables, inputs, labels, valid) -> (sums, logits)` around `apply_fn`."""

    def step(variables, inputs, labels, valid):
        logits = apply_fn(variables, inputs)  # (B, classes)
        return classification_sums(logits, labels, valid), logits

    return jax.jit(step)


def progress_bar(total: int | None, unit: str):
    if not sys.stderr.isatty() or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True)


def evaluate_batches(
    eval_step,
    variables: Any,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    *,
    input_key: str = "image",
    collect_logits: bool = False,
    total_images: int | None = None,
) -> EvalOutput:
    """Run `eval_step` over host-local batches and accumulate the metrics of valid entries.

    Args:
        eval_step: from `make_eval_step`.
        variables: the model (or head) variables, already on the mesh.
        batches: host-local dicts with `input_key`, "label", "valid" and, when collecting
            logits, "index" (as `input_pipeline.make_eval_iterator` yields).
        mesh: the device mesh; batches are split over its batch axes.
        input_key: the batch entry fed to the model ("image" or cached "features").
        collect_logits: also return the per-image logits and labels, ordered by "index".
        total_images: number of valid images, for the progress bar.

    Returns:
        An `EvalOutput`.
    """
    sums = {"count": 0, "top1": 0, "top5": 0, "loss": 0.0}
    collected = []
    bar = progress_bar(total_images, "img")
    try:
        for local in batches:
            keys = [input_key, "label", "valid"] + (["index"] if collect_logits else [])
            batch = sharding.host_local_batch_to_global({k: local[k] for k in keys}, mesh)
            batch_sums, logits = eval_step(
                variables, batch[input_key], batch["label"], batch["valid"]
            )
            batch_sums = jax.device_get(batch_sums)
            for key in sums:
                sums[key] += batch_sums[key].item()
            if collect_logits:
                gathered = multihost_utils.process_allgather(
                    {"logits": logits, **{k: batch[k] for k in ("label", "valid", "index")}},
                    tiled=True,
                )
                collected.append(gathered)
            if bar is not None:
                bar.update(int(batch_sums["count"]))
                bar.set_postfix(top1=f"{sums['top1'] / max(sums['count'], 1):.4f}")
    finally:
        if bar is not None:
            bar.close()
    output = EvalOutput(metrics=finalize_metrics(sums))
    if collect_logits:
        merged = {k: np.concatenate([c[k] for c in collected]) for k in collected[0]}
        keep = merged["valid"]
        order = np.argsort(merged["index"][keep], kind="stable")
        output.logits = np.asarray(merged["logits"][keep][order], np.float32)
        output.labels = np.asarray(merged["label"][keep][order])
    return output


def write_results(path: str | os.PathLike[str], results: dict[str, Any]) -> Path:
    """Write `results` as JSON atomically (temporary file, then rename) from process 0."""
    path = Path(path)
    if jax.process_index() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    logging.info("Wrote %s: %s", path, {k: results[k] for k in results if k != "config"})
    return path


# ----------------------------------------------------------------------------------------
# Training.


@flax.struct.dataclass
class ProbeState:
    """Everything a probe training step updates; the frozen trunk is not part of it."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def init_probe_state(head: nn.Module, tx, feature_shape: Sequence[int], rng: jax.Array):
    """Initialise the head (boxed parameters) and its optimizer state."""
    features = jnp.zeros((1, *feature_shape), jnp.float32)
    variables = head.init(rng, features)
    params = variables["params"]
    return ProbeState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
    )


def make_trunk_features(model: AIM) -> Callable[[Any, jax.Array], jax.Array]:
    """Return `features(trunk_variables, images) -> (B, N, D)` float32 pooled probe features.

    Only the patch embedding and the blocks up to the highest probe block run, so the head's
    variables are not needed.
    """

    def pooled(module: AIM, images: jax.Array) -> jax.Array:
        check_images(images, module.config.patch_size)
        tokens = module.patch_embed(images)  # (B, N, D)
        out = module.trunk(
            tokens,
            None,
            num_run=module.num_run_blocks,
            probe_layers=module.config.probe_layers,
        )
        return out.pooled  # (B, N, D) float32

    def features(trunk_variables, images):
        return jax.lax.stop_gradient(model.apply(trunk_variables, images, method=pooled))

    return features


def make_probe_train_step(head: nn.Module, tx, schedule, featurize):
    """Build `train_step(state, inputs, labels, trunk_variables) -> (state, metrics)`.

    `featurize(trunk_variables, inputs)` returns the (B, N, D) probe features: the frozen
    trunk on images, or a cast of cached features. BatchNorm normalises with batch
    statistics and updates its running statistics (PyTorch's rule). A step whose loss or
    gradient norm is not finite leaves the state unchanged and sets `probe/finite` to False.
    """

    def loss_fn(params, batch_stats, features, labels):
        logits, updates = head.apply(
            {"params": params, "batch_stats": batch_stats},
            features,
            train=True,
            mutable=["batch_stats"],
        )  # (B, classes)
        label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]  # (B,)
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - label_logit)
        return loss, (logits, updates["batch_stats"])

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: ProbeState, inputs, labels, trunk_variables):
        features = featurize(trunk_variables, inputs).astype(jnp.float32)  # (B, N, D)
        (loss, (logits, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, features, labels
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = update_if_finite(tx, finite, grads, state.params, state.opt_state)
        batch_stats = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), batch_stats, state.batch_stats
        )
        new_state = ProbeState(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        top1 = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
        step_metrics = {
            "probe/loss": loss,
            "probe/top1": top1,
            "probe/grad_norm": grad_norm,
            "probe/lr": schedule(state.step),
            "probe/finite": finite,
        }
        return new_state, step_metrics

    return train_step
