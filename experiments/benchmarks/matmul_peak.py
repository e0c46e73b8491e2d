"""Measure the matmul peak FLOP/s of the default JAX device with a large square `jnp.dot`.

The measured peak is the denominator of the model FLOP utilisation (MFU) that the forward
benchmark and the training loop print. As a script:

    python experiments/benchmarks/matmul_peak.py --size 2048 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 10) -> float:
    """Return the best FLOP/s of an (size, size) x (size, size) matmul over `repeats` runs.

    Args:
        dtype: input and output dtype of the matmul, for example `jnp.float32`.
        size: side of the square matrices. One run is 2 * size**3 FLOPs.
        repeats: timed runs after one warm-up run; the fastest one counts.

    Returns:
        FLOP/s of the fastest run.
    """
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size and repeats must be positive, got size={size}, repeats={repeats}.")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((size, size), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((size, size), np.float32), dtype)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the square matrices")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (the fastest counts)")
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help=f"comma-separated, from {sorted(DTYPES)}"
    )
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            parser.error(f"dtype {name!r} is invalid; expected one of {sorted(DTYPES)}.")
        peak = measure_matmul_peak(DTYPES[name], args.size, args.repeats)
        print(f"{name:>9} {args.size}x{args.size} matmul: {peak / 1e9:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
