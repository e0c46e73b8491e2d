"""Saving and loading model checkpoints: an Orbax checkpoint of variables plus config.json.

A checkpoint directory written by `save_pretrained` (or by `tools/convert_torch.py`) holds:

    config.json      the `ModelConfig` fields
    variables/       Orbax checkpoint of {"params": ..., "batch_stats": ...} in the unrolled
                     block layout (`blocks_0`, `blocks_1`, ...)

`load_pretrained` needs nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from aim_jax.models import AIM
from aim_jax.registry import ModelConfig
from aim_jax.trunk import stack_blocks

CONFIG_FILE = "config.json"
VARIABLES_DIR = "variables"


def prepare_output(directory: Path, overwrite: bool) -> Path:
    """Return a fresh temporary directory beside `directory`, after checking it may be written.

    Write the output there, then move it into place with `commit_output`, so that a failure
    leaves nothing at `directory`.
    """
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {directory} already exists; pass overwrite=True (--overwrite) "
            "to replace it."
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700; the output should be readable like any directory
    return tmp


def commit_output(tmp: Path, directory: Path) -> None:
    """Move a finished temporary directory to `directory`, replacing an old one."""
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def write_checkpoint(
    directory: str | os.PathLike,
    config: ModelConfig,
    variables: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write config.json and the Orbax variables atomically.

    The checkpoint is written to a temporary directory beside `directory` and renamed at the
    end, so a failure leaves nothing at `directory`.

    Args:
        directory: output directory.
        config: the architecture.
        variables: {"params": ..., "batch_stats": ...} in the unrolled layout, numpy or jax
            arrays. Orbax copies numpy leaves into memory; `aim_jax.conversion` streams large
            checkpoints instead.
        overwrite: replace an existing directory.

    Returns:
        The output directory.
    """
    directory = Path(directory).absolute()
    tmp = prepare_output(directory, overwrite)
    try:
        (tmp / CONFIG_FILE).write_text(config.to_json())
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            checkpointer.save(tmp / VARIABLES_DIR, args=ocp.args.StandardSave(variables))
        commit_output(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_pretrained(
    directory: str | os.PathLike,
    config: ModelConfig,
    variables: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Save a model checkpoint that `load_pretrained` reads.

    Args:
        directory: output directory; replaced only with `overwrite=True`.
        config: the architecture.
        variables: {"params": ..., "batch_stats": ...} of an `AIM` model, unrolled or
            scanned (scanned blocks are unstacked before saving).
        overwrite: replace an existing directory.

    Returns:
        The output directory.
    """
    variables = dict(variables)
    params = dict(variables["params"])
    if "blocks" in params.get("trunk", {}):
        from aim_jax.trunk import unstack_blocks

        params["trunk"] = unstack_blocks(params["trunk"])
    variables["params"] = params
    variables = jax.tree.map(lambda x: jax.device_get(x), variables)
    return write_checkpoint(directory, config, variables, overwrite=overwrite)


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """Read the `ModelConfig` stored in a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a checkpoint written by save_pretrained or "
            "tools/convert_torch.py."
        )
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"Invalid JSON in {path}: {err}") from err
    return ModelConfig.from_dict(values)


def restore_variables(directory: str | os.PathLike, target: Any = None) -> dict[str, Any]:
    """Restore the Orbax variables of a checkpoint directory.

    Args:
        directory: checkpoint directory.
        target: optional abstract tree (`jax.ShapeDtypeStruct` leaves with shardings) that
            places the restored arrays; by default they land on the default device.

    Returns:
        The variables dict.
    """
    path = Path(directory).absolute() / VARIABLES_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found: the checkpoint has no Orbax variables.")
    with ocp.StandardCheckpointer() as checkpointer:
        if target is None:
            return checkpointer.restore(path)
        return checkpointer.restore(path, target)


def trim_variables(variables: dict[str, Any], num_run: int, *, scan: bool) -> dict[str, Any]:
    """Keep the first `num_run` blocks of unrolled variables, stacked when `scan` is set.

    The post-trunk norm is dropped when not every block runs.
    """
    params = dict(variables["params"])
    trunk = {
        name: value
        for name, value in params["trunk"].items()
        if not name.startswith("blocks_") or int(name.split("_")[1]) < num_run
    }
    num_blocks = sum(name.startswith("blocks_") for name in params["trunk"])
    if num_run < num_blocks:
        trunk.pop("post_trunk_norm", None)
    params["trunk"] = stack_blocks(trunk) if scan else trunk
    return {**variables, "params": params}


def load_pretrained(
    checkpoint_dir: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    scan: bool = False,
    remat_policy: str = "none",
    stop_after_probe: bool = True,
) -> tuple[AIM, dict[str, Any]]:
    """Load a checkpoint as an `AIM` model in evaluation mode.

    Args:
        checkpoint_dir: directory written by `save_pretrained` or `tools/convert_torch.py`.
        dtype: compute dtype, jnp.float32 or jnp.bfloat16 (parameters stay float32).
        scan: run the trunk under `nn.scan` (the blocks are stacked on load).
        remat_policy: rematerialisation policy of the blocks.
        stop_after_probe: run only up to the highest probe block and drop the parameters of
            later blocks; set False to keep and run every block.

    Returns:
        `(model, variables)`; `model.apply(variables, images)` returns logits of shape
        (B, classes) for NHWC images normalised as in `aim_jax.preprocessing`.
    """
    config = read_config(checkpoint_dir)
    variables = restore_variables(checkpoint_dir)
    if "head" not in variables["params"]:
        raise ValueError(
            f"Checkpoint {checkpoint_dir} has no attention-probe head (it was converted without "
            "--head or saved from pre-training), so it cannot classify. Read its trunk with "
            "aim_jax.pretrained.restore_variables, or train a head with python -m aim_jax.probe."
        )
    model = AIM(
        config,
        dtype=dtype,
        scan=scan,
        remat_policy=remat_policy,
        stop_after_probe=stop_after_probe,
    )
    variables = trim_variables(variables, model.num_run_blocks, scan=scan)
    logging.info(
        "Loaded %s (%d blocks, width %d, probe blocks %s) from %s",
        config.name,
        config.num_blocks,
        config.embed_dim,
        list(config.probe_layers),
        checkpoint_dir,
    )
    return model, variables
