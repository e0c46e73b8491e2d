"""Real photographs from scikit-image written to disk in many image formats and modes.

`write_image_variants(directory)` writes every variant and returns name -> path.
`expected_rgb(name)` returns the upright 8-bit RGB pixels that a correct loader should
produce for that file, computed with numpy from the source photograph (alpha composited
onto white, EXIF orientation undone, 16-bit values rounded to 8 bits). Each variant also
declares how far a decode may stray from that array: zero for lossless formats, a small
mean and a larger per-pixel bound for JPEG.

Tests for the preprocessing and for the data pipeline import this module directly.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, features

WHITE = 255
EXIF_ORIENTATION_TAG = 0x0112


@dataclasses.dataclass(frozen=True)
class ImageVariant:
    """One file written by `write_image_variants`.

    Attributes:
        filename: file name inside the output directory.
        description: format, mode and content of the file.
        max_error: largest allowed per-channel difference from `expected_rgb`, in 8-bit levels.
        mean_error: largest allowed mean absolute difference from `expected_rgb`, in 8-bit
            levels.
    """

    filename: str
    description: str
    max_error: int = 0
    mean_error: float = 0.0

    @property
    def lossless(self) -> bool:
        return self.max_error == 0


# JPEGs are written at quality 95 without chroma subsampling. Measured with Pillow 13 on
# these photographs, the mean error is 0.6 to 1.6 levels and the worst pixel, on a sharp
# edge, moves by 21 levels.
_JPEG_OPTIONS = {"quality": 95, "subsampling": 0}
_JPEG = {"max_error": 32, "mean_error": 2.0}

VARIANTS: dict[str, ImageVariant] = {
    "jpeg_rgb": ImageVariant("astronaut.jpg", "RGB JPEG, quality 95", **_JPEG),
    "png_rgb": ImageVariant("astronaut.png", "RGB PNG"),
    "png_rgb16": ImageVariant("astronaut_rgb16.png", "16-bit RGB PNG, values v * 257"),
    "png_gray": ImageVariant("camera.png", "8-bit grayscale PNG (mode L)"),
    "png_gray16": ImageVariant(
        "camera_gray16.png",
        "16-bit grayscale PNG (mode I;16), values v * 257 plus an offset in [-128, 128] "
        "so that only rounding, not truncation, recovers v",
    ),
    "jpeg_gray": ImageVariant("camera_gray.jpg", "grayscale JPEG, quality 95", **_JPEG),
    "png_gray_alpha": ImageVariant("camera_la.png", "grayscale PNG with alpha (mode LA)"),
    "png_rgba": ImageVariant("chelsea_rgba.png", "RGBA PNG with a horizontal alpha ramp"),
    "png_palette": ImageVariant("coffee_palette.png", "palette PNG (mode P), 256 colours"),
    "png_palette_transparent": ImageVariant(
        "coffee_palette_transparent.png",
        "palette PNG with one transparent palette index",
    ),
    "gif_palette": ImageVariant("coffee.gif", "GIF, 256 colours"),
    "jpeg_cmyk": ImageVariant("coffee_cmyk.jpg", "CMYK JPEG, quality 95", **_JPEG),
    "bmp_rgb": ImageVariant("chelsea.bmp", "24-bit BMP"),
    "tiff_rgb": ImageVariant("immunohistochemistry.tif", "RGB TIFF, uncompressed"),
    "tiff_float": ImageVariant("camera_float.tif", "32-bit float grayscale TIFF in [0, 1]"),
    "png_1bit": ImageVariant("camera_1bit.png", "1-bit PNG (mode 1)"),
    "jpeg_exif_orientation_3": ImageVariant(
        "rocket_orientation_3.jpg", "JPEG stored rotated 180 degrees, EXIF orientation 3", **_JPEG
    ),
    "jpeg_exif_orientation_6": ImageVariant(
        "rocket_orientation_6.jpg",
        "JPEG stored rotated 90 degrees counter-clockwise, EXIF orientation 6",
        **_JPEG,
    ),
    "jpeg_exif_orientation_8": ImageVariant(
        "rocket_orientation_8.jpg",
        "JPEG stored rotated 90 degrees clockwise, EXIF orientation 8",
        **_JPEG,
    ),
}
if features.check("webp"):
    VARIANTS["webp_lossless"] = ImageVariant("rocket_lossless.webp", "lossless WebP")


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)


def _composite_on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend 8-bit colours over white with 8-bit alpha, rounding to the nearest level."""
    a = alpha.astype(np.float64)[:, :, None] / 255.0  # (H, W, 1)
    blended = color.astype(np.float64) * a + WHITE * (1.0 - a)
    return np.round(blended).astype(np.uint8)


def _alpha_ramp(height: int, width: int) -> np.ndarray:
    """Alpha from 0 on the left to 255 on the right, constant down each column."""
    ramp = np.round(np.linspace(0, 255, width)).astype(np.uint8)
    return np.broadcast_to(ramp, (height, width)).copy()


def _rocket_upright() -> np.ndarray:
    # Both sides are multiples of 16, the largest JPEG MCU, so rotating the stored image moves
    # whole DCT blocks and the rotated files compress almost exactly like the upright one.
    return skimage.data.rocket()[:416, :624]


@functools.cache
def _quantized_coffee() -> Image.Image:
    return Image.fromarray(skimage.data.coffee()).quantize(colors=256, dither=Image.Dither.NONE)


def _palette_lookup(image: Image.Image) -> np.ndarray:
    palette = np.array(image.getpalette(), dtype=np.uint8).reshape(-1, 3)  # (colours, 3)
    return palette[np.asarray(image)]  # (H, W, 3)


def _transparent_index() -> int:
    """Palette index made transparent: the most frequent colour, so the test has many pixels."""
    return int(np.bincount(np.asarray(_quantized_coffee()).ravel()).argmax())


def _gray16_offsets(shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(0).integers(-128, 129, size=shape)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_png_rgb16(path: Path, rgb16: np.ndarray) -> None:
    """Write a (H, W, 3) uint16 array as a 16-bit RGB PNG.

    Pillow cannot write 16-bit RGB, so this encodes the PNG chunks directly: IHDR with bit
    depth 16 and colour type 2, one zlib stream of big-endian rows each prefixed by filter
    type 0, then IEND.
    """
    height, width, channels = rgb16.shape
    if channels != 3 or rgb16.dtype != np.uint16:
        raise ValueError(f"Expected a (H, W, 3) uint16 array, got {rgb16.shape} {rgb16.dtype}.")
    rows = rgb16.astype(">u2").reshape(height, width * 3).view(np.uint8)  # (H, 6 W) bytes
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # (H, 1 + 6 W)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)


def _save_with_orientation(path: Path, *, upright: np.ndarray, orientation: int) -> None:
    # With EXIF orientation 3 the stored image is upside down. With 6 a viewer turns it 90
    # degrees clockwise to show it upright, and with 8 counter-clockwise. np.rot90 with k > 0
    # turns counter-clockwise.
    turns = {3: 2, 6: 1, 8: -1}[orientation]
    stored = np.ascontiguousarray(np.rot90(upright, k=turns))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray(stored).save(path, exif=exif, **_JPEG_OPTIONS)


def _writers() -> dict[str, Callable[[Path], None]]:
    astronaut = skimage.data.astronaut()
    camera = skimage.data.camera()
    chelsea = skimage.data.chelsea()
    coffee = skimage.data.coffee()

    def png_gray16(path: Path) -> None:
        values = camera.astype(np.int64) * 257 + _gray16_offsets(camera.shape)
        Image.fromarray(np.clip(values, 0, 65535).astype(np.uint16)).save(path)

    def png_gray_alpha(path: Path) -> None:
        alpha = _alpha_ramp(*camera.shape)
        Image.fromarray(np.stack([camera, alpha], axis=2), mode="LA").save(path)

    def png_rgba(path: Path) -> None:
        alpha = _alpha_ramp(*chelsea.shape[:2])
        Image.fromarray(np.concatenate([chelsea, alpha[:, :, None]], axis=2)).save(path)

    def png_palette_transparent(path: Path) -> None:
        _quantized_coffee().save(path, transparency=_transparent_index())

    def tiff_float(path: Path) -> None:
        Image.fromarray(camera.astype(np.float32) / 255.0).save(path)

    writers = {
        "jpeg_rgb": lambda p: Image.fromarray(astronaut).save(p, **_JPEG_OPTIONS),
        "png_rgb": lambda p: Image.fromarray(astronaut).save(p),
        "png_rgb16": lambda p: write_png_rgb16(p, astronaut.astype(np.uint16) * 257),
        "png_gray": lambda p: Image.fromarray(camera).save(p),
        "png_gray16": png_gray16,
        "jpeg_gray": lambda p: Image.fromarray(camera).save(p, **_JPEG_OPTIONS),
        "png_gray_alpha": png_gray_alpha,
        "png_rgba": png_rgba,
        "png_palette": lambda p: _quantized_coffee().save(p),
        "png_palette_transparent": png_palette_transparent,
        "gif_palette": lambda p: _quantized_coffee().save(p),
        "jpeg_cmyk": lambda p: Image.fromarray(coffee).convert("CMYK").save(p, **_JPEG_OPTIONS),
        "bmp_rgb": lambda p: Image.fromarray(chelsea).save(p),
        "tiff_rgb": lambda p: Image.fromarray(skimage.data.immunohistochemistry()).save(p),
        "tiff_float": tiff_float,
        "png_1bit": lambda p: Image.fromarray(camera >= 128).save(p),
        "webp_lossless": lambda p: Image.fromarray(_rocket_upright()).save(p, lossless=True),
    }
    for orientation in (3, 6, 8):
        writers[f"jpeg_exif_orientation_{orientation}"] = functools.partial(
            _save_with_orientation, upright=_rocket_upright(), orientation=orientation
        )
    return writers


def expected_rgb(name: str) -> np.ndarray:
    """Return the upright (H, W, 3) uint8 pixels that variant `name` should decode to.

    Transparent pixels are composited onto white.
    """
    camera = skimage.data.camera()
    if name in ("jpeg_rgb", "png_rgb", "png_rgb16"):
        return skimage.data.astronaut()
    if name in ("png_gray", "png_gray16", "jpeg_gray", "tiff_float"):
        return _gray_to_rgb(camera)
    if name == "png_gray_alpha":
        return _composite_on_white(_gray_to_rgb(camera), _alpha_ramp(*camera.shape))
    if name == "png_rgba":
        chelsea = skimage.data.chelsea()
        return _composite_on_white(chelsea, _alpha_ramp(*chelsea.shape[:2]))
    if name in ("png_palette", "gif_palette"):
        return _palette_lookup(_quantized_coffee())
    if name == "png_palette_transparent":
        indices = np.asarray(_quantized_coffee())
        rgb = _palette_lookup(_quantized_coffee())
        rgb[indices == _transparent_index()] = WHITE
        return rgb
    if name == "jpeg_cmyk":
        return skimage.data.coffee()
    if name == "bmp_rgb":
        return skimage.data.chelsea()
    if name == "tiff_rgb":
        return skimage.data.immunohistochemistry()
    if name == "png_1bit":
        return _gray_to_rgb(np.where(camera >= 128, 255, 0).astype(np.uint8))
    if name.startswith("jpeg_exif_orientation_") or name == "webp_lossless":
        return _rocket_upright()
    raise KeyError(f"Unknown image variant {name!r}; known variants: {sorted(VARIANTS)}.")


def write_image_variants(directory: str | Path) -> dict[str, Path]:
    """Write every variant in `VARIANTS` into `directory` and return name -> path.

    WebP is included only when this Pillow build supports it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writers = _writers()
    paths = {}
    for name, variant in VARIANTS.items():
        path = directory / variant.filename
        writers[name](path)
        paths[name] = path
    return paths


def write_truncated_copy(source: Path, destination: Path, fraction: float = 0.5) -> Path:
    """Write the first `fraction` of the bytes of `source` to `destination`."""
    data = Path(source).read_bytes()
    Path(destination).write_bytes(data[: int(len(data) * fraction)])
    return Path(destination)
