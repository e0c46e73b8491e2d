"""CPU quickstart: pre-train a small AIM on the Fashion-MNIST training images.

Launch (from the repository root; needs the Debian package dataset-fashion-mnist):

    python -m aim_jax.train --config configs/fashion_mnist.py --workdir workdirs/fashion_mnist

About 10 minutes on 2 CPU cores. Labels are not used. Variant "runlocal" trains for a few
steps only (for tests).
"""

from aim_jax import config_lib


def get_config(arg=None):
    variant = config_lib.parse_variant(arg, default="aim-tiny")
    config = config_lib.base_pretrain_config()
    config.model = config_lib.model_config_dict(
        variant["model"],
        embed_dim=128,
        num_blocks=6,
        num_heads=4,
        patch_size=4,
        img_size=(28, 28),
        num_classes=10,
        head_width=128,
        head_depth=1,
    )
    config.total_steps = 500  # about one epoch of the 60,000 training images
    config.batch_size = 128
    config.dtype = "float32"
    config.scan = False
    config.optimizer.peak_lr = 2e-3

    config.data.source = "fashion_mnist"
    config.data.path = "/usr/share/datasets/fashion-mnist"
    config.data.split = "train"
    config.data.image_size = 28
    config.data.num_workers = 0
    config.data.augment = False

    config.checkpoint_every_steps = 100
    config.log_every_steps = 10
    if variant["runlocal"]:
        config.total_steps = 6
        config.batch_size = 16
        config.checkpoint_every_steps = 3
        config.log_every_steps = 1
    return config
