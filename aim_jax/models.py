"""The AIM model: patch embedding, trunk, attention-probe head and pre-training head.

One Flax module serves classification (`__call__`, `features`) and pre-training
(`pretrain`), so a pre-trained trunk, a converted released checkpoint and a probe all share
one parameter tree:

    params/patch_embed/{proj/{kernel, bias}, norm/{scale, bias}}
    params/trunk/{blocks_0 .. blocks_{n-1} | blocks/block (scanned), post_trunk_norm}
    params/head/{cls_token, k, v, linear}          batch_stats/head/bn/{mean, var, ...}
    params/prediction_head/...                      (pre-training only)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aim_jax.heads import AttentionProbe, PredictionHead
from aim_jax.layers import PatchEmbed, attention_mask
from aim_jax.registry import ModelConfig
from aim_jax.trunk import Trunk

Dtype = Any


def check_images(images: jax.Array, patch_size: int) -> None:
    """Raise a ValueError unless `images` is an NHWC RGB batch tiled by the patch size."""
    shape = tuple(images.shape)
    if len(shape) != 4:
        raise ValueError(
            f"Expected images of shape (batch, height, width, 3) (NHWC), got shape {shape}. "
            "Add a batch axis for a single image."
        )
    if shape[-1] != 3:
        hint = ""
        if shape[1] == 3:
            hint = " The array looks channels-first (NCHW); transpose it with (0, 2, 3, 1)."
        raise ValueError(
            f"Expected 3 RGB channels in the last axis (NHWC), got shape {shape}.{hint}"
        )
    height, width = shape[1], shape[2]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image height and width must be divisible by the patch size {patch_size}, got "
            f"{height}x{width}. Resize or crop to a multiple of {patch_size}."
        )


def make_trunk(
    config: ModelConfig, dtype: Dtype, scan: bool, remat_policy: str, name: str | None = None
) -> Trunk:
    """Build the trunk of `config`, shared by `AIM` and `AIMPretrainer`."""
    return Trunk(
        num_blocks=config.num_blocks,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        norm_eps=config.norm_eps,
        dtype=dtype,
        scan=scan,
        remat_policy=remat_policy,
        name=name,
    )


class AIM(nn.Module):
    """AIM v1 model.

    Attributes:
        config: the architecture.
        dtype: compute dtype, float32 or bfloat16; parameters are float32 either way.
        scan: run the trunk blocks under `nn.scan` with stacked parameters.
        remat_policy: rematerialisation policy of the blocks (see `aim_jax.trunk`).
        stop_after_probe: in classification, run only up to the highest probe block. Set it
            to False to run (and initialise) every block and the post-trunk norm.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"
    stop_after_probe: bool = True

    def setup(self):
        cfg = self.config
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim, cfg.norm_eps, self.dtype)
        self.trunk = make_trunk(cfg, self.dtype, self.scan, self.remat_policy)
        self.head = AttentionProbe(cfg.num_heads, cfg.num_classes, dtype=self.dtype)

    @property
    def num_run_blocks(self) -> int:
        """Blocks that a classification pass runs."""
        if self.stop_after_probe:
            return max(self.config.probe_layers) + 1
        return self.config.num_blocks

    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        """Classify NHWC images; returns float32 logits of shape (B, num_classes)."""
        return self.features(images, train=train)["logits"]

    def features(
        self, images: jax.Array, *, train: bool = False, collect_blocks: bool = False
    ) -> dict[str, jax.Array]:
        """Run the classification path and return its intermediate features.

        Args:
            images: (B, H, W, 3) normalised images; H and W divisible by the patch size.
            train: update the probe's BatchNorm statistics from the batch (needs
                `mutable=["batch_stats"]`); otherwise the running statistics are used.
            collect_blocks: also return every block's output.

        Returns:
            A dict with "logits" (B, classes), "pooled" (B, N, D) (the mean of the probe
            blocks' outputs that feeds the head), "tokens" (B, N, D) (the last block that
            ran) and, when requested, "blocks" (num_run, B, N, D).
        """
        check_images(images, self.config.patch_size)
        x = self.patch_embed(images)  # (B, N, D)
        out = self.trunk(
            x,
            None,
            num_run=self.num_run_blocks,
            probe_layers=self.config.probe_layers,
            collect_blocks=collect_blocks,
            final_norm=not self.stop_after_probe,
        )
        logits = self.head(out.pooled, train=train)
        result = {"logits": logits, "pooled": out.pooled, "tokens": out.tokens}
        if collect_blocks:
            result["blocks"] = out.blocks
        return result


class AIMPretrainer(nn.Module):
    """AIM trunk with the prediction head used for autoregressive pre-training.

    Its `patch_embed` and `trunk` parameters have the same names and shapes as `AIM`'s.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array, prefix_len: jax.Array) -> jax.Array:
        """Predict, at every position i, the normalised pixels of patch i + 1.

        Args:
            images: (B, H, W, 3) normalised images.
            prefix_len: (B,) int prefix lengths for the prefix-causal mask.

        Returns:
            float32 predictions of shape (B, N, patch_size * patch_size * 3).
        """
        cfg = self.config
        check_images(images, cfg.patch_size)
        grid = (images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size)
        x = PatchEmbed(cfg.patch_size, cfg.embed_dim, cfg.norm_eps, self.dtype, name="patch_embed")(
            images
        )  # (B, N, D)
        mask = attention_mask("prefix", x.shape[1], prefix_len)  # (B, 1, N, N)
        trunk = make_trunk(cfg, self.dtype, self.scan, self.remat_policy, name="trunk")
        tokens = trunk(x, mask, final_norm=True).tokens  # (B, N, D)
        return PredictionHead(
            width=cfg.head_width,
            depth=cfg.head_depth,
            patch_dim=cfg.patch_dim,
            grid=grid,
            norm_eps=cfg.norm_eps,
            dtype=self.dtype,
            name="prediction_head",
        )(tokens)
