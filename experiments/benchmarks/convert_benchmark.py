"""Measure peak memory and wall time of `tools/convert_torch.py` on a synthetic checkpoint.

Writes a float32 backbone `.pth` and head `.pth` with the key names and shapes of a released
model, filled with random values, then runs the converter in a subprocess and prints its peak
resident set size and wall time. Everything lives in a temporary directory that is deleted at
the end. The aim-3B shape needs about 11 GB per copy and three copies on disk at the peak
(source, scratch and output), so about 35 GB free.

    python experiments/benchmarks/convert_benchmark.py --model aim-3B
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from aim_jax.conversion import key_table
from aim_jax.registry import MODELS

REPO = Path(__file__).resolve().parents[2]

# Size of the pool of random float32 values, and of the chunks written from it.
CHUNK = 2**26


def _random_file(path: Path, count: int, pool: np.ndarray, shift: int) -> None:
    # Slices of one pool of random values: as incompressible as fresh ones, and fast to write.
    with path.open("wb") as f:
        for start in range(0, count, CHUNK):
            size = min(CHUNK, count - start)
            offset = (shift + start) % (len(pool) - size + 1)
            f.write(pool[offset : offset + size].tobytes())


def write_state_dict(path: Path, shapes: dict[str, tuple[int, ...]], scratch: Path) -> int:
    """Write a `.pth` of random float32 tensors without holding them all in memory.

    Each tensor is first written to a raw file and memory-mapped with `torch.from_file`, so
    `torch.save` streams the pages from disk.

    Returns:
        The number of bytes of tensor data.
    """
    pool = 0.02 * np.random.default_rng(0).standard_normal(CHUNK + 4099, dtype=np.float32)
    state = {}
    total = 0
    for i, (key, shape) in enumerate(shapes.items()):
        count = int(np.prod(shape))
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.int64)
            continue
        raw = scratch / f"{i:05d}.raw"
        _random_file(raw, count, pool, shift=4099 * i)
        state[key] = torch.from_file(str(raw), shared=True, size=count, dtype=torch.float32)
        state[key] = state[key].view(shape)
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 0.5  # a valid variance; small, so copied to RAM
        total += count * 4
    torch.save(state, path)
    del state
    for raw in scratch.glob("*.raw"):
        raw.unlink()
    return total


def _poll_peak_rss(pid: int, peak: list[int], done: threading.Event) -> None:
    # VmHWM is the kernel's high-water mark of the process's resident set since its exec. It
    # is read here rather than taken from getrusage, because Linux carries the parent's peak
    # into a child's ru_maxrss across fork and exec.
    status = Path(f"/proc/{pid}/status")
    while not done.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            break
        time.sleep(0.05)


def run_converter(args: list[str]) -> tuple[float, int]:
    """Run the converter; return its wall seconds and peak resident set size in bytes."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "convert_torch.py"), *args])
    peak, done = [0], threading.Event()
    poller = threading.Thread(target=_poll_peak_rss, args=(proc.pid, peak, done))
    poller.start()
    code = proc.wait()
    done.set()
    poller.join()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"The converter exited with status {code}.")
    return wall, peak[0]


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aim-3B", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--workdir", help="parent of the temporary directory (default: system)")
    args = parser.parse_args()

    config = MODELS[args.model]
    work = Path(tempfile.mkdtemp(prefix="convert-benchmark-", dir=args.workdir))
    try:
        backbone = {row.source: row.source_shape for row in key_table(config, head=False)}
        head = {row.source: row.source_shape for row in key_table(config, backbone=False)}
        start = time.perf_counter()
        nbytes = write_state_dict(work / "backbone.pth", backbone, work)
        nbytes += write_state_dict(work / "head.pth", head, work)
        setup = time.perf_counter() - start
        wall, peak = run_converter(
            [
                "--backbone", str(work / "backbone.pth"),
                "--head", str(work / "head.pth"),
                "--model", args.model,
                "--probe-layers", "best",
                "--dtype", args.dtype,
                "--output", str(work / "converted"),
                "--no-progress",
            ]
        )  # fmt: skip
        output_bytes = sum(f.stat().st_size for f in (work / "converted").rglob("*") if f.is_file())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"date:            {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"cpu:             {cpu_model()} ({psutil.cpu_count()} logical cores)")
    print(f"memory:          {psutil.virtual_memory().total / 2**30:.1f} GiB")
    print(f"model:           {args.model}, float32 source, {args.dtype} output")
    print(f"source tensors:  {nbytes / 1e9:.2f} GB (written in {setup:.0f} s)")
    print(f"output on disk:  {output_bytes / 1e9:.2f} GB")
    print(f"wall time:       {wall:.1f} s")
    print(f"peak RSS:        {peak / 2**30:.2f} GiB (VmHWM of the converter process)")


if __name__ == "__main__":
    main()
