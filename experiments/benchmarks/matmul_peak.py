"""Measure the matmul peak FLOP/s of the default JAX device with a large square `jnp.dot`.

The measured peak is the denominator of the model FLOP utilisation (MFU) that the forward
benchmark and the training loop print. As a script:

    python experiments/benchmarks/matmul_peak.py --size 2048 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse

import jax

from aim_jax.flops import measure_matmul_peak

DTYPES = ("float32", "bfloat16")


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
        peak = measure_matmul_peak(name, args.size, args.repeats)
        print(f"{name:>9} {args.size}x{args.size} matmul: {peak / 1e9:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
