r"""Autoregressive pre-training of AIM.

    python -m aim_jax.train --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist
    python -m aim_jax.train --config configs/aim_pretrain.py:aim-600M --workdir DIR \
        --config.data.path=/data/imagenet --config.batch_size=4096

The run resumes from, in this order: the latest complete checkpoint in `WORKDIR/checkpoints`,
then `config.init_from` (a directory from `save_pretrained` or `tools/convert_torch.py`,
whose patch embedding and trunk are copied), then fresh initialisation.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import app, flags, logging
from ml_collections import config_flags

from aim_jax import checkpointing, config_lib, flops, input_pipeline, metrics, sharding
from aim_jax.models import AIMPretrainer
from aim_jax.objective import next_patch_loss, sample_prefix_lengths
from aim_jax.pretrained import read_config, restore_variables
from aim_jax.registry import ModelConfig
from aim_jax.trunk import stack_blocks

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    """Everything a training step updates."""

    step: jax.Array
    params: Any
    opt_state: Any


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def create_model(config: ml_collections.ConfigDict) -> tuple[AIMPretrainer, ModelConfig]:
    """Build the pre-training model from `config.model`, `dtype`, `scan` and `remat_policy`."""
    model_config = config_lib.to_model_config(config.model)
    if config.dtype not in DTYPES:
        raise ValueError(
            f"config.dtype={config.dtype!r} is invalid; expected one of {sorted(DTYPES)}."
        )
    model = AIMPretrainer(
        model_config,
        dtype=DTYPES[config.dtype],
        scan=bool(config.scan),
        remat_policy=config.remat_policy,
    )
    return model, model_config


def weight_decay_mask(params: Any) -> Any:
    """Decay only matrices: not biases, norm scales, or the probe's query token."""

    def decays(path, leaf):
        # Boxed parameters (`nn.LogicallyPartitioned`) end their path with the box's `.value`
        # attribute, so the parameter name is the last dict key in the path.
        names = [str(entry.key) for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return bool(names) and names[-1] == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with linear warmup from `init_lr`, then cosine decay to 0.

    Gradients are clipped to a global norm of `optimizer.clip_norm`; 0 turns clipping off.
    Weight decay applies to kernels only (see `weight_decay_mask`).
    """
    opt = config.optimizer
    warmup = max(1, int(round(opt.warmup_fraction * config.total_steps)))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=opt.init_lr,
        peak_value=opt.peak_lr,
        warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1),
        end_value=0.0,
    )
    tx = optax.adamw(
        schedule,
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=weight_decay_mask,
    )
    if opt.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.clip_norm), tx)
    return tx, schedule


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
    size = config.data.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def update_if_finite(
    tx: optax.GradientTransformation, finite: jax.Array, grads: Any, params: Any, opt_state: Any
) -> tuple[Any, Any]:
    """Apply the optimizer update when `finite` is True; otherwise return the state unchanged.

    The update runs under `lax.cond` rather than a select between the old and the new
    state, because a select keeps both alive. On the CPU, XLA's memory estimate of an
    aim-600M step (batch 2) fell from 24.7 to 20.3 GiB with the conditional.

    Args:
        tx: the optimizer.
        finite: scalar bool, whether the loss and the gradient norm are finite.
        grads: gradients, a pytree like `params`.
        params: current parameters.
        opt_state: current optimizer state.

    Returns:
        `(params, opt_state)` after the update, or the inputs unchanged.
    """

    def apply(operands):
        params, opt_state, grads = operands
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def skip(operands):
        params, opt_state, _ = operands
        return params, opt_state

    return jax.lax.cond(finite, apply, skip, (params, opt_state, grads))


def make_train_step(
    model: AIMPretrainer,
    tx: optax.GradientTransformation,
    schedule: Any,
    grad_accum_steps: int,
    num_processes: int = 1,
):
    """Build `train_step(state, batch, rng) -> (state, metrics)`.

    Each image gets its own prefix length, drawn from `rng` folded with the step. The draws
    follow the order of the data stream, so a run over `num_processes` processes trains on
    the same (image, prefix length) pairs as a single-process run. With
    `grad_accum_steps` > 1 the batch is split into micro-batches whose summed losses and
    gradients are divided by the total number of target patches once, so the update equals
    the one of the whole batch. A step whose loss or gradient norm is not finite leaves the
    state unchanged and reports it in the metrics.
    """
    patch_size = model.config.patch_size

    def loss_sum(params, images, prefix_len):
        predictions = model.apply({"params": params}, images, prefix_len)  # (b, K, ppC)
        loss, count = next_patch_loss(predictions, images, prefix_len, patch_size)
        return loss * count, count

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        images = batch["image"]  # (B, H, W, 3)
        batch_size, height, width, _ = images.shape
        num_patches = (height // patch_size) * (width // patch_size)
        step_rng = jax.random.fold_in(rng, state.step)
        prefix_len = sample_prefix_lengths(step_rng, batch_size, num_patches)  # (B,)
        if num_processes > 1:
            # Process p reads stream positions p, p + P, p + 2P, ... (see
            # `input_pipeline.make_train_dataset`) and the global batch concatenates the
            # processes' slices, so global row p * B/P + j contains stream position j * P + p.
            prefix_len = prefix_len.reshape(batch_size // num_processes, num_processes).T
            prefix_len = prefix_len.reshape(batch_size)  # (B,)

        if grad_accum_steps == 1:
            (total, count), grads = grad_fn(state.params, images, prefix_len)
        else:
            # Micro-batch m takes images m, m + A, m + 2A, ..., so every micro-batch stays
            # spread over all data-parallel devices.
            def split(x):
                x = x.reshape(batch_size // grad_accum_steps, grad_accum_steps, *x.shape[1:])
                return x.swapaxes(0, 1)  # (A, B / A, ...)

            def accumulate(carry, micro):
                (m_total, m_count), m_grads = grad_fn(state.params, *micro)
                total, count, grads = carry
                grads = jax.tree.map(jnp.add, grads, m_grads)
                return (total + m_total, count + m_count, grads), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (total, count, grads), _ = jax.lax.scan(
                accumulate, (0.0, 0.0, zeros), (split(images), split(prefix_len))
            )

        count = jnp.maximum(count, 1.0)
        loss = total / count
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = update_if_finite(tx, finite, grads, state.params, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        step_metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            "train/lr": schedule(state.step),
            "train/finite": finite,
        }
        return new_state, step_metrics

    return train_step


def init_state(model, tx, config, rng) -> TrainState:
    """Initialise parameters (boxed with logical axis names) and optimizer state."""
    height, width = image_shape(config)
    images = jnp.zeros((1, height, width, 3), jnp.float32)
    prefix_len = jnp.ones((1,), jnp.int32)
    params = model.init(rng, images, prefix_len)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def load_init_from(directory: str, *, scan: bool) -> dict[str, Any]:
    """Read the patch embedding and trunk of a pretrained directory for `config.init_from`.

    The head of a converted checkpoint is dropped, and the blocks are stacked for a scanned
    model. The prediction head keeps its fresh initialisation.
    """
    model_config = read_config(directory)
    variables = restore_variables(directory)
    params = {key: variables["params"][key] for key in ("patch_embed", "trunk")}
    if scan:
        params["trunk"] = stack_blocks(params["trunk"], model_config.num_blocks)
    logging.info(
        "init_from %s: %s, %d blocks.", directory, model_config.name, model_config.num_blocks
    )
    return {"params": params}


def apply_init_from(state: TrainState, variables: dict[str, Any]) -> TrainState:
    params = checkpointing.merge_pretrained(
        state.params, variables["params"], strict=False, name="params"
    )
    return state.replace(params=params)


def load_pretrain_checkpoint(
    workdir: str, step: int | None = None
) -> tuple[ml_collections.ConfigDict, ModelConfig, dict[str, Any], int]:
    """Load the parameters of a pre-training checkpoint onto the default device.

    Args:
        workdir: a `python -m aim_jax.train` working directory.
        step: the checkpoint step; the latest complete one by default.

    Returns:
        `(config, model_config, params, step)`; params hold `patch_embed`, `trunk` (in the
        run's layout, scanned or not) and `prediction_head`.
    """
    directory = os.path.join(workdir, checkpointing.CHECKPOINT_SUBDIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory} not found: {workdir} is not a training workdir with checkpoints."
        )
    manager = checkpointing.create_checkpoint_manager(
        directory, save_interval_steps=1, max_to_keep=None, async_save=False
    )
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No complete checkpoint in {directory}.")
        saved = manager.restore(
            step, args=ocp.args.Composite(**{checkpointing.CONFIG_ITEM: ocp.args.JsonRestore()})
        )
        config = ml_collections.ConfigDict(saved[checkpointing.CONFIG_ITEM])
        model, model_config = create_model(config)
        tx, _ = create_optimizer(config)
        abstract = nn.meta.unbox(
            jax.eval_shape(lambda: init_state(model, tx, config, jax.random.key(0)))
        )
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
        restored = checkpointing.restore_checkpoint(manager, step, abstract, shardings)
    finally:
        manager.close()
    return config, model_config, restored.state.params, step


@dataclasses.dataclass
class Setup:
    """Mesh, model, state, data iterator and step function, built by `setup_training`."""

    config: ml_collections.ConfigDict
    model: AIMPretrainer
    model_config: ModelConfig
    mesh: jax.sharding.Mesh
    rules: Any
    state: TrainState
    state_shardings: Any
    rng: jax.Array
    start_step: int
    train_iter: Any
    manager: Any
    step_fn: Any
    flops_per_image: float


def setup_training(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> Setup:
    """Build the mesh, model, optimizer, data iterator and state (restored or fresh).

    Args:
        config: the training config.
        workdir: the run directory; checkpoints go to `workdir/checkpoints`.
        devices: devices laid out by `config.mesh`; all devices of all processes by default.

    Returns:
        A `Setup` for `train_loop`.
    """
    sharding.initialize_distributed(config)
    mesh = sharding.create_mesh(config.mesh, devices)
    rules = sharding.logical_axis_rules(config)
    model, model_config = create_model(config)
    tx, schedule = create_optimizer(config)
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by "
            f"grad_accum_steps={config.grad_accum_steps}."
        )

    rng = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    abstract = jax.eval_shape(lambda: init_state(model, tx, config, init_rng))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    init_fn = jax.jit(
        lambda: nn.meta.unbox(init_state(model, tx, config, init_rng)), out_shardings=shardings
    )
    train_iter = input_pipeline.make_train_iterator(config)
    manager = checkpointing.checkpoint_manager_from_config(workdir, config)
    initialized = checkpointing.restore_or_initialize(
        manager,
        init_fn,
        nn.meta.unbox(abstract),
        shardings,
        init_from=config.init_from or None,
        rng=train_rng,
        data_iterator=train_iter,
        load_pretrained_fn=lambda d: load_init_from(d, scan=bool(config.scan)),
        apply_pretrained_fn=apply_init_from,
    )
    logging.info("Starting at step %d (%s).", initialized.step, initialized.source)

    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        make_train_step(
            model, tx, schedule, int(config.grad_accum_steps), num_processes=jax.process_count()
        ),
        in_shardings=(shardings, batch_sharding, sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    height, width = image_shape(config)
    num_tokens = (height // model_config.patch_size) * (width // model_config.patch_size)
    return Setup(
        config=config,
        model=model,
        model_config=model_config,
        mesh=mesh,
        rules=rules,
        state=initialized.state,
        state_shardings=shardings,
        rng=initialized.rng,
        start_step=initialized.step,
        train_iter=train_iter,
        manager=manager,
        step_fn=step_fn,
        flops_per_image=flops.pretrain_step_flops(model_config, num_tokens),
    )


def device_peak_flops(config: ml_collections.ConfigDict) -> float:
    """Peak FLOP/s of one device: `config.device_peak_flops`, or a matmul measured once."""
    if config.device_peak_flops > 0:
        return float(config.device_peak_flops)
    peak = flops.measure_matmul_peak(config.dtype)
    logging.info(
        "Measured %s matmul peak of %s: %.1f GFLOP/s per device (set config.device_peak_flops "
        "to skip the measurement).",
        config.dtype,
        jax.devices()[0].device_kind,
        peak / 1e9,
    )
    return peak


def _progress_bar(total: int, initial: int):
    if not sys.stderr.isatty() or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def raise_if_non_finite(host_metrics: list[dict[str, Any]], last_step: int) -> None:
    """Raise `NonFiniteError` if a step of `host_metrics` (ending at `last_step`) is not finite."""
    first_step = last_step - len(host_metrics) + 1
    for step, step_metrics in enumerate(host_metrics, start=first_step):
        if not bool(step_metrics["train/finite"]):
            raise NonFiniteError(
                f"Non-finite loss {float(step_metrics['train/loss'])} or gradient norm "
                f"{float(step_metrics['train/grad_norm'])} at step {step}. The step was not "
                f"applied and no checkpoint after step {step - 1} was written, so the latest "
                "checkpoint in the workdir is the last good one. Lower optimizer.peak_lr or "
                "check the data."
            )


def train_loop(setup: Setup, workdir: str) -> dict[str, float]:
    """Run steps until `config.total_steps`, logging, checkpointing and stopping on NaN.

    The finiteness of every step is checked before each checkpoint and at each log step, so
    a checkpoint never follows a step whose loss or gradient norm was NaN or infinite.

    Returns:
        The last logged metrics.

    Raises:
        NonFiniteError: if a step's loss or gradient norm is not finite.
    """
    config = setup.config
    # `resume_step` also drops lines left by a run killed before its first checkpoint.
    writer = metrics.MetricWriter(workdir, resume_step=setup.start_step)
    if setup.start_step == 0:
        writer.write_hparams(config)
    peak = device_peak_flops(config) * setup.mesh.devices.size
    state, rng = setup.state, setup.rng
    bar = _progress_bar(config.total_steps, setup.start_step)
    last: dict[str, float] = {}
    pending = []
    window_start, window_images = time.perf_counter(), 0
    try:
        with sharding.activation_sharding(setup.mesh, setup.rules):
            for step in range(setup.start_step + 1, config.total_steps + 1):
                batch = next(setup.train_iter)
                batch = sharding.host_local_batch_to_global({"image": batch["image"]}, setup.mesh)
                state, step_metrics = setup.step_fn(state, batch, rng)
                window_images += config.batch_size
                pending.append(step_metrics)
                if bar is not None:
                    bar.update(1)
                is_last = step == config.total_steps
                log_due = step % config.log_every_steps == 0 or is_last
                save_due = step % config.checkpoint_every_steps == 0 or is_last
                if log_due or save_due:
                    pending = [jax.device_get(m) for m in pending]
                    raise_if_non_finite(pending, step)
                if log_due:
                    elapsed = time.perf_counter() - window_start
                    images_per_sec = window_images / max(elapsed, 1e-9)
                    last = {
                        "train/loss": float(pending[-1]["train/loss"]),
                        "train/grad_norm": float(pending[-1]["train/grad_norm"]),
                        "train/lr": float(pending[-1]["train/lr"]),
                        "train/images_per_sec": images_per_sec,
                        "train/mfu": images_per_sec * setup.flops_per_image / peak,
                        "data/skipped_images": float(input_pipeline.skipped_image_count()),
                    }
                    writer.write(step, last)
                    logging.info(
                        "step %d/%d loss %.4f grad_norm %.3f lr %.2e %.1f img/s MFU %.1f%%",
                        step,
                        config.total_steps,
                        last["train/loss"],
                        last["train/grad_norm"],
                        last["train/lr"],
                        images_per_sec,
                        100 * last["train/mfu"],
                    )
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['train/loss']:.4f}")
                    pending = []
                    window_start, window_images = time.perf_counter(), 0
                # Called every step: Orbax also saves when JAX's preemption service reports a
                # preemption. Such a save may follow an unchecked step, but a non-finite step
                # leaves the state unchanged, so the saved state is still finite.
                checkpointing.save_checkpoint(
                    setup.manager,
                    step,
                    state,
                    rng=rng,
                    data_iterator=setup.train_iter,
                    config=config,
                    force=is_last,
                )
    finally:
        if bar is not None:
            bar.close()
        setup.manager.wait_until_finished()
        writer.close()
    return last


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Pre-train with `config` in `workdir`, resuming if a checkpoint is there."""
    setup = setup_training(config, workdir)
    try:
        return train_loop(setup, workdir)
    finally:
        setup.manager.close()
        close = getattr(setup.train_iter, "close", None)
        if close is not None:
            close()


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags; called only when this module is the entry point."""
    config_flags.DEFINE_config_file(
        "config", None, "Training config file, e.g. configs/fashion_mnist.py.", lock_config=True
    )
    flags.DEFINE_string(
        "workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events."
    )
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except KeyboardInterrupt:
        # `train_loop` waits for a save in flight before returning, so the checkpoints on
        # disk are complete, and an unfinished one would be ignored on resume anyway.
        logging.warning(
            "Interrupted. Run the same command again to resume from the last complete "
            "checkpoint in %s.",
            FLAGS.workdir,
        )
        sys.exit(130)


if __name__ == "__main__":
    define_flags()
    app.run(main)
