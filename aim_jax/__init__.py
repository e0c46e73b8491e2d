"""AIM (Autoregressive Image Models) in JAX and Flax."""

from aim_jax.models import AIM, AIMPretrainer
from aim_jax.pretrained import load_pretrained, save_pretrained
from aim_jax.registry import MODELS, ModelConfig, get_model_config

__all__ = [
    "AIM",
    "AIMPretrainer",
    "MODELS",
    "ModelConfig",
    "get_model_config",
    "load_pretrained",
    "save_pretrained",
]
