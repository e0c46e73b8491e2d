"""The key table maps the released checkpoints' keys one to one onto the Flax variables.

For each released size, the variable shapes of `AIM` come from `jax.eval_shape` (nothing is
allocated) and the source keys and shapes from the published key listing.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aim_jax.conversion import key_table
from aim_jax.models import AIM
from aim_jax.registry import MODELS

KEYS_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "reference" / "released_checkpoint_keys.json"
)
RELEASED = ["aim-600M", "aim-1B", "aim-3B", "aim-7B"]

pytestmark = pytest.mark.skipif(not KEYS_FILE.is_file(), reason=f"{KEYS_FILE} not found")


@pytest.fixture(scope="module")
def released_keys():
    return json.loads(KEYS_FILE.read_text())


def _flatten(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


@functools.cache
def _abstract_variables(name: str) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    config = MODELS[name]
    images = jax.ShapeDtypeStruct((1, *config.img_size, 3), jnp.float32)
    model = AIM(config, stop_after_probe=False)
    return _flatten(nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images)))


@pytest.mark.parametrize("name", RELEASED)
def test_table_matches_released_keys(released_keys, name):
    listing = released_keys[name]
    source = {
        key: tuple(shape) for key, shape in {**listing["backbone"], **listing["head"]}.items()
    }
    table = key_table(MODELS[name])
    assert len(table) == len(source)
    assert {row.source for row in table} == set(source)
    for row in table:
        assert row.source_shape == source[row.source], row.source


@pytest.mark.parametrize("name", RELEASED)
def test_table_targets_cover_model_variables(name):
    abstract = _abstract_variables(name)
    table = key_table(MODELS[name])
    targets = [row.target for row in table]
    assert len(set(targets)) == len(targets)  # no leaf is filled twice
    assert set(targets) == set(abstract)
    for row in table:
        assert row.target_shape == tuple(abstract[row.target].shape), row.source


@pytest.mark.parametrize("name", RELEASED)
def test_float_parameter_count(released_keys, name):
    # `float_parameters` counts every floating-point element of the backbone and head
    # checkpoints, the BatchNorm running mean and variance included, and leaves out the
    # integer `num_batches_tracked`.
    listing = released_keys[name]
    source_floats = sum(
        math.prod(shape)
        for key, shape in {**listing["backbone"], **listing["head"]}.items()
        if not key.endswith("num_batches_tracked")
    )
    assert source_floats == listing["float_parameters"]

    abstract = _abstract_variables(name)
    floats = sum(
        math.prod(leaf.shape)
        for leaf in abstract.values()
        if jnp.issubdtype(leaf.dtype, jnp.floating)
    )
    assert floats == listing["float_parameters"]
    integers = [
        path for path, leaf in abstract.items() if not jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert integers == [("batch_stats", "head", "bn", "num_batches_tracked")]


def test_transforms_move_source_elements():
    # A (out, in) linear weight becomes an (in, out) kernel; a (out, in, kh, kw) convolution
    # becomes (kh, kw, in, out).
    rows = {row.source: row for row in key_table(MODELS["aim-600M"])}
    linear = rows["trunk.blocks.0.mlp.fc1.weight"]
    weight = np.arange(6 * 4).reshape(6, 4)
    np.testing.assert_array_equal(linear.transform(weight)[3, 5], weight[5, 3])
    conv = rows["preprocessor.patchifier.proj.weight"]
    kernel = np.arange(5 * 3 * 2 * 4).reshape(5, 3, 2, 4)
    np.testing.assert_array_equal(conv.transform(kernel)[1, 3, 2, 4], kernel[4, 2, 1, 3])
