"""One value test for each known fault of AIM ports: each test fails if the fault returns.

The faults: tanh-approximate GELU, one-pass (E[x^2] - E[x]^2) variance in a norm, a square
weight converted without its transpose, and a probe BatchNorm that uses batch statistics at
inference. The resize geometry fault is tested with the preprocessing code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aim_jax.conversion import convert_tensors, key_table
from aim_jax.heads import BatchNorm
from aim_jax.layers import Block, layer_norm
from aim_jax.models import AIM, AIMPretrainer
from aim_jax.registry import ModelConfig

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden" / "tiny_a"
GOLDEN_ATOL = 1e-5

# A row with a large mean: one-pass variance cancels catastrophically on it in float32.
LARGE_MEAN_ROW = np.array([40000.0, 40001.0, 40002.0, 40003.0])
NORMALISED_ROW = (LARGE_MEAN_ROW - LARGE_MEAN_ROW.mean()) / LARGE_MEAN_ROW.std()  # ~ +-1.34, +-0.45


@pytest.fixture(scope="module")
def golden():
    """Return (config, PyTorch state dict, expected arrays, NHWC images) of tiny_a."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN}")
    config = ModelConfig(**json.loads((GOLDEN / "config.json").read_text()))
    state = torch.load(GOLDEN / "backbone.pth", map_location="cpu", weights_only=True)
    state.update(torch.load(GOLDEN / "head.pth", map_location="cpu", weights_only=True))
    expected = dict(np.load(GOLDEN / "expected.npz"))
    images = jnp.asarray(expected["images_nchw"].transpose(0, 2, 3, 1))  # (B, H, W, 3)
    return config, state, expected, images


def convert(config, state, table=None):
    table = key_table(config) if table is None else table
    return convert_tensors(table, state.keys(), lambda k: state[k].numpy())


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# GELU form.


def torch_block(x, weights, num_heads, eps, approximate):
    """Pre-norm transformer block in float64 torch, with PyTorch's weight layouts."""
    dim = x.shape[-1]
    head_dim = dim // num_heads
    w = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in weights.items()}
    h = torch.nn.functional.layer_norm(x, (dim,), w["norm_1.weight"], w["norm_1.bias"], eps)
    qkv = h @ w["attn.qkv.weight"].T  # (B, N, 3D) as [q | k | v]
    q, k, v = (t.unflatten(-1, (num_heads, head_dim)).transpose(1, 2) for t in qkv.chunk(3, -1))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v  # (B, H, N, hd)
    x = x + attn.transpose(1, 2).flatten(2) @ w["attn.proj.weight"].T
    h = torch.nn.functional.layer_norm(x, (dim,), w["norm_2.weight"], w["norm_2.bias"], eps)
    h = torch.nn.functional.gelu(h @ w["mlp.fc1.weight"].T, approximate=approximate)
    return x + h @ w["mlp.fc2.weight"].T


def test_block_uses_exact_gelu():
    dim, heads, eps = 32, 4, 1e-6
    rng = np.random.default_rng(0)
    # Unit-variance MLP pre-activations, where the two GELU forms differ by up to ~1.5e-4.
    weights = {
        "attn.qkv.weight": rng.normal(0, dim**-0.5, (3 * dim, dim)),
        "attn.proj.weight": rng.normal(0, dim**-0.5, (dim, dim)),
        "mlp.fc1.weight": rng.normal(0, dim**-0.5, (4 * dim, dim)),
        "mlp.fc2.weight": rng.normal(0, (4 * dim) ** -0.5, (dim, 4 * dim)),
        "norm_1.weight": 1 + 0.1 * rng.normal(size=dim),
        "norm_1.bias": 0.1 * rng.normal(size=dim),
        "norm_2.weight": 1 + 0.1 * rng.normal(size=dim),
        "norm_2.bias": 0.1 * rng.normal(size=dim),
    }
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    params = {
        "attn": {
            "qkv": {"kernel": weights["attn.qkv.weight"].T},
            "proj": {"kernel": weights["attn.proj.weight"].T},
        },
        "mlp": {
            "fc1": {"kernel": weights["mlp.fc1.weight"].T},
            "fc2": {"kernel": weights["mlp.fc2.weight"].T},
        },
        "norm_1": {"scale": weights["norm_1.weight"], "bias": weights["norm_1.bias"]},
        "norm_2": {"scale": weights["norm_2.weight"], "bias": weights["norm_2.bias"]},
    }
    x = rng.normal(size=(2, 16, dim)).astype(np.float32)

    block = Block(heads, 4, eps)
    ours = np.asarray(block.apply({"params": params}, jnp.asarray(x), None))
    x64 = torch.from_numpy(x).double()
    exact = torch_block(x64, weights, heads, eps, "none").numpy()
    approx = torch_block(x64, weights, heads, eps, "tanh").numpy()

    assert max_diff(ours, exact) < GOLDEN_ATOL
    # The two GELU forms differ by more than the tolerance, so the check above separates them.
    assert max_diff(exact, approx) > 5 * GOLDEN_ATOL
    assert max_diff(ours, approx) > 5 * GOLDEN_ATOL


# Two-pass variance.


def large_mean_input(shape) -> np.ndarray:
    """Return float32 values whose last axis repeats LARGE_MEAN_ROW."""
    reps = shape[-1] // 4
    return np.broadcast_to(np.tile(LARGE_MEAN_ROW, reps), shape).astype(np.float32)


def test_layer_norm_factory_large_mean_row():
    norm = layer_norm(1e-6, jnp.float32)
    x = jnp.asarray(LARGE_MEAN_ROW[None].astype(np.float32))
    variables = norm.init(jax.random.key(0), x)
    out = np.asarray(norm.apply(variables, x))[0]
    np.testing.assert_allclose(out, NORMALISED_ROW, atol=1e-3)
    np.testing.assert_allclose(out, [-1.34, -0.45, 0.45, 1.34], atol=5e-3)


def test_flax_fast_variance_fails_large_mean_row():
    # Shows that the row above detects one-pass variance: Flax's default gets it wrong.
    norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=True)
    x = jnp.asarray(LARGE_MEAN_ROW[None].astype(np.float32))
    out = np.asarray(norm.apply(norm.init(jax.random.key(0), x), x))[0]
    assert np.abs(out - NORMALISED_ROW).max() > 1.0


def fill_variables(model, *args):
    """Return variables for `model`: normal(0, 0.02) kernels, unit scales, zero biases."""
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']") or name.endswith("['var']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name.endswith("['kernel']") or name.endswith("['cls_token']"):
            return jnp.asarray(rng.normal(0, 0.02, leaf.shape).astype(leaf.dtype))
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def run_with_large_mean_norm_inputs(run):
    """Call `run()` with every norm's input replaced by large-mean rows.

    Returns:
        {module path: (input, output)} for every LayerNorm and probe BatchNorm called.
    """
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.LayerNorm | BatchNorm):
            return next_fun(*args, **kwargs)
        x = args[0]
        if isinstance(module, BatchNorm):
            # Each channel takes the values of LARGE_MEAN_ROW over the batch and tokens.
            count = math.prod(x.shape[:-1])
            values = np.resize(LARGE_MEAN_ROW, count).reshape(*x.shape[:-1], 1)
            crafted = np.broadcast_to(values, x.shape).astype(np.float32)
        else:
            crafted = large_mean_input(x.shape)
        out = next_fun(jnp.asarray(crafted, x.dtype), *args[1:], **kwargs)
        seen["/".join(module.path)] = (crafted, np.asarray(out))
        return out

    with nn.intercept_methods(interceptor):
        run()
    return seen


def expected_normalised(values: np.ndarray) -> np.ndarray:
    """Normalise values in 0..3 above 40000 the way LARGE_MEAN_ROW normalises."""
    return (values.astype(np.float64) - LARGE_MEAN_ROW.mean()) / LARGE_MEAN_ROW.std()


def small_config() -> ModelConfig:
    return ModelConfig(
        embed_dim=32,
        num_blocks=2,
        num_heads=4,
        patch_size=4,
        img_size=(8, 8),
        probe_layers=(0, 1),
        num_classes=3,
        head_width=16,
        head_depth=2,
        norm_eps=1e-6,
    )


def test_every_classifier_norm_two_pass():
    config = small_config()
    images = jnp.zeros((2, 8, 8, 3), jnp.float32)
    model = AIM(config, stop_after_probe=False)
    variables = fill_variables(model, images)
    seen = run_with_large_mean_norm_inputs(
        lambda: model.apply(variables, images, train=True, mutable=["batch_stats"])
    )
    expected_paths = {"patch_embed/norm", "trunk/post_trunk_norm", "head/bn"}
    for i in range(config.num_blocks):
        expected_paths |= {f"trunk/blocks_{i}/norm_1", f"trunk/blocks_{i}/norm_2"}
    assert set(seen) == expected_paths
    for path, (crafted, out) in seen.items():
        # Unit scales and zero biases: the output is the normalised input. eps=1e-6
        # shifts the result by about 5e-7.
        np.testing.assert_allclose(out, expected_normalised(crafted), atol=1e-3, err_msg=path)


def test_every_pretrainer_norm_two_pass():
    config = small_config()
    images = jnp.zeros((2, 8, 8, 3), jnp.float32)
    prefix_len = jnp.asarray([1, 2], jnp.int32)
    model = AIMPretrainer(config)
    variables = fill_variables(model, images, prefix_len)
    seen = run_with_large_mean_norm_inputs(lambda: model.apply(variables, images, prefix_len))
    expected_paths = {"patch_embed/norm", "trunk/post_trunk_norm", "prediction_head/norm"}
    for i in range(config.num_blocks):
        expected_paths |= {f"trunk/blocks_{i}/norm_1", f"trunk/blocks_{i}/norm_2"}
    for i in range(config.head_depth):
        expected_paths.add(f"prediction_head/blocks_{i}_norm")
    assert set(seen) == expected_paths
    for path, (crafted, out) in seen.items():
        np.testing.assert_allclose(out, expected_normalised(crafted), atol=1e-3, err_msg=path)


def test_batchnorm_running_var_two_pass():
    x = large_mean_input((1, 8, 4)).transpose(0, 2, 1).copy()  # (1, 4, 8): channel values vary
    module = BatchNorm()
    variables = module.init(jax.random.key(0), jnp.asarray(x))
    _, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    values = np.tile(LARGE_MEAN_ROW, 1)
    unbiased = values.var(ddof=1)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * unbiased, atol=1e-3)


# Transposed square kernels.


@pytest.mark.parametrize("source_suffix", ["attn.proj.weight", "head.k.weight"])
def test_untransposed_square_kernel_changes_logits(golden, source_suffix):
    config, state, expected, images = golden
    table = key_table(config)
    wrong_table = [
        dataclasses.replace(row, transform=lambda x: x)
        if row.source.endswith(source_suffix)
        else row
        for row in table
    ]
    assert any(row.source.endswith(source_suffix) for row in table)
    right = convert(config, state, table)
    wrong = convert(config, state, wrong_table)

    # Every shape check passes: the weight is square.
    assert jax.tree.map(np.shape, wrong) == jax.tree.map(np.shape, right)
    model = AIM(config)
    assert max_diff(model.apply(right, images), expected["logits"]) < GOLDEN_ATOL
    # The golden logits are small (|logit| < 0.05): measured 5.7e-5 for head.k, while the
    # right conversion matches to about 1e-8.
    assert max_diff(model.apply(wrong, images), expected["logits"]) > 3 * GOLDEN_ATOL


# Probe BatchNorm statistics.


def test_probe_uses_running_statistics(golden):
    config, state, expected, images = golden
    variables = convert(config, state)
    model = AIM(config)
    others = np.random.default_rng(1).normal(3.0, 2.0, (2, *images.shape[1:])).astype(np.float32)
    batch = jnp.concatenate([images, jnp.asarray(others)])
    logits = model.apply(variables, batch)
    assert max_diff(logits[:3], expected["logits"]) < GOLDEN_ATOL
    for i in range(images.shape[0]):
        alone = model.apply(variables, images[i : i + 1])
        assert max_diff(alone[0], expected["logits"][i]) < GOLDEN_ATOL

    # Batch statistics (train mode) give other logits that depend on the batch.
    with_batch_stats, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert max_diff(with_batch_stats, expected["logits"]) > 1e-3
