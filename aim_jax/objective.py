"""The AIM pre-training objective: next-patch regression of normalised pixels.

With K patches in raster order and a prefix length S drawn per image uniformly from
1 .. K-1, the model attends prefix-causally and its output at position i regresses patch
i + 1. Each target patch is normalised by its own mean and variance over all its pixels and
channels, and the mean squared error is averaged over the target patches outside the prefix,
that is over positions i = S-1 .. K-2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TARGET_NORM_EPS = 1e-6


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Split NHWC images into raster-ordered patches.

    Args:
        images: (B, H, W, C).
        patch_size: side p of the square patches.

    Returns:
        (B, K, p * p * C) with each patch flattened in (row, column, channel) order, the
        same order as the prediction head's outputs.
    """
    batch, height, width, channels = images.shape
    p = patch_size
    x = images.reshape(batch, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)  # (B, K, ppC)


def unpatchify(patches: jax.Array, grid: tuple[int, int], patch_size: int) -> jax.Array:
    """Invert `patchify` for a (grid_h, grid_w) patch grid; returns (B, H, W, C)."""
    batch, _, dim = patches.shape
    p = patch_size
    channels = dim // (p * p)
    x = patches.reshape(batch, grid[0], grid[1], p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, p, w, p, C)
    return x.reshape(batch, grid[0] * p, grid[1] * p, channels)


def normalize_patches(patches: jax.Array, eps: float = TARGET_NORM_EPS) -> jax.Array:
    """Normalise each patch by its own mean and variance over all its values.

    A constant patch has zero variance and becomes zeros, never NaN, thanks to `eps`.
    """
    patches = patches.astype(jnp.float32)
    mean = patches.mean(axis=-1, keepdims=True)  # (B, K, 1)
    var = jnp.square(patches - mean).mean(axis=-1, keepdims=True)  # (B, K, 1), two-pass
    return (patches - mean) * jax.lax.rsqrt(var + eps)


def sample_prefix_lengths(rng: jax.Array, batch_size: int, num_patches: int) -> jax.Array:
    """Draw one prefix length per image, uniform in 1 .. num_patches - 1; returns (B,) int32."""
    if num_patches < 2:
        raise ValueError(f"The objective needs at least 2 patches per image, got {num_patches}.")
    return jax.random.randint(rng, (batch_size,), 1, num_patches, dtype=jnp.int32)


def target_mask(prefix_len: jax.Array, num_patches: int) -> jax.Array:
    """Mark the positions whose target (the next patch) lies outside the prefix.

    Position i predicts patch i + 1, which is outside the prefix when i + 1 >= S. The last
    position has no next patch.

    Returns:
        float32 (B, K - 1) mask over positions 0 .. K-2.
    """
    positions = jnp.arange(num_patches - 1)[None, :]  # (1, K-1)
    return (positions + 1 >= prefix_len[:, None]).astype(jnp.float32)  # (B, K-1)


def next_patch_loss(
    predictions: jax.Array, images: jax.Array, prefix_len: jax.Array, patch_size: int
) -> tuple[jax.Array, jax.Array]:
    """Mean squared error of next-patch predictions against normalised target patches.

    Args:
        predictions: (B, K, p * p * 3) outputs of `AIMPretrainer`.
        images: (B, H, W, 3) the model's input images.
        prefix_len: (B,) prefix lengths used for the attention mask.
        patch_size: p.

    Returns:
        `(loss, num_targets)`: the scalar loss averaged over every target patch outside the
        prefix in the batch, and the number of such patches.
    """
    targets = normalize_patches(patchify(images, patch_size))[:, 1:]  # (B, K-1, ppC)
    preds = predictions[:, :-1].astype(jnp.float32)  # (B, K-1, ppC)
    per_patch = jnp.square(preds - targets).mean(axis=-1)  # (B, K-1)
    mask = target_mask(prefix_len, targets.shape[1] + 1)  # (B, K-1)
    num_targets = mask.sum()
    loss = (per_patch * mask).sum() / jnp.maximum(num_targets, 1.0)
    return loss, num_targets
