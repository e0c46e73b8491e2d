"""Model configurations: the four released AIM v1 sizes and small research sizes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of an AIM trunk, its probe head and its pre-training head.

    Attributes:
        name: registry name, or "custom".
        embed_dim: trunk width D.
        num_blocks: number of transformer blocks.
        num_heads: attention heads in the trunk and in the attention-probe head.
        patch_size: side of the square patches, in pixels.
        img_size: default input size as (height, width); any size divisible by the patch
            size works at run time.
        mlp_ratio: MLP hidden width as a multiple of D.
        norm_eps: LayerNorm epsilon (1e-6 in the released models, 1e-5 in Apple's pre-training).
        probe_layers: 0-based indices of the blocks whose outputs are averaged for the probe.
        num_classes: classes of the attention-probe head.
        best_probe_layers: the released "best" probe blocks; "last" is always the final six.
        head_width: width of the pre-training prediction head.
        head_depth: number of residual MLP blocks in the prediction head.
    """

    name: str = "custom"
    embed_dim: int = 192
    num_blocks: int = 12
    num_heads: int = 3
    patch_size: int = 14
    img_size: tuple[int, int] = (224, 224)
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    probe_layers: tuple[int, ...] = (6, 7, 8, 9, 10, 11)
    num_classes: int = 1000
    best_probe_layers: tuple[int, ...] | None = None
    head_width: int = 2048
    head_depth: int = 12

    def __post_init__(self):
        img_size = self.img_size
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        object.__setattr__(self, "img_size", tuple(int(s) for s in img_size))
        object.__setattr__(self, "probe_layers", tuple(int(i) for i in self.probe_layers))
        if self.best_probe_layers is not None:
            best = tuple(int(i) for i in self.best_probe_layers)
            object.__setattr__(self, "best_probe_layers", best)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}."
            )
        if self.embed_dim % 4:
            raise ValueError(
                f"embed_dim={self.embed_dim} must be divisible by 4 for the 2D sine-cosine "
                "position embedding."
            )
        if not self.probe_layers:
            raise ValueError("probe_layers is empty; give at least one block index.")
        bad = [i for i in self.probe_layers if not 0 <= i < self.num_blocks]
        if bad:
            raise ValueError(
                f"probe_layers {bad} are outside 0..{self.num_blocks - 1} for a "
                f"{self.num_blocks}-block trunk."
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Number of pixel values in one RGB patch."""
        return self.patch_size * self.patch_size * 3

    @property
    def last_probe_layers(self) -> tuple[int, ...]:
        start = max(self.num_blocks - 6, 0)
        return tuple(range(start, self.num_blocks))

    def with_probe_layers(self, probe_layers: str | Sequence[int]) -> ModelConfig:
        """Return a copy whose probe blocks are "last", "best" or explicit indices."""
        if isinstance(probe_layers, str):
            if probe_layers == "last":
                layers = self.last_probe_layers
            elif probe_layers == "best":
                if self.best_probe_layers is None:
                    raise ValueError(
                        f"Model {self.name!r} has no 'best' probe blocks; use 'last' or "
                        "a list of block indices."
                    )
                layers = self.best_probe_layers
            else:
                raise ValueError(
                    f"probe_layers={probe_layers!r} is invalid; expected 'last', 'best' or a "
                    "list of block indices."
                )
        else:
            layers = tuple(int(i) for i in probe_layers)
        return dataclasses.replace(self, probe_layers=layers)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["img_size"] = list(self.img_size)
        out["probe_layers"] = list(self.probe_layers)
        if self.best_probe_layers is not None:
            out["best_probe_layers"] = list(self.best_probe_layers)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown model configuration fields {unknown}; known: {sorted(known)}."
            )
        return cls(**values)


def _released(name, width, blocks, heads, best):
    return ModelConfig(
        name=name,
        embed_dim=width,
        num_blocks=blocks,
        num_heads=heads,
        patch_size=14,
        img_size=(224, 224),
        norm_eps=1e-6,
        probe_layers=tuple(range(blocks - 6, blocks)),
        best_probe_layers=tuple(range(best, best + 6)),
        num_classes=1000,
    )


def _research(name, width, blocks, heads):
    return ModelConfig(
        name=name,
        embed_dim=width,
        num_blocks=blocks,
        num_heads=heads,
        patch_size=14,
        img_size=(224, 224),
        norm_eps=1e-5,
        probe_layers=tuple(range(max(blocks - 6, 0), blocks)),
        head_width=min(2048, 2 * width),
        head_depth=2,
    )


MODELS: dict[str, ModelConfig] = {
    "aim-600M": _released("aim-600M", 1536, 24, 12, best=14),
    "aim-1B": _released("aim-1B", 2048, 24, 16, best=12),
    "aim-3B": _released("aim-3B", 3072, 24, 24, best=12),
    "aim-7B": _released("aim-7B", 4096, 32, 32, best=14),
    # Research sizes that train on a CPU. Their prediction heads are narrower and shallower
    # than the 2048-wide, 12-block head of the paper sizes.
    "aim-tiny": _research("aim-tiny", 192, 6, 3),
    "aim-small": _research("aim-small", 384, 12, 6),
    "aim-base": _research("aim-base", 768, 12, 12),
}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """Look up a registry entry by name and apply field overrides.

    Args:
        name: one of `MODELS`, for example "aim-600M" or "aim-tiny".
        **overrides: `ModelConfig` fields to replace, for example `patch_size=4`.

    Returns:
        The configuration.
    """
    if name not in MODELS:
        raise KeyError(f"Unknown model {name!r}; known models: {sorted(MODELS)}.")
    config = MODELS[name]
    if "num_blocks" in overrides and "probe_layers" not in overrides:
        # The registry's probe blocks refer to the original depth: default to the last six.
        blocks = overrides["num_blocks"]
        overrides["probe_layers"] = tuple(range(max(blocks - 6, 0), blocks))
        overrides.setdefault("best_probe_layers", None)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    return config
