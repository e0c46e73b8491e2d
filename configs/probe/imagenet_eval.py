"""Attention-probe evaluation of a converted AIM v1 checkpoint on the ImageNet-1k validation set.

Launch (from the repository root), with a checkpoint from tools/convert_torch.py:

    python -m aim_jax.probe --config configs/probe/imagenet_eval.py:aim-600M \
        --workdir workdirs/eval_aim-600M --config.checkpoint=/ckpt/aim-600M \
        --config.data.path=/data/imagenet --config.probe_layers=last

`data.path` is an image folder `<path>/<split>/<class>/<image>` (split "val" by default). For
TFDS use `--config.data.source=tfds --config.data.name=imagenet2012
--config.data.split=validation --config.data.data_dir=/data/tfds`. Images get the released
evaluation preprocessing (shorter side to 256, bicubic, center crop 224). `probe_layers`
("last" or "best") must match the head that was converted.

Variants: aim-600M, aim-1B, aim-3B, aim-7B (aim-3B and aim-7B shard parameters FSDP-style
over all devices), plus "runlocal" (batch 8, no worker processes).
"""

import ml_collections

from aim_jax import config_lib

RELEASED = ("aim-600M", "aim-1B", "aim-3B", "aim-7B")


def get_config(arg=None):
    variant = config_lib.parse_variant(arg, default="aim-600M")
    if variant["model"] not in RELEASED:
        raise ValueError(
            f"Invalid variant {variant['model']!r}: evaluation needs a released model, one of "
            f"{list(RELEASED)}."
        )
    config = ml_collections.ConfigDict()
    config.mode = "evaluate"
    config.checkpoint = ""  # directory from tools/convert_torch.py or save_pretrained
    config.model_name = variant["model"]  # checked against the checkpoint; "" skips the check
    config.probe_layers = "last"  # "last", "best", "checkpoint" or "14,15,16,17,18,19"
    config.dtype = "float32"  # compute dtype: "float32" or "bfloat16"
    config.scan = False
    config.batch_size = 256  # global
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.source = "folder"  # "folder" or "tfds"
    config.data.path = ""
    config.data.name = "imagenet2012"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    config.data.split = "val"
    config.data.image_size = 224
    config.data.num_workers = 8
    config.data.augment = False

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    if variant["model"] in ("aim-3B", "aim-7B"):
        config.mesh.data = 1
        config.mesh.fsdp = -1
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ml_collections.config_dict.placeholder(list)
    if variant["runlocal"]:
        config.batch_size = 8
        config.data.num_workers = 0
    return config
