"""Heads on top of the trunk: the attention probe and the pre-training prediction head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from aim_jax.layers import (
    Dtype,
    Mlp,
    layer_norm,
    logical,
    matrix_dot_general,
    sincos_pos_embed_2d,
)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis without scale or bias, with PyTorch's conventions.

    At inference it normalises with the running mean and variance, so an image's output
    never depends on the rest of the batch (the released probes expect this). In training
    it normalises with the biased batch variance and updates the running variance with the
    unbiased one, with `momentum` weighting the new batch, as `torch.nn.BatchNorm1d` does.
    Both variances are computed in two passes. Statistics live in the "batch_stats"
    collection as `mean`, `var` and `num_batches_tracked`.
    """

    epsilon: float = 1e-6
    momentum: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        tracked = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        x32 = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = x32.size // features
            mean = x32.mean(axis=axes)  # (D,)
            var = jnp.square(x32 - mean).mean(axis=axes)  # (D,) biased
            if not self.is_initializing():
                unbiased = var * count / max(count - 1, 1)
                ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
                tracked.value = tracked.value + 1
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)


class AttentionProbe(nn.Module):
    """Attention-probe classifier over frozen trunk tokens.

    BatchNorm (no affine), one learned query token split over `num_heads`, bias-free key and
    value projections, softmax attention with scale head_dim^-0.5, mean over queries, and a
    bias-free linear layer to the classes.
    """

    num_heads: int
    num_classes: int
    bn_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        x = BatchNorm(epsilon=self.bn_eps, name="bn")(x, train=train).astype(
            self.dtype
        )  # (B, N, D)
        cls_token = self.param(
            "cls_token", logical(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, dim)
        )

        def project(name):
            return nn.Dense(
                dim,
                use_bias=False,
                dtype=self.dtype,
                dot_general=matrix_dot_general,
                kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "heads"),
                name=name,
            )

        k = project("k")(x).reshape(batch, length, self.num_heads, head_dim)  # (B, N, H, hd)
        v = project("v")(x).reshape(batch, length, self.num_heads, head_dim)  # (B, N, H, hd)
        q = jnp.broadcast_to(jnp.asarray(cls_token, self.dtype), (batch, 1, dim))
        q = q.reshape(batch, 1, self.num_heads, head_dim)  # (B, 1, H, hd)
        scale = head_dim**-0.5
        if self.is_mutable_collection("intermediates"):
            # Explicit softmax so that the attention map can be stored for inspection.
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
            weights = jax.nn.softmax(logits, axis=-1)  # (B, H, 1, N)
            self.sow("intermediates", "attention", weights)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, scale=scale)  # (B, 1, H, hd)
        out = out.reshape(batch, 1, dim).mean(axis=1)  # (B, D): mean over queries
        logits = nn.Dense(
            self.num_classes,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=logical(nn.initializers.zeros_init(), "embed", "vocab"),
            name="linear",
        )(out)
        return logits.astype(jnp.float32)  # (B, classes)


class PredictionHead(nn.Module):
    """Pre-training head mapping trunk tokens to the pixels of the next patch.

    Position embeddings are added to the trunk output, then a linear map to `width`,
    `depth` residual MLP-only blocks (pre-LayerNorm, ratio 4, no bias), a final LayerNorm and
    a linear map to `patch_dim` values.
    """

    width: int
    depth: int
    patch_dim: int
    grid: tuple[int, int]
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        pos = sincos_pos_embed_2d(self.grid[0], self.grid[1], dim)  # (K, D)
        x = x + jnp.asarray(pos, x.dtype)[None]
        x = nn.Dense(
            self.width,
            dtype=self.dtype,
            dot_general=matrix_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "heads", "embed"),
            bias_init=logical(nn.initializers.zeros_init(), "embed"),
            name="input_proj",
        )(x)  # (B, K, W)
        for i in range(self.depth):
            h = layer_norm(self.norm_eps, self.dtype, f"blocks_{i}_norm")(x)
            x = x + Mlp(4 * self.width, self.dtype, name=f"blocks_{i}_mlp")(h)
        x = layer_norm(self.norm_eps, self.dtype, "norm")(x)
        out = nn.Dense(
            self.patch_dim,
            dtype=self.dtype,
            dot_general=matrix_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "vocab"),
            bias_init=logical(nn.initializers.zeros_init(), "vocab"),
            name="output_proj",
        )(x)
        return out.astype(jnp.float32)  # (B, K, patch_dim)
