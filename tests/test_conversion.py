"""Tests of `aim_jax.conversion` and `tools/convert_torch.py` against the golden PyTorch outputs.

The golden folder holds random AIM v1 weights in the released file layouts and the outputs of
the reference PyTorch implementation in eval mode, so converted weights must reproduce them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import aim_jax
from aim_jax import conversion
from aim_jax.models import AIM
from aim_jax.pretrained import restore_variables

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden" / "tiny_a"
TOL = 1e-5  # float32 absolute tolerance against the PyTorch outputs

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden vectors not found at {GOLDEN}")


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "convert_torch", REPO / "tools" / "convert_torch.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_torch = _load_tool()


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "expected.npz")


@pytest.fixture(scope="module")
def images(golden):
    return jnp.asarray(golden["images_nchw"].transpose(0, 2, 3, 1))  # (B, H, W, 3)


@pytest.fixture(scope="module")
def state_dict():
    state = torch.load(GOLDEN / "backbone.pth", map_location="cpu", weights_only=True)
    state.update(torch.load(GOLDEN / "head.pth", map_location="cpu", weights_only=True))
    return state


@pytest.fixture(scope="module")
def golden_config():
    values = conversion.read_config_file(GOLDEN / "config.json")
    return conversion.config_from_fields(values, source="golden config.json")


def _run(argv: list[str]) -> int:
    return convert_torch.main([*argv, "--no-progress"])


def _hf_dir(directory: Path, weights: str = "model.safetensors", config: dict | None = None):
    directory.mkdir(parents=True)
    values = json.loads((GOLDEN / "config.json").read_text()) if config is None else config
    (directory / "config.json").write_text(json.dumps(values))
    if weights == "model.safetensors":
        shutil.copy(GOLDEN / "model.safetensors", directory / weights)
    else:
        state = torch.load(GOLDEN / "backbone.pth", map_location="cpu", weights_only=True)
        state.update(torch.load(GOLDEN / "head.pth", map_location="cpu", weights_only=True))
        torch.save(state, directory / weights)
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Golden weights converted through the command line from each source layout."""
    root = tmp_path_factory.mktemp("converted")
    outputs = {}
    pth_args = ["--backbone", str(GOLDEN / "backbone.pth"), "--head", str(GOLDEN / "head.pth")]
    assert (
        _run([*pth_args, "--config", str(GOLDEN / "config.json"), "--output", str(root / "pth")])
        == 0
    )
    outputs["pth"] = root / "pth"
    for weights in ("model.safetensors", "pytorch_model.bin"):
        hf = _hf_dir(root / f"hf-{weights}", weights)
        assert _run(["--hf-dir", str(hf), "--output", str(root / weights)]) == 0
        outputs[weights] = root / weights
    return outputs


def _max_error(actual, expected) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float32) - expected)))


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("source", ["pth", "model.safetensors", "pytorch_model.bin"])
def test_converted_matches_golden(converted, golden, images, source, scan):
    model, variables = aim_jax.load_pretrained(converted[source], scan=scan)
    out = model.apply(variables, images, collect_blocks=True, method=AIM.features)
    assert _max_error(model.apply(variables, images), golden["logits"]) < TOL
    assert _max_error(out["logits"], golden["logits"]) < TOL
    assert _max_error(out["pooled"], golden["pooled_tokens"]) < TOL
    assert _max_error(out["blocks"][0], golden["first_block_tokens"]) < TOL

    model, variables = aim_jax.load_pretrained(converted[source], scan=scan, stop_after_probe=False)
    out = model.apply(variables, images, collect_blocks=True, method=AIM.features)
    assert _max_error(out["blocks"][-1], golden["last_block_tokens"]) < TOL
    assert _max_error(out["logits"], golden["logits"]) < TOL


def test_converted_config_json(converted):
    values = json.loads((converted["pth"] / "config.json").read_text())
    assert values["probe_layers"] == [1, 2]
    assert values["num_classes"] == 10
    assert values["norm_eps"] == 1e-6
    assert values["embed_dim"] == 64


def test_converted_leaves_equal_source(converted, state_dict):
    variables = restore_variables(converted["pth"])
    params, stats = variables["params"], variables["batch_stats"]["head"]["bn"]
    qkv = params["trunk"]["blocks_0"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv, state_dict["trunk.blocks.0.attn.qkv.weight"].numpy().T)
    conv = params["patch_embed"]["proj"]["kernel"]  # (kh, kw, in, out)
    source = state_dict["preprocessor.patchifier.proj.weight"].numpy()  # (out, in, kh, kw)
    np.testing.assert_array_equal(conv[2, 5, 1, 7], source[7, 1, 2, 5])
    np.testing.assert_array_equal(stats["var"], state_dict["head.bn.running_var"].numpy())
    assert stats["num_batches_tracked"] == state_dict["head.bn.num_batches_tracked"].item()
    assert stats["num_batches_tracked"].dtype == np.int32


def test_probe_layers_flag_overrides_config(tmp_path):
    output = tmp_path / "out"
    argv = ["--backbone", str(GOLDEN / "backbone.pth"), "--head", str(GOLDEN / "head.pth")]
    argv += ["--config", str(GOLDEN / "config.json"), "--probe-layers", "last"]
    assert _run([*argv, "--output", str(output)]) == 0
    assert json.loads((output / "config.json").read_text())["probe_layers"] == [0, 1, 2, 3]


def test_bfloat16_output_close(tmp_path, golden, images, state_dict):
    output = tmp_path / "bf16"
    assert (
        _run(
            [
                "--hf-dir",
                str(_hf_dir(tmp_path / "hf")),
                "--output",
                str(output),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    variables = restore_variables(output)
    qkv = variables["params"]["trunk"]["blocks_1"]["attn"]["qkv"]["kernel"]
    assert qkv.dtype == ml_dtypes.bfloat16
    expected = state_dict["trunk.blocks.1.attn.qkv.weight"].numpy().T.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(qkv, expected)
    stats = variables["batch_stats"]["head"]["bn"]
    assert stats["mean"].dtype == np.float32
    np.testing.assert_array_equal(stats["mean"], state_dict["head.bn.running_mean"].numpy())
    assert stats["num_batches_tracked"].dtype == np.int32

    model, variables = aim_jax.load_pretrained(output)
    logits = model.apply(variables, images)
    # Measured 1.4e-4 on logits whose magnitude is at most 0.028, from rounding the weights
    # to bfloat16 (about 0.5% of the largest logit).
    assert _max_error(logits, golden["logits"]) < 1e-3
    assert _max_error(logits, golden["logits"]) > TOL  # the weights really were rounded


def test_bfloat16_source_converts(tmp_path, golden, images, state_dict):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((GOLDEN / "config.json").read_text())
    bf16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state_dict.items()}
    save_file(bf16, hf / "model.safetensors")
    output = tmp_path / "out"
    assert _run(["--hf-dir", str(hf), "--output", str(output)]) == 0
    variables = restore_variables(output)
    kernel = variables["params"]["trunk"]["blocks_2"]["mlp"]["fc1"]["kernel"]
    assert kernel.dtype == np.float32
    expected = bf16["trunk.blocks.2.mlp.fc1.weight"].float().numpy().T
    np.testing.assert_array_equal(kernel, expected)


def test_sharded_safetensors_with_index(tmp_path, golden, images, state_dict):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text((GOLDEN / "config.json").read_text())
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    weight_map = {}
    for i, (key, value) in enumerate(state_dict.items()):
        name = sorted(shards)[i % 2]
        shards[name][key] = value.contiguous()
        weight_map[key] = name
    for name, tensors in shards.items():
        save_file(tensors, hf / name)
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    output = tmp_path / "out"
    assert _run(["--hf-dir", str(hf), "--output", str(output)]) == 0
    model, variables = aim_jax.load_pretrained(output)
    assert _max_error(model.apply(variables, images), golden["logits"]) < TOL


def test_reopening_sources_keeps_values(tmp_path, golden, images, monkeypatch):
    # Reopen the memory-mapped files before every tensor.
    monkeypatch.setattr(conversion, "REOPEN_BYTES", 0)
    for name, sources in {
        "pth": [GOLDEN / "backbone.pth", GOLDEN / "head.pth"],
        "safetensors": [GOLDEN / "model.safetensors"],
    }.items():
        config = conversion.config_from_fields(
            json.loads((GOLDEN / "config.json").read_text()), source="golden"
        )
        output = conversion.convert_checkpoint(sources, tmp_path / name, config, concurrent_bytes=1)
        model, variables = aim_jax.load_pretrained(output)
        assert _max_error(model.apply(variables, images), golden["logits"]) < TOL


def test_legacy_pth_format_converts(tmp_path, golden, images, state_dict):
    backbone = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    path = tmp_path / "legacy.pth"
    torch.save(backbone, path, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    output = tmp_path / "out"
    argv = ["--backbone", str(path), "--head", str(GOLDEN / "head.pth")]
    assert _run([*argv, "--config", str(GOLDEN / "config.json"), "--output", str(output)]) == 0
    model, variables = aim_jax.load_pretrained(output)
    assert _max_error(model.apply(variables, images), golden["logits"]) < TOL


def test_num_classes_inferred_from_head(tmp_path, images, golden):
    values = json.loads((GOLDEN / "config.json").read_text())
    del values["num_classes"]
    output = tmp_path / "out"
    assert (
        _run(["--hf-dir", str(_hf_dir(tmp_path / "hf", config=values)), "--output", str(output)])
        == 0
    )
    assert json.loads((output / "config.json").read_text())["num_classes"] == 10


def test_backbone_only_features(tmp_path, golden, images):
    output = tmp_path / "backbone"
    argv = ["--backbone", str(GOLDEN / "backbone.pth"), "--config", str(GOLDEN / "config.json")]
    assert _run([*argv, "--output", str(output)]) == 0
    variables = restore_variables(output)
    assert set(variables) == {"params"}
    assert set(variables["params"]) == {"patch_embed", "trunk"}

    config = aim_jax.pretrained.read_config(output)
    model = AIM(config, stop_after_probe=False)

    def trunk_features(module, x):
        return module.trunk(
            module.patch_embed(x), None, probe_layers=config.probe_layers, collect_blocks=True
        )

    out = model.apply(variables, images, method=trunk_features)
    assert _max_error(out.pooled, golden["pooled_tokens"]) < TOL
    assert _max_error(out.blocks[-1], golden["last_block_tokens"]) < TOL


def test_transposed_proj_caught_only_by_value(golden_config, state_dict, images, golden):
    table = conversion.key_table(golden_config)
    wrong = [
        row if row.source != "trunk.blocks.0.attn.proj.weight" else
        conversion.KeyMapping(row.source, row.target, row.source_shape)  # no transpose
        for row in table
    ]  # fmt: skip
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    conversion.check_source_keys(wrong, shapes)  # every shape check passes
    variables = conversion.convert_tensors(wrong, state_dict, lambda k: state_dict[k].numpy())
    conversion.check_target_shapes(variables, golden_config, head=True)
    logits = AIM(golden_config).apply(variables, images)
    assert _max_error(logits, golden["logits"]) > 10 * TOL  # the parity tests would fail

    right = conversion.convert_tensors(table, state_dict, lambda k: state_dict[k].numpy())
    assert _max_error(AIM(golden_config).apply(right, images), golden["logits"]) < TOL


# ----------------------------------------------------------------------------------------
# Invalid inputs: one-line errors naming the key or file, and nothing left behind.


def _modified_backbone(tmp_path: Path, change) -> Path:
    state = torch.load(GOLDEN / "backbone.pth", map_location="cpu", weights_only=True)
    change(state)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    return path


def _truncated(tmp_path: Path, source: Path, name: str) -> Path:
    path = tmp_path / name
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_pth_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Backbone files that must be rejected, each with a string its error must contain."""

    def remove(state):
        del state["trunk.blocks.3.norm_2.bias"]

    def add(state):
        state["trunk.extra.weight"] = torch.zeros(3)

    def reshape(state):
        state["trunk.blocks.0.attn.proj.weight"] = torch.zeros(64, 32)

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listing)
    nested = tmp_path / "nested.pth"
    torch.save({"model": torch.load(GOLDEN / "backbone.pth", weights_only=True)}, nested)
    cases = {
        "missing": (_modified_backbone(tmp_path / "m", remove), "trunk.blocks.3.norm_2.bias"),
        "unexpected": (_modified_backbone(tmp_path / "u", add), "trunk.extra.weight"),
        "misshaped": (
            _modified_backbone(tmp_path / "s", reshape),
            "trunk.blocks.0.attn.proj.weight",
        ),
        "truncated": (_truncated(tmp_path, GOLDEN / "backbone.pth", "cut.pth"), "cut.pth"),
        "text": (text, "notes.pth"),
        "list": (listing, "list.pth"),
        "nested": (nested, "nested.pth"),
        "absent": (tmp_path / "absent.pth", "absent.pth"),
    }
    return cases


BAD_PTH = ["missing", "unexpected", "misshaped", "truncated", "text", "list", "nested", "absent"]


def _assert_nothing_written(parent: Path, output: Path) -> None:
    assert not output.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert leftovers == []


@pytest.mark.parametrize("case", BAD_PTH)
def test_invalid_pth_rejected(tmp_path, capsys, case):
    for sub in "mus":
        (tmp_path / sub).mkdir()
    path, needle = _bad_pth_cases(tmp_path)[case]
    output = tmp_path / "out"
    argv = ["--backbone", str(path), "--head", str(GOLDEN / "head.pth")]
    code = _run([*argv, "--config", str(GOLDEN / "config.json"), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert needle in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    _assert_nothing_written(tmp_path, output)


@pytest.mark.parametrize("case", ["truncated", "text", "no_weights"])
def test_invalid_hf_dir_rejected(tmp_path, capsys, case):
    hf = _hf_dir(tmp_path / "hf")
    weights = hf / "model.safetensors"
    needle = "model.safetensors"
    if case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "text":
        weights.write_text("not a checkpoint")
    else:
        weights.unlink()
    output = tmp_path / "out"
    code = _run(["--hf-dir", str(hf), "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert needle in err
    assert len(err.splitlines()) == 1
    _assert_nothing_written(tmp_path, output)


def test_failure_during_save_leaves_nothing(tmp_path, monkeypatch, golden_config):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(conversion, "save_variables", fail)
    output = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        conversion.convert_checkpoint([GOLDEN / "model.safetensors"], output, golden_config)
    _assert_nothing_written(tmp_path, output)


def test_command_line_error_exit_status(tmp_path):
    path = _truncated(tmp_path, GOLDEN / "backbone.pth", "cut.pth")
    argv = [sys.executable, str(REPO / "tools" / "convert_torch.py"), "--backbone", str(path)]
    argv += ["--config", str(GOLDEN / "config.json"), "--output", str(tmp_path / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "cut.pth" in result.stderr
    assert "Traceback" not in result.stderr
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path, capsys, images, golden):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("old")
    argv = ["--hf-dir", str(_hf_dir(tmp_path / "hf")), "--output", str(output)]
    assert _run(argv) == 1
    err = capsys.readouterr().err
    assert "already exists" in err
    assert "--overwrite" in err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "old"

    assert _run([*argv, "--overwrite"]) == 0
    assert not (output / "keep.txt").exists()
    model, variables = aim_jax.load_pretrained(output)
    assert _max_error(model.apply(variables, images), golden["logits"]) < TOL
    _assert_nothing_written(tmp_path, tmp_path / "absent")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------------------
# Hugging Face config fields.


def test_config_int_probe_layers_means_last_blocks():
    values = {"img_size": 224, "patch_size": 14, "embed_dim": 64, "num_blocks": 8, "num_heads": 4}
    config = conversion.config_from_fields({**values, "probe_layers": 3}, source="test")
    assert config.probe_layers == (5, 6, 7)
    assert config.name == "custom"
    assert config.norm_eps == 1e-6
    assert conversion.config_from_fields(values, source="test").probe_layers == (2, 3, 4, 5, 6, 7)


def test_config_matches_registry_name():
    values = {"img_size": 224, "patch_size": 14, "embed_dim": 1536, "num_blocks": 24}
    config = conversion.config_from_fields({**values, "num_heads": 12}, source="test")
    assert config.name == "aim-600M"
    assert config.best_probe_layers == tuple(range(14, 20))
    assert config.probe_layers == tuple(range(18, 24))


def test_config_missing_field_named():
    with pytest.raises(conversion.ConversionError, match="num_heads"):
        conversion.config_from_fields(
            {"img_size": 224, "patch_size": 14, "embed_dim": 64, "num_blocks": 8}, source="x.json"
        )
