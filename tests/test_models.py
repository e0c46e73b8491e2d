"""Value tests of aim_jax.models: golden parity, layouts, dtypes, input checks, pre-training."""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aim_jax.conversion import convert_tensors, key_table
from aim_jax.layers import sincos_pos_embed_2d
from aim_jax.models import AIM, AIMPretrainer
from aim_jax.registry import ModelConfig
from aim_jax.trunk import REMAT_POLICIES, stack_blocks, unstack_blocks

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden" / "tiny_a"
# The golden files state that a faithful float32 port matches to about 1e-6.
GOLDEN_ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    """Return (config, unrolled variables, expected arrays, NHWC images) of tiny_a."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden vectors not found at {GOLDEN}")
    fields = json.loads((GOLDEN / "config.json").read_text())
    config = ModelConfig(**fields)
    state = torch.load(GOLDEN / "backbone.pth", map_location="cpu", weights_only=True)
    state.update(torch.load(GOLDEN / "head.pth", map_location="cpu", weights_only=True))
    variables = convert_tensors(key_table(config), state.keys(), lambda k: state[k].numpy())
    expected = dict(np.load(GOLDEN / "expected.npz"))
    images = jnp.asarray(expected["images_nchw"].transpose(0, 2, 3, 1))  # (B, H, W, 3)
    return config, variables, expected, images


def scanned_variables(variables, num_blocks):
    """Restack unrolled variables for a scanned model that runs `num_blocks` blocks."""
    params = dict(variables["params"])
    params["trunk"] = stack_blocks(params["trunk"], num_blocks)
    return {**variables, "params": params}


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def tiny_config(**changes) -> ModelConfig:
    fields = dict(
        embed_dim=32,
        num_blocks=3,
        num_heads=4,
        patch_size=4,
        img_size=(16, 16),
        probe_layers=(1, 2),
        num_classes=5,
        head_width=48,
        head_depth=2,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def random_leaf(path, shape, dtype, rng):
    """Return a random value for one variable, shaped like a trained model's."""
    name = jax.tree_util.keystr(path)
    if jnp.issubdtype(dtype, jnp.integer):
        return np.zeros(shape, dtype)
    if name.endswith("['var']"):
        values = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("['scale']"):
        values = 1.0 + 0.1 * rng.normal(size=shape)
    elif name.endswith("['kernel']"):
        fan_in = int(np.prod(shape[:-1]))
        values = rng.normal(0.0, fan_in**-0.5, shape)
    else:
        values = 0.1 * rng.normal(size=shape)
    return jnp.asarray(values.astype(dtype))


def init_variables(model, *args, seed=0):
    """Return random variables for `model` with every leaf non-trivial.

    `jax.eval_shape` builds the variable tree without compiling the initialisers (which
    takes seconds per model on a CPU), and the values are drawn in numpy.
    """
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *args))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: random_leaf(path, leaf.shape, leaf.dtype, rng), shapes
    )


def apply(model, variables, *args, **kwargs):
    """Run `model.apply` eagerly: for these tiny models compiling costs more than it saves."""
    return model.apply(variables, *args, **kwargs)


def random_images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# Golden parity.


@pytest.mark.parametrize(
    "scan, remat_policy",
    [(False, "none")] + [(True, policy) for policy in REMAT_POLICIES],
)
def test_golden_parity(golden, scan, remat_policy):
    config, variables, expected, images = golden
    for stop_after_probe in (True, False):
        model = AIM(config, scan=scan, remat_policy=remat_policy, stop_after_probe=stop_after_probe)
        model_vars = scanned_variables(variables, model.num_run_blocks) if scan else variables
        out = apply(model, model_vars, images, collect_blocks=True, method=AIM.features)
        assert max_diff(out["logits"], expected["logits"]) < GOLDEN_ATOL
        assert max_diff(out["pooled"], expected["pooled_tokens"]) < GOLDEN_ATOL
        assert max_diff(out["blocks"][0], expected["first_block_tokens"]) < GOLDEN_ATOL
        if not stop_after_probe:
            assert max_diff(out["blocks"][-1], expected["last_block_tokens"]) < GOLDEN_ATOL


def test_golden_stop_after_probe_runs_fewer_blocks(golden):
    config, variables, _, images = golden
    model = AIM(config)
    out = apply(model, variables, images, collect_blocks=True, method=AIM.features)
    assert out["blocks"].shape[0] == max(config.probe_layers) + 1
    # "tokens" is then the last probe block's output, not the post-trunk norm.
    assert max_diff(out["tokens"], out["blocks"][-1]) == 0.0


def test_logits_independent_of_batch(golden):
    config, variables, expected, images = golden
    model = AIM(config)
    others = random_images((4, *images.shape[1:]), seed=7) * 3.0
    # Each golden image sits between two other images.
    mixed = jnp.concatenate([others[0:1], images[0:1], others[1:2], images[1:], others[2:]])
    mixed_logits = apply(model, variables, mixed)
    positions = [1, 3, 4]
    for i, position in enumerate(positions):
        alone = apply(model, variables, images[i : i + 1])
        assert max_diff(alone[0], mixed_logits[position]) < 1e-6
        assert max_diff(alone[0], expected["logits"][i]) < GOLDEN_ATOL


# Layouts and options.


def test_unrolled_and_scanned_identical():
    config = tiny_config()
    images = random_images((2, 16, 16, 3))
    unrolled = AIM(config, stop_after_probe=False)
    variables = init_variables(unrolled, images)
    scanned = AIM(config, scan=True, stop_after_probe=False)
    out_unrolled = apply(unrolled, variables, images, collect_blocks=True, method=AIM.features)
    out_scanned = apply(
        scanned,
        scanned_variables(variables, config.num_blocks),
        images,
        collect_blocks=True,
        method=AIM.features,
    )
    # XLA fuses the scanned body differently, so the last float32 bits may differ.
    for key in ("logits", "pooled", "tokens", "blocks"):
        assert max_diff(out_unrolled[key], out_scanned[key]) < 1e-5, key


def test_stack_unstack_round_trip():
    config = tiny_config()
    images = random_images((1, 16, 16, 3))
    variables = init_variables(AIM(config, stop_after_probe=False), images, seed=1)
    trunk = variables["params"]["trunk"]
    stacked = stack_blocks(trunk)
    assert set(stacked) == {"blocks", "post_trunk_norm"}
    qkv = stacked["blocks"]["block"]["attn"]["qkv"]["kernel"]
    for i in range(config.num_blocks):
        np.testing.assert_array_equal(qkv[i], trunk[f"blocks_{i}"]["attn"]["qkv"]["kernel"])
    restored = unstack_blocks(stacked)
    assert jax.tree.structure(restored) == jax.tree.structure(trunk)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(trunk), strict=True):
        np.testing.assert_array_equal(a, b)
    # A scanned init has the same stacked layout.
    scanned = AIM(config, scan=True, stop_after_probe=False)
    scanned_init = nn.meta.unbox(jax.eval_shape(scanned.init, jax.random.key(0), images))
    scanned_shapes = jax.tree.map(np.shape, scanned_init["params"]["trunk"])
    assert scanned_shapes == jax.tree.map(np.shape, stacked)


def test_stop_after_probe_same_logits():
    config = tiny_config(num_blocks=4, probe_layers=(1, 2))
    images = random_images((2, 16, 16, 3), seed=2)
    full = AIM(config, stop_after_probe=False)
    variables = init_variables(full, images, seed=2)
    logits_full = apply(full, variables, images)
    logits_short = apply(AIM(config, stop_after_probe=True), variables, images)
    assert float(jnp.abs(logits_full).max()) > 1e-2
    assert max_diff(logits_full, logits_short) == 0.0


def test_bfloat16_compute_keeps_float32_params(golden):
    config, variables, expected, images = golden
    model = AIM(config, dtype=jnp.bfloat16)
    init_shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.meta.unbox(init_shapes["params"]))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    logits = apply(model, variables, images)
    assert logits.dtype == jnp.float32
    # Measured with this test: 2.1e-4 on golden logits of magnitude up to 0.028. bfloat16 keeps
    # 8 significand bits (relative error ~4e-3 per value), so the bound is 1e-3.
    diff = max_diff(logits, expected["logits"])
    assert diff < 1e-3
    # A float32 run matches the golden logits to ~1e-8, so a nonzero difference shows that
    # the computation really ran in bfloat16.
    assert diff > 0.0


def numpy_patch_embed(images, params, patch, eps):
    """Patch projection and two-pass LayerNorm in float64 numpy, without position embedding."""
    x = np.asarray(images, np.float64)
    batch, height, width, channels = x.shape
    rows, cols = height // patch, width // patch
    patches = x.reshape(batch, rows, patch, cols, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, rows * cols, -1)  # (B, K, p*p*C), raster order
    kernel = np.asarray(params["proj"]["kernel"], np.float64).reshape(patches.shape[-1], -1)
    tokens = patches @ kernel + np.asarray(params["proj"]["bias"])  # (B, K, D)
    mean = tokens.mean(-1, keepdims=True)
    var = ((tokens - mean) ** 2).mean(-1, keepdims=True)
    normed = (tokens - mean) / np.sqrt(var + eps)
    return normed * np.asarray(params["norm"]["scale"]) + np.asarray(params["norm"]["bias"])


def test_non_square_input_uses_its_own_grid():
    config = tiny_config(patch_size=14, img_size=(28, 56))
    images = random_images((2, 28, 56, 3), seed=4)
    model = AIM(config)
    variables = init_variables(model, images, seed=3)
    logits = apply(model, variables, images)
    tokens = numpy_patch_embed(
        images, variables["params"]["patch_embed"], config.patch_size, config.norm_eps
    )  # (B, 8, D)

    def trunk_and_head(module, tokens):
        out = module.trunk(
            tokens, None, num_run=module.num_run_blocks, probe_layers=config.probe_layers
        )
        return module.head(out.pooled)

    def logits_with_grid(grid_h, grid_w):
        pos = sincos_pos_embed_2d(grid_h, grid_w, config.embed_dim)  # (K, D)
        x = jnp.asarray((tokens + pos[None]).astype(np.float32))
        return apply(model, variables, x, method=trunk_and_head)

    # The 28x56 input has 2 patch rows and 4 patch columns.
    assert max_diff(logits, logits_with_grid(2, 4)) < 1e-5
    assert max_diff(logits, logits_with_grid(4, 2)) > 1e-3


# Input checks.


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 3, 28, 28), r"channels-first \(NCHW\); transpose it with \(0, 2, 3, 1\)"),
        (
            (2, 28, 28, 4),
            r"Expected 3 RGB channels in the last axis \(NHWC\), got shape \(2, 28, 28, 4\)",
        ),
        ((2, 30, 28, 3), r"divisible by the patch size 14, got 30x28"),
        ((28, 28, 3), r"Expected images of shape \(batch, height, width, 3\).*Add a batch axis"),
    ],
)
def test_bad_input_raises_value_error(shape, message):
    config = tiny_config(patch_size=14, img_size=(28, 28))
    model = AIM(config)
    variables = init_variables(model, random_images((1, 28, 28, 3)))
    with pytest.raises(ValueError, match=message):
        model.apply(variables, jnp.zeros(shape, jnp.float32))
    with pytest.raises(ValueError, match=message):
        AIMPretrainer(config).init(
            jax.random.key(0), jnp.zeros(shape, jnp.float32), jnp.ones((2,), jnp.int32)
        )


# Pre-training model.


def mse_loss(params, model, images, prefix_len, targets):
    """Return the MSE of the predictions, and the predictions as auxiliary output."""
    predictions = model.apply({"params": params}, images, prefix_len)
    return jnp.mean(jnp.square(predictions - targets)), predictions


def predictions_and_grads(model, params, images, prefix_len, targets):
    grad_fn = jax.jit(jax.grad(mse_loss, has_aux=True), static_argnums=1)
    grads, predictions = grad_fn(params, model, images, prefix_len, targets)
    return predictions, grads


@pytest.fixture(scope="module")
def pretrainer_setup():
    """Return a tiny pre-training model with its reference predictions and gradients."""
    config = tiny_config(img_size=(16, 16), num_blocks=3, head_depth=1)
    images = random_images((3, 16, 16, 3), seed=10)
    prefix_len = jnp.asarray([1, 6, 15], jnp.int32)
    plain = AIMPretrainer(config)
    params = init_variables(plain, images, prefix_len, seed=4)["params"]
    targets = random_images((3, 16, config.patch_dim), seed=11)
    predictions, grads = predictions_and_grads(plain, params, images, prefix_len, targets)
    return {
        "config": config,
        "images": images,
        "prefix_len": prefix_len,
        "params": params,
        "targets": targets,
        "predictions": predictions,
        "grads": grads,
    }


def stacked_params(params):
    return {**params, "trunk": stack_blocks(params["trunk"])}


@pytest.mark.parametrize("remat_policy", [p for p in REMAT_POLICIES if p != "none"])
def test_pretrainer_scan_remat_matches_unrolled(pretrainer_setup, remat_policy):
    setup = pretrainer_setup
    images, prefix_len, targets = setup["images"], setup["prefix_len"], setup["targets"]
    scanned = AIMPretrainer(setup["config"], scan=True, remat_policy=remat_policy)
    scanned_params = stacked_params(setup["params"])

    predictions, grads = predictions_and_grads(scanned, scanned_params, images, prefix_len, targets)
    assert max_diff(predictions, setup["predictions"]) < 1e-5
    expected = stacked_params(setup["grads"])
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected), strict=True
    ):
        assert max_diff(a, b) < 1e-5, jax.tree_util.keystr(path)
    # The gradients are not trivially zero.
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected)) > 1e-3


def patch_pixels(images, index, patch, grid_w):
    """Return the (row, col) pixel slices of raster patch `index`."""
    row, col = divmod(index, grid_w)
    return slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)


@pytest.mark.parametrize("scan, remat_policy", [(False, "none"), (True, "full")])
def test_pretrainer_prefix_mask_by_perturbation(pretrainer_setup, scan, remat_policy):
    config, images, prefix_len = (pretrainer_setup[k] for k in ("config", "images", "prefix_len"))
    params = pretrainer_setup["params"]
    model = AIMPretrainer(config, scan=scan, remat_policy=remat_policy)
    model_params = stacked_params(params) if scan else params
    run = jax.jit(lambda x: model.apply({"params": model_params}, x, prefix_len))
    base = np.asarray(run(images))
    num_patches, grid_w, patch = 16, 4, config.patch_size
    for perturbed_patch in (2, 5, 9, 14):
        rows, cols = patch_pixels(images, perturbed_patch, patch, grid_w)
        changed = np.asarray(run(images.at[:, rows, cols, :].add(3.0)))
        change = np.abs(changed - base).max(axis=-1)  # (B, N)
        for b, prefix in enumerate(np.asarray(prefix_len)):
            for i in range(num_patches):
                # Output i attends to patch j exactly when j <= max(i, prefix - 1).
                if perturbed_patch <= max(i, prefix - 1):
                    assert change[b, i] > 1e-4, (b, i, perturbed_patch)
                else:
                    assert change[b, i] == 0.0, (b, i, perturbed_patch)
