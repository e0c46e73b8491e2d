"""Helpers shared by the config files under configs/."""

from __future__ import annotations

import ml_collections

from aim_jax.registry import MODELS, ModelConfig, get_model_config

# Fields that define a trunk's shape; a config that changes any of them is no longer the
# registry model it started from.
ARCHITECTURE_FIELDS = ("embed_dim", "num_blocks", "num_heads", "patch_size", "mlp_ratio")


def parse_variant(arg: str | None, default: str) -> dict[str, str | bool]:
    """Parse a config argument such as "aim-600M", "runlocal" or "aim-base,runlocal".

    Returns:
        {"model": <registry name>, "runlocal": bool}.
    """
    parts = [p for p in (arg or "").split(",") if p]
    model, runlocal = default, False
    for part in parts:
        if part == "runlocal":
            runlocal = True
        elif part in MODELS:
            model = part
        else:
            raise ValueError(
                f"Unknown config variant {part!r}; expected a model from {sorted(MODELS)} "
                "and/or 'runlocal', separated by commas."
            )
    return {"model": model, "runlocal": runlocal}


def model_config_dict(name: str, **overrides) -> ml_collections.ConfigDict:
    """Return the registry entry `name` as a ConfigDict, so each field can be overridden."""
    model = get_model_config(name, **overrides)
    values = model.to_dict()
    # Tuples, because ml_collections overrides tuples from the command line but not lists.
    values["img_size"] = model.img_size
    values["probe_layers"] = model.probe_layers
    values["best_probe_layers"] = model.best_probe_layers or ml_collections.config_dict.placeholder(
        tuple
    )
    return ml_collections.ConfigDict(values)


def to_model_config(model: ml_collections.ConfigDict) -> ModelConfig:
    """Build a `ModelConfig` from the `config.model` field of a training config."""
    values = model.to_dict()
    for key in ("img_size", "probe_layers", "best_probe_layers"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    config = ModelConfig.from_dict(values)
    registered = MODELS.get(config.name)
    if registered is not None and any(
        getattr(config, field) != getattr(registered, field) for field in ARCHITECTURE_FIELDS
    ):
        # A registry name on a changed architecture would mislabel checkpoints and logs.
        config = config.replace(name=f"{config.name}-custom")
    return config


def base_pretrain_config() -> ml_collections.ConfigDict:
    """Return the pre-training fields every config shares, set to Apple's AIM v1 recipe."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 500_000
    config.batch_size = 4096  # global, over all processes and devices
    config.grad_accum_steps = 1  # micro-batches per optimizer step
    config.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    config.scan = True
    config.remat_policy = "none"

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.peak_lr = 1e-3
    config.optimizer.init_lr = 1e-6  # linear warmup starts here
    config.optimizer.warmup_fraction = 0.025
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.95
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.05  # not applied to biases, norms or the probe token
    config.optimizer.clip_norm = 1.0

    config.data = ml_collections.ConfigDict()
    config.data.source = "folder"  # "folder", "tfds" or "fashion_mnist"
    config.data.path = ""
    config.data.name = ""
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    config.data.split = "train"
    config.data.image_size = 224
    config.data.num_workers = 8
    config.data.augment = True

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ml_collections.config_dict.placeholder(list)

    # Multi-process launch. Left unset, SLURM and Open MPI launches are detected from their
    # environment; on Cloud TPU pods set auto_detect. Set the address, count and id to start
    # the processes by hand.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
    config.distributed.num_processes = ml_collections.config_dict.placeholder(int)
    config.distributed.process_id = ml_collections.config_dict.placeholder(int)
    config.distributed.local_device_ids = ml_collections.config_dict.placeholder(tuple)
    config.distributed.auto_detect = False

    config.checkpoint_every_steps = 2000
    config.async_checkpointing = True
    config.keep_checkpoints = 3
    config.log_every_steps = 50
    config.init_from = ""  # a save_pretrained or convert_torch.py directory
    # Peak FLOP/s of one device for the MFU figure; 0 measures a matmul once at startup.
    config.device_peak_flops = 0.0
    return config
