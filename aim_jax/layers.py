"""Building blocks of the AIM trunk: patch embedding, position embedding, attention, MLP.

Parameters carry logical axis names ("embed", "mlp", "qkv", "heads", "norm", "patch",
"vocab") so that `aim_jax.sharding` can place them on any mesh; nothing here names a device.
Activations are constrained with ("batch", "length", "embed"), a no-op without axis rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

ATTENTION_MODES = ("bidirectional", "causal", "prefix")


def logical(init: Initializer, *names: str | None) -> Initializer:
    return nn.with_logical_partitioning(init, names)


def matrix_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Dtype | None = None,
) -> jax.Array:
    """`lax.dot_general` for `nn.Dense` that multiplies the input as one (tokens, D) matrix.

    Gives the same values as `lax.dot_general`. With the batch and token axes kept apart,
    XLA's CPU backend computes the kernel gradient from a transposed copy of the output
    gradient, and that copy fuses the GELU or LayerNorm backward that produces it. Merging
    the leading axes first turns the kernel gradient into one plain matrix product. On a
    2-core CPU an aim-base training step (batch 8) fell from 13.8 to 11.4 s
    (`experiments/benchmarks/train_benchmark.py`).

    Args:
        lhs: input of shape (..., D).
        rhs: kernel of shape (D, F).
        dimension_numbers: as for `lax.dot_general`. Any form other than `nn.Dense`'s
            (contract the last input axis with the first kernel axis, no batch axes) goes to
            `lax.dot_general` unchanged.
        precision: passed to `lax.dot_general`.
        preferred_element_type: passed to `lax.dot_general`.

    Returns:
        The product, of shape (..., F) in the Dense form.
    """
    (lhs_contract, rhs_contract), batch_dims = dimension_numbers
    dense_form = (
        tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and batch_dims == ((), ())
        and rhs.ndim == 2
    )
    if not dense_form or lhs.ndim <= 2:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
        )
    out = jax.lax.dot_general(
        lhs.reshape(-1, lhs.shape[-1]),
        rhs,
        (((1,), (0,)), ((), ())),
        precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(*lhs.shape[:-1], rhs.shape[1])


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    """Return a LayerNorm that computes the variance in two passes.

    Flax's default `use_fast_variance=True` computes E[x^2] - E[x]^2, which cancels
    catastrophically for rows with a large mean (large ViT activations have them), so every
    norm in this package sets it to False.
    """
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        use_fast_variance=False,
        scale_init=logical(nn.initializers.ones_init(), "norm"),
        bias_init=logical(nn.initializers.zeros_init(), "norm"),
        name=name,
    )


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Compute the fixed 2D sine-cosine position embedding of a patch grid.

    The first half of the channels encodes the column (x) index and the second half the
    row (y) index. Each half is [sin(pos * omega), cos(pos * omega)] with
    omega_i = 1 / 10000^(i / (dim / 4)), i = 0 .. dim/4 - 1. Computed in float64 with numpy
    at trace time, because the grid shape is static.

    Args:
        grid_h: patch rows.
        grid_w: patch columns.
        dim: embedding width, divisible by 4.

    Returns:
        float32 array of shape (grid_h * grid_w, dim) in raster (row-major) order.
    """
    if dim % 4:
        raise ValueError(f"Position embedding width {dim} must be divisible by 4.")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)  # (D/4,)
    rows, cols = np.meshgrid(
        np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij"
    )

    def encode(positions):
        angles = positions.reshape(-1)[:, None] * omega[None, :]  # (K, D/4)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # (K, D/2)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)  # (K, D)


def attention_mask(
    mode: str, num_tokens: int, prefix_len: jax.Array | None = None
) -> jax.Array | None:
    """Build the boolean attention mask for one of the three attention modes.

    Args:
        mode: "bidirectional" (no mask), "causal", or "prefix" (prefix-causal: the first
            `prefix_len[b]` tokens attend to each other, and every later token attends to
            the prefix and the tokens before it).
        num_tokens: sequence length N.
        prefix_len: int array of shape (B,), required for "prefix".

    Returns:
        None for bidirectional attention, else a bool array broadcastable to (B, 1, N, N)
        where True means "query i may attend to key j".
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"Attention mode {mode!r} is invalid; expected one of {ATTENTION_MODES}.")
    if mode == "bidirectional":
        return None
    positions = jnp.arange(num_tokens)
    causal = positions[None, :] <= positions[:, None]  # (N, N): key j <= query i
    if mode == "causal":
        return causal[None, None]  # (1, 1, N, N)
    if prefix_len is None:
        raise ValueError("Attention mode 'prefix' needs prefix_len, an int array of shape (B,).")
    prefix_len = jnp.asarray(prefix_len)
    if prefix_len.ndim != 1:
        raise ValueError(f"prefix_len must have shape (B,), got {prefix_len.shape}.")
    in_prefix = positions[None, None, :] < prefix_len[:, None, None]  # (B, 1, N): key j in prefix
    return (causal[None] | in_prefix)[:, None]  # (B, 1, N, N)


class PatchProjection(nn.Module):
    """Convolution with kernel = stride = patch size, flattening patches in raster order.

    The convolution is computed as a matmul over non-overlapping patches, which is the same
    operation and faster on CPUs. Its kernel has the layout of `nn.Conv`: (p, p, 3, D).
    """

    patch_size: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch_size
        batch, height, width, channels = images.shape
        kernel = self.param(
            "kernel",
            logical(
                nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                "patch",
                None,
                None,
                "embed",
            ),
            (p, p, channels, self.embed_dim),
        )
        bias = self.param("bias", logical(nn.initializers.zeros_init(), "embed"), (self.embed_dim,))
        patches = images.reshape(batch, height // p, p, width // p, p, channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p, p, C)
        patches = patches.reshape(
            batch, (height // p) * (width // p), p * p * channels
        )  # (B, K, ppC)
        kernel = jnp.asarray(kernel, self.dtype).reshape(p * p * channels, self.embed_dim)
        x = matrix_dot_general(patches.astype(self.dtype), kernel, (((2,), (0,)), ((), ())))
        x = x + jnp.asarray(bias, self.dtype)  # (B, K, D)
        return x


class PatchEmbed(nn.Module):
    """Patch projection, LayerNorm, then the fixed 2D sine-cosine position embedding."""

    patch_size: int
    embed_dim: int
    norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _, height, width, _ = images.shape
        x = PatchProjection(self.patch_size, self.embed_dim, self.dtype, name="proj")(images)
        x = layer_norm(self.norm_eps, self.dtype, "norm")(x)  # (B, K, D)
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        pos = sincos_pos_embed_2d(grid_h, grid_w, self.embed_dim)  # (K, D)
        return x + jnp.asarray(pos, x.dtype)[None]


class Attention(nn.Module):
    """Multi-head self-attention without biases, on `jax.nn.dot_product_attention`.

    `dot_product_attention` picks a fused kernel (cuDNN flash attention) where the backend
    has one and falls back to XLA elsewhere.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = nn.Dense(
            3 * dim,
            use_bias=False,
            dtype=self.dtype,
            dot_general=matrix_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "qkv"),
            name="qkv",
        )(x)  # (B, N, 3D)
        # PyTorch's layout: the 3D outputs are [q | k | v], each split into heads.
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)  # (B, N, 3, H, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, N, H, hd)
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=head_dim**-0.5
        )  # (B, N, H, hd)
        out = out.reshape(batch, length, dim)  # (B, N, D)
        return nn.Dense(
            dim,
            use_bias=False,
            dtype=self.dtype,
            dot_general=matrix_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "heads", "embed"),
            name="proj",
        )(out)


class Mlp(nn.Module):
    """Two bias-free linear layers with exact (erf) GELU between them.

    PyTorch's `nn.GELU()` is the exact form, while `flax.linen.gelu` defaults to the tanh
    approximation (1.5e-4 apart at x = 1), so `approximate=False` is required for parity.
    """

    hidden_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = nn.Dense(
            self.hidden_dim,
            use_bias=False,
            dtype=self.dtype,
            dot_general=matrix_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "embed", "mlp"),
            name="fc1",
        )(x)  # (B, N, 4D)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.gelu(h, approximate=False)
        return nn.Dense(
            dim,
            use_bias=False,
            dtype=self.dtype,
            dot_general=matrix_dot_general,
            kernel_init=logical(nn.initializers.xavier_uniform(), "mlp", "embed"),
            name="fc2",
        )(h)  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN1(x)), then x + MLP(LN2(x))."""

    num_heads: int
    mlp_ratio: int
    norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        dim = x.shape[-1]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = layer_norm(self.norm_eps, self.dtype, "norm_1")(x)
        x = x + Attention(self.num_heads, self.dtype, name="attn")(h, mask)
        h = layer_norm(self.norm_eps, self.dtype, "norm_2")(x)
        x = x + Mlp(self.mlp_ratio * dim, self.dtype, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))
