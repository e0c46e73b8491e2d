"""Classify images with an AIM checkpoint and print the most probable classes.

    python -m aim_jax.classify photo.jpg other.png --checkpoint=/path/to/aim-600M --top_k=5

The checkpoint is a directory written by `aim_jax.save_pretrained` or
`tools/convert_torch.py`. Each image goes through `aim_jax.preprocessing.eval_transform` at
the model's input size; the probabilities are the softmax of the logits. A head with 1000
classes is labelled with the ImageNet-1k names, any other head with "class N".

Images that cannot be loaded are reported on stderr and skipped, and the exit status is 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from aim_jax import imagenet_classes
from aim_jax.preprocessing import ImageLoadError, eval_transform
from aim_jax.pretrained import load_pretrained

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Define the command-line flags; called only when this module is the entry point."""
    flags.DEFINE_string(
        "checkpoint",
        None,
        "Checkpoint directory written by aim_jax.save_pretrained or tools/convert_torch.py.",
        required=True,
    )
    flags.DEFINE_integer("top_k", 5, "Number of classes printed per image.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", lower_bound=1)


def class_names(num_classes: int) -> list[str]:
    """Return a label per class: ImageNet-1k names for 1000 classes, else "class N"."""
    if num_classes == imagenet_classes.NUM_CLASSES:
        try:
            return list(imagenet_classes.class_names())
        except imagenet_classes.ClassNamesNotFoundError as error:
            logging.warning("Printing class indices instead of ImageNet names: %s", error)
    return [f"class {index}" for index in range(num_classes)]


def top_k(probabilities: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Return the k most probable (class index, probability) pairs, most probable first.

    Ties keep the lower class index first.
    """
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(int(index), float(probabilities[index])) for index in order]


def make_predictor(model, batch_size: int) -> Callable[[Any, np.ndarray], np.ndarray]:
    """Build a function that returns softmax probabilities for preprocessed images.

    The returned `predict(variables, images)` takes float32 (N, H, W, 3) images normalised by
    `eval_transform` and returns float32 (N, classes) probabilities. It runs `batch_size`
    images per forward pass and pads the last batch with zeros, so the jitted model compiles
    once. Padding does not change the other rows, because the probe's BatchNorm uses its
    running statistics at inference.

    Args:
        model: an `aim_jax.AIM` module.
        batch_size: images per forward pass.
    """
    apply = jax.jit(lambda variables, x: jax.nn.softmax(model.apply(variables, x), axis=-1))

    def predict(variables, images: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]  # (b, H, W, 3)
            count = len(batch)
            if count < batch_size:
                padding = np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, padding])  # (batch_size, H, W, 3)
            outputs.append(np.asarray(apply(variables, batch))[:count])  # (b, classes)
        return np.concatenate(outputs)  # (N, classes)

    return predict


def load_images(
    paths: Sequence[str], image_size: int | tuple[int, int]
) -> tuple[list[str], np.ndarray, list[str]]:
    """Preprocess every image that loads, and collect an error message for the others.

    Returns:
        (loaded paths, float32 (N, H, W, 3) images, error messages).
    """
    loaded, arrays, errors = [], [], []
    for path in paths:
        try:
            arrays.append(eval_transform(path, image_size))  # (H, W, 3)
        except ImageLoadError as error:
            errors.append(str(error))
            continue
        loaded.append(path)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = np.stack(arrays) if arrays else np.zeros((0, height, width, 3), np.float32)
    return loaded, images, errors


def format_predictions(path: str, predictions: list[tuple[int, float]], names: list[str]) -> str:
    """Format one image's predictions: the path, then one line per class."""
    lines = [path]
    for rank, (index, probability) in enumerate(predictions, start=1):
        lines.append(f"  {rank}. {probability:.6f}  [{index}] {names[index]}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    paths = list(argv[1:])
    if not paths:
        raise app.UsageError("Give at least one image path after the flags.")
    try:
        model, variables = load_pretrained(FLAGS.checkpoint)
    except (FileNotFoundError, ValueError) as error:
        print(f"Failed to load checkpoint {FLAGS.checkpoint}: {error}", file=sys.stderr)
        return 2

    batch_size = FLAGS.batch_size
    predict = make_predictor(model, batch_size)
    names = class_names(model.config.num_classes)
    failures = 0
    # Images are loaded one batch at a time, so memory does not grow with the number of paths.
    for start in range(0, len(paths), batch_size):
        loaded, images, errors = load_images(
            paths[start : start + batch_size], model.config.img_size
        )
        for message in errors:
            print(message, file=sys.stderr)
        failures += len(errors)
        if not loaded:
            continue
        probabilities = predict(variables, images)  # (b, classes)
        for path, row in zip(loaded, probabilities, strict=True):
            print(format_predictions(path, top_k(row, FLAGS.top_k), names))
    return 1 if failures else 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
