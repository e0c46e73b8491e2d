"""Image augmentation for AIM pre-training, and a plain resize for small images.

The train recipe follows torchvision's PIL backend: `RandomResizedCrop` (scale 0.4-1, ratio 3/4-4/3,
bicubic), `RandomHorizontalFlip(0.5)`, `RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)`,
then scaling to [0, 1] and ImageNet normalisation. All randomness comes from the
`np.random.Generator` passed in, so one generator seeded per record gives the same image whatever
the worker count or resumption point.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageEnhance

from aim_jax import preprocessing

IMAGENET_MEAN = np.asarray(preprocessing.IMAGENET_MEAN, dtype=np.float32)
IMAGENET_STD = np.asarray(preprocessing.IMAGENET_STD, dtype=np.float32)

CROP_SCALE = (0.4, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_PROBABILITY = 0.5
JITTER_PROBABILITY = 0.8
JITTER_STRENGTH = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}


def as_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Return `image_size` as a (height, width) tuple of positive ints."""
    if isinstance(image_size, int | np.integer):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(
            f"Invalid image_size {image_size!r}: expected a positive int or a (height, width) pair."
        )
    return size


@dataclasses.dataclass(frozen=True)
class CropBox:
    """Crop window in pixels of the source image."""

    top: int
    left: int
    height: int
    width: int


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    max_attempts: int = 10,
) -> CropBox:
    """Sample a random-resized-crop window with the semantics of torchvision.

    Draws an area fraction uniformly in `scale` and a log-uniform aspect ratio (width / height) in
    `ratio`, and keeps the first window that fits. After `max_attempts` misses it falls back to the
    largest centered window whose aspect ratio is clamped into `ratio`.

    Args:
        height: Source image height in pixels.
        width: Source image width in pixels.
        rng: Generator for all draws.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio, width / height.
        max_attempts: Number of draws before the centered fallback.

    Returns:
        The crop window.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(max_attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return CropBox(top, left, crop_height, crop_width)

    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width = width
        crop_height = int(round(crop_width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_height = height
        crop_width = int(round(crop_height * max(ratio)))
    else:
        crop_width, crop_height = width, height
    return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def resized_crop(image: Image.Image, box: CropBox, size: tuple[int, int]) -> Image.Image:
    """Crop `box` out of `image`, then resize it to `size` (height, width) with bicubic filter."""
    cropped = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    if cropped.size == (size[1], size[0]):
        return cropped
    return cropped.resize((size[1], size[0]), Image.Resampling.BICUBIC)


@dataclasses.dataclass(frozen=True)
class JitterParams:
    """Colour jitter factors and the order in which the four operations run.

    `order` is a permutation of (0, 1, 2, 3) = (brightness, contrast, saturation, hue). Brightness,
    contrast and saturation are blend factors (1 = unchanged); hue is a shift in turns, [-0.5, 0.5].
    """

    order: tuple[int, ...]
    brightness: float
    contrast: float
    saturation: float
    hue: float


def sample_jitter_params(
    rng: np.random.Generator,
    brightness: float = JITTER_STRENGTH["brightness"],
    contrast: float = JITTER_STRENGTH["contrast"],
    saturation: float = JITTER_STRENGTH["saturation"],
    hue: float = JITTER_STRENGTH["hue"],
) -> JitterParams:
    """Sample `ColorJitter` factors as torchvision does: uniform in [max(0, 1 - s), 1 + s]."""
    order = tuple(int(i) for i in rng.permutation(4))
    return JitterParams(
        order=order,
        brightness=float(rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness)),
        contrast=float(rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast)),
        saturation=float(rng.uniform(max(0.0, 1.0 - saturation), 1.0 + saturation)),
        hue=float(rng.uniform(-hue, hue)),
    )


def adjust_hue(image: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue of an RGB image by `hue` turns in PIL's 8-bit HSV space."""
    if not -0.5 <= hue <= 0.5:
        raise ValueError(f"Invalid hue shift {hue}: expected a value in [-0.5, 0.5].")
    h, s, v = image.convert("HSV").split()
    # NOTE: torchvision casts `hue * 255` to uint8 directly, which is undefined for negative values
    # in C. Truncating toward zero and wrapping mod 256 gives what that cast yields on x86.
    shift = int(hue * 255) % 256
    shifted = (np.asarray(h, dtype=np.uint16) + shift) % 256
    h = Image.fromarray(shifted.astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def apply_jitter(image: Image.Image, params: JitterParams) -> Image.Image:
    """Apply the four colour operations of `params` to an RGB image in `params.order`."""
    for op in params.order:
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(params.brightness)
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(params.contrast)
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(params.saturation)
        else:
            image = adjust_hue(image, params.hue)
    return image


def normalize(image: Image.Image | np.ndarray) -> np.ndarray:
    """Scale uint8 RGB to [0, 1] and normalise with the ImageNet mean and std.

    Returns:
        float32 array (H, W, 3).
    """
    pixels = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    return (pixels - IMAGENET_MEAN) / IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Random choices of one pre-training augmentation; `jitter` is None when jitter is skipped."""

    box: CropBox
    flip: bool
    jitter: JitterParams | None


def sample_augment_params(height: int, width: int, rng: np.random.Generator) -> AugmentParams:
    """Draw the crop window, the flip and the colour jitter for a `height` x `width` image."""
    box = sample_crop_box(height, width, rng)
    flip = bool(rng.random() < FLIP_PROBABILITY)
    jitter = sample_jitter_params(rng) if rng.random() < JITTER_PROBABILITY else None
    return AugmentParams(box, flip, jitter)


def apply_augment(image: Image.Image, params: AugmentParams, size: tuple[int, int]) -> np.ndarray:
    """Crop and resize, flip, jitter and normalise an RGB image with fixed `params`.

    Returns:
        float32 array (size[0], size[1], 3), normalised with the ImageNet mean and std.
    """
    image = resized_crop(image, params.box, size)
    if params.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.jitter is not None:
        image = apply_jitter(image, params.jitter)
    return normalize(image)


def train_augment(
    image: Image.Image, rng: np.random.Generator, size: tuple[int, int]
) -> np.ndarray:
    """Run the pre-training augmentation on an RGB PIL image.

    Args:
        image: RGB source image of any size.
        rng: Generator for every random choice; the same generator state gives the same output.
        size: Output (height, width).

    Returns:
        float32 array (height, width, 3), normalised with the ImageNet mean and std.
    """
    return apply_augment(image, sample_augment_params(image.height, image.width, rng), size)


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize the whole image to `size` (height, width) with bicubic filtering, ignoring aspect."""
    if image.size == (size[1], size[0]):
        return image
    return image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
