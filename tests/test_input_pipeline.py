"""Tests for the Grain input pipeline, its data sources and the augmentation."""

import colorsys
import gzip
import io
import logging
import os

import grain
import ml_collections
import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from aim_jax import augment, data_sources, input_pipeline, preprocessing

FASHION_DIR = data_sources.DEFAULT_FASHION_MNIST_PATH
needs_fashion = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz")),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
LOW = (0.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
HIGH = (1.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD


def make_config(source="folder", batch_size=4, image_size=16, **data):
    fields = {
        "source": source,
        "path": "",
        "name": "",
        "data_dir": "",
        "split": "train",
        "image_size": image_size,
        "num_workers": 0,
        "augment": False,
        "num_threads": 2,
        "prefetch_buffer_size": 8,
    }
    fields.update(data)
    return ml_collections.ConfigDict({"data": fields, "batch_size": batch_size, "seed": 0})


class ArraySource:
    """In-memory source: record i is a constant image of value 10 * i with label i."""

    def __init__(self, length):
        self._length = length

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        return {"image": np.full((8, 8, 1), 10 * index, np.uint8), "label": index}

    def __repr__(self):
        return f"ArraySource({self._length})"


def photos():
    """Real photos bundled with scikit-image, cropped small to keep the tests fast."""
    return {
        "astronaut": skimage.data.astronaut()[::8, ::8],  # (64, 64, 3)
        "chelsea": skimage.data.chelsea()[::6, ::6],  # (50, 76, 3)
        "coffee": skimage.data.coffee()[::8, ::8],  # (50, 75, 3)
        "camera": skimage.data.camera()[::8, ::8],  # (64, 64) greyscale
    }


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_folder(root, split="train"):
    """Write real photos in many formats under root/split/<class>/; return {path: (label, rgb)}."""
    p = photos()
    rgb = Image.fromarray(p["astronaut"])
    expected = {}

    def put(cls, name, data, pixels):
        os.makedirs(os.path.join(root, split, cls), exist_ok=True)
        path = os.path.join(root, split, cls, name)
        with open(path, "wb") as f:
            f.write(data)
        expected[path] = (cls, pixels)

    # Lossless formats decode to the exact pixels; None marks lossy ones.
    put("b_cat", "chelsea.png", encode(Image.fromarray(p["chelsea"]), "PNG"), p["chelsea"])
    put("b_cat", "chelsea.bmp", encode(Image.fromarray(p["chelsea"]), "BMP"), p["chelsea"])
    put("b_cat", "chelsea.JPEG", encode(Image.fromarray(p["chelsea"]), "JPEG", quality=95), None)
    put("a_person", "astronaut.tiff", encode(rgb, "TIFF"), p["astronaut"])
    put("a_person", "astronaut.webp", encode(rgb, "WEBP", lossless=True), p["astronaut"])
    put("a_person", "astronaut_cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG", quality=95), None)
    rgba = Image.fromarray(np.dstack([p["astronaut"], np.full((64, 64), 128, np.uint8)]))
    on_white = (p["astronaut"] * 128.0 + 255.0 * 127.0) / 255.0  # Composited onto white.
    put("a_person", "astronaut_rgba.png", encode(rgba, "PNG"), on_white)
    grey = np.repeat(p["camera"][..., None], 3, axis=-1)
    put("c_camera", "camera.png", encode(Image.fromarray(p["camera"]), "PNG"), grey)
    camera16 = p["camera"].astype(np.uint16) * 257  # 16-bit greyscale spanning the same range.
    put("c_camera", "camera16.png", encode(Image.fromarray(camera16), "PNG"), grey)
    palette = Image.fromarray(p["coffee"]).quantize(64)
    put("d_coffee", "coffee.gif", encode(palette, "GIF"), np.asarray(palette.convert("RGB")))
    # EXIF orientation 6 (rotate 90 degrees clockwise) on a non-square photo.
    exif = Image.Exif()
    exif[0x0112] = 6
    put(
        "d_coffee",
        "coffee_rotated.jpg",
        encode(Image.fromarray(p["coffee"]), "JPEG", quality=95, exif=exif),
        None,
    )
    return expected


def write_bad_files(directory):
    """Write an empty, a truncated and a garbage image file; return their paths."""
    os.makedirs(directory, exist_ok=True)
    jpeg = encode(Image.fromarray(photos()["astronaut"]), "JPEG")
    contents = {"empty.jpg": b"", "truncated.jpg": jpeg[: len(jpeg) // 2], "garbage.png": b"x" * 99}
    paths = []
    for name, data in contents.items():
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


# Fashion-MNIST.


def reference_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@needs_fashion
def test_fashion_mnist_matches_reference_decode():
    train = data_sources.FashionMnistSource(FASHION_DIR, "train")
    test = data_sources.FashionMnistSource(FASHION_DIR, "test", rgb=True)
    assert len(train) == 60000
    assert len(test) == 10000
    images = reference_idx(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"))
    labels = reference_idx(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))
    for i in (0, 1, 2, 9999):
        record = test[i]
        assert record["image"].shape == (28, 28, 3)
        np.testing.assert_array_equal(record["image"][..., 1], images[i])
        assert record["label"] == labels[i]
    assert train[0]["image"].shape == (28, 28, 1)
    assert train[0]["label"] == 9  # The first training image is an ankle boot.


def test_fashion_mnist_reads_uncompressed_files(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 251
    for stem, header, body in (
        ("t10k-images-idx3-ubyte", [0x803, 3, 28, 28], images.astype(np.uint8)),
        ("t10k-labels-idx1-ubyte", [0x801, 3], np.array([4, 0, 7], np.uint8)),
    ):
        (tmp_path / stem).write_bytes(np.array(header, ">u4").tobytes() + body.tobytes())
    source = data_sources.FashionMnistSource(tmp_path, "t10k")
    assert len(source) == 3
    np.testing.assert_array_equal(source[2]["image"][..., 0], images[2].astype(np.uint8))
    assert [source[i]["label"] for i in range(3)] == [4, 0, 7]


def test_fashion_mnist_rejects_bad_magic(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(np.array([0x801, 0], ">u4").tobytes())
    with pytest.raises(ValueError, match="magic bytes 00000d03"):
        data_sources.FashionMnistSource(tmp_path, "train")


# Image folders and unreadable files.


def test_folder_source_labels_and_formats(tmp_path):
    expected = write_folder(str(tmp_path))
    source = data_sources.ImageFolderSource(tmp_path, "train")
    assert source.classes == ["a_person", "b_cat", "c_camera", "d_coffee"]
    assert len(source) == len(expected)
    assert "train" in repr(source)
    assert str(tmp_path) in repr(source)
    for i in range(len(source)):
        record = source[i]
        cls, pixels = expected[record["path"]]
        assert record["label"] == source.class_to_index[cls]
        image = np.asarray(data_sources.decode_record(record))
        assert image.dtype == np.uint8
        assert image.shape[-1] == 3
        if pixels is not None:
            np.testing.assert_allclose(image, pixels, atol=1, err_msg=record["path"])
        elif "rotated" in record["path"]:
            # EXIF orientation 6 turns the stored (50, 75) image into (75, 50).
            assert image.shape == (75, 50, 3)
        else:
            assert image.shape[:2] in ((50, 76), (64, 64))
            assert np.abs(image.astype(int) - photos_rgb(record["path"])).mean() < 6


def photos_rgb(path):
    p = photos()
    return p["chelsea"] if "chelsea" in path else p["astronaut"]


def test_unreadable_images_skipped_and_logged(tmp_path, caplog):
    write_folder(str(tmp_path))
    bad = write_bad_files(str(tmp_path / "train" / "b_cat"))
    source = data_sources.ImageFolderSource(tmp_path, "train")
    good = len(source) - len(bad)
    config = make_config(batch_size=1, image_size=8, num_threads=0, prefetch_buffer_size=0)
    before = input_pipeline.skipped_image_count()
    iterator = input_pipeline.make_train_iterator(
        config, source=source, process_index=0, process_count=1
    )
    with caplog.at_level(logging.WARNING):
        # Two epochs' worth of good images: the first epoch has certainly been read in full.
        batches = take(iterator, 2 * good)[:good]
    assert len(bad) <= input_pipeline.skipped_image_count() - before <= 2 * len(bad)
    for path in bad:
        assert f"Skipping unreadable image {path}" in caplog.text
    # The epoch yields each good image once and no filler: compare with the images decoded directly.
    references = [
        input_pipeline.eval_preprocess(
            data_sources.decode_record(source[i]), (8, 8), center_crop=True
        )
        for i in range(len(source))
        if source[i]["path"] not in bad
    ]
    assert sorted(b["image"][0].tobytes() for b in batches) == sorted(
        r.tobytes() for r in references
    )
    for batch in batches:
        assert np.ptp(batch["image"][0]) > 0.5  # Not a constant grey fill.


def test_eval_marks_unreadable_invalid(tmp_path):
    write_bad_files(str(tmp_path / "test" / "a"))
    Image.fromarray(photos()["astronaut"]).save(tmp_path / "test" / "a" / "good.png")
    config = make_config(path=str(tmp_path), batch_size=4, image_size=8)
    before = input_pipeline.skipped_image_count()
    batches = list(
        input_pipeline.make_eval_iterator(config, "test", process_index=0, process_count=1)
    )
    assert len(batches) == 1
    # Files in sorted order: empty.jpg, garbage.png, good.png, truncated.jpg.
    assert batches[0]["valid"].tolist() == [False, False, True, False]
    assert batches[0]["index"].tolist() == [0, 1, 2, 3]
    assert input_pipeline.skipped_image_count() - before == 3


# Augmentation.


def test_crop_box_fallback_closed_form():
    # A 10x100 strip: no window with area >= 0.4 * 1000 and aspect ratio <= 4/3 fits its height.
    box = augment.sample_crop_box(10, 100, np.random.default_rng(0))
    assert box == augment.CropBox(top=0, left=43, height=10, width=13)
    box = augment.sample_crop_box(100, 10, np.random.default_rng(0))
    assert box == augment.CropBox(top=43, left=0, height=13, width=10)


def test_crop_box_area_and_ratio_in_range():
    rng = np.random.default_rng(1)
    for _ in range(300):
        box = augment.sample_crop_box(120, 90, rng)
        assert 0 <= box.top
        assert box.top + box.height <= 120
        assert 0 <= box.left
        assert box.left + box.width <= 90
        area = box.height * box.width / (120 * 90)
        assert 0.38 <= area <= 1.0
        assert 0.7 <= box.width / box.height <= 1.4


def test_augment_crop_and_flip_by_value():
    pixels = photos()["chelsea"]  # (50, 76, 3)
    box = augment.CropBox(top=5, left=11, height=30, width=40)
    params = augment.AugmentParams(box=box, flip=True, jitter=None)
    out = augment.apply_augment(Image.fromarray(pixels), params, (30, 40))
    crop = pixels[5:35, 11:51][:, ::-1].astype(np.float32) / 255.0
    np.testing.assert_allclose(
        out, (crop - augment.IMAGENET_MEAN) / augment.IMAGENET_STD, atol=1e-6
    )
    unflipped = augment.apply_augment(
        Image.fromarray(pixels), augment.AugmentParams(box, False, None), (30, 40)
    )
    np.testing.assert_array_equal(unflipped[:, ::-1], out)


def test_resized_crop_is_bicubic_of_crop():
    pixels = photos()["astronaut"]
    box = augment.CropBox(top=3, left=7, height=40, width=30)
    out = augment.resized_crop(Image.fromarray(pixels), box, (20, 24))
    expected = Image.fromarray(pixels[3:43, 7:37]).resize((24, 20), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def jitter(image, **factors):
    params = dict(order=(), brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
    params.update(factors)
    return np.asarray(augment.apply_jitter(Image.fromarray(image), augment.JitterParams(**params)))


def test_jitter_ops_match_numpy():
    x = photos()["coffee"]
    xf = x.astype(np.float64)
    grey = xf @ np.array([0.299, 0.587, 0.114])  # (H, W) ITU-R 601 luma, as PIL's "L".
    checks = {
        "brightness": (dict(order=(0,), brightness=1.3), xf * 1.3),
        "contrast": (dict(order=(1,), contrast=0.7), grey.mean() + 0.7 * (xf - grey.mean())),
        "saturation": (
            dict(order=(2,), saturation=1.2),
            grey[..., None] + 1.2 * (xf - grey[..., None]),
        ),
    }
    for name, (factors, reference) in checks.items():
        out = jitter(x, **factors).astype(np.float64)
        diff = np.abs(out - np.clip(reference, 0, 255))
        assert diff.max() <= 2.0, name


def test_jitter_hue_matches_colorsys():
    # Saturated, bright colours, where 8-bit HSV rounding is smallest relative to the shift.
    colours = np.array([[[255, 0, 0], [0, 200, 0], [30, 60, 250], [250, 200, 40]]], np.uint8)
    out = jitter(colours, order=(3,), hue=0.1).astype(np.float64)
    shift = int(0.1 * 255) / 255.0
    for j, rgb in enumerate(colours[0] / 255.0):
        h, s, v = colorsys.rgb_to_hsv(*rgb)
        expected = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255
        assert np.abs(out[0, j] - expected).max() <= 8, (rgb, out[0, j], expected)
    # A zero shift returns the input up to the rounding of 8-bit HSV.
    assert np.abs(jitter(colours, order=(3,), hue=0.0).astype(int) - colours).max() <= 2


def test_train_augment_deterministic_per_seed():
    image = Image.fromarray(photos()["astronaut"])
    first = augment.train_augment(image, np.random.default_rng(5), (24, 24))
    again = augment.train_augment(image, np.random.default_rng(5), (24, 24))
    other = augment.train_augment(image, np.random.default_rng(6), (24, 24))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32
    assert first.shape == (24, 24, 3)
    assert np.all(first >= LOW - 1e-6)
    assert np.all(first <= HIGH + 1e-6)


def test_eval_batches_match_eval_transform(tmp_path):
    write_folder(str(tmp_path))
    config = make_config(path=str(tmp_path), batch_size=4, image_size=24)
    source = data_sources.ImageFolderSource(tmp_path, "train")
    batches = list(input_pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    assert len(batches) == 3  # 11 images padded to 12.
    images = np.concatenate([b["image"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 11 + [False]
    for i in range(len(source)):
        expected = preprocessing.eval_transform(source[i]["path"], 24)
        np.testing.assert_array_equal(images[i], expected)


# Pipeline.


def test_train_batches_values_and_determinism(tmp_path):
    write_folder(str(tmp_path))
    config = make_config(path=str(tmp_path), augment=True, batch_size=4, image_size=16)
    batches = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 3)
    again = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 3)
    config.seed = 1
    other = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 3)
    for batch, batch_again, batch_other in zip(batches, again, other, strict=True):
        assert batch["image"].shape == (4, 16, 16, 3)
        assert batch["image"].dtype == np.float32
        assert batch["label"].shape == (4,)
        assert batch["label"].dtype == np.int32
        assert np.all(batch["image"] >= LOW - 1e-6)
        assert np.all(batch["image"] <= HIGH + 1e-6)
        assert set(batch["label"].tolist()) <= {0, 1, 2, 3}
        np.testing.assert_array_equal(batch["image"], batch_again["image"])
        assert not np.array_equal(batch["image"], batch_other["image"])


def test_train_epoch_covers_records_once():
    config = make_config(source="fashion_mnist", batch_size=4, image_size=8)
    iterator = input_pipeline.make_train_iterator(
        config, source=ArraySource(12), process_index=0, process_count=1
    )
    labels = np.concatenate([b["label"] for b in take(iterator, 6)])
    assert sorted(labels[:12].tolist()) == list(range(12))
    assert sorted(labels[12:].tolist()) == list(range(12))
    assert labels[:12].tolist() != labels[12:].tolist()  # Each epoch is reshuffled.
    # Without augmentation, record i is the constant 10 * i after the resize.
    batch = take(
        input_pipeline.make_train_iterator(
            config, source=ArraySource(12), process_index=0, process_count=1
        ),
        1,
    )[0]
    for image, label in zip(batch["image"], batch["label"], strict=True):
        expected = (10 * label / 255.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
        np.testing.assert_allclose(image, np.broadcast_to(expected, image.shape), atol=1e-5)


def test_two_processes_share_epoch():
    config = make_config(source="fashion_mnist", batch_size=4, image_size=8, augment=True)
    single = take(
        input_pipeline.make_train_iterator(
            config, source=ArraySource(12), process_index=0, process_count=1
        ),
        3,
    )
    shards = [
        take(
            input_pipeline.make_train_iterator(
                config, source=ArraySource(12), process_index=p, process_count=2
            ),
            3,
        )
        for p in range(2)
    ]
    seen = []
    for step in range(3):
        assert shards[0][step]["label"].shape == (2,)
        step_labels = np.concatenate([shards[p][step]["label"] for p in range(2)])
        assert sorted(step_labels.tolist()) == sorted(single[step]["label"].tolist())
        # Interleaved positions: process p gets global positions p, p + 2.
        for p in range(2):
            np.testing.assert_array_equal(shards[p][step]["image"], single[step]["image"][p::2])
        seen.extend(step_labels.tolist())
    assert sorted(seen) == list(range(12))


def test_state_round_trip_in_process():
    config = make_config(source="fashion_mnist", batch_size=4, image_size=8, augment=True)
    iterator = input_pipeline.make_train_iterator(
        config, source=ArraySource(10), process_index=0, process_count=1
    )
    take(iterator, 2)
    state = iterator.get_state()
    expected = take(iterator, 4)  # Crosses the epoch boundary at position 10.
    restored = input_pipeline.make_train_iterator(
        config, source=ArraySource(10), process_index=0, process_count=1
    )
    restored.set_state(state)
    for batch, again in zip(expected, take(restored, 4), strict=True):
        np.testing.assert_array_equal(batch["image"], again["image"])
        np.testing.assert_array_equal(batch["label"], again["label"])


def test_eval_two_processes_count_each_once():
    config = make_config(source="fashion_mnist", batch_size=4, image_size=8)
    per_process = [
        list(
            input_pipeline.make_eval_iterator(
                config, source=ArraySource(10), process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert [len(batches) for batches in per_process] == [3, 3]
    indices, labels = [], []
    for batches in per_process:
        for batch in batches:
            assert batch["image"].shape == (2, 8, 8, 3)
            valid = batch["valid"]
            indices.extend(batch["index"][valid].tolist())
            labels.extend(batch["label"][valid].tolist())
            assert np.all(batch["index"][~valid] == -1)
            assert np.all(batch["image"][~valid] == 0)
    assert sorted(indices) == list(range(10))
    assert indices == labels


@pytest.fixture(scope="module")
def absl_flags_parsed():
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def test_workers_state_round_trip_and_images(absl_flags_parsed):
    config = make_config(source="fashion_mnist", batch_size=4, image_size=8, augment=True)
    serial = take(
        input_pipeline.make_train_iterator(
            config, source=ArraySource(10), process_index=0, process_count=1
        ),
        4,
    )
    config.data.num_workers = 2
    iterator = input_pipeline.make_train_iterator(
        config, source=ArraySource(10), process_index=0, process_count=1
    )
    try:
        first = take(iterator, 2)
        state = iterator.get_state()
        expected = take(iterator, 2)
        iterator.set_state(state)
        for batch, again in zip(expected, take(iterator, 2), strict=True):
            np.testing.assert_array_equal(batch["image"], again["image"])
            np.testing.assert_array_equal(batch["label"], again["label"])
    finally:
        iterator.close()
    # Worker w batches positions w, w + 2, ...: same images per position as without workers.
    by_workers = np.concatenate([b["image"] for b in first + expected])  # (16, 8, 8, 3)
    by_serial = np.concatenate([b["image"] for b in serial])
    np.testing.assert_array_equal(by_workers[0:4], by_serial[0:8:2])
    np.testing.assert_array_equal(by_workers[4:8], by_serial[1:8:2])


# TFDS ArrayRecord datasets.


class AimPipelineTestPhotos(tfds.core.GeneratorBasedBuilder):
    """Real photos stored as encoded JPEG/PNG bytes, which needs no TensorFlow to write."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        # `DatasetInfo` directly: `dataset_info_from_configs` looks for metadata files beside the
        # module, which a test module does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["astronaut", "chelsea", "coffee"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        p = photos()
        for i, name in enumerate(["astronaut", "chelsea", "coffee"]):
            image = Image.fromarray(p[name])
            yield i, {"image": encode(image, "PNG"), "label": i}
            yield i + 3, {"image": encode(image, "JPEG", quality=95), "label": i}
        yield 6, {"image": b"not an image", "label": 0}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    AimPipelineTestPhotos(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_reads_array_record(tfds_dir):
    source = data_sources.TfdsSource("aim_pipeline_test_photos", "train", data_dir=tfds_dir)
    assert len(source) == 7
    assert "aim_pipeline_test_photos" in repr(source)
    assert tfds_dir in repr(source)
    p = photos()
    names = ["astronaut", "chelsea", "coffee"]
    lossless = 0
    for i in range(7):
        record = source[i]
        if record["encoded"] == b"not an image":
            with pytest.raises(data_sources.ImageLoadError):
                data_sources.decode_record(record)
            continue
        image = np.asarray(data_sources.decode_record(record))
        reference = p[names[record["label"]]]
        assert image.shape == reference.shape
        if record["encoded"].startswith(b"\x89PNG"):
            np.testing.assert_array_equal(image, reference)
            lossless += 1
    assert lossless == 3


def test_tfds_pipeline_end_to_end(tfds_dir):
    config = make_config(
        source="tfds", name="aim_pipeline_test_photos", data_dir=tfds_dir, batch_size=2
    )
    batches = list(input_pipeline.make_eval_iterator(config, process_index=0, process_count=1))
    assert len(batches) == 4
    valid = np.concatenate([b["valid"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert valid.sum() == 6
    assert sorted(labels[valid].tolist()) == [0, 0, 1, 1, 2, 2]
    train = take(input_pipeline.make_train_iterator(config, process_index=0, process_count=1), 6)
    train_labels = np.concatenate([b["label"] for b in train])
    assert sorted(train_labels[:6].tolist()) in ([0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2])


# Missing datasets.


def test_missing_datasets_explain_fix(tmp_path):
    with pytest.raises(data_sources.DatasetNotFoundError, match="apt-get install dataset-fashion"):
        data_sources.FashionMnistSource(tmp_path, "train")
    with pytest.raises(data_sources.DatasetNotFoundError, match="<split>/<class>/<image>"):
        data_sources.ImageFolderSource(tmp_path, "train")
    with pytest.raises(data_sources.DatasetNotFoundError, match="tfds build imagenet2012"):
        data_sources.TfdsSource("imagenet2012", "train", data_dir=str(tmp_path))
    with pytest.raises(data_sources.DatasetNotFoundError, match="not found"):
        data_sources.TfdsSource("no_such_dataset_xyz", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="'folder', 'tfds' or 'fashion_mnist'"):
        data_sources.make_source(make_config(source="csv").data)


def test_orbax_checkpoint_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    config = make_config(source="fashion_mnist", batch_size=2, image_size=8, augment=True)
    iterator = input_pipeline.make_train_iterator(
        config, source=ArraySource(6), process_index=0, process_count=1
    )
    take(iterator, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 3)
        restored = input_pipeline.make_train_iterator(
            config, source=ArraySource(6), process_index=0, process_count=1
        )
        manager.restore(
            1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored))
        )
    for batch, again in zip(expected, take(restored, 3), strict=True):
        np.testing.assert_array_equal(batch["image"], again["image"])
