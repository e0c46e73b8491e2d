"""Model FLOP counts and the measured matmul peak, for throughput and MFU figures."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from aim_jax.registry import ModelConfig


def trunk_forward_flops(
    config: ModelConfig, num_tokens: int, num_blocks: int | None = None
) -> float:
    """FLOPs of one image through the patch embedding and `num_blocks` blocks (2 per MAC)."""
    d = config.embed_dim
    blocks = config.num_blocks if num_blocks is None else num_blocks
    patch = 2 * num_tokens * config.patch_dim * d
    linear = 2 * num_tokens * (3 * d * d + d * d + 2 * config.mlp_ratio * d * d)  # qkv, proj, MLP
    attention = 2 * 2 * num_tokens * num_tokens * d  # QK^T and AV
    return float(patch + blocks * (linear + attention))


def probe_forward_flops(config: ModelConfig, num_tokens: int) -> float:
    """FLOPs of one image through the attention-probe head."""
    d = config.embed_dim
    return float(2 * num_tokens * 2 * d * d + 2 * 2 * num_tokens * d + 2 * d * config.num_classes)


def prediction_head_flops(config: ModelConfig, num_tokens: int) -> float:
    """FLOPs of one image through the pre-training prediction head."""
    d, w = config.embed_dim, config.head_width
    per_token = d * w + config.head_depth * 2 * 4 * w * w + w * config.patch_dim
    return float(2 * num_tokens * per_token)


def classify_flops(config: ModelConfig, num_tokens: int, num_blocks: int | None = None) -> float:
    """Forward FLOPs per image of classification (trunk up to `num_blocks`, then the probe)."""
    return trunk_forward_flops(config, num_tokens, num_blocks) + probe_forward_flops(
        config, num_tokens
    )


def pretrain_step_flops(config: ModelConfig, num_tokens: int) -> float:
    """Training FLOPs per image of pre-training: forward plus backward, 3x the forward."""
    forward = trunk_forward_flops(config, num_tokens) + prediction_head_flops(config, num_tokens)
    return 3.0 * forward


@functools.cache
def measure_matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """Measure the FLOP/s of a square matmul on the default device, best of `repeats`.

    The result is cached per argument set, so repeated calls cost nothing.

    Args:
        dtype: input and output dtype name, "float32" or "bfloat16".
        size: side of the square matrices; one run is 2 * size**3 FLOPs.
        repeats: timed runs after one warm-up run; the fastest one counts.

    Returns:
        FLOP/s of the fastest run.
    """
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size and repeats must be positive, got size={size}, repeats={repeats}.")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((size, size), np.float32), jnp.dtype(dtype))
    b = jnp.asarray(rng.standard_normal((size, size), np.float32), jnp.dtype(dtype))
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
