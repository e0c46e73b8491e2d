"""On-disk cache of frozen-trunk probe features, so that probe training runs only the head.

One directory per split, `<workdir>/feature_cache/<split>/`:

    features.npy   (num_records, N, D) pooled probe features (the mean of the probe blocks'
                   outputs), float16 or float32, read as a memory map
    labels.npy     (num_records,) int32 labels; -1 marks an unreadable image, never sampled
    key.json       what the features depend on, and its SHA-256 digest

The key covers the trunk (a fingerprint of its parameters and its source), the probe
blocks, the compute dtype, the data config and the split. A cache whose key differs is
rebuilt, so a stale cache is never reused. Features are computed with the evaluation
preprocessing and no augmentation, the training split included.

NOTE: with several processes, process 0 writes the cache and every process reads it, so
the workdir must be on a file system that all hosts share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from aim_jax import sharding
from aim_jax.pretrained import commit_output

CACHE_SUBDIR = "feature_cache"
FEATURES_FILE = "features.npy"
LABELS_FILE = "labels.npy"
KEY_FILE = "key.json"
CACHE_DTYPES = {"float16": np.float16, "float32": np.float32}

# Data-config fields that change the images fed to the trunk.
_DATA_KEY_FIELDS = ("source", "path", "name", "data_dir", "image_size", "eval_center_crop")


def cache_key(
    *,
    trunk_fingerprint: str,
    trunk_description: str,
    model_config_json: str,
    compute_dtype: str,
    data_config: Any,
    split: str,
    num_records: int,
    cache_dtype: str,
) -> dict[str, Any]:
    """Return the JSON-serialisable description of what a split's cached features depend on.

    `model_config_json` carries the probe blocks; `data_config` is `config.data`.
    """
    data = {field: data_config.get(field, None) for field in _DATA_KEY_FIELDS}
    return {
        "trunk_fingerprint": trunk_fingerprint,
        "trunk": trunk_description,
        "model": json.loads(model_config_json),
        "dtype": compute_dtype,
        "data": json.loads(json.dumps(data, default=str)),
        "split": split,
        "num_records": int(num_records),
        "cache_dtype": cache_dtype,
    }


def key_digest(key: dict[str, Any]) -> str:
    """Return the SHA-256 hex digest of a cache key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class FeatureCache:
    """The cached features of one split.

    Attributes:
        directory: the split's cache directory.
        features: (num_records, N, D) read-only memory map.
        labels: (num_records,) int32; -1 for unreadable images.
    """

    directory: Path
    features: np.ndarray
    labels: np.ndarray

    @property
    def valid_rows(self) -> np.ndarray:
        """Indices of the records that have features, ascending."""
        return np.flatnonzero(self.labels >= 0)


def split_directory(workdir: str | os.PathLike[str], split: str) -> Path:
    """Return `<workdir>/feature_cache/<split>` (slashes and brackets in TFDS splits escaped)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
    return Path(workdir) / CACHE_SUBDIR / safe


def load_cache(directory: str | os.PathLike[str], key: dict[str, Any]) -> FeatureCache | None:
    """Open the cache in `directory` if its key equals `key`; return None otherwise."""
    directory = Path(directory)
    key_path = directory / KEY_FILE
    if not key_path.is_file():
        return None
    stored = json.loads(key_path.read_text())
    if stored.get("digest") != key_digest(key):
        logging.info("Feature cache %s is stale (its key differs); rebuilding it.", directory)
        return None
    features = np.load(directory / FEATURES_FILE, mmap_mode="r")
    labels = np.load(directory / LABELS_FILE)
    logging.info("Reusing feature cache %s: features %s.", directory, features.shape)
    return FeatureCache(directory, features, labels)


def build_cache(
    directory: str | os.PathLike[str],
    key: dict[str, Any],
    batches: Iterable[dict[str, np.ndarray]],
    features_fn: Callable[[Any, jax.Array], jax.Array],
    trunk_variables: Any,
    mesh: jax.sharding.Mesh,
    *,
    num_records: int,
    feature_shape: tuple[int, int],
    cache_dtype: str,
) -> FeatureCache:
    """Run the frozen trunk over one evaluation pass and write the features to `directory`.

    The files are written to a temporary directory beside `directory` and renamed at the
    end, so an interrupted build leaves no cache behind.

    Args:
        directory: the split's cache directory, replaced if it exists.
        key: from `cache_key`.
        batches: host-local batches from `input_pipeline.make_eval_iterator` ("image",
            "label", "valid", "index").
        features_fn: jitted `(trunk_variables, images) -> (B, N, D)` pooled features.
        trunk_variables: the trunk's variables on the mesh.
        mesh: the device mesh.
        num_records: records in the split.
        feature_shape: (N, D).
        cache_dtype: "float16" or "float32".

    Returns:
        The written cache.
    """
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(
            f"config.cache_dtype={cache_dtype!r} is invalid; expected one of "
            f"{sorted(CACHE_DTYPES)}."
        )
    directory = Path(directory)
    writer = jax.process_index() == 0
    tmp = None
    if writer:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        features = labels = None
        if writer:
            features = np.lib.format.open_memmap(
                tmp / FEATURES_FILE,
                mode="w+",
                dtype=CACHE_DTYPES[cache_dtype],
                shape=(num_records, *feature_shape),
            )
            labels = np.full((num_records,), -1, np.int32)
        for local in batches:
            batch = sharding.host_local_batch_to_global(
                {k: local[k] for k in ("image", "label", "valid", "index")}, mesh
            )
            pooled = features_fn(trunk_variables, batch["image"])  # (B, N, D)
            gathered = multihost_utils.process_allgather(
                {"features": pooled, **{k: batch[k] for k in ("label", "valid", "index")}},
                tiled=True,
            )
            if writer:
                rows = gathered["index"][gathered["valid"]]
                features[rows] = gathered["features"][gathered["valid"]]
                labels[rows] = gathered["label"][gathered["valid"]]
        if writer:
            features.flush()
            del features
            np.save(tmp / LABELS_FILE, labels)
            record = {"digest": key_digest(key), "key": key}
            (tmp / KEY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
            commit_output(tmp, directory)
            logging.info(
                "Wrote feature cache %s: %d records, %d unreadable.",
                directory,
                num_records,
                int(np.sum(labels < 0)),
            )
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    multihost_utils.sync_global_devices(f"feature cache {directory}")
    return FeatureCache(
        directory,
        np.load(directory / FEATURES_FILE, mmap_mode="r"),
        np.load(directory / LABELS_FILE),
    )


def batch_rows(valid_rows: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Return the cache rows of the global training batch at `step` (0-based).

    Each epoch is a fresh permutation of the valid rows drawn from (seed, epoch), and the
    last incomplete batch of an epoch is dropped. The rows depend only on the arguments, so
    a resumed run reads exactly the batches an uninterrupted run reads.
    """
    steps_per_epoch = len(valid_rows) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.batch_size={batch_size} is larger than the {len(valid_rows)} cached "
            "training images; lower the batch size."
        )
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(len(valid_rows))
    return valid_rows[order[position * batch_size : (position + 1) * batch_size]]


def local_slice(global_batch: int) -> slice:
    """Return this process's part of a global batch, in `host_local_batch_to_global` order."""
    local = global_batch // jax.process_count()
    start = jax.process_index() * local
    return slice(start, start + local)


def training_batch(cache: FeatureCache, batch_size: int, seed: int, step: int) -> dict[str, Any]:
    """Read this process's part of the global training batch at `step` from the cache."""
    rows = batch_rows(cache.valid_rows, batch_size, seed, step)[local_slice(batch_size)]
    order = np.argsort(rows)  # Ascending rows read the memory map sequentially.
    rows = rows[order]
    return {
        "features": np.asarray(cache.features[rows]),  # (B_local, N, D)
        "label": cache.labels[rows],
    }


def eval_batches(cache: FeatureCache, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield host-local batches over every cached record in order, padding the last batch.

    Padding and unreadable records have `valid=False`, as in `input_pipeline`.
    """
    num_records = len(cache.labels)
    part = local_slice(batch_size)
    for start in range(0, math.ceil(num_records / batch_size) * batch_size, batch_size):
        index = np.arange(start, start + batch_size)[part]
        inside = index < num_records
        rows = np.where(inside, index, 0)
        features = np.asarray(cache.features[rows])  # (B_local, N, D)
        labels = cache.labels[rows]
        valid = inside & (labels >= 0)
        yield {
            "features": features,
            "label": np.where(valid, labels, 0).astype(np.int32),
            "valid": valid,
            "index": np.where(inside, index, -1).astype(np.int32),
        }
