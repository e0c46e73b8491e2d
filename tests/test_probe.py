"""Tests of aim_jax.probe: golden evaluation, metrics, probe training, feature cache, resume."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from aim_jax import checkpointing, feature_cache, probe, probe_lib, train
from aim_jax.conversion import convert_tensors, key_table
from aim_jax.input_pipeline import eval_preprocess
from aim_jax.pretrained import load_pretrained, restore_variables, save_pretrained
from aim_jax.registry import ModelConfig
from aim_jax.trunk import unstack_blocks

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO_ROOT.parent / "shared" / "golden" / "tiny_a"
GOLDEN_ATOL = 1e-5  # the golden files state that a float32 port matches to about 1e-6
RESULT_KEYS = {"top1", "top5", "loss", "num_images"}


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    path = REPO_ROOT / "configs" / "probe" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"probe_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def numpy_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy computed independently in float64."""
    logits = logits.astype(np.float64)
    order = np.argsort(-logits, axis=1)
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([label in row[:5] for row, label in zip(order, labels, strict=True)])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -np.mean(log_probs[np.arange(len(labels)), labels])
    return {"top1": top1, "top5": top5, "loss": loss}


# ----------------------------------------------------------------------------------------
# Evaluate mode on the golden checkpoint.


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """Return (converted checkpoint dir, expected arrays, NHWC images) of tiny_a."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN}")
    config = ModelConfig(**json.loads((GOLDEN / "config.json").read_text()))
    state = torch.load(GOLDEN / "backbone.pth", map_location="cpu", weights_only=True)
    state.update(torch.load(GOLDEN / "head.pth", map_location="cpu", weights_only=True))
    variables = convert_tensors(key_table(config), state.keys(), lambda k: state[k].numpy())
    directory = save_pretrained(tmp_path_factory.mktemp("golden") / "tiny_a", config, variables)
    expected = dict(np.load(GOLDEN / "expected.npz"))
    images = expected["images_nchw"].transpose(0, 2, 3, 1)  # (3, H, W, 3)
    return directory, expected, images


def eval_config(checkpoint, **mesh) -> ml_collections.ConfigDict:
    config = load_config("imagenet_eval", "aim-600M,runlocal")
    config.checkpoint = str(checkpoint)
    config.model_name = ""
    config.probe_layers = "1,2"  # tiny_a's head
    config.batch_size = 8
    config.data.image_size = 56
    config.mesh.update(mesh)
    return config


def golden_batches(images: np.ndarray, labels: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Two batches of 8: images 0 and 1 with padding in between, then image 2 and padding.

    Padding entries hold large random images and label 0, so that counting them would change
    every metric.
    """
    rng = np.random.default_rng(0)
    batches = []
    for placement in ({0: 0, 2: 1}, {0: 2}):
        batch = {
            "image": rng.normal(0, 5, (8, *images.shape[1:])).astype(np.float32),
            "label": np.zeros((8,), np.int32),
            "valid": np.zeros((8,), bool),
            "index": np.full((8,), -1, np.int32),
        }
        for slot, image_index in placement.items():
            batch["image"][slot] = images[image_index]
            batch["label"][slot] = labels[image_index]
            batch["valid"][slot] = True
            batch["index"][slot] = image_index
        batches.append(batch)
    return batches


def golden_labels(logits: np.ndarray) -> np.ndarray:
    """Labels giving one top-1 hit, one top-5-only hit and one miss."""
    order = np.argsort(-logits, axis=1)
    return np.array([order[0, 0], order[1, 2], order[2, -1]], np.int32)


@pytest.mark.parametrize("mesh", [{"data": -1, "fsdp": 1}, {"data": 4, "fsdp": 2}])
def test_evaluate_golden_logits_and_metrics(golden, tmp_path, mesh):
    directory, expected, images = golden
    labels = golden_labels(expected["logits"])
    config = eval_config(directory, **mesh)
    output = probe.evaluate_checkpoint(
        config, str(tmp_path), batches=golden_batches(images, labels), collect_logits=True
    )

    np.testing.assert_allclose(output.logits, expected["logits"], rtol=0, atol=GOLDEN_ATOL)
    np.testing.assert_array_equal(output.labels, labels)
    reference = numpy_metrics(expected["logits"], labels)
    assert reference["top1"] == pytest.approx(1 / 3)
    assert reference["top5"] == pytest.approx(2 / 3)
    for key in ("top1", "top5"):
        assert output.metrics[key] == pytest.approx(reference[key], abs=1e-12)
    assert output.metrics["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert output.metrics["num_images"] == 3

    results = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["num_images"] == 3
    assert results["probe_layers"] == [1, 2]
    assert results["loss"] == pytest.approx(reference["loss"], abs=1e-5)


def test_evaluate_rejects_other_probe_layers(golden, tmp_path):
    directory, _, _ = golden
    config = eval_config(directory)
    config.probe_layers = "last"  # blocks 0-3 of a 4-block trunk; the head used 1 and 2
    with pytest.raises(ValueError, match="trained on blocks \\[1, 2\\]"):
        probe.evaluate_checkpoint(config, str(tmp_path), batches=[])


def test_evaluate_input_pipeline_counts_each_image_once(golden, tmp_path):
    directory, _, _ = golden
    rng = np.random.default_rng(1)
    records = [
        {"image": rng.integers(0, 256, (70, 60, 3), dtype=np.uint8), "label": int(i % 10)}
        for i in range(5)
    ]
    config = eval_config(directory)
    output = probe.evaluate_checkpoint(config, str(tmp_path), source=records, collect_logits=True)

    model, variables = load_pretrained(directory)
    images = np.stack(
        [eval_preprocess(Image.fromarray(r["image"]), (56, 56), True) for r in records]
    )  # (5, 56, 56, 3)
    logits = np.asarray(model.apply(variables, images))
    labels = np.array([r["label"] for r in records])
    np.testing.assert_allclose(output.logits, logits, rtol=0, atol=GOLDEN_ATOL)
    reference = numpy_metrics(logits, labels)
    assert output.metrics["num_images"] == 5  # 3 padding entries of the batch of 8 excluded
    assert output.metrics["top1"] == pytest.approx(reference["top1"], abs=1e-12)
    assert output.metrics["top5"] == pytest.approx(reference["top5"], abs=1e-12)
    assert output.metrics["loss"] == pytest.approx(reference["loss"], abs=1e-5)


@pytest.mark.parametrize("kind", probe_lib.HEADS)
def test_probe_step_skips_non_finite_batch(kind):
    config = train_config(optimizer={"init_lr": 0.01})  # nonzero learning rate at step 0
    head = probe_lib.create_head(kind, tiny_model_config())
    tx, schedule = train.create_optimizer(config)
    step = jax.jit(
        probe_lib.make_probe_train_step(head, tx, schedule, lambda _, features: features)
    )
    state = nn.meta.unbox(probe_lib.init_probe_state(head, tx, (8, 32), jax.random.key(0)))
    rng = np.random.default_rng(3)
    features = rng.normal(size=(4, 8, 32)).astype(np.float32)  # (B, N, D)
    labels = np.arange(4, dtype=np.int32) % NUM_CLASSES

    good, good_metrics = step(state, features, labels, None)
    assert bool(good_metrics["probe/finite"])
    assert not np.array_equal(good.params["linear"]["kernel"], state.params["linear"]["kernel"])
    for new, old in zip(
        jax.tree.leaves(good.batch_stats), jax.tree.leaves(state.batch_stats), strict=True
    ):
        assert not np.array_equal(new, old)

    features[1, 2, 3] = np.nan
    skipped, skipped_metrics = step(good, features, labels, None)
    assert not bool(skipped_metrics["probe/finite"])
    assert int(skipped.step) == int(good.step) + 1
    for field in ("params", "batch_stats", "opt_state"):
        new_leaves = jax.tree.leaves(getattr(skipped, field))
        for new, old in zip(new_leaves, jax.tree.leaves(getattr(good, field)), strict=True):
            np.testing.assert_array_equal(new, old, err_msg=field)


def test_classification_sums_ties_and_few_classes():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 2.0, 1.0]], np.float32)
    labels = np.array([1, 0, 2], np.int32)
    valid = np.array([True, True, False])
    sums = jax.device_get(probe_lib.classification_sums(logits, labels, valid))
    assert int(sums["count"]) == 2
    assert int(sums["top1"]) == 1  # a tie with the maximum counts as a hit
    assert int(sums["top5"]) == 2  # with 3 classes every label is in the top 5
    expected_loss = np.log(2 * np.e + 1) - 1 + np.log(1 + np.e + np.e**2)
    assert float(sums["loss"]) == pytest.approx(expected_loss, rel=1e-6)


# ----------------------------------------------------------------------------------------
# Probe training on a learnable synthetic set with a random trunk.

NUM_CLASSES = 4


def synthetic_records(count: int, seed: int) -> list[dict]:
    """16x16 noise images; class c brightens quadrant c in colour channel c (all for c = 3)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        label = i % NUM_CLASSES
        image = rng.integers(0, 140, (16, 16, 3)).astype(np.int32)
        row, col = divmod(label, 2)
        channels = slice(label, label + 1) if label < 3 else slice(0, 3)
        image[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8, channels] += 100
        records.append({"image": image.astype(np.uint8), "label": label})
    return records


@pytest.fixture(scope="module")
def synthetic_sources():
    return {"train": synthetic_records(256, seed=0), "test": synthetic_records(64, seed=1)}


def tiny_model_config() -> ModelConfig:
    return ModelConfig(
        embed_dim=32,
        num_blocks=2,
        num_heads=2,
        patch_size=4,
        img_size=(16, 16),
        probe_layers=(0, 1),
        num_classes=NUM_CLASSES,
        head_width=32,
        head_depth=1,
    )


def train_config(trunk: pathlib.Path | None = None, **changes) -> ml_collections.ConfigDict:
    """The Fashion-MNIST probe config shrunk to the synthetic set and a tiny trunk."""
    config = load_config("fashion_mnist", "random,runlocal")
    config.model = ml_collections.ConfigDict(tiny_model_config().to_dict())
    if trunk is not None:
        config.trunk.source = "pretrained"
        config.trunk.checkpoint = str(trunk)
    config.num_classes = NUM_CLASSES
    config.data.source = "folder"  # replaced by the in-memory sources
    config.data.image_size = 16
    config.data.eval_center_crop = False
    config.batch_size = 32
    config.eval_batch_size = 32
    config.cache_dtype = "float32"
    config.log_every_steps = 50
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


@pytest.fixture(scope="module")
def trunk_dir(tmp_path_factory):
    """A random tiny trunk from the "random" source, saved as a pretrained directory."""
    config = train_config()
    trunk = probe_lib.read_trunk(config)
    again = probe_lib.random_trunk(tiny_model_config(), int(config.seed))
    other = probe_lib.random_trunk(tiny_model_config(), int(config.seed) + 1)
    leaves = jax.tree.leaves(trunk.variables)
    for a, b in zip(leaves, jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(
        not np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(other), strict=True)
    )
    directory = tmp_path_factory.mktemp("trunk") / "random_trunk"
    return save_pretrained(directory, trunk.model_config, trunk.variables)


ATTENTION_STEPS = 150


def attention_config(trunk: pathlib.Path) -> ml_collections.ConfigDict:
    return train_config(
        trunk,
        total_steps=ATTENTION_STEPS,
        checkpoint_every_steps=ATTENTION_STEPS // 2,
        optimizer={"peak_lr": 3e-3},
    )


@pytest.fixture(scope="module")
def attention_run(trunk_dir, synthetic_sources, tmp_path_factory):
    """Return (workdir, results) of an attention probe trained without interruption."""
    workdir = tmp_path_factory.mktemp("attention")
    config = attention_config(trunk_dir)
    results = probe.train_probe(config, str(workdir), sources=synthetic_sources)
    return workdir, results


def read_model(workdir) -> dict:
    return restore_variables(pathlib.Path(workdir) / "model")


def test_train_attention_probe_learns(attention_run):
    workdir, results = attention_run
    # Measured: top-1 1.0 on the 64 test images after 150 steps (chance is 0.25).
    assert results["top1"] >= 0.85
    assert results["num_images"] == 64
    assert RESULT_KEYS | {"config"} <= set(results)
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["top1"] == results["top1"]
    assert saved["config"]["trunk"]["source"] == "pretrained"
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "probe/loss" in line]
    assert train_lines[-1]["step"] == ATTENTION_STEPS
    assert {"probe/top1", "probe/lr", "probe/grad_norm"} <= set(train_lines[-1])
    assert train_lines[-1]["probe/loss"] < train_lines[0]["probe/loss"]
    assert lines[-1]["probe/eval_top1"] == results["top1"]


def test_exported_probe_loads_and_classifies(attention_run, synthetic_sources):
    workdir, results = attention_run
    model, variables = load_pretrained(workdir / "model")
    records = synthetic_sources["test"]
    images = np.stack(
        [eval_preprocess(Image.fromarray(r["image"]), (16, 16), False) for r in records]
    )  # (64, 16, 16, 3)
    labels = np.array([r["label"] for r in records])
    logits = np.asarray(model.apply(variables, images))  # (64, classes)
    reference = numpy_metrics(logits, labels)
    assert reference["top1"] == pytest.approx(results["top1"], abs=1e-12)
    assert reference["loss"] == pytest.approx(results["loss"], abs=1e-5)


def test_train_batchnorm_stats_follow_pytorch(attention_run):
    workdir, _ = attention_run
    cache = feature_cache.load_cache(
        feature_cache.split_directory(workdir, "train"), probe._stored_key(str(workdir), "train")
    )
    # PyTorch's BatchNorm1d rule: running = 0.9 * running + 0.1 * batch statistic, with the
    # unbiased variance over all (image, token) rows of the batch.
    mean, var = np.zeros(32), np.ones(32)
    for step in range(ATTENTION_STEPS):
        rows = feature_cache.batch_rows(cache.valid_rows, 32, 0, step)
        x = np.asarray(cache.features[rows], np.float64).reshape(-1, 32)  # (B * N, D)
        mean = 0.9 * mean + 0.1 * x.mean(axis=0)
        var = 0.9 * var + 0.1 * x.var(axis=0, ddof=1)
    stats = read_model(workdir)["batch_stats"]["head"]["bn"]
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-4, atol=1e-5)
    assert int(stats["num_batches_tracked"]) == ATTENTION_STEPS


def count_builds(monkeypatch) -> list:
    calls = []
    original = feature_cache.build_cache

    def counting(directory, *args, **kwargs):
        calls.append(pathlib.Path(directory).name)
        return original(directory, *args, **kwargs)

    monkeypatch.setattr(feature_cache, "build_cache", counting)
    return calls


def test_resume_reuses_cache_and_is_exact(
    attention_run, trunk_dir, synthetic_sources, tmp_path, monkeypatch
):
    calls = count_builds(monkeypatch)
    config = attention_config(trunk_dir)

    class Interrupted(Exception):
        pass

    original = feature_cache.training_batch
    interrupt_step = ATTENTION_STEPS // 2 + 10  # 0-based, after the mid-run checkpoint

    def interrupting(cache, batch_size, seed, step):
        if step == interrupt_step:
            raise Interrupted
        return original(cache, batch_size, seed, step)

    monkeypatch.setattr(feature_cache, "training_batch", interrupting)
    with pytest.raises(Interrupted):
        probe.train_probe(config, str(tmp_path), sources=synthetic_sources)
    assert sorted(calls) == ["test", "train"]
    features = tmp_path / "feature_cache" / "train" / "features.npy"
    mtime = features.stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(feature_cache, "training_batch", original)
    results = probe.train_probe(config, str(tmp_path), sources=synthetic_sources)
    assert calls == []  # the trunk did not run again
    assert features.stat().st_mtime_ns == mtime

    full_dir, full_results = attention_run
    full, resumed = read_model(full_dir), read_model(tmp_path)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert results["top1"] == full_results["top1"]
    assert results["loss"] == full_results["loss"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "probe/loss" in line]
    assert steps == sorted(set(steps))  # no training step logged twice


def test_feature_cache_invalidated_by_probe_layers(
    attention_run, trunk_dir, synthetic_sources, tmp_path, monkeypatch
):
    workdir, _ = attention_run
    shutil.copytree(workdir / "feature_cache", tmp_path / "feature_cache")
    calls = count_builds(monkeypatch)
    config = train_config(trunk_dir, total_steps=1, checkpoint_every_steps=1, probe_layers="1")
    probe.train_probe(config, str(tmp_path), sources=synthetic_sources)
    assert sorted(calls) == ["test", "train"]
    key = json.loads((tmp_path / "feature_cache" / "train" / "key.json").read_text())
    assert key["key"]["model"]["probe_layers"] == [1]


def test_resume_rejects_another_trunk(attention_run, synthetic_sources, tmp_path):
    workdir, _ = attention_run
    trunk_dir = pathlib.Path(attention_run[1]["config"]["trunk"]["checkpoint"])
    model_config, variables = probe_lib.read_pretrained_trunk(trunk_dir)
    variables["params"]["trunk"]["blocks_1"]["mlp"]["fc1"]["kernel"] += 1e-3
    other = save_pretrained(tmp_path / "other_trunk", model_config, variables)
    with pytest.raises(ValueError, match="differs from the one"):
        probe.train_probe(attention_config(other), str(workdir), sources=synthetic_sources)


def test_linear_probe_export_matches_evaluation(trunk_dir, synthetic_sources, tmp_path):
    config = train_config(trunk_dir, head="linear", total_steps=60, checkpoint_every_steps=60)
    config.optimizer.peak_lr = 1e-2
    results = probe.train_probe(config, str(tmp_path / "train"), sources=synthetic_sources)
    assert results["top1"] >= 0.6  # measured 0.95; chance is 0.25

    # The exported attention probe must reproduce the linear head's evaluation.
    evaluation = load_config("imagenet_eval", "aim-600M,runlocal")
    evaluation.checkpoint = str(tmp_path / "train" / "model")
    evaluation.model_name = ""
    evaluation.probe_layers = "checkpoint"
    evaluation.data.image_size = 16
    evaluation.data.eval_center_crop = False
    evaluation.batch_size = 32
    output = probe.evaluate_checkpoint(
        evaluation, str(tmp_path / "eval"), source=synthetic_sources["test"]
    )
    assert output.metrics["num_images"] == 64
    assert output.metrics["top1"] == pytest.approx(results["top1"], abs=1e-12)
    assert output.metrics["loss"] == pytest.approx(results["loss"], abs=1e-5)


def test_train_on_images_without_cache(trunk_dir, synthetic_sources, tmp_path):
    config = train_config(trunk_dir, total_steps=3, checkpoint_every_steps=3, cache_features=False)
    results = probe.train_probe(config, str(tmp_path), sources=synthetic_sources)
    assert not (tmp_path / "feature_cache").exists()
    assert results["num_images"] == 64
    assert np.isfinite(results["loss"])
    stats = read_model(tmp_path)["batch_stats"]["head"]["bn"]
    assert int(stats["num_batches_tracked"]) == 3


# ----------------------------------------------------------------------------------------
# Trunk sources and configs.


@pytest.mark.parametrize("scan", [False, True])
def test_read_pretrain_workdir_returns_latest_trunk(tmp_path, scan):
    pretrain = ml_collections.ConfigDict(
        {
            "model": tiny_model_config().to_dict(),
            "dtype": "float32",
            "scan": scan,
            "remat_policy": "none",
            "total_steps": 10,
            "checkpoint_every_steps": 1,
            "keep_checkpoints": 3,
            "data": {"image_size": 16},
            "optimizer": {
                "init_lr": 0.0,
                "peak_lr": 1e-3,
                "warmup_fraction": 0.1,
                "b1": 0.9,
                "b2": 0.95,
                "eps": 1e-8,
                "weight_decay": 0.05,
                "clip_norm": 1.0,
            },
        }
    )
    model, _ = train.create_model(pretrain)
    tx, _ = train.create_optimizer(pretrain)
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(train.init_state(model, tx, pretrain, jax.random.key(0)))
    )
    manager = checkpointing.checkpoint_manager_from_config(tmp_path, pretrain)
    states = {}
    for step in (3, 7):
        rng = np.random.default_rng(step)
        states[step] = jax.tree.map(
            lambda leaf, rng=rng: rng.normal(size=leaf.shape).astype(leaf.dtype), abstract
        )
        checkpointing.save_checkpoint(manager, step, states[step], config=pretrain, force=True)
    manager.wait_until_finished()
    manager.close()

    step, model_config, variables = probe_lib.read_pretrain_workdir(tmp_path)
    assert step == 7
    assert model_config == tiny_model_config()
    expected = states[7].params
    if scan:
        expected = {**expected, "trunk": unstack_blocks(expected["trunk"])}
    assert set(variables["params"]) == {"patch_embed", "trunk"}
    for key in ("patch_embed", "trunk"):
        got, want = variables["params"][key], expected[key]
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert probe_lib.read_pretrain_workdir(tmp_path, step=3)[0] == 3
    with pytest.raises(FileNotFoundError, match="complete steps: \\[3, 7\\]"):
        probe_lib.read_pretrain_workdir(tmp_path, step=5)


def test_fashion_mnist_configs_load():
    pretrain_spec = importlib.util.spec_from_file_location(
        "pretrain_fashion_mnist", REPO_ROOT / "configs" / "fashion_mnist.py"
    )
    module = importlib.util.module_from_spec(pretrain_spec)
    pretrain_spec.loader.exec_module(module)
    pretrain_model = module.get_config().model.to_dict()

    default = load_config("fashion_mnist")
    assert default.mode == "train"
    assert default.trunk.source == "pretrain_workdir"
    assert default.trunk.workdir == "workdirs/fashion_mnist"
    assert default.data.image_size == 28
    assert default.model.to_dict() == pretrain_model
    assert load_config("fashion_mnist", "random").trunk.source == "random"
    assert load_config("fashion_mnist", "linear").head == "linear"
    assert load_config("fashion_mnist", "runlocal").total_steps < default.total_steps
    with pytest.raises(ValueError, match="Unknown config variants"):
        load_config("fashion_mnist", "huge")


@pytest.mark.parametrize("variant", ["aim-600M", "aim-1B", "aim-3B", "aim-7B"])
def test_imagenet_eval_configs_load(variant):
    config = load_config("imagenet_eval", variant)
    assert config.mode == "evaluate"
    assert config.model_name == variant
    assert config.data.image_size == 224
    fsdp = variant in ("aim-3B", "aim-7B")
    assert (config.mesh.fsdp == -1) == fsdp
