"""Tests for the `python -m aim_jax.classify` command and the ImageNet-1k class names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import image_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from aim_jax import classify, imagenet_classes
from aim_jax.models import AIM
from aim_jax.preprocessing import preprocess
from aim_jax.pretrained import load_pretrained, save_pretrained
from aim_jax.registry import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
# The command runs the model under jax.jit and the test runs it eagerly. In float32 their
# logits, which reach 170 here, differ by up to 4e-5, and the probabilities by up to 3e-6.
PROBABILITY_TOLERANCE = 1e-5
# One printed prediction: rank, probability, [class index], name.
PREDICTION_LINE = re.compile(r"^  (\d+)\. (\d\.\d{6})  \[(\d+)\] (.+)$")


def _tiny_variable(path, shape: jax.ShapeDtypeStruct, rng: np.random.Generator) -> np.ndarray:
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']") or name.endswith("['var']"):
        return np.ones(shape.shape, shape.dtype)
    if any(name.endswith(f"['{zero}']") for zero in ("bias", "mean", "num_batches_tracked")):
        return np.zeros(shape.shape, shape.dtype)
    # A large classifier spreads the logits, so that the top classes are well separated.
    std = 3.0 if "['linear']" in name else 0.2
    return (std * rng.standard_normal(shape.shape)).astype(shape.dtype)


def write_tiny_checkpoint(directory: Path, num_classes: int) -> Path:
    """Save a 2-block, width-32 model with random weights for 28 x 42 inputs.

    The variables are filled from the shapes that `jax.eval_shape` traces, which is much
    faster on a CPU than running `model.init`.
    """
    config = ModelConfig(
        name="tiny-classifier",
        embed_dim=32,
        num_blocks=2,
        num_heads=2,
        patch_size=14,
        img_size=(28, 42),
        probe_layers=(0, 1),
        num_classes=num_classes,
    )
    shapes = jax.eval_shape(
        lambda: nn.meta.unbox(AIM(config).init(jax.random.key(0), jnp.zeros((1, 28, 42, 3))))
    )
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map_with_path(lambda p, s: _tiny_variable(p, s, rng), shapes)
    return save_pretrained(directory, config, variables)


def run_classify(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "aim_jax.classify", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def parse_output(stdout: str) -> dict[str, list[tuple[int, float, str]]]:
    """Map each printed image path to its (class index, probability, name) lines."""
    results: dict[str, list[tuple[int, float, str]]] = {}
    current = None
    for line in stdout.splitlines():
        match = PREDICTION_LINE.match(line)
        if match:
            rank, probability, index, name = match.groups()
            assert int(rank) == len(results[current]) + 1
            results[current].append((int(index), float(probability), name))
        else:
            current = line
            results[current] = []
    return results


def numpy_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return image_fixtures.write_image_variants(tmp_path_factory.mktemp("photos"))


def test_classify_prints_softmax_of_logits(photos, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint", num_classes=1000)
    paths = [str(photos[name]) for name in ("jpeg_rgb", "png_gray", "png_rgba")]

    # Three images with --batch_size=2 also run a padded final batch.
    result = run_classify(*paths, f"--checkpoint={checkpoint}", "--top_k=5", "--batch_size=2")

    assert result.returncode == 0, result.stderr
    printed = parse_output(result.stdout)
    assert list(printed) == paths
    model, variables = load_pretrained(checkpoint)
    logits = np.asarray(model.apply(variables, preprocess(paths, image_size=(28, 42))))
    probabilities = numpy_softmax(logits)  # (3, 1000)
    names = imagenet_classes.class_names()
    for path, row in zip(paths, probabilities, strict=True):
        expected_indices = np.argsort(-row)[:5]
        assert [index for index, _, _ in printed[path]] == expected_indices.tolist()
        printed_probabilities = np.array([p for _, p, _ in printed[path]])
        np.testing.assert_allclose(
            printed_probabilities, row[expected_indices], atol=PROBABILITY_TOLERANCE
        )
        assert [name for _, _, name in printed[path]] == [names[i] for i in expected_indices]
    # The random classifier is confident enough that the printed values are informative.
    assert probabilities.max(axis=-1).min() > 0.05


def test_classify_reports_bad_images(photos, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "checkpoint", num_classes=10)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("plain text\n")
    missing = tmp_path / "missing.png"
    good = str(photos["jpeg_cmyk"])

    result = run_classify(
        str(not_an_image), good, str(missing), f"--checkpoint={checkpoint}", "--top_k=3"
    )

    assert result.returncode == 1
    assert str(not_an_image) in result.stderr
    assert str(missing) in result.stderr
    printed = parse_output(result.stdout)
    assert list(printed) == [good]
    model, variables = load_pretrained(checkpoint)
    row = numpy_softmax(np.asarray(model.apply(variables, preprocess([good], (28, 42)))))[0]
    expected_indices = np.argsort(-row)[:3]
    assert [(index, name) for index, _, name in printed[good]] == [
        (int(i), f"class {i}") for i in expected_indices
    ]
    np.testing.assert_allclose(
        [p for _, p, _ in printed[good]], row[expected_indices], atol=PROBABILITY_TOLERANCE
    )


def test_classify_missing_checkpoint_fails(photos, tmp_path):
    result = run_classify(str(photos["png_rgb"]), f"--checkpoint={tmp_path / 'absent'}")

    assert result.returncode == 2
    assert "absent" in result.stderr
    assert result.stdout == ""


def test_imagenet_class_names_known_indices():
    names = imagenet_classes.class_names()
    ids = imagenet_classes.wordnet_ids()

    assert len(names) == len(ids) == 1000
    assert (ids[0], names[0]) == ("n01440764", "tench, Tinca tinca")
    assert (ids[1], names[1]) == ("n01443537", "goldfish, Carassius auratus")
    assert (ids[281], names[281]) == ("n02123045", "tabby, tabby cat")
    assert (ids[999], names[999]) == (
        "n15075141",
        "toilet tissue, toilet paper, bathroom tissue",
    )
    assert list(ids) == sorted(ids)


def test_class_names_other_heads():
    assert classify.class_names(3) == ["class 0", "class 1", "class 2"]
    assert classify.class_names(1000)[281] == "tabby, tabby cat"


def test_top_k_order_and_ties():
    probabilities = np.array([0.1, 0.3, 0.05, 0.3, 0.25])

    assert classify.top_k(probabilities, 3) == [(1, 0.3), (3, 0.3), (4, 0.25)]
    assert len(classify.top_k(probabilities, 10)) == 5
