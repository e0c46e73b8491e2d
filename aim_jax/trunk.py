"""The AIM transformer trunk, unrolled or under `nn.scan`, with optional rematerialisation.

Both layouts compute the same function. Unrolled blocks are named `blocks_0`, `blocks_1`, ...
and the scanned layout stacks the same leaves along a leading "layers" axis under `blocks`;
`stack_blocks` and `unstack_blocks` convert between the two.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aim_jax.layers import Block, Dtype, layer_norm

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class TrunkOutput(NamedTuple):
    """Outputs of a trunk pass.

    Attributes:
        tokens: output of the last block that ran, (B, N, D).
        pooled: mean of the probe blocks' outputs, (B, N, D); None when no probe block ran.
        blocks: every block's output stacked, (num_run, B, N, D), when requested, else None.
    """

    tokens: jax.Array
    pooled: jax.Array | None
    blocks: jax.Array | None


class _ScanStep(nn.Module):
    """One scanned block that also accumulates the probe blocks' outputs."""

    num_heads: int
    mlp_ratio: int
    norm_eps: float
    dtype: Dtype
    remat_policy: str
    collect_blocks: bool

    @nn.compact
    def __call__(self, carry, is_probe, mask):
        x, probe_sum = carry
        block_cls = Block
        if self.remat_policy != "none":
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        x = block_cls(self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype, name="block")(
            x, mask
        )
        probe_sum = probe_sum + jnp.where(is_probe, x, 0).astype(probe_sum.dtype)
        return (x, probe_sum), (x if self.collect_blocks else None)


class Trunk(nn.Module):
    """Transformer blocks plus the post-trunk LayerNorm.

    Attributes:
        num_blocks: blocks in the parameters.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
        norm_eps: LayerNorm epsilon.
        dtype: compute dtype (parameters stay float32).
        scan: run the blocks under `nn.scan` with stacked parameters.
        remat_policy: one of `REMAT_POLICIES`.
    """

    num_blocks: int
    num_heads: int
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    scan: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        *,
        num_run: int | None = None,
        probe_layers: tuple[int, ...] = (),
        collect_blocks: bool = False,
        final_norm: bool = False,
    ) -> TrunkOutput:
        """Run the first `num_run` blocks (all by default).

        Args:
            x: tokens, (B, N, D).
            mask: boolean attention mask broadcastable to (B, 1, N, N), or None.
            num_run: how many blocks to run; the scanned layout then needs parameters stacked
                for exactly that many blocks (`load_pretrained` slices them).
            probe_layers: blocks whose outputs are averaged into `TrunkOutput.pooled`.
            collect_blocks: also return every block's output.
            final_norm: apply the post-trunk LayerNorm to `tokens` (needs all blocks to run).

        Returns:
            A `TrunkOutput`.
        """
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r} is invalid; expected one of "
                f"{sorted(REMAT_POLICIES)}."
            )
        num_run = self.num_blocks if num_run is None else num_run
        if not 0 < num_run <= self.num_blocks:
            raise ValueError(f"num_run={num_run} is outside 1..{self.num_blocks}.")
        probe_in_run = [i for i in probe_layers if i < num_run]
        is_probe = np.zeros((num_run,), dtype=bool)
        is_probe[probe_in_run] = True

        if self.scan:
            step = nn.scan(
                _ScanStep,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=num_run,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(
                self.num_heads,
                self.mlp_ratio,
                self.norm_eps,
                self.dtype,
                self.remat_policy,
                collect_blocks,
                name="blocks",
            )
            probe_sum = jnp.zeros(x.shape, jnp.float32)
            (x, probe_sum), blocks = step((x, probe_sum), jnp.asarray(is_probe), mask)
        else:
            block_cls = Block
            if self.remat_policy != "none":
                block_cls = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy])
            probe_sum = None
            outputs = []
            for i in range(num_run):
                x = block_cls(
                    self.num_heads, self.mlp_ratio, self.norm_eps, self.dtype, name=f"blocks_{i}"
                )(x, mask)  # (B, N, D)
                if is_probe[i]:
                    term = x.astype(jnp.float32)
                    probe_sum = term if probe_sum is None else probe_sum + term
                if collect_blocks:
                    outputs.append(x)
            blocks = jnp.stack(outputs) if collect_blocks else None

        pooled = probe_sum / len(probe_in_run) if probe_in_run else None  # (B, N, D) float32
        if final_norm:
            if num_run != self.num_blocks:
                raise ValueError("The post-trunk norm needs every block to run.")
            x = layer_norm(self.norm_eps, self.dtype, "post_trunk_norm")(x)
        return TrunkOutput(tokens=x, pooled=pooled, blocks=blocks)


def _block_index(name: str) -> int | None:
    prefix = "blocks_"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


def stack_blocks(trunk_params: dict[str, Any], num_blocks: int | None = None) -> dict[str, Any]:
    """Convert unrolled trunk parameters (`blocks_0`, ...) to the scanned layout.

    Args:
        trunk_params: the "trunk" subtree of an unrolled model's params.
        num_blocks: keep only the first `num_blocks` blocks (all by default).

    Returns:
        The subtree with `blocks/block/...` leaves stacked on a leading axis.
    """
    indices = sorted(i for i in map(_block_index, trunk_params) if i is not None)
    if indices != list(range(len(indices))):
        raise ValueError(f"Trunk block indices are not contiguous from 0: {indices}.")
    num_blocks = len(indices) if num_blocks is None else num_blocks
    if num_blocks > len(indices):
        raise ValueError(f"Requested {num_blocks} blocks but the trunk has {len(indices)}.")
    out = {k: v for k, v in trunk_params.items() if _block_index(k) is None}
    per_block = [trunk_params[f"blocks_{i}"] for i in range(num_blocks)]
    out["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)}
    return out


def unstack_blocks(trunk_params: dict[str, Any], num_blocks: int | None = None) -> dict[str, Any]:
    """Convert scanned trunk parameters (`blocks/block/...`) to the unrolled layout."""
    stacked = trunk_params["blocks"]["block"]
    total = jax.tree.leaves(stacked)[0].shape[0]
    num_blocks = total if num_blocks is None else num_blocks
    out = {k: v for k, v in trunk_params.items() if k != "blocks"}
    for i in range(num_blocks):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
