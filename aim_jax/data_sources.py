"""Random-access image data sources for the Grain input pipeline.

Each source implements the `grain.sources.RandomAccessDataSource` protocol (`__len__`,
`__getitem__`) and has a `__repr__` that names its path, dataset and split, so that Grain can store
it in iterator checkpoints and check it on restore. Records are cheap dicts. The pipeline's map
decodes them with `decode_record`, so that it can skip one unreadable file without failing the
whole source:

- `ImageFolderSource`: `{"path": str, "label": int}`.
- `TfdsSource`: `{"encoded": bytes, "name": str, "label": int}`.
- `FashionMnistSource`: `{"image": uint8 (28, 28, 1) or (28, 28, 3), "label": int}`.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from aim_jax.preprocessing import ImageLoadError, load_image

DEFAULT_FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_MNIST_SPLIT_ALIASES = {"train": "train", "test": "test", "t10k": "test"}
# IDX magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
_IDX_UBYTE = 0x08
# Exceptions that Pillow raises for bytes that are not an image, or a corrupt or truncated one.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


class DatasetNotFoundError(FileNotFoundError):
    """Raised when the data of a dataset is not where the configuration points."""


def _decode_bytes(encoded: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes fully, then convert them with `load_image`."""
    try:
        image = Image.open(io.BytesIO(encoded))
        image.load()
    except _DECODE_ERRORS as err:
        raise ImageLoadError(name, f"decoding failed ({type(err).__name__}: {err})") from err
    return load_image(image)


def record_name(record: dict[str, Any]) -> str:
    """Return the file path or dataset position that identifies `record` in log messages."""
    if "path" in record:
        return record["path"]
    return record.get("name", "<in-memory image>")


def decode_record(record: dict[str, Any]) -> Image.Image:
    """Decode the image of a source record into an RGB PIL image.

    Greyscale images get their channel repeated three times. Files and bytes go through
    `aim_jax.preprocessing.load_image`: EXIF orientation applied, 16-bit scaled to 8 bits,
    transparency composited onto white.

    Raises:
        ImageLoadError: the file or bytes are missing, empty, truncated or not an image.
    """
    if "image" in record:
        pixels = np.asarray(record["image"], dtype=np.uint8)
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]  # (H, W)
        return Image.fromarray(pixels).convert("RGB")
    if "path" in record:
        return load_image(record["path"])
    return _decode_bytes(record["encoded"], record_name(record))


class ImageFolderSource:
    """Images in `root/<split>/<class>/<image>`, labelled by the sorted class folder names.

    Files are found recursively under each class folder; a file counts as an image when PIL has a
    plugin for its extension (case-insensitive). Hidden files and folders are ignored.

    Attributes:
        classes: Class folder names in label order.
        class_to_index: Map from class folder name to label id.
    """

    def __init__(self, root: str | os.PathLike[str], split: str):
        self._root = os.fspath(root)
        self._split = split
        split_dir = os.path.join(self._root, split)
        if not os.path.isdir(split_dir):
            raise DatasetNotFoundError(
                f"Image folder {split_dir!r} not found. Expected the layout "
                f"{self._root}/<split>/<class>/<image> with split {split!r}, for example "
                f"{self._root}/{split}/n01440764/image_0001.JPEG; set config.data.path to the root "
                "and config.data.split to the split folder name."
            )
        self.classes = sorted(
            entry.name
            for entry in os.scandir(split_dir)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        self.class_to_index = {name: i for i, name in enumerate(self.classes)}
        extensions = {ext.lower() for ext in Image.registered_extensions()}

        self._paths: list[str] = []
        labels: list[int] = []
        ignored = 0
        for name in self.classes:
            class_dir = os.path.join(split_dir, name)
            for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    if filename.startswith("."):
                        continue
                    if os.path.splitext(filename)[1].lower() not in extensions:
                        ignored += 1
                        continue
                    self._paths.append(os.path.join(dirpath, filename))
                    labels.append(self.class_to_index[name])
        self._labels = np.asarray(labels, dtype=np.int32)
        if not self._paths:
            raise DatasetNotFoundError(
                f"No images found under {split_dir!r}. Expected class folders holding image files: "
                f"{split_dir}/<class>/<image>."
            )
        if ignored:
            logging.info(
                "Ignored %d files without an image extension under %s.", ignored, split_dir
            )
        logging.info("%r: %d images in %d classes.", self, len(self._paths), len(self.classes))

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"path": self._paths[index], "label": int(self._labels[index])}

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self._root!r}, split={self._split!r})"


def _find_idx_file(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}.gz (or {stem}) not found in {directory!r}. Install the Debian "
        f"package with `apt-get install dataset-fashion-mnist` (files in "
        f"{DEFAULT_FASHION_MNIST_PATH}), or set config.data.path to a folder holding the four IDX "
        "files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (gzip-compressed or not)."
    )


def _open_idx(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_idx_header(stream, path: str, ndim: int) -> tuple[int, ...]:
    magic = stream.read(4)
    if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] != _IDX_UBYTE:
        raise ValueError(
            f"Invalid IDX file {path!r}: magic bytes {magic.hex()} are not 0000 08 0N for unsigned "
            "bytes. The file is corrupt or not an IDX file; reinstall dataset-fashion-mnist."
        )
    if magic[3] != ndim:
        raise ValueError(f"Invalid IDX file {path!r}: {magic[3]} dimensions, expected {ndim}.")
    dims = np.frombuffer(stream.read(4 * ndim), dtype=">u4")
    return tuple(int(d) for d in dims)


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (optionally gzip-compressed) into a uint8 array.

    Raises:
        ValueError: the magic number, dimension count or data length is wrong.
    """
    with _open_idx(path) as stream:
        shape = _read_idx_header(stream, path, ndim)
        data = stream.read()
    expected = int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"Invalid IDX file {path!r}: header shape {shape} needs {expected} bytes, found "
            f"{len(data)}. The file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


class FashionMnistSource:
    """Fashion-MNIST from its IDX files: 28x28 greyscale images and labels 0-9.

    The arrays load on first access in each process (about 55 MB for the train split), so a
    pickled source sent to a Grain worker carries only its path.

    Args:
        path: Folder with the IDX files, gzip-compressed or not.
        split: "train" (60000 images) or "test" (10000 images; "t10k" is an alias).
        rgb: If True, records hold (28, 28, 3) images with the channel repeated, else (28, 28, 1).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_PATH,
        split: str = "train",
        rgb: bool = False,
    ):
        if split not in _FASHION_MNIST_SPLIT_ALIASES:
            raise ValueError(
                f"Invalid Fashion-MNIST split {split!r}: expected one of "
                f"{sorted(_FASHION_MNIST_SPLIT_ALIASES)}."
            )
        self._path = os.fspath(path)
        self._split = _FASHION_MNIST_SPLIT_ALIASES[split]
        self._rgb = rgb
        if not os.path.isdir(self._path):
            raise DatasetNotFoundError(
                f"Fashion-MNIST folder {self._path!r} not found. Install it with `apt-get install "
                f"dataset-fashion-mnist` (files in {DEFAULT_FASHION_MNIST_PATH}) or set "
                "config.data.path to the folder with the IDX files."
            )
        image_stem, label_stem = _FASHION_MNIST_FILES[self._split]
        self._image_file = _find_idx_file(self._path, image_stem)
        self._label_file = _find_idx_file(self._path, label_stem)
        with _open_idx(self._image_file) as stream:
            image_shape = _read_idx_header(stream, self._image_file, 3)
        with _open_idx(self._label_file) as stream:
            (num_labels,) = _read_idx_header(stream, self._label_file, 1)
        if image_shape[0] != num_labels:
            raise ValueError(
                f"Fashion-MNIST files disagree: {self._image_file} has {image_shape[0]} images but "
                f"{self._label_file} has {num_labels} labels."
            )
        self._length = num_labels
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def _load(self) -> None:
        self._images = read_idx(self._image_file, 3)  # (N, 28, 28)
        self._labels = read_idx(self._label_file, 1)  # (N,)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._images is None:
            self._load()
        image = self._images[index][..., None]  # (28, 28, 1)
        if self._rgb:
            image = np.repeat(image, 3, axis=-1)  # (28, 28, 3)
        return {"image": image, "label": int(self._labels[index])}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_images"] = None
        state["_labels"] = None
        return state

    def __repr__(self) -> str:
        return f"FashionMnistSource(path={self._path!r}, split={self._split!r})"


class TfdsSource:
    """A prepared TFDS dataset in ArrayRecord format, read with `tfds.data_source`.

    Reading needs no TensorFlow: the image feature is fetched as encoded bytes
    (`tfds.decode.SkipDecoding`) and decoded in the pipeline by `decode_record`, where an unreadable
    image can be skipped. Nothing is downloaded or built at run time.

    Args:
        name: TFDS dataset name, optionally with config and version ("imagenet2012:5.1.0").
        split: Split name, optionally with a slice ("train[:10%]").
        data_dir: TFDS data folder; None uses TFDS's default (`~/tensorflow_datasets` or
            `$TFDS_DATA_DIR`).
        image_key: Name of the image feature.
        label_key: Name of the label feature.
    """

    def __init__(
        self,
        name: str,
        split: str,
        data_dir: str | os.PathLike[str] | None = None,
        image_key: str = "image",
        label_key: str = "label",
    ):
        self._name = name
        self._split = split
        self._data_dir = os.fspath(data_dir) if data_dir is not None else None
        self._image_key = image_key
        self._label_key = label_key
        self._source = self._open()
        self._length = len(self._source)

    def _open(self) -> Sequence[dict[str, Any]]:
        import tensorflow_datasets as tfds  # Imported lazily: it is slow to import.

        build_hint = (
            f"Build it once with `tfds build {self._name.split(':')[0]} --file_format=array_record"
            + (f" --data_dir={self._data_dir}" if self._data_dir else "")
            + "` (for ImageNet add `--manual_dir=DIR` with the downloaded tar files) and set "
            "config.data.data_dir to the TFDS data folder."
        )
        try:
            builder = tfds.builder(self._name, data_dir=self._data_dir)
        except tfds.core.registered.DatasetNotFoundError as err:
            raise DatasetNotFoundError(
                f"TFDS dataset {self._name!r} not found in data_dir {self._data_dir!r}: {err}. "
                + build_hint
            ) from err
        if not builder.is_prepared():
            raise DatasetNotFoundError(
                f"TFDS dataset {self._name!r} has no prepared data in {builder.data_dir!r}. "
                + build_hint
            )
        file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
        if file_format != "array_record":
            raise ValueError(
                f"TFDS dataset {self._name!r} in {builder.data_dir!r} is stored as {file_format}, "
                "but random access needs ArrayRecord. Convert it with `tfds convert_format "
                f"--root_data_dir={builder.data_dir} --out_file_format=array_record`."
            )
        features = builder.info.features
        for key in (self._image_key, self._label_key):
            if key not in features:
                raise ValueError(
                    f"TFDS dataset {self._name!r} has no feature {key!r}; its features are "
                    f"{sorted(features.keys())}. Set config.data.image_key / label_key."
                )
        try:
            return tfds.data_source(
                self._name,
                split=self._split,
                data_dir=self._data_dir,
                download=False,
                decoders={self._image_key: tfds.decode.SkipDecoding()},
            )
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"Invalid split {self._split!r} for TFDS dataset {self._name!r}: {err}. Available "
                f"splits: {sorted(builder.info.splits.keys())}."
            ) from err

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._source is None:
            self._source = self._open()
        example = self._source[index]
        return {
            "encoded": example[self._image_key],
            "name": f"{self._name}/{self._split}[{index}]",
            "label": int(example[self._label_key]),
        }

    def __getstate__(self) -> dict[str, Any]:
        # The ArrayRecord readers hold open files, so each process reopens them.
        state = dict(self.__dict__)
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self._name!r}, split={self._split!r}, data_dir={self._data_dir!r})"
        )


def make_source(data_config: Any, split: str | None = None):
    """Build the source named by `config.data`.

    Args:
        data_config: `config.data` with `source` ("folder", "tfds" or "fashion_mnist"), `path`,
            `name`, `data_dir` and `split` as described in `aim_jax.input_pipeline`.
        split: Split to read; None uses `data_config.split`.

    Returns:
        An `ImageFolderSource`, `TfdsSource` or `FashionMnistSource`.
    """
    split = split if split is not None else data_config.split
    kind = data_config.source
    if kind == "folder":
        return ImageFolderSource(data_config.path, split)
    if kind == "fashion_mnist":
        return FashionMnistSource(data_config.get("path") or DEFAULT_FASHION_MNIST_PATH, split)
    if kind == "tfds":
        return TfdsSource(
            data_config.name,
            split,
            data_dir=data_config.get("data_dir") or None,
            image_key=data_config.get("image_key", "image"),
            label_key=data_config.get("label_key", "label"),
        )
    raise ValueError(
        f"Invalid config.data.source {kind!r}: expected 'folder', 'tfds' or 'fashion_mnist'."
    )
