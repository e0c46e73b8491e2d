"""Every config file under configs/ loads with each of its variants."""

import importlib.util
from pathlib import Path

import pytest

from aim_jax import config_lib
from aim_jax.registry import MODELS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

VARIANTS = {
    "aim_pretrain.py": [None, *MODELS, "aim-600M,runlocal", "aim-7B,runlocal"],
    "fashion_mnist.py": [None, "runlocal"],
    "probe/fashion_mnist.py": [None, "random", "linear", "runlocal", "random,runlocal"],
    "probe/imagenet_eval.py": [None, "aim-600M", "aim-1B", "aim-3B", "aim-7B", "aim-600M,runlocal"],
}


def load_config(relative: str, arg):
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_"), CONFIG_DIR / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_every_config_file_listed():
    found = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.py"))
    assert found == sorted(VARIANTS)


@pytest.mark.parametrize(
    "relative,arg", [(name, arg) for name, args in VARIANTS.items() for arg in args]
)
def test_config_loads(relative, arg):
    config = load_config(relative, arg)
    assert config.get("mode", "train") in ("train", "evaluate")
    if "model" in config:
        model = config_lib.to_model_config(config.model)
        assert model.embed_dim % model.num_heads == 0
        assert max(model.probe_layers) < model.num_blocks


def test_pretrain_sizes_match_registry():
    for name in ("aim-600M", "aim-1B", "aim-3B", "aim-7B"):
        model = config_lib.to_model_config(load_config("aim_pretrain.py", name).model)
        assert model.embed_dim == MODELS[name].embed_dim
        assert model.num_blocks == MODELS[name].num_blocks
        assert model.num_heads == MODELS[name].num_heads
        # Apple's pre-training recipe uses LayerNorm epsilon 1e-5.
        assert model.norm_eps == 1e-5


def test_unknown_variant_rejected():
    with pytest.raises(ValueError, match="Unknown config variant"):
        load_config("aim_pretrain.py", "aim-9000B")


def test_quickstart_fields_scripts_rely_on():
    config = load_config("fashion_mnist.py", None)
    for field in ("total_steps", "batch_size", "seed", "checkpoint_every_steps", "log_every_steps"):
        assert field in config
    assert config.data.source == "fashion_mnist"
    for field in ("path", "name", "split"):
        assert field in config.data
