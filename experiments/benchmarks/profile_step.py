"""Profile one pre-training step and print where its time goes, per XLA operation.

    python experiments/benchmarks/profile_step.py --size aim-base --batch_size 8

Runs the jitted `train_step` of `aim_jax.train` (as `train_benchmark.py` builds it) once
under `jax.profiler.trace` and reads the trace with `jax.profiler.ProfileData`. It prints
the operations of the compiled step with the most time, each with the JAX operation it came
from, then the time per kind of operation (`ynn_fusion` for matmuls, `dot` for Eigen
matmuls, loop fusions for elementwise work).

XLA's CPU runtime runs independent operations at the same time, and two operations that
overlap both count their full time. So the sum can exceed the wall time, and a matmul that
shares the cores with another looks slower than it is. Tracing adds a cost to every
operation, which shows most on small models, so time steps with `train_benchmark.py`. On the
CPU the trace has per-operation events only with `--xla_cpu_enable_xprof_traceme=true`,
which this script adds to `XLA_FLAGS`.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from train_benchmark import build_step, make_config, random_batch  # noqa: E402

# Events of the runtime itself rather than of one operation of the step. An "end: " event
# marks where an operation that ran asynchronously finished.
RUNTIME_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "end: ")


def op_sources(hlo_text: str) -> dict[str, str]:
    """Map each HLO instruction name to the JAX operation in its metadata."""
    sources = {}
    for match in re.finditer(r'%(\S+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo_text):
        source = match.group(2).replace("jit(train_step)/", "")
        source = source.replace("transpose(jvp(AIMPretrainer))", "backward")
        sources[match.group(1)] = source.replace("jvp(AIMPretrainer)", "forward")
    return sources


def operation_times(trace_dir: pathlib.Path) -> tuple[collections.Counter, collections.Counter]:
    """Sum the duration (ns) and count the events of each XLA operation in a trace."""
    traces = sorted(trace_dir.glob("**/*.xplane.pb"))
    if not traces:
        raise FileNotFoundError(f"jax.profiler.trace wrote no .xplane.pb file under {trace_dir}.")
    profile = jax.profiler.ProfileData.from_file(str(traces[-1]))
    durations, counts = collections.Counter(), collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's runtime threads
                continue
            for event in line.events:
                if event.name.startswith(RUNTIME_EVENTS):
                    continue
                durations[event.name] += event.duration_ns
                counts[event.name] += 1
    return durations, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="aim-base", help="model name in aim_jax.registry")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--top", type=int, default=25, help="operations to list")
    parser.add_argument("--no_scan", dest="scan", action="store_false", help="unroll the blocks")
    args = parser.parse_args()

    config = make_config(args.size, args.batch_size, scan=args.scan, dtype=args.dtype)
    step, init, _, _ = build_step(config)
    batch = random_batch(args.batch_size)
    rng = jax.random.key(1)
    state = init()
    compiled = step.lower(state, batch, rng).compile()
    state, metrics = compiled(state, batch, rng)  # warm-up
    jax.block_until_ready(metrics)

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            state, metrics = compiled(state, batch, rng)
            jax.block_until_ready(metrics)
            wall = time.perf_counter() - start
        durations, counts = operation_times(pathlib.Path(trace_dir))

    sources = op_sources(compiled.as_text())
    total = sum(durations.values())
    print(f"{args.size}, batch {args.batch_size}, {args.dtype}, scan={args.scan}")
    print(f"profiled step: {wall:.2f} s wall, {total / 1e9:.2f} s summed over operations\n")
    print(f"{'ms':>9} {'share':>6} {'calls':>5}  operation  <-  JAX source")
    for name, duration in durations.most_common(args.top):
        print(
            f"{duration / 1e6:9.1f} {100 * duration / total:5.1f}% {counts[name]:5d}  "
            f"{name}  <-  {sources.get(name, '?')}"
        )
    kinds = collections.Counter()
    for name, duration in durations.items():
        kinds[re.sub(r"\.\d+$", "", name)] += duration
    print(f"\n{'ms':>9} {'share':>6}  kind of operation")
    for kind, duration in kinds.most_common(args.top):
        print(f"{duration / 1e6:9.1f} {100 * duration / total:5.1f}%  {kind}")


if __name__ == "__main__":
    main()
