"""Value tests of aim_jax.layers and the probe BatchNorm against independent references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aim_jax.heads import BatchNorm
from aim_jax.layers import (
    Attention,
    Mlp,
    PatchProjection,
    attention_mask,
    matrix_dot_general,
    sincos_pos_embed_2d,
)

# float32 matmuls and softmax against float64 references.
ATOL = 1e-5


def erf_gelu(x: np.ndarray) -> np.ndarray:
    """GELU in its exact form, x * Phi(x), in float64."""
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def tanh_gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU, the default of `flax.linen.gelu`."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def reference_pos_embed(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Position embedding written element by element from its definition."""
    quarter = dim // 4
    out = np.zeros((grid_h * grid_w, dim))
    for row in range(grid_h):
        for col in range(grid_w):
            token = row * grid_w + col  # raster order
            for i in range(quarter):
                omega = 1.0 / 10000.0 ** (i / quarter)
                out[token, i] = math.sin(col * omega)
                out[token, quarter + i] = math.cos(col * omega)
                out[token, 2 * quarter + i] = math.sin(row * omega)
                out[token, 3 * quarter + i] = math.cos(row * omega)
    return out


def reference_mask(mode: str, num_tokens: int, prefix_len: list[int]) -> np.ndarray:
    """Mask of shape (B, N, N), True where query i may attend to key j, built with loops."""
    out = np.zeros((len(prefix_len), num_tokens, num_tokens), dtype=bool)
    for b, prefix in enumerate(prefix_len):
        for i in range(num_tokens):
            for j in range(num_tokens):
                if mode == "bidirectional":
                    out[b, i, j] = True
                elif mode == "causal":
                    out[b, i, j] = j <= i
                else:
                    out[b, i, j] = j <= i or j < prefix
    return out


def reference_attention(x, qkv_weight, proj_weight, num_heads, mask):
    """Multi-head attention in float64 numpy with PyTorch's weight layouts.

    Args:
        x: (B, N, D) input.
        qkv_weight: (3D, D) PyTorch linear weight whose outputs are [q | k | v].
        proj_weight: (D, D) PyTorch linear weight of the output projection.
        num_heads: number of heads.
        mask: (B, N, N) bool, True where attention is allowed.

    Returns:
        (B, N, D) output.
    """
    x = x.astype(np.float64)
    batch, length, dim = x.shape
    head_dim = dim // num_heads
    qkv = x @ qkv_weight.T.astype(np.float64)  # (B, N, 3D)
    q, k, v = qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]
    out = np.zeros((batch, length, dim))
    for h in range(num_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(head_dim)  # (B, N, N)
        scores = np.where(mask, scores, -np.inf)
        scores = scores - scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        out[..., cols] = weights @ v[..., cols]
    return out @ proj_weight.T.astype(np.float64)


def test_pos_embed_matches_definition_on_3x5_grid():
    dim = 16
    ours = sincos_pos_embed_2d(3, 5, dim)
    expected = reference_pos_embed(3, 5, dim)
    assert ours.shape == (15, dim)
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_pos_embed_channel_order_column_first():
    dim = 8
    ours = sincos_pos_embed_2d(3, 5, dim)
    # Token (row 2, col 4) is raster index 14. With omega_0 = 1, channel 0 is sin(col).
    assert ours[14, 0] == pytest.approx(math.sin(4.0), abs=1e-6)
    assert ours[14, 2] == pytest.approx(math.cos(4.0), abs=1e-6)
    assert ours[14, 4] == pytest.approx(math.sin(2.0), abs=1e-6)
    assert ours[14, 6] == pytest.approx(math.cos(2.0), abs=1e-6)


def test_pos_embed_rejects_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(2, 2, 10)


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "prefix"])
def test_attention_mask_matches_loops(mode):
    prefix_len = [1, 3, 6, 0]
    num_tokens = 6
    mask = attention_mask(mode, num_tokens, jnp.asarray(prefix_len))
    expected = reference_mask(mode, num_tokens, prefix_len)
    if mode == "bidirectional":
        assert mask is None
        return
    full = np.broadcast_to(np.asarray(mask), (len(prefix_len), 1, num_tokens, num_tokens))
    np.testing.assert_array_equal(full[:, 0], expected)


def test_attention_mask_rejects_bad_arguments():
    with pytest.raises(ValueError, match="expected one of"):
        attention_mask("sliding", 4)
    with pytest.raises(ValueError, match="needs prefix_len"):
        attention_mask("prefix", 4)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        attention_mask("prefix", 4, jnp.ones((2, 2), jnp.int32))


def _attention_with_torch_weights(num_heads, dim, seed):
    rng = np.random.default_rng(seed)
    qkv_weight = rng.normal(0, dim**-0.5, (3 * dim, dim)).astype(np.float32)
    proj_weight = rng.normal(0, dim**-0.5, (dim, dim)).astype(np.float32)
    params = {
        "qkv": {"kernel": jnp.asarray(qkv_weight.T)},
        "proj": {"kernel": jnp.asarray(proj_weight.T)},
    }
    return Attention(num_heads), {"params": params}, qkv_weight, proj_weight


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "prefix"])
def test_attention_matches_numpy(mode):
    batch, length, dim, heads = 3, 7, 32, 4
    module, variables, qkv_weight, proj_weight = _attention_with_torch_weights(heads, dim, 0)
    x = np.random.default_rng(1).normal(size=(batch, length, dim)).astype(np.float32)
    prefix_len = [1, 4, 7]
    mask = attention_mask(mode, length, jnp.asarray(prefix_len))
    ours = np.asarray(module.apply(variables, jnp.asarray(x), mask))
    expected = reference_attention(
        x, qkv_weight, proj_weight, heads, reference_mask(mode, length, prefix_len)
    )
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_prefix_mask_semantics_by_perturbation():
    length, dim, heads, prefix = 8, 32, 4, 3
    module, variables, _, _ = _attention_with_torch_weights(heads, dim, 2)
    x = np.random.default_rng(3).normal(size=(1, length, dim)).astype(np.float32)
    mask = attention_mask("prefix", length, jnp.asarray([prefix]))
    base = np.asarray(module.apply(variables, jnp.asarray(x), mask))

    def output_change(position):
        perturbed = x.copy()
        perturbed[0, position] += 5.0
        out = np.asarray(module.apply(variables, jnp.asarray(perturbed), mask))
        return np.abs(out - base).max(axis=-1)[0]  # (N,)

    # A prefix token attends to later prefix tokens: token 0 depends on token 2.
    change = output_change(prefix - 1)
    assert change[0] > 1e-3
    assert change[1] > 1e-3
    # A token after the prefix attends to no future token: perturbing token 5 leaves 0..4 alone.
    change = output_change(5)
    np.testing.assert_array_equal(change[:5], 0.0)
    assert change[5] > 1e-3
    assert change[6] > 1e-3


def test_patch_projection_equals_conv():
    patch, channels, dim = 4, 3, 16
    rng = np.random.default_rng(4)
    images = rng.normal(size=(2, 8, 12, channels)).astype(np.float32)  # (B, H, W, C)
    kernel = rng.normal(size=(patch, patch, channels, dim)).astype(np.float32)  # HWIO
    bias = rng.normal(size=(dim,)).astype(np.float32)
    module = PatchProjection(patch, dim)
    variables = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
    ours = np.asarray(module.apply(variables, jnp.asarray(images)))  # (B, K, D)

    conv = jax.lax.conv_general_dilated(
        jnp.asarray(images),
        jnp.asarray(kernel),
        window_strides=(patch, patch),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )  # (B, h, w, D)
    expected_jax = np.asarray(conv).reshape(2, -1, dim) + bias
    np.testing.assert_allclose(ours, expected_jax, atol=ATOL, rtol=0)

    torch_out = torch.nn.functional.conv2d(
        torch.from_numpy(images.transpose(0, 3, 1, 2)).double(),
        torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).double(),
        torch.from_numpy(bias).double(),
        stride=patch,
    )  # (B, D, h, w)
    expected_torch = torch_out.flatten(2).transpose(1, 2).numpy()  # (B, K, D), raster order
    np.testing.assert_allclose(ours, expected_torch, atol=ATOL, rtol=0)


def test_mlp_matches_numpy():
    dim, hidden = 16, 64
    rng = np.random.default_rng(5)
    fc1 = rng.normal(0, dim**-0.5, (dim, hidden)).astype(np.float32)
    fc2 = rng.normal(0, hidden**-0.5, (hidden, dim)).astype(np.float32)
    x = rng.normal(size=(2, 5, dim)).astype(np.float32)
    variables = {
        "params": {"fc1": {"kernel": jnp.asarray(fc1)}, "fc2": {"kernel": jnp.asarray(fc2)}}
    }
    ours = np.asarray(Mlp(hidden).apply(variables, jnp.asarray(x)))
    expected = erf_gelu(x.astype(np.float64) @ fc1) @ fc2
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_mlp_gradients_match_numpy():
    # The backward pass written out in float64: y = GELU(x W1) W2, loss = sum(y * dy).
    dim, hidden = 16, 64
    rng = np.random.default_rng(7)
    fc1 = rng.normal(0, dim**-0.5, (dim, hidden)).astype(np.float32)
    fc2 = rng.normal(0, hidden**-0.5, (hidden, dim)).astype(np.float32)
    x = rng.normal(size=(2, 5, dim)).astype(np.float32)
    dy = rng.normal(size=(2, 5, dim)).astype(np.float32)

    def loss(params, inputs):
        return (Mlp(hidden).apply({"params": params}, inputs) * dy).sum()

    params = {"fc1": {"kernel": jnp.asarray(fc1)}, "fc2": {"kernel": jnp.asarray(fc2)}}
    grads, grad_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    h = x64 @ fc1  # (B, N, hidden)
    normal_cdf = 0.5 * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
    normal_pdf = np.exp(-0.5 * h**2) / math.sqrt(2.0 * math.pi)
    gelu_slope = normal_cdf + h * normal_pdf  # d/dh of h * Phi(h)
    dh = (dy64 @ fc2.T) * gelu_slope
    expected_fc2 = np.einsum("bnh,bnd->hd", erf_gelu(h), dy64)
    expected_fc1 = np.einsum("bnd,bnh->dh", x64, dh)
    np.testing.assert_allclose(grads["fc2"]["kernel"], expected_fc2, atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(grads["fc1"]["kernel"], expected_fc1, atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(grad_x, dh @ fc1.T, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("lhs_shape", "rhs_shape", "dims", "subscripts"),
    [
        ((2, 3, 5, 4), (4, 6), (((3,), (0,)), ((), ())), "abcd,de->abce"),  # merged to 2D
        ((7, 4), (4, 6), (((1,), (0,)), ((), ())), "ad,de->ae"),  # already 2D
        (
            (4, 3, 5),
            (4, 6),
            (((0,), (0,)), ((), ())),
            "dbc,de->bce",
        ),  # any other form: lax.dot_general
    ],
)
def test_matrix_dot_general_equals_einsum(lhs_shape, rhs_shape, dims, subscripts):
    rng = np.random.default_rng(8)
    lhs = rng.normal(size=lhs_shape).astype(np.float32)
    rhs = rng.normal(size=rhs_shape).astype(np.float32)
    ours = np.asarray(matrix_dot_general(jnp.asarray(lhs), jnp.asarray(rhs), dims))
    expected = np.einsum(subscripts, lhs.astype(np.float64), rhs.astype(np.float64))
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=1e-6)


def test_mlp_gelu_is_exact_not_tanh():
    # Identity projections make the Mlp output GELU(x) itself.
    dim = 8
    eye = jnp.eye(dim, dtype=jnp.float32)
    variables = {"params": {"fc1": {"kernel": eye}, "fc2": {"kernel": eye}}}
    x = np.linspace(0.8, 1.2, dim, dtype=np.float32)[None]  # (1, D)
    ours = np.asarray(Mlp(dim).apply(variables, jnp.asarray(x)))
    np.testing.assert_allclose(ours, erf_gelu(x.astype(np.float64)), atol=1e-6, rtol=0)
    assert np.abs(ours - tanh_gelu(x.astype(np.float64))).max() > 1e-4


def test_batchnorm_matches_torch_train_then_eval():
    batch, length, dim = 4, 5, 6
    rng = np.random.default_rng(6)
    steps = [
        (
            rng.normal(size=(batch, length, dim)) * rng.uniform(0.5, 3, dim) + rng.normal(0, 4, dim)
        ).astype(np.float32)
        for _ in range(2)
    ]
    reference = torch.nn.BatchNorm1d(dim, eps=1e-6, momentum=0.1, affine=False).double()
    module = BatchNorm(epsilon=1e-6, momentum=0.1)
    variables = module.init(jax.random.key(0), jnp.asarray(steps[0]))

    def to_torch(x):
        return torch.from_numpy(x.transpose(0, 2, 1).astype(np.float64))  # (B, D, N)

    reference.train()
    for step, x in enumerate(steps, start=1):
        ours, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
        expected = reference(to_torch(x)).numpy().transpose(0, 2, 1)
        np.testing.assert_allclose(np.asarray(ours), expected, atol=ATOL, rtol=0)
        stats = variables["batch_stats"]
        np.testing.assert_allclose(stats["mean"], reference.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(stats["var"], reference.running_var.numpy(), atol=1e-5)
        assert int(stats["num_batches_tracked"]) == step
        assert int(reference.num_batches_tracked) == step

    reference.eval()
    x = rng.normal(size=(3, length, dim)).astype(np.float32)
    ours = np.asarray(module.apply(variables, jnp.asarray(x), train=False))
    expected = reference(to_torch(x)).numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


def test_batchnorm_running_var_is_unbiased():
    # One step from mean 0, var 1: running_var = 0.9 + 0.1 * unbiased batch variance.
    x = np.array([[[1.0], [2.0], [3.0], [6.0]]], dtype=np.float32)  # (1, 4, 1)
    module = BatchNorm()
    variables = module.init(jax.random.key(0), jnp.asarray(x))
    _, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    values = x.ravel().astype(np.float64)
    unbiased = ((values - values.mean()) ** 2).sum() / (values.size - 1)
    assert float(updates["batch_stats"]["var"][0]) == pytest.approx(0.9 + 0.1 * unbiased, abs=1e-6)
    assert float(updates["batch_stats"]["mean"][0]) == pytest.approx(0.1 * values.mean(), abs=1e-6)
