"""Conversion of released AIM v1 PyTorch checkpoints into this package's checkpoint format.

Conversion is a table, not a chain of string replacements: `key_table` lists, for one
architecture, every source key with its target path and the transform that maps the
PyTorch layout onto the Flax one. `convert_tensors` fills every target leaf exactly once
and rejects missing, unexpected and mis-shaped keys by name.

`convert_checkpoint` streams a conversion to disk: it reads one tensor at a time from
memory-mapped `.pth` or safetensors files, writes each converted leaf to a memory-mapped
scratch file, and saves the Orbax checkpoint from those files a bounded number of bytes at a
time, so a checkpoint larger than RAM converts. `convert_released` (the split `.pth` files)
and `convert_hf_dir` (the Hugging Face layout) resolve the architecture and call it.
`tools/convert_torch.py` is the command-line entry point.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path as FilePath
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from aim_jax import pretrained
from aim_jax.registry import MODELS, ModelConfig

Path = tuple[str, ...]

# Dtypes that `--dtype` accepts for the converted floating-point parameters.
FLOAT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Source bytes read from one memory-mapped file before it is closed and reopened. The pages a
# mapping has touched count towards the process's resident set until it is unmapped.
REOPEN_BYTES = 512 * 2**20

# Bytes the Orbax writer reads from the scratch files at the same time.
SAVE_CONCURRENT_BYTES = 2**30


class ConversionError(ValueError):
    """A source checkpoint is unreadable or does not match the expected architecture."""


# ----------------------------------------------------------------------------------------
# The key table.


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _linear(x: np.ndarray) -> np.ndarray:
    # PyTorch stores linear weights as (out, in); Flax kernels are (in, out).
    return x.T


def _conv(x: np.ndarray) -> np.ndarray:
    # PyTorch conv weights are (out, in, kh, kw); Flax conv kernels are (kh, kw, in, out).
    return x.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One row of the key table.

    Attributes:
        source: PyTorch state-dict key.
        target: path in the Flax variables, starting with the collection.
        source_shape: shape the source tensor must have.
        transform: maps the source array onto the Flax layout.
        dtype: target dtype override (None keeps the float dtype chosen by the caller).
    """

    source: str
    target: Path
    source_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = _identity
    dtype: Any = None

    @property
    def target_shape(self) -> tuple[int, ...]:
        # A zero-stride view has the source shape without allocating it.
        dummy = np.lib.stride_tricks.as_strided(
            np.zeros((), np.int8), self.source_shape, [0] * len(self.source_shape)
        )
        return tuple(self.transform(dummy).shape)


def backbone_table(config: ModelConfig) -> list[KeyMapping]:
    """Key table of a backbone checkpoint (`preprocessor.*` and `trunk.*` keys)."""
    d, p, hidden = config.embed_dim, config.patch_size, config.mlp_ratio * config.embed_dim
    src, embed = "preprocessor.patchifier", ("params", "patch_embed")
    rows = [
        KeyMapping(f"{src}.proj.weight", (*embed, "proj", "kernel"), (d, 3, p, p), _conv),
        KeyMapping(f"{src}.proj.bias", (*embed, "proj", "bias"), (d,)),
        KeyMapping(f"{src}.norm.weight", (*embed, "norm", "scale"), (d,)),
        KeyMapping(f"{src}.norm.bias", (*embed, "norm", "bias"), (d,)),
    ]
    # (source key suffix, target path suffix, source shape, transform) of every block.
    block = [
        ("attn.qkv.weight", ("attn", "qkv", "kernel"), (3 * d, d), _linear),
        ("attn.proj.weight", ("attn", "proj", "kernel"), (d, d), _linear),
        ("norm_1.weight", ("norm_1", "scale"), (d,), _identity),
        ("norm_1.bias", ("norm_1", "bias"), (d,), _identity),
        ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), (hidden, d), _linear),
        ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), (d, hidden), _linear),
        ("norm_2.weight", ("norm_2", "scale"), (d,), _identity),
        ("norm_2.bias", ("norm_2", "bias"), (d,), _identity),
    ]
    for i in range(config.num_blocks):
        rows += [
            KeyMapping(
                f"trunk.blocks.{i}.{key}", ("params", "trunk", f"blocks_{i}", *path), shape, fn
            )
            for key, path, shape, fn in block
        ]
    norm = ("params", "trunk", "post_trunk_norm")
    rows += [
        KeyMapping("trunk.post_trunk_norm.weight", (*norm, "scale"), (d,)),
        KeyMapping("trunk.post_trunk_norm.bias", (*norm, "bias"), (d,)),
    ]
    return rows


def head_table(config: ModelConfig) -> list[KeyMapping]:
    """Key table of an attention-probe head checkpoint (`head.*` keys)."""
    d, classes = config.embed_dim, config.num_classes
    head, bn = ("params", "head"), ("batch_stats", "head", "bn")
    return [
        KeyMapping("head.cls_token", (*head, "cls_token"), (1, 1, d)),
        KeyMapping("head.k.weight", (*head, "k", "kernel"), (d, d), _linear),
        KeyMapping("head.v.weight", (*head, "v", "kernel"), (d, d), _linear),
        KeyMapping("head.linear.weight", (*head, "linear", "kernel"), (classes, d), _linear),
        # Running statistics stay float32 whatever the parameter dtype, because the probe's
        # BatchNorm computes in float32.
        KeyMapping("head.bn.running_mean", (*bn, "mean"), (d,), dtype=np.float32),
        KeyMapping("head.bn.running_var", (*bn, "var"), (d,), dtype=np.float32),
        KeyMapping("head.bn.num_batches_tracked", (*bn, "num_batches_tracked"), (), dtype=np.int32),
    ]


def key_table(config: ModelConfig, *, backbone: bool = True, head: bool = True) -> list[KeyMapping]:
    """Key table of a whole model, or of its backbone or head alone."""
    rows = []
    if backbone:
        rows += backbone_table(config)
    if head:
        rows += head_table(config)
    return rows


def set_path(tree: dict[str, Any], path: Path, value: Any) -> None:
    """Store `value` at `path` in a nested dict, creating the intermediate dicts."""
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def check_source_keys(table: Iterable[KeyMapping], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check that the source keys and shapes match the table one to one.

    Args:
        table: the key table.
        shapes: shape of every tensor present in the source files, by key.

    Raises:
        ConversionError: naming every missing, unexpected and mis-shaped key.
    """
    expected = {row.source: row.source_shape for row in table}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = [
        f"{key} {tuple(shapes[key])} (expected {expected[key]})"
        for key in expected
        if key in shapes and tuple(shapes[key]) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped keys [{', '.join(misshaped)}]")
    if problems:
        raise ConversionError(
            "The source checkpoint does not match the architecture: " + "; ".join(problems) + "."
        )


def convert_tensors(
    table: Iterable[KeyMapping],
    source_keys: Iterable[str],
    load: Callable[[str], np.ndarray],
    *,
    float_dtype: Any = np.float32,
    on_leaf: Callable[[KeyMapping, np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """Convert source tensors into a nested Flax variables dict, one tensor at a time.

    Args:
        table: the key table.
        source_keys: every key present in the source files.
        load: returns the source tensor of a key as a numpy array; called once per key.
        float_dtype: dtype of converted floating-point leaves.
        on_leaf: optional hook that receives each converted leaf and returns what to store
            (for example a memory-mapped copy), so that at most one tensor is in memory. The
            leaf it receives may be a non-contiguous view of the loaded tensor; the hook must
            copy it before returning.

    Returns:
        Nested dict {"params": ..., "batch_stats": ...}.

    Raises:
        ConversionError: naming every missing, unexpected or mis-shaped key.
    """
    table = list(table)
    expected = {row.source for row in table}
    present = list(source_keys)
    duplicates = sorted(key for key, count in collections.Counter(present).items() if count > 1)
    if duplicates:
        raise ConversionError(f"Keys {duplicates} appear more than once in the source files.")
    missing = sorted(expected - set(present))
    unexpected = sorted(set(present) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise ConversionError(
            "The source checkpoint does not match the architecture: " + "; ".join(problems) + "."
        )
    out: dict[str, Any] = {}
    for row in table:
        array = load(row.source)
        if tuple(array.shape) != row.source_shape:
            raise ConversionError(
                f"Key {row.source!r} has shape {tuple(array.shape)}, expected {row.source_shape}."
            )
        dtype = row.dtype if row.dtype is not None else float_dtype
        value = row.transform(np.asarray(array)).astype(dtype, copy=False)
        if on_leaf is not None:
            set_path(out, row.target, on_leaf(row, value))
        else:
            set_path(out, row.target, np.asarray(value, order="C"))  # keeps 0-d leaves 0-d
        del array, value  # drops the last reference to the memory-mapped source tensor
    return out


# ----------------------------------------------------------------------------------------
# Architecture from the registry or from a Hugging Face style config.json.

# Fields of the released Hugging Face `config.json` that describe the architecture.
CONFIG_FIELDS = ("img_size", "patch_size", "embed_dim", "num_blocks", "num_heads")


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Hugging Face style `config.json`.

    Raises:
        ConversionError: when the file is missing or not a JSON object.
    """
    path = FilePath(path)
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConversionError(f"Config file {path} not found.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"Config file {path} is not valid JSON: {err}.") from err
    if not isinstance(values, dict):
        raise ConversionError(
            f"Config file {path} contains a {type(values).__name__}, not a JSON object."
        )
    return values


def _registry_match(fields: Mapping[str, Any]) -> ModelConfig | None:
    for config in MODELS.values():
        same = (
            config.embed_dim == fields["embed_dim"]
            and config.num_blocks == fields["num_blocks"]
            and config.num_heads == fields["num_heads"]
            and config.patch_size == fields["patch_size"]
            and config.norm_eps == 1e-6
        )
        if same:
            return config
    return None


def config_from_fields(
    values: Mapping[str, Any], *, source: str, num_classes: int | None = None
) -> ModelConfig:
    """Build a `ModelConfig` from the fields of a Hugging Face style `config.json`.

    Args:
        values: `img_size`, `patch_size`, `embed_dim`, `num_blocks`, `num_heads`, optional
            `probe_layers` (a list of 0-based block indices, or an int n meaning the last n
            blocks; the last six when absent), optional `num_classes` and `mlp_ratio`.
            Other fields are ignored.
        source: where the values come from, for error messages.
        num_classes: classes of the head, used when `values` has no `num_classes`.

    Returns:
        The configuration, with LayerNorm epsilon 1e-6 as in the released models. Its name
        is the registry name when the architecture matches a registry entry, else "custom".

    Raises:
        ConversionError: when a field is missing or invalid.
    """
    missing = [field for field in CONFIG_FIELDS if field not in values]
    if missing:
        raise ConversionError(f"{source} is missing the fields {missing}.")
    channels = values.get("num_channels", 3)
    if channels != 3:
        raise ConversionError(f"{source} has num_channels={channels}; AIM takes RGB input (3).")
    fields = {field: values[field] for field in CONFIG_FIELDS}
    blocks = fields["num_blocks"]
    probe = values.get("probe_layers", 6)
    if isinstance(probe, int) and not isinstance(probe, bool):
        if not 0 < probe <= blocks:
            raise ConversionError(
                f"{source} has probe_layers={probe}; an int must be in 1..{blocks} (last n blocks)."
            )
        probe = list(range(blocks - probe, blocks))
    classes = values.get("num_classes", num_classes)
    registered = _registry_match(fields)
    try:
        return ModelConfig(
            name=registered.name if registered else "custom",
            embed_dim=fields["embed_dim"],
            num_blocks=blocks,
            num_heads=fields["num_heads"],
            patch_size=fields["patch_size"],
            img_size=fields["img_size"],
            mlp_ratio=values.get("mlp_ratio", 4),
            norm_eps=1e-6,
            probe_layers=probe,
            num_classes=1000 if classes is None else int(classes),
            best_probe_layers=registered.best_probe_layers if registered else None,
        )
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{source} describes an invalid architecture: {err}") from err


# ----------------------------------------------------------------------------------------
# Reading source files one tensor at a time.


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _SourceFile:
    """A checkpoint file read one tensor at a time.

    The file is memory-mapped, and reopened after every `REOPEN_BYTES` bytes read so that the
    pages it has touched leave the resident set.
    """

    def __init__(self, path: FilePath):
        self.path = path
        self._bytes_since_open = 0
        self._reopen = True  # False when the file is in memory rather than memory-mapped
        self._open()
        self.shapes = self._shapes()

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _tensor(self, key: str) -> Any:
        raise NotImplementedError

    def load(self, key: str) -> np.ndarray:
        """Return the tensor `key` as a numpy array (bfloat16 as `ml_dtypes.bfloat16`)."""
        if self._reopen and self._bytes_since_open > REOPEN_BYTES:
            self._close()
            self._open()
            self._bytes_since_open = 0
        try:
            array = _torch_to_numpy(self._tensor(key))
        except ConversionError:
            raise
        except Exception as err:  # safetensors and torch raise several types on bad data
            raise ConversionError(
                f"Failed to read {key!r} from {self.path}: {_first_line(err)}"
            ) from err
        self._bytes_since_open += array.nbytes
        return array

    def close(self) -> None:
        self._close()


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        # numpy has no bfloat16; reinterpret the bits as ml_dtypes.bfloat16 without a copy.
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _TorchFile(_SourceFile):
    """A `.pth` or `pytorch_model.bin` state dict, read with `torch.load(mmap=True)`."""

    def _open(self) -> None:
        import torch

        try:
            state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap can only be used" not in str(err):
                raise ConversionError(
                    f"{self.path} is not a readable PyTorch checkpoint: {_first_line(err)}"
                ) from err
            # A file in the legacy (pre-zip) format cannot be memory-mapped.
            logging.warning("%s is in the legacy format; loading it whole into memory.", self.path)
            state = self._load_whole()
            self._reopen = False
        except Exception as err:  # torch raises several types for corrupt files
            raise ConversionError(
                f"{self.path} is not a readable PyTorch checkpoint: {_first_line(err)}"
            ) from err
        self._state = self._check_state_dict(state)

    def _load_whole(self) -> Any:
        import torch

        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt files
            raise ConversionError(
                f"{self.path} is not a readable PyTorch checkpoint: {_first_line(err)}"
            ) from err

    def _check_state_dict(self, state: Any) -> dict[str, Any]:
        import torch

        if not isinstance(state, Mapping):
            raise ConversionError(
                f"{self.path} contains a {type(state).__name__}, not a state dict (a mapping of "
                "parameter names to tensors)."
            )
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                nested = (
                    " (a nested dict: extract the state dict first)"
                    if isinstance(value, Mapping)
                    else ""
                )
                raise ConversionError(
                    f"{self.path} is not a state dict: entry {key!r} is a "
                    f"{type(value).__name__}, not a tensor{nested}."
                )
        return dict(state)

    def _close(self) -> None:
        self._state = None  # unmaps the file once the last tensor view is gone

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(value.shape) for key, value in self._state.items()}

    def _tensor(self, key: str) -> Any:
        return self._state[key]


class _SafetensorsFile(_SourceFile):
    """A `.safetensors` file, read with `safetensors.safe_open`."""

    def _open(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            # The "pt" framework reads bfloat16, which the "numpy" framework rejects.
            self._handle = safe_open(str(self.path), framework="pt")
        except (OSError, SafetensorError) as err:
            raise ConversionError(
                f"{self.path} is not a readable safetensors file: {_first_line(err)}"
            ) from err

    def _close(self) -> None:
        self._handle = None

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(self._handle.get_slice(key).get_shape()) for key in self._handle.keys()}

    def _tensor(self, key: str) -> Any:
        return self._handle.get_tensor(key)


def open_source(path: str | os.PathLike) -> _SourceFile:
    """Open a `.safetensors` file or a PyTorch state dict (`.pth`, `.bin`, `.pt`).

    Raises:
        ConversionError: when the file is missing, unreadable or not a state dict.
    """
    path = FilePath(path)
    if not path.is_file():
        raise ConversionError(f"Checkpoint file {path} not found.")
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    return _TorchFile(path)


class SourceFiles:
    """Several checkpoint files read as one state dict, for example a backbone and a head.

    Attributes:
        shapes: shape of every tensor, by key.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        self._files: list[_SourceFile] = []
        self._owner: dict[str, _SourceFile] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        try:
            for path in paths:
                source = open_source(path)
                self._files.append(source)
                for key, shape in source.shapes.items():
                    if key in self._owner:
                        raise ConversionError(
                            f"Key {key!r} appears in both {self._owner[key].path} and "
                            f"{source.path}."
                        )
                    self._owner[key] = source
                    self.shapes[key] = shape
        except BaseException:
            self.close()
            raise

    def load(self, key: str) -> np.ndarray:
        """Return the tensor `key` as a numpy array."""
        return self._owner[key].load(key)

    def close(self) -> None:
        for source in self._files:
            source.close()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------
# Writing: memory-mapped scratch leaves, then an Orbax checkpoint saved from them.


class _ScratchWriter:
    """Leaf hook that copies each converted leaf to a raw file and returns a read-only map.

    Raw files are used rather than `.npy`, because `np.load` reads a bfloat16 `.npy` back as
    the opaque dtype "V2".
    """

    def __init__(self, directory: FilePath):
        self.directory = directory
        self.count = 0

    def __call__(self, row: KeyMapping, value: np.ndarray) -> np.ndarray:
        if value.ndim == 0:
            return np.array(value)  # a scalar counter; not worth a file
        path = self.directory / f"{self.count:05d}.bin"
        self.count += 1
        out = np.memmap(path, dtype=value.dtype, mode="w+", shape=value.shape)
        out[...] = value
        out.flush()
        del out  # unmaps the written pages, so they leave the resident set
        return np.memmap(path, dtype=value.dtype, mode="r", shape=value.shape)


class _MemmapHandler(ocp.type_handlers.NumpyHandler):
    """Orbax handler for memory-mapped leaves that bounds the bytes in flight.

    Orbax 0.12's `NumpyHandler` deep-copies every numpy leaf into memory before writing and
    ignores `save_concurrent_gb`. This handler writes the maps in place, at most
    `concurrent_bytes` at a time, and drops each map's pages from the resident set once
    written. It keeps the typestr "np.ndarray", so the stock handler restores the leaves.
    """

    def __init__(self, concurrent_bytes: int):
        super().__init__(deepcopy_host_arrays=False)
        self._concurrent_bytes = concurrent_bytes
        self._in_flight = 0
        self._condition: asyncio.Condition | None = None

    # NOTE: overrides a private method of orbax-checkpoint 0.12.8; check it on upgrades.
    async def _open_and_write(self, value: np.ndarray, tspec: dict[str, Any], ts_context: Any):
        if self._condition is None:
            self._condition = asyncio.Condition()
        nbytes = min(value.nbytes, self._concurrent_bytes)
        async with self._condition:
            await self._condition.wait_for(
                lambda: self._in_flight + nbytes <= self._concurrent_bytes
            )
            self._in_flight += nbytes
        try:
            await super()._open_and_write(value, tspec, ts_context)
        finally:
            if isinstance(value, np.memmap) and value._mmap is not None:
                value._mmap.madvise(mmap.MADV_DONTNEED)
            async with self._condition:
                self._in_flight -= nbytes
                self._condition.notify_all()


def save_variables(
    directory: FilePath, variables: dict[str, Any], concurrent_bytes: int = SAVE_CONCURRENT_BYTES
) -> None:
    """Save variables whose leaves are memory-mapped numpy arrays as an Orbax checkpoint.

    The result restores like one written by `aim_jax.pretrained.write_checkpoint`.

    Args:
        directory: the Orbax checkpoint directory to create.
        variables: nested dict of `np.memmap` (and small `np.ndarray`) leaves.
        concurrent_bytes: bytes read from the maps at the same time.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.memmap, _MemmapHandler(concurrent_bytes)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=max(1, math.ceil(concurrent_bytes / 2**30)),
        type_handler_registry=registry,
        # With OCDBT, tensorstore 0.1.86 kept about half the checkpoint's bytes in anonymous
        # memory until the save finished (measured 1.5 GB for aim-600M). One zarr array per
        # leaf keeps the writer's memory flat, and Orbax restores both formats.
        use_ocdbt=False,
    )
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(variables))


# ----------------------------------------------------------------------------------------
# Whole conversions.


def _flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def expected_variable_shapes(config: ModelConfig, *, head: bool = True) -> dict[Path, tuple]:
    """Shapes of every variable of `AIM(config)` with all blocks, without allocating them.

    Args:
        config: the architecture.
        head: include the attention-probe head's params and batch stats.

    Returns:
        {path: shape}, the path starting with the collection name.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    from aim_jax.models import AIM

    model = AIM(config, stop_after_probe=False)
    height, width = config.img_size
    images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
    shapes = {path: tuple(leaf.shape) for path, leaf in _flatten(abstract).items()}
    if not head:
        shapes = {path: shape for path, shape in shapes.items() if "head" not in path[:2]}
    return shapes


def check_target_shapes(variables: Mapping[str, Any], config: ModelConfig, *, head: bool) -> None:
    """Check that converted variables have exactly the leaves and shapes of `AIM(config)`.

    Raises:
        ConversionError: naming every missing, unexpected or mis-shaped leaf.
    """
    expected = expected_variable_shapes(config, head=head)
    actual = {path: tuple(leaf.shape) for path, leaf in _flatten(variables).items()}
    problems = [f"{'/'.join(path)} missing" for path in expected if path not in actual]
    problems += [f"{'/'.join(path)} unexpected" for path in actual if path not in expected]
    problems += [
        f"{'/'.join(path)} has shape {actual[path]}, expected {shape}"
        for path, shape in expected.items()
        if path in actual and actual[path] != shape
    ]
    if problems:
        # Only a key table that disagrees with the model reaches this error.
        raise ConversionError("Converted variables do not match the model: " + "; ".join(problems))


def convert_checkpoint(
    sources: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    config: ModelConfig,
    *,
    head: bool = True,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = False,
    concurrent_bytes: int = SAVE_CONCURRENT_BYTES,
) -> FilePath:
    """Convert PyTorch checkpoint files into a checkpoint directory that `load_pretrained` reads.

    Tensors are read, converted and written one at a time through memory-mapped scratch
    files in a temporary directory beside `output`, so peak memory stays well below the
    checkpoint size. On any failure nothing is left at `output` or beside it.

    Args:
        sources: `.pth`, `.bin` or `.safetensors` files that together hold exactly the keys of
            the table.
        output: checkpoint directory to create.
        config: the architecture, probe blocks and classes included.
        head: convert the attention-probe head too; without it the output has only the
            patch embedding and trunk.
        dtype: "float32" or "bfloat16", the dtype of the converted float parameters; BatchNorm
            statistics stay float32 and `num_batches_tracked` int32.
        overwrite: replace an existing `output`.
        progress: show a progress bar of converted tensors.
        concurrent_bytes: bytes the Orbax writer reads from the scratch files at a time.

    Returns:
        The absolute output directory.

    Raises:
        ConversionError: a source file is unreadable or does not match the table; the message
            names the file or key.
        FileExistsError: `output` exists and `overwrite` is False.
    """
    if dtype not in FLOAT_DTYPES:
        raise ConversionError(
            f"dtype={dtype!r} is invalid; expected one of {sorted(FLOAT_DTYPES)}."
        )
    output = FilePath(output).absolute()
    if output.exists() and not overwrite:
        raise FileExistsError(
            f"Output directory {output} already exists; pass --overwrite to replace it."
        )
    table = key_table(config, head=head)
    with SourceFiles(sources) as files:
        check_source_keys(table, files.shapes)
        output.parent.mkdir(parents=True, exist_ok=True)
        scratch = FilePath(tempfile.mkdtemp(prefix=f".{output.name}.scratch-", dir=output.parent))
        try:
            variables = _convert_to_scratch(table, files, scratch, FLOAT_DTYPES[dtype], progress)
            files.close()
            check_target_shapes(variables, config, head=head)
            _write_output(output, config, variables, overwrite, concurrent_bytes)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    logging.info("Converted %d tensors into %s", len(table), output)
    return output


def _convert_to_scratch(
    table: list[KeyMapping],
    files: SourceFiles,
    scratch: FilePath,
    float_dtype: np.dtype,
    progress: bool,
) -> dict[str, Any]:
    from tqdm import tqdm

    writer = _ScratchWriter(scratch)
    with tqdm(total=len(table), unit="tensor", desc="convert", disable=not progress) as bar:

        def on_leaf(row: KeyMapping, value: np.ndarray) -> np.ndarray:
            out = writer(row, value)
            bar.update(1)
            return out

        return convert_tensors(
            table, files.shapes, files.load, float_dtype=float_dtype, on_leaf=on_leaf
        )


def _write_output(
    output: FilePath,
    config: ModelConfig,
    variables: dict[str, Any],
    overwrite: bool,
    concurrent_bytes: int,
) -> None:
    # Same layout and atomic rename as `pretrained.write_checkpoint`, with the streaming saver.
    tmp = pretrained.prepare_output(output, overwrite)
    try:
        (tmp / pretrained.CONFIG_FILE).write_text(config.to_json())
        save_variables(tmp / pretrained.VARIABLES_DIR, variables, concurrent_bytes)
        pretrained.commit_output(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _num_classes(shapes: Mapping[str, tuple[int, ...]], source: str) -> int | None:
    shape = shapes.get("head.linear.weight")
    if shape is None:
        return None
    if len(shape) != 2:
        raise ConversionError(
            f"Key 'head.linear.weight' in {source} has shape {shape}; expected 2-D."
        )
    return int(shape[0])


def convert_released(
    backbone: str | os.PathLike,
    output: str | os.PathLike,
    *,
    head: str | os.PathLike | None = None,
    model: str | None = None,
    config_file: str | os.PathLike | None = None,
    probe_layers: str | Sequence[int] | None = None,
    **kwargs: Any,
) -> FilePath:
    """Convert a released backbone `.pth` and, optionally, a released head `.pth`.

    Args:
        backbone: backbone state dict (`preprocessor.*` and `trunk.*` keys).
        output: checkpoint directory to create.
        head: head state dict (`head.*` keys); None converts the backbone alone.
        model: registry name such as "aim-600M"; give exactly one of `model` and
            `config_file`.
        config_file: Hugging Face style `config.json` for an architecture outside the
            registry (see `config_from_fields`).
        probe_layers: the blocks the head was trained on: "last", "best" (registry models),
            or explicit indices; stored in the output's config.json. None keeps the config
            file's `probe_layers`, or the last six blocks of a registry model.
        **kwargs: `dtype`, `overwrite`, `progress`, `concurrent_bytes` of `convert_checkpoint`.

    Returns:
        The absolute output directory.
    """
    if (model is None) == (config_file is None):
        raise ConversionError("Give exactly one of a registry model name and a config file.")
    num_classes = None
    if head is not None:
        with SourceFiles([head]) as head_file:
            num_classes = _num_classes(head_file.shapes, str(head))
    if model is not None:
        if model not in MODELS:
            raise ConversionError(f"Unknown model {model!r}; known models: {sorted(MODELS)}.")
        config = MODELS[model]
        if num_classes is not None:
            config = config.replace(num_classes=num_classes)
    else:
        values = read_config_file(config_file)
        config = config_from_fields(values, source=str(config_file), num_classes=num_classes)
    if probe_layers is not None:
        try:
            config = config.with_probe_layers(probe_layers)
        except ValueError as err:
            raise ConversionError(str(err)) from err
    sources = [backbone] if head is None else [backbone, head]
    return convert_checkpoint(sources, output, config, head=head is not None, **kwargs)


# Weight files of a Hugging Face model directory, in order of preference.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def hf_weight_files(hf_dir: str | os.PathLike) -> list[FilePath]:
    """List the weight files of a Hugging Face model directory (sharded ones included).

    Raises:
        ConversionError: when the directory has no weights or an invalid index file.
    """
    hf_dir = FilePath(hf_dir)
    for name in HF_WEIGHT_FILES:
        path = hf_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        index = read_config_file(path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"Index file {path} has no 'weight_map' object.")
        return [hf_dir / shard for shard in sorted(set(weight_map.values()))]
    raise ConversionError(f"No weights found in {hf_dir}: expected one of {list(HF_WEIGHT_FILES)}.")


def convert_hf_dir(
    hf_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    probe_layers: str | Sequence[int] | None = None,
    **kwargs: Any,
) -> FilePath:
    """Convert a model directory in the released Hugging Face layout.

    The directory contains `config.json` and the whole state dict (backbone and the "best"
    head) as `model.safetensors` or `pytorch_model.bin`, or shards of either with an index
    file. `num_classes` comes from the config or, when absent, from `head.linear.weight`.

    Args:
        hf_dir: the model directory.
        output: checkpoint directory to create.
        probe_layers: overrides the config's `probe_layers` ("last", "best" or indices).
        **kwargs: `dtype`, `overwrite`, `progress`, `concurrent_bytes` of `convert_checkpoint`.

    Returns:
        The absolute output directory.
    """
    hf_dir = FilePath(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"Hugging Face model directory {hf_dir} not found.")
    config_path = hf_dir / "config.json"
    values = read_config_file(config_path)
    weights = hf_weight_files(hf_dir)
    with SourceFiles(weights) as files:
        num_classes = _num_classes(files.shapes, str(hf_dir))
        has_head = any(key.startswith("head.") for key in files.shapes)
    config = config_from_fields(values, source=str(config_path), num_classes=num_classes)
    if probe_layers is not None:
        try:
            config = config.with_probe_layers(probe_layers)
        except ValueError as err:
            raise ConversionError(str(err)) from err
    return convert_checkpoint(weights, output, config, head=has_head, **kwargs)
