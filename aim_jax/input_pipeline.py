"""Grain input pipelines for pre-training and probing.

Configuration read from an `ml_collections.ConfigDict`:

- `config.data.source`: "folder", "tfds" or "fashion_mnist".
- `config.data.path`: folder root (`root/<split>/<class>/<image>`) for "folder"; IDX folder for
  "fashion_mnist" (default `/usr/share/datasets/fashion-mnist`, Debian `dataset-fashion-mnist`).
- `config.data.name`, `config.data.data_dir`: TFDS dataset name and data folder for "tfds";
  optional `config.data.image_key` / `label_key` (default "image" / "label").
- `config.data.split`: split name ("train", "test", "validation" or a folder name).
- `config.data.image_size`: int or (height, width) of the output images.
- `config.data.num_workers`: Grain worker processes; 0 runs everything in the calling process.
- `config.data.augment`: pre-training augmentation on (True) or the evaluation resize (False).
- optional `config.data.num_threads` (default 8) and `config.data.prefetch_buffer_size` (default
  128): reader threads and buffered elements per process.
- `config.batch_size`: GLOBAL batch size, split evenly over JAX processes.
- `config.seed`: seed of the shuffle and of the augmentation.

Unreadable images (corrupt, truncated, empty) are skipped in training and masked out
(`valid=False`) in evaluation. Each skip is logged with the file path and counted per process; see
`skipped_image_count`.

Checkpointing the training iterator with Orbax (grain 0.2.18 registers these classes with
orbax-checkpoint when both are installed)::

    manager = ocp.CheckpointManager(
        workdir, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=grain.checkpoint.CheckpointSave(train_iter)))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))

The handler writes one JSON file per JAX process (`process_<i>-of-<n>.json`) holding
`train_iter.get_state()`, and on restore calls `train_iter.set_state(...)` in place. A restore must
use the same dataset, seed, global batch size, process count and `num_workers`.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import grain
import numpy as np
from absl import flags, logging
from PIL import Image

from aim_jax import augment
from aim_jax.data_sources import ImageLoadError, decode_record, make_source, record_name
from aim_jax.preprocessing import eval_transform

DEFAULT_NUM_THREADS = 8
DEFAULT_PREFETCH_BUFFER_SIZE = 128
# Sources whose images are small enough to be resized whole for evaluation, without a center crop.
_PLAIN_RESIZE_SOURCES = ("fashion_mnist",)

_skip_lock = threading.Lock()
_skipped_images = 0


def skipped_image_count() -> int:
    """Return how many unreadable images this process has skipped so far.

    The count is per process: with `num_workers > 0` the skips happen in the Grain worker
    processes, whose counts appear only in their log lines.
    """
    return _skipped_images


def _record_skip(record: dict[str, Any], err: Exception) -> None:
    global _skipped_images
    with _skip_lock:
        _skipped_images += 1
        count = _skipped_images
    logging.warning(
        "Skipping unreadable image %s: %s (%d skipped so far in process %d).",
        record_name(record),
        err,
        count,
        os.getpid(),
    )


def _decode_or_none(record: dict[str, Any]) -> Image.Image | None:
    try:
        return decode_record(record)
    except ImageLoadError as err:
        _record_skip(record, err)
        return None


def eval_preprocess(image: Image.Image, size: tuple[int, int], center_crop: bool) -> np.ndarray:
    """Resize an RGB image for evaluation and normalise it.

    Args:
        image: RGB PIL image.
        size: Output (height, width).
        center_crop: If True, apply `aim_jax.preprocessing.eval_transform` (shorter side to
            `size / 0.875`, then a center crop); if False, resize the whole image to `size`.

    Returns:
        float32 array (height, width, 3) normalised with the ImageNet mean and std.
    """
    if not center_crop:
        return augment.normalize(augment.resize(image, size))
    return eval_transform(image, size)


class TrainTransform(grain.transforms.RandomMap):
    """Decode a record and augment it; returns None for an unreadable image, which Grain drops.

    Args:
        image_size: Output (height, width).
        augment_images: Pre-training augmentation if True, else the evaluation resize.
        center_crop: Evaluation resize mode when `augment_images` is False; see `eval_preprocess`.
    """

    def __init__(self, image_size: tuple[int, int], augment_images: bool, center_crop: bool):
        self.image_size = image_size
        self.augment_images = augment_images
        self.center_crop = center_crop

    def random_map(self, record: dict[str, Any], rng: np.random.Generator):
        image = _decode_or_none(record)
        if image is None:
            return None
        if self.augment_images:
            pixels = augment.train_augment(image, rng, self.image_size)  # (H, W, 3)
        else:
            pixels = eval_preprocess(image, self.image_size, self.center_crop)  # (H, W, 3)
        return {"image": pixels, "label": np.int32(record["label"])}


class EvalTransform(grain.transforms.Map):
    """Decode and resize one evaluation record, marking padding and unreadable images invalid.

    Args:
        image_size: Output (height, width).
        center_crop: See `eval_preprocess`.
    """

    def __init__(self, image_size: tuple[int, int], center_crop: bool):
        self.image_size = image_size
        self.center_crop = center_crop

    def map(self, element: tuple[int, dict[str, Any] | None]) -> dict[str, Any]:
        index, record = element
        image = None if record is None else _decode_or_none(record)
        if image is None:
            # Padding or an unreadable image: zeros that `valid` masks out of every metric.
            return {
                "image": np.zeros((*self.image_size, 3), np.float32),
                "label": np.int32(0),
                "valid": np.bool_(False),
                "index": np.int32(-1 if record is None else index),
            }
        return {
            "image": eval_preprocess(image, self.image_size, self.center_crop),
            "label": np.int32(record["label"]),
            "valid": np.bool_(True),
            "index": np.int32(index),
        }


class _PaddedSource:
    """`source` padded with None records up to `length`, yielding (index, record) pairs."""

    def __init__(self, source, length: int):
        self._source = source
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any] | None]:
        if index < len(self._source):
            return index, self._source[index]
        return index, None

    def __repr__(self) -> str:
        return f"_PaddedSource({self._source!r}, length={self._length})"


def _process_layout(
    global_batch: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """Return (process_index, process_count, local_batch), taking defaults from JAX."""
    if process_index is None or process_count is None:
        import jax  # Imported here so that Grain workers never import it.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"Invalid process_index {process_index} for {process_count} processes.")
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(
            f"Invalid config.batch_size {global_batch}: the global batch must be a positive "
            f"multiple of the process count {process_count}."
        )
    return process_index, process_count, global_batch // process_count


def _read_options(data_config) -> grain.ReadOptions:
    return grain.ReadOptions(
        num_threads=data_config.get("num_threads", DEFAULT_NUM_THREADS),
        prefetch_buffer_size=data_config.get("prefetch_buffer_size", DEFAULT_PREFETCH_BUFFER_SIZE),
    )


def _add_worker_prefetch(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers <= 0:
        return ds
    # Grain's worker processes read absl flags, which raise if unparsed. Callers outside
    # `absl.app.run` (notebooks, tests) get the flag defaults.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _uses_center_crop(data_config) -> bool:
    return data_config.get("eval_center_crop", data_config.source not in _PLAIN_RESIZE_SOURCES)


def make_train_dataset(
    config, *, source=None, process_index: int | None = None, process_count: int | None = None
) -> grain.IterDataset:
    """Build the infinite, shuffled, augmented and batched training dataset of one process.

    The record order is one global shuffle per epoch (reseeded each epoch from `config.seed`),
    repeated forever. Process p of P takes global positions p, p + P, p + 2P, ..., so after k steps
    the processes together have read exactly the first k * batch_size positions. Augmentation
    draws from a generator seeded by `config.seed` and the global position, so the image at a
    position does not depend on the process count, `num_workers` or a restart. Unreadable images
    are dropped before batching, so a batch may reach one image further into the stream.

    Args:
        config: ConfigDict with the `data`, `batch_size` and `seed` fields of this module.
        source: Random-access source to use instead of the one `config.data` names.
        process_index: This process's shard; None uses `jax.process_index()`.
        process_count: Number of shards; None uses `jax.process_count()`.

    Returns:
        An IterDataset of dicts {"image": float32 (B_local, H, W, 3), "label": int32 (B_local,)}
        with B_local = config.batch_size / process_count.
    """
    data = config.data
    process_index, process_count, local_batch = _process_layout(
        config.batch_size, process_index, process_count
    )
    source = source if source is not None else make_source(data)
    transform = TrainTransform(
        augment.as_hw(data.image_size), bool(data.augment), _uses_center_crop(data)
    )

    ds = grain.MapDataset.source(source)
    ds = ds.shuffle(seed=config.seed).repeat(None)
    # The augmentation comes before the process slice, so global positions seed its generator.
    ds = ds.random_map(transform, seed=config.seed)
    ds = ds[process_index::process_count]
    ids = ds.to_iter_dataset(_read_options(data))  # Drops the None of unreadable images.
    ids = ids.batch(local_batch, drop_remainder=True)
    return _add_worker_prefetch(ids, int(data.get("num_workers", 0)))


def make_train_iterator(
    config, *, source=None, process_index: int | None = None, process_count: int | None = None
) -> grain.DatasetIterator:
    """Return a checkpointable iterator over training batches; see `make_train_dataset`.

    The iterator supports `get_state()` -> dict and `set_state(state)`; after `set_state` it
    yields exactly the batches that followed the saved state. Save it with Orbax through
    `grain.checkpoint.CheckpointHandler` as the module docstring shows. Call `close()` on it to
    stop worker processes when `config.data.num_workers > 0`.
    """
    return iter(
        make_train_dataset(
            config, source=source, process_index=process_index, process_count=process_count
        )
    )


def make_eval_dataset(
    config,
    split: str | None = None,
    *,
    source=None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Build a single ordered pass over a split for evaluation, without augmentation.

    The N records are padded to ceil(N / batch_size) * batch_size positions, and process p of P
    takes positions p, p + P, and so on. Every process yields the same number of full batches,
    and across processes each record appears exactly once with `valid=True`. Padding and unreadable
    images have `valid=False`, a zero image, label 0, and `index` -1 (padding) or the record index
    (unreadable; logged and counted like in training).

    Args:
        config: ConfigDict as for `make_train_dataset`; `config.data.augment` is ignored.
        split: Split to read; None uses `config.data.split`.
        source: Random-access source to use instead of the one `config.data` names.
        process_index: This process's shard; None uses `jax.process_index()`.
        process_count: Number of shards; None uses `jax.process_count()`.

    Returns:
        A finite IterDataset of dicts {"image": float32 (B_local, H, W, 3), "label": int32
        (B_local,), "valid": bool (B_local,), "index": int32 (B_local,)}.
    """
    data = config.data
    process_index, process_count, local_batch = _process_layout(
        config.batch_size, process_index, process_count
    )
    source = source if source is not None else make_source(data, split)
    num_batches = math.ceil(len(source) / config.batch_size)
    padded = _PaddedSource(source, num_batches * config.batch_size)
    transform = EvalTransform(augment.as_hw(data.image_size), _uses_center_crop(data))

    ds = grain.MapDataset.source(padded)[process_index::process_count]
    ds = ds.map(transform).batch(local_batch)
    ids = ds.to_iter_dataset(_read_options(data))
    return _add_worker_prefetch(ids, int(data.get("num_workers", 0)))


def make_eval_iterator(
    config,
    split: str | None = None,
    *,
    source=None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Return an iterator over one ordered evaluation pass; see `make_eval_dataset`."""
    return iter(
        make_eval_dataset(
            config,
            split,
            source=source,
            process_index=process_index,
            process_count=process_count,
        )
    )
