"""Benchmark the pre-training step: throughput, step time, MFU, compile time and memory.

    python experiments/benchmarks/train_benchmark.py
    python experiments/benchmarks/train_benchmark.py --sizes aim-tiny,aim-base --steps 3

For each size the jitted `train_step` of `aim_jax.train` runs on random 224 px images on one
device, with the blocks under `nn.scan` unless `--no_scan` unrolls them. MFU is the analytic
`flops.pretrain_step_flops` over the measured matmul peak (`flops.measure_matmul_peak`). For
aim-7B shapes it only lowers and compiles the step from abstract inputs
(`jax.ShapeDtypeStruct`, nothing allocated), with and without `nn.scan`.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import psutil

from aim_jax import config_lib, flops
from aim_jax import train as train_lib

IMAGE_SIZE = 224


def make_config(size: str, batch_size: int, scan: bool, dtype: str) -> ml_collections.ConfigDict:
    config = config_lib.base_pretrain_config()
    config.model = config_lib.model_config_dict(size)
    config.batch_size = batch_size
    config.total_steps = 1000
    config.scan = scan
    config.dtype = dtype
    return config


def build_step(config):
    """Return (jitted step, jitted state init, abstract state, model config) on one device."""
    model, model_config = train_lib.create_model(config)
    tx, schedule = train_lib.create_optimizer(config)
    step = train_lib.make_train_step(model, tx, schedule, int(config.grad_accum_steps))
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(train_lib.init_state(model, tx, config, jax.random.key(0)))
    )
    init = jax.jit(
        lambda: nn.meta.unbox(train_lib.init_state(model, tx, config, jax.random.key(0)))
    )
    return jax.jit(step, donate_argnums=0), init, abstract, model_config


def random_batch(batch_size: int) -> dict[str, jax.Array]:
    """Return a batch of `batch_size` random 224 px images, the same for every call."""
    images = np.random.default_rng(0).normal(size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, 3))
    return {"image": jnp.asarray(images, jnp.float32)}


def memory_needed(compiled) -> int | None:
    """Bytes the compiled step needs by XLA's analysis (arguments, outputs, temporaries)."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def memory_analysis_bytes(compiled) -> str:
    needed = memory_needed(compiled)
    if needed is None:
        return "n/a"
    temp = compiled.memory_analysis().temp_size_in_bytes
    return f"{needed / 2**30:.2f} GiB (temp {temp / 2**30:.2f})"


def benchmark_size(
    size: str, batch_size: int, steps: int, dtype: str, peak: float, scan: bool = True
) -> dict:
    config = make_config(size, batch_size, scan=scan, dtype=dtype)
    step, init, abstract, model_config = build_step(config)
    num_tokens = (IMAGE_SIZE // model_config.patch_size) ** 2
    flops_per_image = flops.pretrain_step_flops(model_config, num_tokens)
    batch_spec = {
        "image": jax.ShapeDtypeStruct((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
    }
    rng = jax.random.key(1)
    start = time.perf_counter()
    compiled = step.lower(abstract, batch_spec, rng).compile()
    compile_s = time.perf_counter() - start
    needed = memory_needed(compiled)
    # `available` already excludes the memory this process uses now. The aim-600M run at
    # batch 2 peaked at 21.2 GiB RSS against an estimate of 20.3 GiB, so the 5% margin has to
    # cover about 1 GiB.
    available = psutil.virtual_memory().available
    if needed is not None and needed > 0.95 * available:
        return {
            "size": size,
            "skipped": f"XLA's memory analysis gives {needed / 2**30:.2f} GiB, over 95% of the "
            f"{available / 2**30:.2f} GiB available",
        }

    batch = random_batch(batch_size)
    state = init()
    state, metrics = compiled(state, batch, rng)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    images_per_s = batch_size / step_s
    return {
        "size": size,
        "batch": batch_size,
        "compile_s": compile_s,
        "step_s": step_s,
        "images_per_s": images_per_s,
        "gflop_per_image": flops_per_image / 1e9,
        "mfu": images_per_s * flops_per_image / peak,
        "xla_memory": memory_analysis_bytes(compiled),
        "loss": float(metrics["train/loss"]),
    }


def compile_abstract(size: str, batch_size: int, scan: bool) -> dict:
    """Lower and compile the step of `size` from abstract inputs; nothing is allocated."""
    config = make_config(size, batch_size, scan=scan, dtype="bfloat16")
    config.remat_policy = "dots_no_batch"
    step, _, abstract, _ = build_step(config)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    lowered = step.lower(abstract, batch, rng)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start - lower_s
    return {
        "size": size,
        "scan": scan,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "xla_memory": memory_analysis_bytes(compiled),
    }


def rss_gib() -> tuple[float, float]:
    current = psutil.Process().memory_info().rss / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return current, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="aim-tiny,aim-small,aim-base,aim-600M")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step")
    parser.add_argument("--batch_size_600m", type=int, default=2, help="images per aim-600M step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no_scan", dest="scan", action="store_false", help="unroll the blocks")
    parser.add_argument(
        "--max_step_seconds",
        type=float,
        default=120.0,
        help="skip a size whose analytic step time at the measured peak exceeds this",
    )
    parser.add_argument(
        "--compile_7b", default="scan,unrolled", help="aim-7B compile variants; empty skips"
    )
    args = parser.parse_args()

    peak = flops.measure_matmul_peak(args.dtype)
    print(f"device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(f"measured {args.dtype} matmul peak: {peak / 1e9:.1f} GFLOP/s")
    print(f"blocks: {'nn.scan' if args.scan else 'unrolled'}")
    print()
    header = "size       batch  compile_s  step_s  images/s  GFLOP/img    MFU  XLA memory"
    print(header)
    for size in [s for s in args.sizes.split(",") if s]:
        batch = args.batch_size_600m if size == "aim-600M" else args.batch_size
        model_config = config_lib.to_model_config(config_lib.model_config_dict(size))
        num_tokens = (IMAGE_SIZE // model_config.patch_size) ** 2
        estimate = batch * flops.pretrain_step_flops(model_config, num_tokens) / peak
        if estimate > args.max_step_seconds:
            print(
                f"{size:<10} skipped: a step needs about {estimate:.0f} s at the measured peak "
                f"(over --max_step_seconds={args.max_step_seconds:.0f})"
            )
            continue
        row = benchmark_size(size, batch, args.steps, args.dtype, peak, args.scan)
        if "skipped" in row:
            print(f"{size:<10} skipped: {row['skipped']}")
            continue
        print(
            f"{size:<10} {row['batch']:>5}  {row['compile_s']:>9.1f}  {row['step_s']:>6.2f}  "
            f"{row['images_per_s']:>8.2f}  {row['gflop_per_image']:>9.1f}  "
            f"{100 * row['mfu']:>4.1f}%  {row['xla_memory']}"
        )
    current, peak_rss = rss_gib()
    print(f"\nprocess RSS: {current:.2f} GiB now, {peak_rss:.2f} GiB peak")

    variants = [v for v in args.compile_7b.split(",") if v]
    if variants:
        print("\naim-7B train_step compiled from abstract inputs (bfloat16, remat dots_no_batch):")
        print("layout     lower_s  compile_s  XLA memory (per device, batch 1)")
        for variant in variants:
            row = compile_abstract("aim-7B", 1, scan=variant == "scan")
            print(
                f"{variant:<10} {row['lower_s']:>7.1f}  {row['compile_s']:>9.1f}  "
                f"{row['xla_memory']}"
            )
        current, peak_rss = rss_gib()
        print(f"process RSS after compiling: {current:.2f} GiB now, {peak_rss:.2f} GiB peak")


if __name__ == "__main__":
    main()
