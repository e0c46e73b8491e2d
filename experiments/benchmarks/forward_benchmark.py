"""Forward throughput of an AIM classifier: images/s, ms per batch, FLOP/s and MFU.

Parameters are randomly initialised with `jax.jit(model.init)`, because their values do
not change the timing. FLOPs per image are counted by hand (2 x multiply-adds of every matmul: patch
embedding, qkv, attention QK^T and AV, attention output, MLP, probe head) and cross-checked
against XLA's `cost_analysis()`. MFU divides the achieved FLOP/s by the measured matmul peak
of the device in the same dtype (`matmul_peak.py`). Example:

    python experiments/benchmarks/forward_benchmark.py --model aim-600M --batch-sizes 1,8 \\
        --dtypes float32,bfloat16 --steps 3
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from aim_jax.flops import measure_matmul_peak
from aim_jax.models import AIM
from aim_jax.registry import MODELS, ModelConfig, get_model_config

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def forward_flops(config: ModelConfig, height: int, width: int, num_run: int) -> dict[str, float]:
    """Count the matmul FLOPs (2 x multiply-adds) of one image's classification forward pass.

    Args:
        config: the architecture.
        height: image height in pixels.
        width: image width in pixels.
        num_run: transformer blocks that run (all of them unless the pass stops after the
            highest probe block).

    Returns:
        FLOPs per image by part: "patch_embed", "blocks_dense", "blocks_attention", "head",
        and "total". Norms, GELU, softmax and additions are left out.
    """
    d, p = config.embed_dim, config.patch_size
    tokens = (height // p) * (width // p)
    hidden = config.mlp_ratio * d
    patch_embed = 2 * tokens * (p * p * 3) * d
    # qkv (D -> 3D), output projection (D -> D), fc1 (D -> 4D), fc2 (4D -> D).
    dense = 2 * tokens * (3 * d * d + d * d + 2 * d * hidden) * num_run
    # QK^T and AV, each N x N x D multiply-adds over all heads.
    attention = 2 * 2 * tokens * tokens * d * num_run
    # Key and value projections, one query against N keys, and the classifier.
    head = 2 * (2 * tokens * d * d + 2 * tokens * d + d * config.num_classes)
    total = patch_embed + dense + attention + head
    return {
        "patch_embed": patch_embed,
        "blocks_dense": dense,
        "blocks_attention": attention,
        "head": head,
        "total": total,
    }


def xla_flops(compiled) -> float | None:
    """Return the FLOP count that XLA's cost analysis reports for a compiled function."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def time_forward(model, params, batch_size, height, width, steps):
    """Compile the forward pass for one batch size and return (best seconds, compiled)."""
    images = jnp.asarray(
        np.random.default_rng(0).standard_normal((batch_size, height, width, 3), np.float32)
    )
    compiled = jax.jit(model.apply).lower(params, images).compile()
    compiled(params, images).block_until_ready()  # warm up
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        compiled(params, images).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best, compiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="aim-600M", help=f"registry name, one of {sorted(MODELS)}"
    )
    parser.add_argument("--img-size", type=int, default=224, help="square input side in pixels")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help=f"compute dtypes, from {sorted(DTYPES)}"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per setting (the fastest counts)"
    )
    parser.add_argument(
        "--peak-size", type=int, default=2048, help="side of the matmul that measures the peak"
    )
    parser.add_argument(
        "--all-blocks",
        action="store_true",
        help="run every block (stop_after_probe=False) instead of stopping after the probe",
    )
    args = parser.parse_args()

    config = get_model_config(args.model)
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        if name not in DTYPES:
            parser.error(f"dtype {name!r} is invalid; expected one of {sorted(DTYPES)}.")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    size = args.img_size

    peaks = {name: measure_matmul_peak(name, args.peak_size) for name in dtypes}
    print(f"device: {jax.devices()[0].device_kind}, backend {jax.default_backend()}")
    for name, peak in peaks.items():
        print(f"matmul peak {name} ({args.peak_size}^3): {peak / 1e9:.1f} GFLOP/s")

    params = None
    rows = []
    for name in dtypes:
        model = AIM(config, dtype=DTYPES[name], stop_after_probe=not args.all_blocks)
        if params is None:
            # Parameters are float32 for every compute dtype, so one init serves all.
            images = jnp.zeros((1, size, size, 3), jnp.float32)
            params = jax.jit(model.init)(jax.random.key(0), images)
            count = sum(leaf.size for leaf in jax.tree.leaves(params["params"]))
            flops = forward_flops(config, size, size, model.num_run_blocks)
            print(
                f"model {config.name}: {count / 1e6:.1f}M params, {model.num_run_blocks} blocks "
                f"run, {flops['total'] / 1e9:.1f} GFLOP/image (patch embed "
                f"{flops['patch_embed'] / 1e9:.2f}, dense {flops['blocks_dense'] / 1e9:.1f}, "
                f"attention {flops['blocks_attention'] / 1e9:.2f}, head {flops['head'] / 1e9:.2f})"
            )
        for batch in batch_sizes:
            seconds, compiled = time_forward(model, params, batch, size, size, args.steps)
            achieved = flops["total"] * batch / seconds
            rows.append(
                (name, batch, batch / seconds, 1e3 * seconds, achieved, xla_flops(compiled))
            )

    header = f"{'dtype':>9} {'batch':>5} {'img/s':>8} {'ms/batch':>10} {'GFLOP/s':>8} {'MFU':>6}"
    print(header + f" {'XLA/count':>9}")
    for name, batch, throughput, ms, achieved, xla in rows:
        ratio = f"{xla / (flops['total'] * batch):9.3f}" if xla else f"{'n/a':>9}"
        print(
            f"{name:>9} {batch:>5} {throughput:8.3f} {ms:10.1f} {achieved / 1e9:8.1f} "
            f"{achieved / peaks[name]:6.1%} {ratio}"
        )


if __name__ == "__main__":
    main()
