"""Shared pieces of the training tests: a tiny config, run helpers and a multi-process worker.

Run as a script, this file is one process of a multi-process CPU training run:

    python tests/train_helpers.py --process_id 0 --num_processes 2 --port 12345 --workdir DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"

# Command-line overrides that shrink configs/fashion_mnist.py to a tiny model. The 6 blocks of
# that config stay, because `probe_layers` (a list) cannot be overridden on the command line.
TINY_MODEL_FLAGS = (
    "--config.model.embed_dim=32",
    "--config.model.num_heads=2",
    "--config.model.head_width=32",
    "--config.model.head_depth=1",
    "--config.device_peak_flops=1e9",
)

# XLA flags of the training subprocesses. Optimisation level 0 halves the compile time of the
# tiny model on CPU, which dominates these short runs.
SUBPROCESS_XLA_FLAGS = "--xla_backend_optimization_level=0"


def fashion_mnist_available() -> bool:
    return os.path.isdir(FASHION_MNIST_PATH)


def load_config_file(name: str, arg: str | None = None):
    """Call `get_config(arg)` of `configs/<name>.py`."""
    spec = importlib.util.spec_from_file_location(
        f"configs_{name}", REPO_ROOT / "configs" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_config(**overrides: Any):
    """Return the Fashion-MNIST runlocal config with a 2-block, width-32 model.

    Args:
        **overrides: top-level config fields to set, for example `total_steps=6`.
    """
    config = load_config_file("fashion_mnist", "runlocal")
    config.model.embed_dim = 32
    config.model.num_blocks = 2
    config.model.num_heads = 2
    config.model.head_width = 32
    config.model.head_depth = 1
    config.model.probe_layers = [0, 1]
    config.device_peak_flops = 1e9  # skips the matmul measurement
    config.data.num_threads = 2
    config.data.prefetch_buffer_size = 4
    for key, value in overrides.items():
        config[key] = value
    return config


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Return the records of `workdir/metrics.jsonl` in file order."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_losses(workdir: str | os.PathLike[str]) -> dict[int, float]:
    """Return {step: train/loss} from `workdir/metrics.jsonl`."""
    return {int(record["step"]): record["train/loss"] for record in read_metrics(workdir)}


def train(config, workdir: str | os.PathLike[str], devices=None) -> dict[str, float]:
    """Run `setup_training` and `train_loop` on `devices` and close the checkpoint manager."""
    from aim_jax import train as train_lib

    setup = train_lib.setup_training(config, os.fspath(workdir), devices)
    try:
        return train_lib.train_loop(setup, os.fspath(workdir))
    finally:
        setup.manager.close()


def run_steps(setup, num_steps: int):
    """Run `num_steps` steps of `setup.step_fn` without checkpoints or metrics.

    Returns:
        `(state, losses)`: the final train state and the list of per-step losses.
    """
    import jax

    from aim_jax import sharding

    state, losses = setup.state, []
    with sharding.activation_sharding(setup.mesh, setup.rules):
        for _ in range(num_steps):
            batch = next(setup.train_iter)
            batch = sharding.host_local_batch_to_global({"image": batch["image"]}, setup.mesh)
            state, step_metrics = setup.step_fn(state, batch, setup.rng)
            losses.append(float(jax.device_get(step_metrics["train/loss"])))
    return state, losses


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--total_steps", type=int, default=6)
    args = parser.parse_args()

    import ml_collections
    from absl import logging

    from aim_jax import train as train_lib

    logging.set_verbosity(logging.WARNING)
    config = tiny_config(total_steps=args.total_steps)
    config.distributed = ml_collections.ConfigDict(
        {
            "coordinator_address": f"127.0.0.1:{args.port}",
            "num_processes": args.num_processes,
            "process_id": args.process_id,
        }
    )
    train_lib.train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
    _worker_main()
