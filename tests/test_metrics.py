"""Tests for aim_jax.metrics: JSON lines content, resume truncation and TensorBoard records."""

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from aim_jax import metrics


def read_events(logdir):
    """Parse every TFRecord-framed `Event` in the event files under `logdir`."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            # Record: uint64 length, uint32 length CRC, payload, uint32 payload CRC.
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
    return events


def scalar_events(logdir):
    """Return [(step, tag, value)] for every scalar summary value."""
    scalars = []
    for event in read_events(logdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.append((event.step, value.tag, value.simple_value))
    return scalars


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_jsonl_and_tensorboard_values(tmp_path):
    writer = metrics.MetricWriter(tmp_path)
    writer.write(10, {"train/loss": jnp.float32(0.25), "train/lr": np.float64(1e-3)})
    writer.write(20, {"train": {"loss": jnp.array([0.125]), "grad_norm": 3}})
    writer.write(30, {"probe/top1": float("nan")})

    # Each record is on disk before close.
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[0] == {"step": 10, "train/loss": 0.25, "train/lr": 1e-3}
    assert records[1] == {"step": 20, "train/loss": 0.125, "train/grad_norm": 3.0}
    assert isinstance(records[1]["train/grad_norm"], float)
    assert records[2]["step"] == 30
    assert math.isnan(records[2]["probe/top1"])
    writer.close()

    scalars = scalar_events(tmp_path / "tensorboard")
    assert (10, "train/loss", 0.25) in scalars
    assert (20, "train/loss", 0.125) in scalars
    assert (20, "train/grad_norm", 3.0) in scalars
    (lr,) = [value for step, tag, value in scalars if tag == "train/lr"]
    assert lr == pytest.approx(1e-3, rel=1e-6)  # stored as float32
    (top1,) = [value for step, tag, value in scalars if tag == "probe/top1"]
    assert math.isnan(top1)


def test_non_scalar_metric_rejected(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match=r"'train/loss' has shape \(2,\)"):
            writer.write(1, {"train/loss": np.zeros(2)})


def test_resume_drops_later_steps(tmp_path):
    with metrics.MetricWriter(tmp_path) as writer:
        for step in (100, 200, 300):
            writer.write(step, {"train/loss": step / 1000})
    # A killed process may leave half a line.
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 400, "train/lo')

    with metrics.MetricWriter(tmp_path, resume_step=200) as writer:
        writer.write(300, {"train/loss": 0.5})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in records] == [(100, 0.1), (200, 0.2), (300, 0.5)]

    # The resumed event file starts with a purge marker at resume_step + 1. TensorBoard hides
    # the first run's events from that step on.
    purge_markers = [
        event.step
        for event in read_events(tmp_path / "tensorboard")
        if event.HasField("session_log")
    ]
    assert purge_markers == [201]

    # Reopening without resume_step keeps every complete line.
    with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(400, {"train/loss": 0.75})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [100, 200, 300, 400]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = metrics.MetricWriter(tmp_path / "run")
    writer.write(1, {"train/loss": 1.0})
    writer.write_hparams({"lr": 1.0})
    writer.write_images(1, {"samples": np.zeros((4, 4, 3), np.uint8)})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_write_hparams_and_images(tmp_path):
    config = ml_collections.ConfigDict({"model": "aim-600M", "optimizer": {"lr": 1e-3}})
    with metrics.MetricWriter(tmp_path) as writer:
        writer.write_hparams(config)
        image = np.zeros((2, 4, 4, 3), np.float32)
        image[:, :, :, 0] = 1.0
        writer.write_images(5, {"samples": image})
        with pytest.raises(ValueError, match=r"expected \(H, W, C\)"):
            writer.write_images(5, {"bad": np.zeros((4, 4))})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == {"model": "aim-600M", "optimizer": {"lr": 1e-3}}

    events = read_events(tmp_path / "tensorboard")
    images = [v for e in events for v in e.summary.value if v.HasField("image")]
    assert [v.tag for v in images] == ["samples"]
    assert (images[0].image.height, images[0].image.width) == (4, 8)  # 2 images side by side
    texts = [v for e in events for v in e.summary.value if v.tag.startswith("config")]
    assert len(texts) == 1
    assert b"aim-600M" in texts[0].tensor.string_val[0]
