"""Next-patch prediction grid of a pre-training checkpoint.

    python -m aim_jax.visualize --workdir workdirs/fashion_mnist --output grid.png photo.jpg

For each image the PNG shows three panels side by side: the prefix (patches after it
blanked), the model's next-patch predictions after the prefix, and the ground truth.
Predictions are normalised patches; they are mapped back to pixels with the mean and
standard deviation of the true patch at the same place. Without image arguments, three
photographs from scikit-image are used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image, ImageDraw

from aim_jax import preprocessing, train
from aim_jax.models import AIMPretrainer
from aim_jax.objective import TARGET_NORM_EPS, patchify, unpatchify

PANEL_TITLES = ("prefix", "prediction", "ground truth")
MIN_PANEL_SIDE = 192  # pixels; small inputs are enlarged with nearest-neighbour sampling


def sample_photographs() -> list[Image.Image]:
    """Return three real photographs shipped with scikit-image."""
    try:
        import skimage.data
    except ImportError as err:
        raise RuntimeError(
            "No images given and scikit-image is not installed; pass image paths or install "
            "scikit-image (pip install -e '.[dev]')."
        ) from err
    return [
        Image.fromarray(f())
        for f in (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee)
    ]


def predict_next_patches(
    model: AIMPretrainer, params: dict[str, Any], images: np.ndarray, prefix_len: int
) -> dict[str, np.ndarray]:
    """Predict every patch after the prefix and map the predictions back to image space.

    Args:
        model: the pre-training model.
        params: its parameters.
        images: (B, H, W, 3) normalised images.
        prefix_len: number of prefix patches S, 1 <= S < K.

    Returns:
        Images (B, H, W, 3) in the normalised input space: "prefix" (patches from S on set
        to 0), "prediction" (the prefix, then at patch j >= S the prediction made at
        position j - 1, un-normalised with the true patch's statistics) and "truth".
    """
    patch = model.config.patch_size
    batch, height, width, _ = images.shape
    grid = (height // patch, width // patch)
    num_patches = grid[0] * grid[1]
    if not 1 <= prefix_len < num_patches:
        raise ValueError(f"prefix_len={prefix_len} is outside 1..{num_patches - 1}.")
    prefix = jnp.full((batch,), prefix_len, jnp.int32)
    predictions = np.asarray(
        model.apply({"params": params}, jnp.asarray(images), prefix)
    )  # (B, K, ppC)

    truth = np.asarray(patchify(jnp.asarray(images), patch))  # (B, K, ppC)
    mean = truth.mean(axis=-1, keepdims=True)
    std = np.sqrt(truth.var(axis=-1, keepdims=True) + TARGET_NORM_EPS)
    predicted = truth.copy()
    predicted[:, prefix_len:] = (
        predictions[:, prefix_len - 1 : -1] * std[:, prefix_len:] + mean[:, prefix_len:]
    )
    blanked = truth.copy()
    blanked[:, prefix_len:] = 0.0

    def to_image(patches):
        return np.asarray(unpatchify(jnp.asarray(patches), grid, patch))

    return {
        "prefix": to_image(blanked),
        "prediction": to_image(predicted),
        "truth": to_image(truth),
    }


def to_pixels(image: np.ndarray) -> np.ndarray:
    """Undo the ImageNet normalisation and return uint8 (H, W, 3)."""
    mean = np.asarray(preprocessing.IMAGENET_MEAN, np.float32)
    std = np.asarray(preprocessing.IMAGENET_STD, np.float32)
    return (np.clip(image * std + mean, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_grid(panels: dict[str, np.ndarray]) -> Image.Image:
    """Lay out one row per image with the prefix, prediction and truth panels."""
    rows = panels["truth"].shape[0]
    height, width = panels["truth"].shape[1:3]
    scale = max(1, -(-MIN_PANEL_SIDE // max(height, width)))
    side_h, side_w, margin, title = height * scale, width * scale, 8, 16
    canvas = Image.new(
        "RGB", (3 * side_w + 4 * margin, rows * (side_h + margin) + margin + title), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(PANEL_TITLES):
        draw.text((margin + col * (side_w + margin), 2), name, fill="black")
    for row in range(rows):
        for col, key in enumerate(("prefix", "prediction", "truth")):
            tile = Image.fromarray(to_pixels(panels[key][row])).resize(
                (side_w, side_h), Image.NEAREST
            )
            canvas.paste(
                tile, (margin + col * (side_w + margin), title + margin + row * (side_h + margin))
            )
    return canvas


def visualize(
    workdir: str,
    output: str,
    image_paths: Sequence[str] = (),
    *,
    prefix_fraction: float = 0.5,
    step: int | None = None,
) -> str:
    """Write the prediction grid of the latest (or given) checkpoint in `workdir` to `output`."""
    config, model_config, params, step = train.load_pretrain_checkpoint(workdir, step)
    model, _ = train.create_model(config)
    sources = list(image_paths) or sample_photographs()
    grayscale = config.data.source == "fashion_mnist"
    height, width = model_config.img_size
    images = []
    for source in sources:
        image = preprocessing.load_image(source)
        if grayscale:
            # A model pre-trained on grayscale images is shown its photographs in grayscale too.
            image = image.convert("L").convert("RGB")
        images.append(preprocessing.eval_transform(image, image_size=(height, width)))
    num_patches = (height // model_config.patch_size) * (width // model_config.patch_size)
    prefix_len = min(max(1, int(round(prefix_fraction * num_patches))), num_patches - 1)
    panels = predict_next_patches(model, params, np.stack(images), prefix_len)
    render_grid(panels).save(output)
    logging.info(
        "Wrote %s: %d images, step %d, prefix of %d/%d patches.",
        output,
        len(images),
        step,
        prefix_len,
        num_patches,
    )
    return output


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags; called only when this module is the entry point."""
    flags.DEFINE_string("workdir", None, "Training workdir whose checkpoint is shown.")
    flags.DEFINE_string("output", "next_patch_grid.png", "PNG file to write.")
    flags.DEFINE_integer("step", None, "Checkpoint step; the latest complete one by default.")
    flags.DEFINE_float("prefix_fraction", 0.5, "Fraction of the patches given as the prefix.")
    flags.mark_flag_as_required("workdir")


def main(argv):
    visualize(
        FLAGS.workdir,
        FLAGS.output,
        argv[1:],
        prefix_fraction=FLAGS.prefix_fraction,
        step=FLAGS.step,
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
