"""Image loading and the AIM evaluation transform, as NHWC float32 arrays.

The evaluation transform reproduces torchvision's `Resize(256, BICUBIC)`, `CenterCrop(224)`,
`ToTensor()` and `Normalize(IMAGENET_MEAN, IMAGENET_STD)` applied to a PIL image, which is
how the released AIM models were evaluated:

* the shorter side becomes `ceil(image_size / crop_ratio)` and the longer side
  `int(size * long / short)`, truncated rather than rounded;
* Pillow's bicubic filter resizes, and it antialiases when downscaling;
* the crop offsets are `int(round((side - crop) / 2))`, with Python's half-to-even rounding.

A 687 x 512 (width x height) photograph is resized to 343 x 256, and its 224 x 224 crop
starts 60 pixels from the left and 16 from the top.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageFile, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_RATIO = 0.875

# Background for images with an alpha channel or a transparent palette index.
WHITE = (255, 255, 255)

ImageSource = str | os.PathLike | Image.Image

# Exceptions that Pillow raises for files that are missing, not images, corrupt or truncated.
# Plugins raise SyntaxError for malformed headers and struct.error or EOFError for short reads.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

_PIL_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageLoadError(ValueError):
    """An image file that could not be opened or fully decoded.

    Attributes:
        path: the file that failed, or None for an in-memory image.
    """

    def __init__(self, path: str | None, cause: str):
        self.path = path
        where = f"image file {path!r}" if path is not None else "in-memory image"
        super().__init__(f"Failed to load {where}: {cause}")


def _describe(error: BaseException) -> str:
    message = str(error) or "no details"
    return f"{type(error).__name__}: {message}"


def _open_upright(path: str) -> Image.Image:
    """Open `path`, decode all of its pixel data and apply its EXIF orientation."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # NOTE: this module-wide Pillow flag is left as the caller set it. While it is True,
        # Pillow pads truncated JPEG and PNG files with grey instead of raising.
        logging.log_first_n(
            logging.WARNING,
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated images load without "
            "an error; set it to False to reject them.",
            1,
        )
    try:
        with Image.open(path) as image:
            # Image.open only reads the header; load() decodes the pixels and raises on a
            # truncated file. exif_transpose runs before the file closes because TIFF keeps
            # its orientation tag on the file object, and it returns a new in-memory image.
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError as error:
        raise ImageLoadError(path, f"the file does not exist ({_describe(error)})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(
            path, f"the file is not an image format that Pillow can read ({_describe(error)})"
        ) from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            path,
            "the image has more pixels than PIL.Image.MAX_IMAGE_PIXELS allows; raise that "
            f"limit if the file is trusted ({_describe(error)})",
        ) from error
    except _DECODE_ERRORS as error:
        raise ImageLoadError(
            path, f"the file is corrupt or truncated ({_describe(error)})"
        ) from error


def _scale_16_bit(image: Image.Image) -> Image.Image:
    """Map 16-bit or 32-bit integer grayscale 0..65535 to 8-bit 0..255 by rounding."""
    # Pillow's own conversion of these modes to "L" clips at 255 instead of scaling.
    values = np.asarray(image).astype(np.float64)  # (H, W)
    if image.mode == "I" and (values.min() < 0 or values.max() > 65535):
        # NOTE: mode "I" is assumed to contain 16-bit data, because Pillow uses it for some
        # 16-bit PNG and TIFF files. Values outside 0..65535 are clipped.
        logging.log_first_n(
            logging.WARNING,
            "32-bit integer image has values outside 0..65535, which are clipped.",
            1,
        )
        values = np.clip(values, 0, 65535)
    return Image.fromarray(np.round(values * (255.0 / 65535.0)).astype(np.uint8))


def _scale_float(image: Image.Image) -> Image.Image:
    """Map 32-bit float grayscale 0..1 to 8-bit 0..255 by rounding."""
    # NOTE: float images are assumed to contain values in [0, 1], the usual convention for
    # float TIFF. Values outside it are clipped, and NaN becomes 0.
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)  # (H, W)
    values = np.clip(values, 0.0, 1.0)
    return Image.fromarray(np.round(values * 255.0).astype(np.uint8))


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb(image: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    if image.mode in _PIL_16_BIT_MODES or image.mode == "I":
        image = _scale_16_bit(image)
    elif image.mode == "F":
        image = _scale_float(image)

    if _has_transparency(image) and background is not None:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    # A plain conversion drops any alpha channel. CMYK goes through Pillow's conversion
    # without colour management, as in torchvision's ImageFolder loader.
    return image.convert("RGB")


def load_image(source: ImageSource, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Load an image file or PIL image as an upright 8-bit RGB image.

    The EXIF orientation tag is applied. Grayscale, 1-bit, palette and CMYK images are
    converted with Pillow. 16-bit images are scaled from 0..65535 to 0..255 and float images
    from 0..1 to 0..255, both with rounding. Pillow reduces 16-bit RGB PNG files to 8 bits
    itself by keeping the high byte. Multi-frame files (GIF, TIFF, WebP) give their first
    frame.

    Args:
        source: a path, or a PIL image, which is not modified.
        background: RGB colour onto which images with an alpha channel or a transparent
            palette index are composited. White, the default, is how transparent images
            are usually displayed. None drops the alpha channel instead, as
            `Image.convert("RGB")` does, leaving whatever colour the transparent pixels store.

    Returns:
        A fully decoded PIL image in mode "RGB".

    Raises:
        ImageLoadError: the file is missing, is not an image, or is corrupt or truncated.
            The message names the file and the cause.
    """
    if isinstance(source, Image.Image):
        path = getattr(source, "filename", None) or None
        try:
            image = ImageOps.exif_transpose(source)
        except _DECODE_ERRORS as error:
            raise ImageLoadError(path, f"decoding failed ({_describe(error)})") from error
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        image = _open_upright(path)
    else:
        raise TypeError(f"source must be a path or a PIL.Image.Image, got {type(source).__name__}.")

    try:
        return _to_rgb(image, background)
    except _DECODE_ERRORS as error:
        raise ImageLoadError(
            path, f"conversion of mode {image.mode!r} to RGB failed ({_describe(error)})"
        ) from error


def _as_height_width(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        height = width = image_size
    else:
        if len(image_size) != 2:
            raise ValueError(f"image_size={image_size!r} must be an int or (height, width).")
        height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size={image_size!r} must be positive.")
    return height, width


def resize_size(image_size: int | Sequence[int], crop_ratio: float = DEFAULT_CROP_RATIO) -> int:
    """Return the length of the shorter side before the center crop.

    This is `ceil(image_size / crop_ratio)`, 256 for 224 and 0.875. For a (height, width)
    output the larger of the two is used, so that the crop fits inside the resized image.
    """
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio={crop_ratio} must be in (0, 1].")
    height, width = _as_height_width(image_size)
    return math.ceil(max(height, width) / crop_ratio)


def resized_shape(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """Return (width, height) after resizing the shorter side to `shorter_side`.

    The longer side is `int(shorter_side * long / short)`, truncated as in torchvision's
    `Resize(int)`, so 687 x 512 becomes 343 x 256.
    """
    if width <= height:
        return shorter_side, int(shorter_side * height / width)
    return int(shorter_side * width / height), shorter_side


def center_crop_box(
    width: int, height: int, crop_height: int, crop_width: int
) -> tuple[int, int, int, int]:
    """Return the PIL box (left, top, right, bottom) of a centred crop.

    The offsets are `int(round((side - crop) / 2))` with Python's half-to-even rounding, as in
    torchvision's `CenterCrop`: a 343-wide image cropped to 224 starts at column 60.
    """
    if crop_width > width or crop_height > height:
        raise ValueError(
            f"Crop {crop_width} x {crop_height} does not fit in a {width} x {height} image."
        )
    left = int(round((width - crop_width) / 2.0))
    top = int(round((height - crop_height) / 2.0))
    return left, top, left + crop_width, top + crop_height


def eval_transform(
    image: ImageSource,
    image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> np.ndarray:
    """Resize, center-crop and normalise one image for AIM evaluation.

    Args:
        image: a path or a PIL image; `load_image` converts it to upright RGB first.
        image_size: output side in pixels, or (height, width).
        crop_ratio: fraction of the resized shorter side that the crop keeps.

    Returns:
        float32 array (H, W, 3), ImageNet-normalised.
    """
    crop_height, crop_width = _as_height_width(image_size)
    shorter_side = resize_size(image_size, crop_ratio)
    rgb = load_image(image)

    new_width, new_height = resized_shape(rgb.width, rgb.height, shorter_side)
    # Pillow returns an unchanged copy when the size already matches, as torchvision does.
    rgb = rgb.resize((new_width, new_height), Image.Resampling.BICUBIC)
    rgb = rgb.crop(center_crop_box(new_width, new_height, crop_height, crop_width))

    # float32 throughout, in the order ToTensor and Normalize use: x / 255, minus mean, over std.
    pixels = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255)  # (H, W, 3)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return (pixels - mean) / std  # (H, W, 3)


def preprocess(
    sources: Sequence[ImageSource],
    image_size: int | Sequence[int] = DEFAULT_IMAGE_SIZE,
    crop_ratio: float = DEFAULT_CROP_RATIO,
) -> np.ndarray:
    """Apply `eval_transform` to each image and stack the results.

    Args:
        sources: paths or PIL images.
        image_size: output side in pixels, or (height, width).
        crop_ratio: fraction of the resized shorter side that the crop keeps.

    Returns:
        float32 array (B, H, W, 3).
    """
    if isinstance(sources, (str, os.PathLike, Image.Image)):
        raise TypeError("preprocess expects a sequence of images; use eval_transform for one.")
    if not sources:
        raise ValueError("preprocess received no images.")
    return np.stack([eval_transform(s, image_size, crop_ratio) for s in sources])  # (B, H, W, 3)
