"""Metrics writer: JSON lines plus TensorBoard, written by process 0 only.

Every `MetricWriter.write(step, metrics)` call appends one line to `<workdir>/metrics.jsonl`,
for example `{"step": 100, "train/loss": 0.53, "train/grad_norm": 1.2}`, and flushes it, so a
killed process keeps every line it wrote. The same scalars go to TensorBoard event files in
`<workdir>/tensorboard/`.

When a run resumes from a checkpoint at step `s`, open the writer with `resume_step=s`. It
drops the lines with a larger step (written after that checkpoint, before the crash) from
`metrics.jsonl`, and TensorBoard hides events from steps after `s`. So no step appears twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

METRICS_FILENAME = "metrics.jsonl"
CONFIG_FILENAME = "config.json"
TENSORBOARD_SUBDIR = "tensorboard"


class MetricWriter:
    """Writes scalar metrics to `metrics.jsonl` and TensorBoard on process 0.

    On other processes every method is a no-op, so all processes may call it.

    Args:
        workdir: the run directory; created if missing.
        resume_step: the step the run resumes from. Lines with a larger step are removed from
            an existing `metrics.jsonl` and TensorBoard purges events after it. None for a
            fresh run or to keep every existing line.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.workdir = os.fspath(workdir)
        self.metrics_path = os.path.join(self.workdir, METRICS_FILENAME)
        self.active = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        if not self.active:
            return

        os.makedirs(self.workdir, exist_ok=True)
        if os.path.exists(self.metrics_path):
            self._repair_existing(resume_step)
        self._jsonl = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            # Imported here so processes other than 0 never load it.
            from tensorboardX import SummaryWriter

            # `purge_step` makes TensorBoard hide events with step >= purge_step that an earlier
            # run wrote to the same directory.
            purge_step = None if resume_step is None else resume_step + 1
            self._tensorboard = SummaryWriter(
                os.path.join(self.workdir, TENSORBOARD_SUBDIR), purge_step=purge_step
            )

    def _repair_existing(self, resume_step: int | None) -> None:
        """Drop lines after `resume_step` and any partial last line left by a killed process."""
        with open(self.metrics_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # After split, the last element is "" when the file ends with a newline and a partial
        # record otherwise.
        complete, partial = lines[:-1], lines[-1]

        kept = []
        dropped = 0
        for line in complete:
            if not line.strip():
                continue
            record = json.loads(line)
            if resume_step is not None and record.get("step", -1) > resume_step:
                dropped += 1
                continue
            kept.append(line)
        if not dropped and not partial:
            return

        if partial:
            logging.warning("Dropping a partial last line from %s.", self.metrics_path)
        if dropped:
            logging.info(
                "Dropped %d lines after resume step %d from %s.",
                dropped,
                resume_step,
                self.metrics_path,
            )

        temporary_path = self.metrics_path + ".tmp"
        with open(temporary_path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(temporary_path, self.metrics_path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one record of scalar metrics at `step`.

        Args:
            step: the training step.
            metrics: name -> scalar (Python number, numpy or `jax.Array` of size 1). Names are
                namespaced with "/", for example "train/loss"; nested mappings are flattened
                with "/". NaN and infinity are written as the JSON extensions `NaN` and
                `Infinity`, which Python's `json` module reads back.

        Raises:
            ValueError: if a value has more than one element.
        """
        if not self.active:
            return
        scalars = {name: _to_float(name, value) for name, value in _flatten(metrics).items()}
        record = {"step": int(step), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, global_step=int(step))
            self._tensorboard.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Write images to TensorBoard.

        Args:
            step: the training step.
            images: name -> array shaped `(H, W, C)` or `(N, H, W, C)` with C in {1, 3, 4},
                `uint8` in [0, 255] or floating point in [0, 1].
        """
        if not self.active or self._tensorboard is None:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if image.ndim == 3:
                image = image[None]  # (1, H, W, C)
            if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
                raise ValueError(
                    f"Image {name!r} has shape {image.shape}; expected (H, W, C) or "
                    "(N, H, W, C) with C in {1, 3, 4}."
                )
            self._tensorboard.add_images(name, image, global_step=int(step), dataformats="NHWC")
        self._tensorboard.flush()

    def write_hparams(self, config: Any) -> None:
        """Save the run config as `<workdir>/config.json` and as TensorBoard text.

        Args:
            config: a `ConfigDict` or JSON-serialisable mapping.
        """
        if not self.active:
            return
        if hasattr(config, "to_json_best_effort"):
            text = config.to_json_best_effort(indent=2, sort_keys=True)
        else:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
        config_path = os.path.join(self.workdir, CONFIG_FILENAME)
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        if self._tensorboard is not None:
            # Four leading spaces make TensorBoard's Markdown renderer show the JSON verbatim.
            indented = "\n".join("    " + line for line in text.splitlines())
            self._tensorboard.add_text("config", indented, global_step=0)
            self._tensorboard.flush()

    def flush(self) -> None:
        """Flush both outputs."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flush and close both outputs; later calls do nothing."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self.active = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=key + "/"))
        else:
            flat[key] = value
    return flat


def _to_float(name: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(
            f"Metric {name!r} has shape {array.shape}; only scalars can be written. Reduce it "
            "(for example with a mean) before writing."
        )
    return float(array.reshape(()))
