"""Tests for aim_jax.preprocessing on real photographs written in many file formats."""

from __future__ import annotations

import math

import image_fixtures
import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from aim_jax import preprocessing
from aim_jax.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    center_crop_box,
    eval_transform,
    load_image,
    preprocess,
    resize_size,
    resized_shape,
)

ONE_LEVEL = 1.0 / 255.0
# Slack for float32 un-normalisation, far below one 8-bit level.
FLOAT_SLACK = 1e-5


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    return image_fixtures.write_image_variants(tmp_path_factory.mktemp("variants"))


def unnormalize(pixels: np.ndarray) -> np.ndarray:
    """Undo the ImageNet normalisation: (H, W, 3) back to [0, 1] units."""
    return pixels.astype(np.float64) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)


def _torch_bicubic_pass(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    resized = torch.nn.functional.interpolate(
        pixels, size=size, mode="bicubic", antialias=True, align_corners=False
    )
    return resized.clamp(0, 255).round()


def reference_eval_transform(rgb: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Apply the evaluation transform with torch's antialiased bicubic, in [0, 1] units.

    Pillow resizes 8-bit images in two passes, horizontal then vertical, and rounds and clips
    to 0..255 after each one. Bicubic overshoot at sharp edges is therefore clipped before the
    vertical pass. A single float `interpolate` call skips that clipping and differs from
    Pillow by up to 12 levels on these photographs, so the reference runs the two passes
    separately and rounds after each.
    """
    height, width = rgb.shape[:2]
    shorter_side = math.ceil(max(crop_height, crop_width) / 0.875)
    if width <= height:
        new_width, new_height = shorter_side, int(shorter_side * height / width)
    else:
        new_width, new_height = int(shorter_side * width / height), shorter_side

    pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].double()  # (1, 3, H, W)
    pixels = _torch_bicubic_pass(pixels, (height, new_width))  # (1, 3, H, W')
    pixels = _torch_bicubic_pass(pixels, (new_height, new_width))  # (1, 3, H', W')
    resized = pixels[0].permute(1, 2, 0).numpy()  # (H', W', 3)

    top = int(round((new_height - crop_height) / 2.0))
    left = int(round((new_width - crop_width) / 2.0))
    return resized[top : top + crop_height, left : left + crop_width] / 255.0


def assert_close_to_reference(ours: np.ndarray, reference: np.ndarray, levels: int):
    difference = np.abs(unnormalize(ours) - reference)
    assert ours.shape == reference.shape
    assert difference.max() <= levels * ONE_LEVEL + FLOAT_SLACK, difference.max() * 255
    # Pillow and torch disagree only where the exact value sits near a rounding boundary.
    assert (difference > FLOAT_SLACK).mean() < 0.03


def column_ramp_image(width: int, height: int) -> Image.Image:
    """RGB image whose red channel rises with the column and green with the row."""
    columns = np.round(np.arange(width) * 255.0 / (width - 1))
    rows = np.round(np.arange(height) * 255.0 / (height - 1))
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 0] = columns[None, :]
    pixels[:, :, 1] = rows[:, None]
    pixels[:, :, 2] = 128
    return Image.fromarray(pixels)


# Loading.


@pytest.mark.parametrize("name", sorted(image_fixtures.VARIANTS))
def test_load_image_decodes_variant(variants, name):
    variant = image_fixtures.VARIANTS[name]
    loaded = load_image(variants[name])
    expected = image_fixtures.expected_rgb(name)

    assert loaded.mode == "RGB"
    pixels = np.asarray(loaded)
    assert pixels.shape == expected.shape
    difference = np.abs(pixels.astype(np.int32) - expected.astype(np.int32))
    assert difference.max() <= variant.max_error
    assert difference.mean() <= variant.mean_error


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_load_image_applies_exif_orientation(variants, orientation):
    name = f"jpeg_exif_orientation_{orientation}"
    stored = np.asarray(Image.open(variants[name]).convert("RGB"))
    loaded = np.asarray(load_image(variants[name]))

    upright = image_fixtures.expected_rgb(name)
    assert upright.shape == (416, 624, 3)
    assert loaded.shape == upright.shape
    # Without the EXIF rotation the pixels are far from upright: the shape differs for 6 and 8,
    # and for 3 the upside-down rocket is off by tens of levels on average.
    if orientation == 3:
        assert np.abs(stored.astype(np.int32) - upright).mean() > 20.0
    else:
        assert stored.shape == (624, 416, 3)
    assert np.abs(loaded.astype(np.int32) - upright).mean() < 2.0


def test_load_image_16_bit_rounds_not_truncates(variants):
    # The file stores 257 * v + offset with |offset| <= 128: rounding recovers v exactly,
    # while keeping the high byte would give v - 1 for every negative offset.
    loaded = np.asarray(load_image(variants["png_gray16"]))[:, :, 0]

    assert Image.open(variants["png_gray16"]).mode == "I;16"
    np.testing.assert_array_equal(loaded, skimage.data.camera())


def test_load_image_pil_alpha_background():
    rgba = np.concatenate(
        [skimage.data.chelsea(), np.full((300, 451, 1), 64, np.uint8)], axis=2
    )  # (H, W, 4)
    source = Image.fromarray(rgba)

    composited = np.asarray(load_image(source)).astype(np.float64)
    dropped = np.asarray(load_image(source, background=None))

    expected = rgba[:, :, :3] * (64 / 255) + 255 * (1 - 64 / 255)
    assert np.abs(composited - expected).max() <= 1.0
    np.testing.assert_array_equal(dropped, rgba[:, :, :3])
    assert source.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(source), rgba)


# Errors.


@pytest.mark.parametrize("name", ["jpeg_rgb", "png_rgb"])
def test_load_image_truncated_file_raises(variants, tmp_path, name):
    truncated = tmp_path / f"truncated_{variants[name].name}"
    image_fixtures.write_truncated_copy(variants[name], truncated, fraction=0.5)

    with pytest.raises(ImageLoadError, match="truncated") as raised:
        load_image(truncated)
    assert str(truncated) in str(raised.value)
    assert raised.value.path == str(truncated)
    with pytest.raises(ImageLoadError):
        eval_transform(truncated)


def test_load_image_non_image_raises(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a text file, not a JPEG\n")

    with pytest.raises(ImageLoadError, match="not an image") as raised:
        load_image(path)
    assert str(path) in str(raised.value)


def test_load_image_missing_file_raises(tmp_path):
    path = tmp_path / "missing.png"

    with pytest.raises(ImageLoadError, match="does not exist") as raised:
        load_image(path)
    assert str(path) in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_load_image_rejects_array():
    with pytest.raises(TypeError, match="ndarray"):
        load_image(np.zeros((4, 4, 3), np.uint8))


# Geometry.


def test_resize_and_crop_geometry_values():
    assert resize_size(224) == 256
    assert resize_size(224, 1.0) == 224
    assert resize_size((160, 224)) == 256
    # 687 * 256 / 512 = 343.5 is truncated to 343, not rounded to 344.
    assert resized_shape(687, 512, 256) == (343, 256)
    assert resized_shape(512, 687, 256) == (256, 343)
    # (343 - 224) / 2 = 59.5 and (345 - 224) / 2 = 60.5 both round to the even 60.
    assert center_crop_box(343, 256, 224, 224) == (60, 16, 284, 240)
    assert center_crop_box(345, 256, 224, 224) == (60, 16, 284, 240)
    assert center_crop_box(256, 343, 224, 224) == (16, 60, 240, 284)


def test_eval_transform_687x512_crop_offsets():
    image = column_ramp_image(687, 512)

    output = unnormalize(eval_transform(image)) * 255.0  # (224, 224, 3) in levels

    # Output column j comes from resized column j + 60 of 343, whose centre lies at source
    # column (j + 60.5) * 687 / 343 - 0.5, where the red ramp has the value below. Measured
    # with Pillow 13, the correct geometry leaves a mean residual of 0.003 levels and a worst
    # column of 0.57. A crop one column off shifts the mean by 0.74 levels. Resizing to 344
    # columns shifts it by 0.37, with a worst column of 0.97.
    columns = np.arange(224)
    source_columns = (columns + 60 + 0.5) * 687 / 343 - 0.5
    red_residual = output[:, :, 0].mean(axis=0) - source_columns * 255 / 686
    assert abs(red_residual.mean()) < 0.1
    assert np.abs(red_residual).max() < 0.75

    # Output row i comes from resized row i + 16 of 256, centred on source row 2 i + 32.5.
    # The correct geometry leaves a worst row of 0.22 levels. A crop one row off shifts the
    # mean by 1.0 level, and resizing to 257 rows shifts it by 0.5.
    rows = np.arange(224)
    source_rows = (rows + 16 + 0.5) * 512 / 256 - 0.5
    green_residual = output[:, :, 1].mean(axis=1) - source_rows * 255 / 511
    assert abs(green_residual.mean()) < 0.1
    assert np.abs(green_residual).max() < 0.75

    # The same result, pixel for pixel, as Pillow's resize to 343 x 256 and a crop at (60, 16).
    expected = np.asarray(image.resize((343, 256), Image.Resampling.BICUBIC))[16:240, 60:284]
    np.testing.assert_allclose(output, expected, atol=1e-3)


def test_eval_transform_solid_colour_normalisation():
    colour = (10, 128, 250)
    image = Image.new("RGB", (400, 300), colour)

    output = eval_transform(image)

    expected = (np.array(colour) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert output.dtype == np.float32
    assert output.shape == (224, 224, 3)
    np.testing.assert_allclose(output, np.broadcast_to(expected, (224, 224, 3)), atol=1e-6)


# Comparison with the torch reference.


@pytest.mark.parametrize("name", sorted(image_fixtures.VARIANTS))
def test_eval_transform_matches_torch_reference(variants, name):
    rgb = np.asarray(load_image(variants[name]))

    ours = eval_transform(variants[name])

    assert_close_to_reference(ours, reference_eval_transform(rgb, 224, 224), levels=1)


def test_eval_transform_non_square_matches_reference():
    rgb = skimage.data.coffee()

    ours = eval_transform(Image.fromarray(rgb), image_size=(160, 224))

    assert ours.shape == (160, 224, 3)
    assert_close_to_reference(ours, reference_eval_transform(rgb, 160, 224), levels=1)


@pytest.mark.parametrize(
    "photo, top, left, height, width",
    [
        ("astronaut", 100, 150, 150, 200),
        ("chelsea", 81, 302, 128, 134),
        ("rocket", 175, 28, 146, 220),
    ],
)
def test_eval_transform_upscale_matches_reference(photo, top, left, height, width):
    # Photographs smaller than 256 pixels are enlarged. There, a one-level disagreement after
    # the horizontal pass can grow past one level in the vertical pass, because the bicubic
    # weights have negative lobes and their absolute values sum to more than one. Over 90
    # random crops of six scikit-image photographs, the worst case was two levels. The
    # chelsea and rocket crops here reach it, and the astronaut crop stays within one.
    rgb = np.ascontiguousarray(
        getattr(skimage.data, photo)()[top : top + height, left : left + width]
    )

    ours = eval_transform(Image.fromarray(rgb))

    assert_close_to_reference(ours, reference_eval_transform(rgb, 224, 224), levels=2)


def test_16_bit_png_matches_8_bit(variants):
    for sixteen, eight in [("png_gray16", "png_gray"), ("png_rgb16", "png_rgb")]:
        difference = np.abs(
            unnormalize(eval_transform(variants[sixteen]))
            - unnormalize(eval_transform(variants[eight]))
        )
        assert difference.max() <= ONE_LEVEL + FLOAT_SLACK, sixteen


def test_preprocess_stacks_eval_transform(variants):
    sources = [variants["jpeg_rgb"], variants["png_gray"], Image.fromarray(skimage.data.coffee())]

    batch = preprocess(sources, image_size=(160, 224))

    assert batch.shape == (3, 160, 224, 3)
    assert batch.dtype == np.float32
    for index, source in enumerate(sources):
        np.testing.assert_array_equal(batch[index], eval_transform(source, (160, 224)))


def test_preprocess_rejects_single_path(variants):
    with pytest.raises(TypeError, match="sequence"):
        preprocess(variants["png_rgb"])


def test_truncated_flag_left_unchanged(variants):
    load_image(variants["png_rgb"])

    assert preprocessing.ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_image_decompression_bomb_raises(variants, monkeypatch):
    # Pillow raises DecompressionBombError above twice MAX_IMAGE_PIXELS; 512 x 512 is far above.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    with pytest.raises(ImageLoadError, match="MAX_IMAGE_PIXELS") as raised:
        load_image(variants["png_rgb"])
    assert str(variants["png_rgb"]) in str(raised.value)
