"""Pre-training of the paper sizes with Apple's AIM v1 recipe.

Launch (from the repository root):

    python -m aim_jax.train --config configs/aim_pretrain.py:aim-600M --workdir /ckpt/aim-600M \
        --config.data.source=folder --config.data.path=/data/imagenet

Variants: aim-600M, aim-1B, aim-3B, aim-7B, the research sizes aim-tiny, aim-small,
aim-base, and "runlocal" (comma-separated), which shrinks steps and batch for a laptop.
El-Nouby et al. (ICML 2024) trained on DFN-2B+ with a global batch of 4096: aim-600M for
about 500k steps, the larger sizes for about 1.2M steps.
"""

from aim_jax import config_lib


def get_config(arg=None):
    variant = config_lib.parse_variant(arg, default="aim-600M")
    config = config_lib.base_pretrain_config()
    # Apple's pre-training config uses LayerNorm epsilon 1e-5 (the released weights use 1e-6).
    config.model = config_lib.model_config_dict(variant["model"], norm_eps=1e-5)
    if variant["model"] in ("aim-1B", "aim-3B", "aim-7B"):
        config.total_steps = 1_200_000
    if variant["model"] in ("aim-3B", "aim-7B"):
        config.mesh.fsdp = -1
        config.mesh.data = 1
        config.remat_policy = "dots_no_batch"
    if variant["runlocal"]:
        config.total_steps = 20
        config.batch_size = 8
        config.data.num_workers = 0
        config.checkpoint_every_steps = 10
        config.log_every_steps = 1
        config.dtype = "float32"
    return config
