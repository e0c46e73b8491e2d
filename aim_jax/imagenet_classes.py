"""ImageNet-1k class names and WordNet ids, read from files that tensorflow-datasets ships.

Class index i is the i-th WordNet id in sorted order, the label order of the tfds
`imagenet2012` dataset and of torchvision's `ImageFolder` on the ImageNet training set, so
index 0 is n01440764 "tench, Tinca tinca".

The files are located without importing tensorflow_datasets, and the names are parsed from
Python source with `ast.literal_eval`, so nothing from the package runs:

* `datasets/imagenet2012/labels.txt`: the 1000 WordNet ids, one per line;
* `datasets/siscore/labels.py`: `IMAGENET_LABELS_LIST`, the 1000 human-readable names in the
  same order.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

NUM_CLASSES = 1000

_WORDNET_IDS_FILE = ("datasets", "imagenet2012", "labels.txt")
_NAMES_FILE = ("datasets", "siscore", "labels.py")
_NAMES_VARIABLE = "IMAGENET_LABELS_LIST"


class ClassNamesNotFoundError(FileNotFoundError):
    """The tensorflow-datasets files with the ImageNet-1k labels are missing or malformed."""


def _tfds_file(parts: tuple[str, ...]) -> Path:
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise ClassNamesNotFoundError(
            "tensorflow-datasets is not installed. Install it (pip install tensorflow-datasets) "
            "to print ImageNet class names."
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise ClassNamesNotFoundError(
            f"{path} not found: this tensorflow-datasets version does not ship the ImageNet-1k "
            "labels at that path."
        )
    return path


def _check_count(values: tuple[str, ...], path: Path) -> tuple[str, ...]:
    if len(values) != NUM_CLASSES or len(set(values)) != NUM_CLASSES:
        raise ClassNamesNotFoundError(
            f"{path} gives {len(values)} labels ({len(set(values))} distinct); expected "
            f"{NUM_CLASSES} distinct ImageNet-1k labels."
        )
    return values


@functools.cache
def wordnet_ids() -> tuple[str, ...]:
    """Return the 1000 ImageNet-1k WordNet ids in class-index order, such as "n01440764"."""
    path = _tfds_file(_WORDNET_IDS_FILE)
    ids = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return _check_count(ids, path)


@functools.cache
def class_names() -> tuple[str, ...]:
    """Return the 1000 ImageNet-1k class names in class-index order, such as "goldfish, ..."."""
    path = _tfds_file(_NAMES_FILE)
    module = ast.parse(path.read_text(), filename=str(path))
    for node in module.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == _NAMES_VARIABLE
        ):
            return _check_count(tuple(ast.literal_eval(node.value)), path)
    raise ClassNamesNotFoundError(f"{path} does not define {_NAMES_VARIABLE}.")
