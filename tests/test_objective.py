"""Tests of the next-patch objective against numpy re-implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aim_jax import objective


def numpy_patchify(images, p):
    """Raster-ordered patches by explicit loops: patch k is row k // w, column k % w."""
    batch, height, width, channels = images.shape
    rows, cols = height // p, width // p
    out = np.zeros((batch, rows * cols, p * p * channels), images.dtype)
    for b in range(batch):
        for r in range(rows):
            for c in range(cols):
                patch = images[b, r * p : (r + 1) * p, c * p : (c + 1) * p, :]  # (p, p, C)
                out[b, r * cols + c] = patch.reshape(-1)
    return out


def numpy_normalize(patches, eps=1e-6):
    patches = patches.astype(np.float64)
    mean = patches.mean(axis=-1, keepdims=True)
    var = ((patches - mean) ** 2).mean(axis=-1, keepdims=True)
    return (patches - mean) / np.sqrt(var + eps)


def numpy_next_patch_loss(predictions, images, prefix_len, p):
    """Per image: mean over patches t = S .. K-1 of the MSE of prediction t-1 vs target t."""
    targets = numpy_normalize(numpy_patchify(images, p))  # (B, K, ppC)
    total, count = 0.0, 0
    for b in range(images.shape[0]):
        for t in range(int(prefix_len[b]), targets.shape[1]):
            total += np.mean((predictions[b, t - 1].astype(np.float64) - targets[b, t]) ** 2)
            count += 1
    return total / count, count


def test_patchify_raster_order_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 12, 8, 3)).astype(np.float32)
    patches = objective.patchify(jnp.asarray(images), 4)
    np.testing.assert_array_equal(np.asarray(patches), numpy_patchify(images, 4))


def test_unpatchify_inverts_patchify():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 12, 8, 3)).astype(np.float32)
    patches = objective.patchify(jnp.asarray(images), 4)
    restored = objective.unpatchify(patches, (3, 2), 4)
    np.testing.assert_array_equal(np.asarray(restored), images)


def test_patchify_first_row_then_second():
    # A 2x2 grid of constant patches numbered in raster order.
    image = np.zeros((1, 4, 4, 3), np.float32)
    image[0, :2, 2:] = 1.0  # top right
    image[0, 2:, :2] = 2.0  # bottom left
    image[0, 2:, 2:] = 3.0  # bottom right
    patches = np.asarray(objective.patchify(jnp.asarray(image), 2))
    np.testing.assert_array_equal(patches[0, :, 0], [0.0, 1.0, 2.0, 3.0])


def test_normalize_patches_matches_two_pass_numpy():
    rng = np.random.default_rng(2)
    # A large common offset: one-pass E[x^2] - E[x]^2 variance would lose the signal.
    patches = (4000.0 + rng.normal(size=(2, 5, 48))).astype(np.float32)
    normalized = objective.normalize_patches(jnp.asarray(patches))
    np.testing.assert_allclose(np.asarray(normalized), numpy_normalize(patches), atol=2e-3)
    np.testing.assert_allclose(np.asarray(normalized).std(axis=-1), 1.0, atol=1e-3)


def test_normalize_constant_patch_gives_zeros():
    patches = jnp.full((1, 2, 12), 0.7, jnp.float32)
    normalized = np.asarray(objective.normalize_patches(patches))
    assert np.all(np.isfinite(normalized))
    # The float32 mean of twelve 0.7s is off by about 6e-8, which eps = 1e-6 scales by 1000.
    np.testing.assert_allclose(normalized, 0.0, atol=1e-4)
    exact = np.asarray(objective.normalize_patches(jnp.full((1, 2, 12), 0.5, jnp.float32)))
    np.testing.assert_array_equal(exact, 0.0)  # 0.5 and its mean are exact in float32


def test_prefix_lengths_uniform_in_range():
    num_patches = 9
    lengths = np.asarray(objective.sample_prefix_lengths(jax.random.key(0), 40_000, num_patches))
    assert lengths.dtype == np.int32
    assert lengths.min() == 1
    assert lengths.max() == num_patches - 1
    counts = np.bincount(lengths, minlength=num_patches)
    assert counts[0] == 0
    expected = len(lengths) / (num_patches - 1)
    # 5 standard deviations of a binomial count; the test is deterministic for this key.
    tolerance = 5 * np.sqrt(expected * (1 - 1 / (num_patches - 1)))
    np.testing.assert_allclose(counts[1:], expected, atol=tolerance)


def test_prefix_lengths_reject_single_patch():
    with pytest.raises(ValueError, match="at least 2 patches"):
        objective.sample_prefix_lengths(jax.random.key(0), 4, 1)


def test_target_mask_marks_targets_outside_prefix():
    mask = np.asarray(objective.target_mask(jnp.array([1, 3, 4]), 5))
    # Position i (0 .. K-2) predicts patch i + 1 and counts when i + 1 >= S.
    expected = np.array(
        [
            [1, 1, 1, 1],  # S = 1: targets 1 .. 4
            [0, 0, 1, 1],  # S = 3: targets 3, 4
            [0, 0, 0, 1],  # S = 4: target 4
        ],
        np.float32,
    )
    np.testing.assert_array_equal(mask, expected)


def test_next_patch_loss_matches_numpy_reference():
    rng = np.random.default_rng(3)
    p, batch = 2, 3
    images = rng.normal(size=(batch, 6, 4, 3)).astype(np.float32)  # K = 6 patches
    prefix_len = np.array([1, 3, 5], np.int32)
    targets = numpy_normalize(numpy_patchify(images, p))  # (B, K, ppC)
    num_patches, dim = targets.shape[1], targets.shape[2]
    # Predictions built by hand: position i contains target i+1 plus noise of size 0.1 * (i + 1),
    # so the right objective, a same-position loss and a loss over prefix targets all differ.
    predictions = np.zeros((batch, num_patches, dim), np.float32)
    for i in range(num_patches):
        noise = 0.1 * (i + 1) * rng.normal(size=(batch, dim))
        source = targets[:, i + 1] if i + 1 < num_patches else np.zeros((batch, dim))
        predictions[:, i] = source + noise

    loss, count = objective.next_patch_loss(
        jnp.asarray(predictions), jnp.asarray(images), jnp.asarray(prefix_len), p
    )
    expected, expected_count = numpy_next_patch_loss(predictions, images, prefix_len, p)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert int(count) == expected_count
    assert expected_count == 5 + 3 + 1  # targets after prefixes 1, 3 and 5 of K = 6

    same_position = np.mean(
        [
            np.mean((predictions[b, t] - targets[b, t]) ** 2)
            for b in range(batch)
            for t in range(prefix_len[b], num_patches)
        ]
    )
    with_prefix_targets = np.mean(
        [
            np.mean((predictions[b, t - 1] - targets[b, t]) ** 2)
            for b in range(batch)
            for t in range(1, num_patches)
        ]
    )
    assert abs(same_position - expected) > 0.1
    assert abs(with_prefix_targets - expected) > 0.01
    assert abs(float(loss) - same_position) > 0.1
    assert abs(float(loss) - with_prefix_targets) > 0.01


def test_next_patch_loss_ignores_prefix_predictions():
    rng = np.random.default_rng(4)
    images = rng.normal(size=(1, 4, 4, 3)).astype(np.float32)  # K = 4
    predictions = rng.normal(size=(1, 4, 12)).astype(np.float32)
    prefix_len = jnp.array([3])
    loss, _ = objective.next_patch_loss(
        jnp.asarray(predictions), jnp.asarray(images), prefix_len, 2
    )
    # Positions 0 and 1 predict prefix patches 1 and 2, and position 3 has no target.
    changed = predictions.copy()
    changed[0, [0, 1, 3]] += 100.0
    changed_loss, _ = objective.next_patch_loss(
        jnp.asarray(changed), jnp.asarray(images), prefix_len, 2
    )
    assert float(changed_loss) == float(loss)
    changed[0, 2] += 1.0
    moved_loss, _ = objective.next_patch_loss(
        jnp.asarray(changed), jnp.asarray(images), prefix_len, 2
    )
    assert float(moved_loss) != float(loss)
