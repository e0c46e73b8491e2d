"""Attention-probe evaluation and training on a frozen AIM trunk.

    python -m aim_jax.probe --config configs/probe/imagenet_eval.py:aim-600M --workdir DIR \
        --config.checkpoint=/ckpt/aim-600M --config.data.path=/data/imagenet
    python -m aim_jax.probe --config configs/probe/fashion_mnist.py --workdir DIR

`config.mode` selects the stage:

* "evaluate": a converted checkpoint (trunk and head) on a validation split. Writes top-1,
  top-5, mean cross-entropy and the image count to `DIR/results.json`.
* "train": a new probe head ("attention", or a "linear" baseline) on the frozen trunk of a
  pre-training workdir, a converted checkpoint or a random initialisation (see
  `aim_jax.probe_lib`). With `config.cache_features` the trunk runs once per split and the
  head trains on features cached under `DIR/feature_cache`. The run checkpoints to
  `DIR/checkpoints` and resumes from there, logs `probe/*` metrics, evaluates on
  `config.data.eval_split`, writes `DIR/results.json` and saves trunk and head with
  `save_pretrained` to `DIR/model`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from aim_jax import checkpointing, feature_cache, input_pipeline, metrics, probe_lib, sharding
from aim_jax.data_sources import make_source
from aim_jax.models import AIM
from aim_jax.pretrained import save_pretrained
from aim_jax.registry import ModelConfig
from aim_jax.train import create_optimizer

RESULTS_FILE = "results.json"
TRUNK_FILE = "trunk.json"
MODEL_SUBDIR = "model"
MODES = ("evaluate", "train")


def _with_batch_size(config: ml_collections.ConfigDict, batch_size: int):
    """Return a copy of `config` whose `batch_size` is `batch_size` (for eval iterators)."""
    copy = config.copy_and_resolve_references()
    copy.batch_size = int(batch_size)
    return copy


def _config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())


# ----------------------------------------------------------------------------------------
# Evaluate mode.


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    source: Any = None,
    batches: Any = None,
    collect_logits: bool = False,
) -> probe_lib.EvalOutput:
    """Evaluate a converted checkpoint and write `workdir/results.json`.

    Args:
        config: an evaluate-mode config (see configs/probe/imagenet_eval.py).
        workdir: output directory.
        source: random-access source to read instead of the one `config.data` names.
        batches: host-local batches ("image", "label", "valid", "index") to evaluate instead
            of the input pipeline's evaluation pass, for example preprocessed arrays.
        collect_logits: also return the per-image logits.

    Returns:
        The `EvalOutput`.
    """
    sharding.initialize_distributed(config)
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config)
    model, variables = probe_lib.load_for_evaluation(
        config.checkpoint,
        config.probe_layers,
        mesh,
        rules,
        dtype=probe_lib.compute_dtype(config.dtype),
        scan=bool(config.scan),
    )
    _check_model_name(config, model.config)
    split = config.data.split
    total = None
    if batches is None:
        source = source if source is not None else make_source(config.data, split)
        total = len(source)
        batches = input_pipeline.make_eval_iterator(config, split, source=source)
    eval_step = probe_lib.make_eval_step(model.apply)
    start = time.perf_counter()
    with sharding.activation_sharding(mesh, rules):
        output = probe_lib.evaluate_batches(
            eval_step,
            variables,
            batches,
            mesh,
            collect_logits=collect_logits,
            total_images=total,
        )
    logging.info(
        "Evaluated %d images in %.1f s: top-1 %.4f, top-5 %.4f, loss %.4f.",
        output.metrics["num_images"],
        time.perf_counter() - start,
        output.metrics["top1"],
        output.metrics["top5"],
        output.metrics["loss"],
    )
    results = {
        **output.metrics,
        "mode": "evaluate",
        "checkpoint": os.path.abspath(config.checkpoint),
        "model": model.config.name,
        "probe_layers": list(model.config.probe_layers),
        "split": split,
        "config": _config_record(config),
    }
    probe_lib.write_results(Path(workdir) / RESULTS_FILE, results)
    return output


def _check_model_name(config: ml_collections.ConfigDict, model_config: ModelConfig) -> None:
    expected = config.get("model_name", "")
    if expected and model_config.name not in (expected, "custom"):
        raise ValueError(
            f"The config variant is for {expected!r} but {config.checkpoint} contains "
            f"{model_config.name!r}. Pick the matching variant, or set --config.model_name='' "
            "to skip this check."
        )


# ----------------------------------------------------------------------------------------
# Train mode.


@dataclasses.dataclass
class ProbeSetup:
    """Trunk, head, state and step function of a probe-training run (`setup_probe_training`)."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    rules: Any
    trunk: probe_lib.TrunkSource
    model_config: ModelConfig
    trunk_variables: Any
    featurize: Any
    head: Any
    state: probe_lib.ProbeState
    start_step: int
    manager: Any
    step_fn: Any
    train_cache: feature_cache.FeatureCache | None
    train_iter: Any


def probe_model_config(config: ml_collections.ConfigDict, trunk: probe_lib.TrunkSource):
    """Return the trunk's config with the requested probe blocks and `config.num_classes`."""
    model_config = probe_lib.with_requested_probe_layers(trunk.model_config, config.probe_layers)
    return model_config.replace(num_classes=int(config.num_classes))


def check_same_probe(
    workdir: str, trunk: probe_lib.TrunkSource, fingerprint: str, config, model_config
) -> None:
    """Record the trunk, probe blocks and head of a fresh run; check them when resuming."""
    path = Path(workdir) / TRUNK_FILE
    record = {
        "trunk": trunk.description,
        "fingerprint": fingerprint,
        "probe_layers": list(model_config.probe_layers),
        "head": config.head,
    }
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") != fingerprint:
            raise ValueError(
                f"The trunk {trunk.description} differs from the one the probe in {workdir} was "
                f"trained on ({stored.get('trunk')}). Use a new --workdir, or restore the "
                "original trunk."
            )
        for key in ("probe_layers", "head"):
            if stored.get(key) != record[key]:
                raise ValueError(
                    f"The probe in {workdir} was trained with {key}={stored.get(key)}, but the "
                    f"config asks for {record[key]}. Use a new --workdir."
                )
        return
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)


def prepare_features(
    config: ml_collections.ConfigDict,
    workdir: str,
    split: str,
    *,
    trunk: probe_lib.TrunkSource,
    fingerprint: str,
    model_config: ModelConfig,
    trunk_variables: Any,
    featurize: Any,
    mesh: jax.sharding.Mesh,
    rules: Any,
    source: Any = None,
) -> feature_cache.FeatureCache:
    """Reuse the feature cache of `split` if its key matches, else run the trunk to build it.

    The training split goes through the evaluation preprocessing, without augmentation.
    """
    source = source if source is not None else make_source(config.data, split)
    key = feature_cache.cache_key(
        trunk_fingerprint=fingerprint,
        trunk_description=trunk.description,
        model_config_json=model_config.to_json(),
        compute_dtype=config.dtype,
        data_config=config.data,
        split=split,
        num_records=len(source),
        cache_dtype=config.cache_dtype,
    )
    directory = feature_cache.split_directory(workdir, split)
    cache = feature_cache.load_cache(directory, key)
    if cache is not None:
        return cache
    eval_config = _with_batch_size(config, config.eval_batch_size)
    batches = input_pipeline.make_eval_iterator(eval_config, split, source=source)
    num_tokens = _num_tokens(config, model_config)
    logging.info("Computing the features of split %r (%d images).", split, len(source))
    with sharding.activation_sharding(mesh, rules):
        return feature_cache.build_cache(
            directory,
            key,
            batches,
            jax.jit(featurize),
            trunk_variables,
            mesh,
            num_records=len(source),
            feature_shape=(num_tokens, model_config.embed_dim),
            cache_dtype=config.cache_dtype,
        )


def _num_tokens(config: ml_collections.ConfigDict, model_config: ModelConfig) -> int:
    height, width = _image_size(config)
    patch = model_config.patch_size
    return (height // patch) * (width // patch)


def _image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    size = config.data.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def setup_probe_training(
    config: ml_collections.ConfigDict, workdir: str, *, sources: dict[str, Any] | None = None
) -> ProbeSetup:
    """Read the trunk, build the head, optimizer and data, and restore or initialise the state.

    Args:
        config: a train-mode config (see configs/probe/fashion_mnist.py).
        workdir: the run directory.
        sources: optional {split: random-access source} replacing `config.data`'s sources.

    Returns:
        The `ProbeSetup`.
    """
    sources = sources or {}
    sharding.initialize_distributed(config)
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.logical_axis_rules(config)
    dtype = probe_lib.compute_dtype(config.dtype)

    trunk = probe_lib.read_trunk(config)
    model_config = probe_model_config(config, trunk)
    fingerprint = probe_lib.trunk_fingerprint(trunk.variables)
    check_same_probe(workdir, trunk, fingerprint, config, model_config)
    model = AIM(model_config, dtype=dtype, scan=bool(config.scan))
    run_abstract = probe_lib.abstract_variables(model, _image_size(config))
    run_shardings = sharding.state_shardings(run_abstract, mesh, rules)["params"]
    run_shardings = {key: run_shardings[key] for key in probe_lib.TRUNK_KEYS}
    run_params = probe_lib.run_layout(
        trunk.variables["params"], model.num_run_blocks, scan=bool(config.scan)
    )
    trunk_variables = {"params": probe_lib.place_on_shardings(run_params, run_shardings)}
    trunk_features = probe_lib.make_trunk_features(model)

    train_split = config.data.split
    train_cache = None
    train_iter = None
    if config.cache_features:
        for split in (train_split, config.data.eval_split):
            cache = prepare_features(
                config,
                workdir,
                split,
                trunk=trunk,
                fingerprint=fingerprint,
                model_config=model_config,
                trunk_variables=trunk_variables,
                featurize=trunk_features,
                mesh=mesh,
                rules=rules,
                source=sources.get(split),
            )
            if split == train_split:
                train_cache = cache
        featurize = lambda _, features: features  # noqa: E731
    else:
        train_iter = input_pipeline.make_train_iterator(config, source=sources.get(train_split))
        featurize = trunk_features

    head = probe_lib.create_head(config.head, model_config, dtype)
    tx, schedule = create_optimizer(config)
    feature_shape = (_num_tokens(config, model_config), model_config.embed_dim)
    init_rng = jax.random.key(config.seed)

    def init():
        return probe_lib.init_probe_state(head, tx, feature_shape, init_rng)

    abstract = jax.eval_shape(init)
    shardings = sharding.state_shardings(abstract, mesh, rules)
    init_fn = jax.jit(lambda: sharding.unbox(init()), out_shardings=shardings)
    manager = checkpointing.checkpoint_manager_from_config(workdir, config)
    initialized = checkpointing.restore_or_initialize(
        manager, init_fn, sharding.unbox(abstract), shardings, data_iterator=train_iter
    )
    logging.info("Probe training starts at step %d (%s).", initialized.step, initialized.source)
    step_fn = jax.jit(
        probe_lib.make_probe_train_step(head, tx, schedule, featurize),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return ProbeSetup(
        config=config,
        mesh=mesh,
        rules=rules,
        trunk=trunk,
        model_config=model_config,
        trunk_variables=trunk_variables,
        featurize=featurize,
        head=head,
        state=initialized.state,
        start_step=initialized.step,
        manager=manager,
        step_fn=step_fn,
        train_cache=train_cache,
        train_iter=train_iter,
    )


def _next_batch(setup: ProbeSetup, step: int) -> dict[str, Any]:
    """Return the global training batch of 0-based `step`: cached features or images."""
    config = setup.config
    if setup.train_cache is not None:
        local = feature_cache.training_batch(
            setup.train_cache, config.batch_size, config.seed, step
        )
        return sharding.host_local_batch_to_global(
            {"inputs": local["features"], "label": local["label"]}, setup.mesh
        )
    local = next(setup.train_iter)
    return sharding.host_local_batch_to_global(
        {"inputs": local["image"], "label": local["label"]}, setup.mesh
    )


def train_loop(setup: ProbeSetup, workdir: str) -> probe_lib.ProbeState:
    """Run head steps up to `config.total_steps`, logging metrics and writing checkpoints."""
    config = setup.config
    writer = metrics.MetricWriter(workdir, resume_step=setup.start_step or None)
    if setup.start_step == 0:
        writer.write_hparams(config)
    state = setup.state
    bar = probe_lib.progress_bar(config.total_steps, "step")
    if bar is not None:
        bar.update(setup.start_step)
    pending = []
    window_start = time.perf_counter()
    try:
        with sharding.activation_sharding(setup.mesh, setup.rules):
            for step in range(setup.start_step + 1, config.total_steps + 1):
                batch = _next_batch(setup, step - 1)
                state, step_metrics = setup.step_fn(
                    state, batch["inputs"], batch["label"], setup.trunk_variables
                )
                pending.append(step_metrics)
                if bar is not None:
                    bar.update(1)
                if step % config.log_every_steps == 0 or step == config.total_steps:
                    _log_metrics(writer, step, pending, window_start, config)
                    pending = []
                    window_start = time.perf_counter()
                checkpointing.save_checkpoint(
                    setup.manager,
                    step,
                    state,
                    data_iterator=setup.train_iter,
                    config=config,
                    force=step == config.total_steps,
                )
    finally:
        if bar is not None:
            bar.close()
        setup.manager.wait_until_finished()
        writer.close()
    return state


def _log_metrics(writer, step: int, pending: list, window_start: float, config) -> None:
    host = [jax.device_get(m) for m in pending]
    bad = [m for m in host if not bool(m["probe/finite"])]
    if bad:
        raise FloatingPointError(
            f"Non-finite probe loss {float(bad[0]['probe/loss'])} or gradient norm "
            f"{float(bad[0]['probe/grad_norm'])} before step {step}; the step was not applied. "
            "Lower optimizer.peak_lr or check the features."
        )
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    record = {
        "probe/loss": float(np.mean([m["probe/loss"] for m in host])),
        "probe/top1": float(np.mean([m["probe/top1"] for m in host])),
        "probe/grad_norm": float(host[-1]["probe/grad_norm"]),
        "probe/lr": float(host[-1]["probe/lr"]),
        "probe/steps_per_sec": len(host) / elapsed,
    }
    writer.write(step, record)
    logging.info(
        "step %d/%d loss %.4f top-1 %.4f lr %.2e",
        step,
        config.total_steps,
        record["probe/loss"],
        record["probe/top1"],
        record["probe/lr"],
    )


def evaluate_probe(
    setup: ProbeSetup, state: probe_lib.ProbeState, workdir: str, *, source: Any = None
) -> dict[str, Any]:
    """Evaluate the trained head on `config.data.eval_split`: cached features or images."""
    config = setup.config
    split = config.data.eval_split
    head_variables = {"params": state.params, "batch_stats": state.batch_stats}

    def apply(variables, inputs):
        features = setup.featurize(variables["trunk"], inputs).astype(np.float32)
        return setup.head.apply(variables["head"], features)

    variables = {"trunk": setup.trunk_variables, "head": head_variables}
    if config.cache_features:
        cache = feature_cache.load_cache(
            feature_cache.split_directory(workdir, split), _stored_key(workdir, split)
        )
        batches = feature_cache.eval_batches(cache, config.eval_batch_size)
        input_key, total = "features", len(cache.valid_rows)
        variables["trunk"] = None
    else:
        source = source if source is not None else make_source(config.data, split)
        eval_config = _with_batch_size(config, config.eval_batch_size)
        batches = input_pipeline.make_eval_iterator(eval_config, split, source=source)
        input_key, total = "image", len(source)
    with sharding.activation_sharding(setup.mesh, setup.rules):
        output = probe_lib.evaluate_batches(
            probe_lib.make_eval_step(apply),
            variables,
            batches,
            setup.mesh,
            input_key=input_key,
            total_images=total,
        )
    return output.metrics


def _stored_key(workdir: str, split: str) -> dict[str, Any]:
    """Return the key of the cache that `prepare_features` just validated or wrote."""
    path = feature_cache.split_directory(workdir, split) / feature_cache.KEY_FILE
    return json.loads(path.read_text())["key"]


def export_model(setup: ProbeSetup, state: probe_lib.ProbeState, workdir: str) -> Path:
    """Save the whole trunk and the trained head to `workdir/model` with `save_pretrained`.

    A linear head is saved as the equivalent attention probe, so `load_pretrained`,
    `aim_jax.classify` and evaluate mode read either kind.
    """
    head_params = jax.device_get(sharding.unbox(state.params))
    batch_stats = jax.device_get(state.batch_stats)
    if setup.config.head == "linear":
        head_params = probe_lib.linear_probe_as_attention(head_params, setup.model_config.embed_dim)
    params = {**setup.trunk.variables["params"], "head": head_params}
    variables = {"params": params, "batch_stats": {"head": batch_stats}}
    directory = Path(workdir) / MODEL_SUBDIR
    # NOTE: `save_pretrained` writes from this process alone; with several processes only
    # process 0 saves, which assumes Orbax needs no other process for host numpy arrays.
    if jax.process_index() == 0:
        save_pretrained(directory, setup.model_config, variables, overwrite=True)
        logging.info("Saved the trunk and the trained head to %s.", directory)
    return directory


def train_probe(
    config: ml_collections.ConfigDict, workdir: str, *, sources: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train a probe head on a frozen trunk, evaluate it and save it; see the module docstring.

    Args:
        config: a train-mode config.
        workdir: the run directory (checkpoints, metrics, feature cache, results, model).
        sources: optional {split: random-access source} replacing `config.data`'s sources.

    Returns:
        The results written to `workdir/results.json`.
    """
    sources = sources or {}
    setup = setup_probe_training(config, workdir, sources=sources)
    try:
        state = train_loop(setup, workdir)
        eval_metrics = evaluate_probe(
            setup, state, workdir, source=sources.get(config.data.eval_split)
        )
        export_model(setup, state, workdir)
    finally:
        setup.manager.close()
        close = getattr(setup.train_iter, "close", None)
        if close is not None:
            close()
    logging.info(
        "Probe on %s: top-1 %.4f, top-5 %.4f, loss %.4f over %d images.",
        config.data.eval_split,
        eval_metrics["top1"],
        eval_metrics["top5"],
        eval_metrics["loss"],
        eval_metrics["num_images"],
    )
    writer = metrics.MetricWriter(workdir, tensorboard=False)
    writer.write(int(config.total_steps), {f"probe/eval_{k}": v for k, v in eval_metrics.items()})
    writer.close()
    results = {
        **eval_metrics,
        "mode": "train",
        "split": config.data.eval_split,
        "trunk": setup.trunk.description,
        "head": config.head,
        "probe_layers": list(setup.model_config.probe_layers),
        "config": _config_record(config),
    }
    probe_lib.write_results(Path(workdir) / RESULTS_FILE, results)
    return results


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Run the stage that `config.mode` names."""
    if config.mode == "evaluate":
        return evaluate_checkpoint(config, workdir).metrics
    if config.mode == "train":
        return train_probe(config, workdir)
    raise ValueError(f"config.mode={config.mode!r} is invalid; expected one of {list(MODES)}.")


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags; called only when this module is the entry point."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Probe config file, e.g. configs/probe/fashion_mnist.py or "
        "configs/probe/imagenet_eval.py:aim-600M.",
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir", None, "Output directory: results.json, and in train mode checkpoints and model."
    )
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
