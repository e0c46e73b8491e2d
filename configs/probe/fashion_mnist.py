"""Attention probe on Fashion-MNIST over the frozen trunk of the Fashion-MNIST pre-training run.

Launch (from the repository root; needs the Debian package dataset-fashion-mnist), after
pre-training with configs/fashion_mnist.py into workdirs/fashion_mnist:

    python -m aim_jax.probe --config configs/probe/fashion_mnist.py \
        --workdir workdirs/fashion_mnist_probe

The trunk runs once over the training and test images (evaluation resize, no augmentation),
its probe features are cached under `<workdir>/feature_cache`, and the head trains on them.

Variants (comma-separated): "random" probes a randomly initialised trunk of the same
architecture (a baseline that needs no pre-training), "linear" trains the linear-probe
baseline instead of the attention probe, and "runlocal" trains for a few steps on small
batches (for tests). Other trunks: `--config.trunk.source=pretrained
--config.trunk.checkpoint=DIR`.
"""

import importlib.util
import pathlib

import ml_collections

PRETRAIN_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "fashion_mnist.py"
VARIANTS = ("random", "linear", "runlocal")


def pretrain_model_config() -> ml_collections.ConfigDict:
    """Return `config.model` of configs/fashion_mnist.py, so both configs share one model."""
    spec = importlib.util.spec_from_file_location("fashion_mnist_pretrain", PRETRAIN_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().model


def get_config(arg=None):
    parts = [part for part in (arg or "").split(",") if part]
    unknown = sorted(set(parts) - set(VARIANTS))
    if unknown:
        raise ValueError(
            f"Unknown config variants {unknown}; expected any of {list(VARIANTS)}, separated "
            "by commas."
        )
    config = ml_collections.ConfigDict()
    config.mode = "train"
    config.seed = 0
    config.dtype = "float32"
    config.scan = False

    config.trunk = ml_collections.ConfigDict()
    config.trunk.source = "random" if "random" in parts else "pretrain_workdir"
    config.trunk.workdir = "workdirs/fashion_mnist"  # for "pretrain_workdir"
    config.trunk.step = ml_collections.config_dict.placeholder(int)  # None: latest
    config.trunk.checkpoint = ""  # for "pretrained"
    # The architecture of a "random" trunk; the other sources store their own.
    config.model = pretrain_model_config()

    config.head = "linear" if "linear" in parts else "attention"
    config.probe_layers = "last"  # "last", "best" or block indices such as "3,4,5"
    config.num_classes = 10
    config.cache_features = True
    config.cache_dtype = "float16"  # "float16" or "float32"

    config.total_steps = 6000
    config.batch_size = 256  # global
    config.eval_batch_size = 512
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.peak_lr = 3e-3
    config.optimizer.init_lr = 0.0
    config.optimizer.warmup_fraction = 0.05
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.05  # kernels only
    config.optimizer.clip_norm = 0.0  # 0 turns clipping off

    config.data = ml_collections.ConfigDict()
    config.data.source = "fashion_mnist"
    config.data.path = "/usr/share/datasets/fashion-mnist"
    config.data.split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 28
    config.data.num_workers = 0
    config.data.augment = False  # only read when cache_features is False

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ml_collections.config_dict.placeholder(list)

    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2
    config.log_every_steps = 50
    if "runlocal" in parts:
        config.total_steps = 6
        config.batch_size = 16
        config.eval_batch_size = 16
        config.checkpoint_every_steps = 3
        config.log_every_steps = 1
    return config
