"""Tests for aim_jax.sharding on 8 simulated CPU devices, plus a 2-process CPU run."""

import os

# Must be set before JAX creates its CPU backend; `tests/conftest.py` may already have set it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import logging as std_logging  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from aim_jax import sharding  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def devices():
    if jax.device_count() < 8:
        pytest.skip(
            f"needs 8 devices, found {jax.device_count()}: set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"
        )
    return jax.devices()[:8]


def logical(init, *names):
    return nn.with_logical_partitioning(init, names)


class TinyBlock(nn.Module):
    """Parameters named with every logical axis of the model vocabulary."""

    @nn.compact
    def __call__(self, x):  # x: (B, D) with D = 8
        d = x.shape[-1]
        self.param(
            "patch_kernel", logical(nn.initializers.ones, "patch", "patch", "embed"), (2, 3, d)
        )
        self.param(
            "stacked", logical(nn.initializers.ones, "layers", "embed", "mlp"), (3, d, 4 * d)
        )
        qkv = nn.Dense(3 * d, kernel_init=logical(nn.initializers.lecun_normal(), "embed", "qkv"))(
            x
        )
        h = nn.Dense(4 * d, kernel_init=logical(nn.initializers.lecun_normal(), "embed", "mlp"))(x)
        y = nn.Dense(
            d,
            kernel_init=logical(nn.initializers.lecun_normal(), "mlp", "embed"),
            bias_init=logical(nn.initializers.zeros, "embed"),
        )(h)
        o = nn.Dense(d, kernel_init=logical(nn.initializers.lecun_normal(), "heads", "embed"))(y)
        norm = nn.LayerNorm(
            scale_init=logical(nn.initializers.ones, "norm"),
            bias_init=logical(nn.initializers.zeros, "norm"),
        )
        logits = nn.Dense(16, kernel_init=logical(nn.initializers.lecun_normal(), "embed", "vocab"))
        return logits(norm(o)) + qkv.sum()


def abstract_train_state(width=8):
    model = TinyBlock()
    tx = optax.adamw(1e-3)

    def init():
        params = model.init(jax.random.PRNGKey(0), jnp.ones((4, width)))["params"]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return init, jax.eval_shape(init)


def test_create_mesh_shapes(devices):
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh.axis_names == ("data", "fsdp", "tensor")

    mesh = sharding.create_mesh(ml_collections.ConfigDict({"tensor": 2, "data": -1}), devices)
    assert mesh.axis_names == ("data", "tensor")
    assert dict(mesh.shape) == {"data": 4, "tensor": 2}

    mesh = sharding.create_mesh([("tensor", 2), ("data", 2), ("fsdp", 2)], devices)
    assert mesh.axis_names == ("tensor", "data", "fsdp")
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_create_mesh_rejects_bad_sizes(devices):
    with pytest.raises(ValueError, match=r"has 6 devices but 8 are available"):
        sharding.create_mesh({"data": 3, "fsdp": 2, "tensor": 1}, devices)
    with pytest.raises(
        ValueError, match=r"multiply to 3, which does not divide the device count 8"
    ):
        sharding.create_mesh({"data": -1, "fsdp": 3}, devices)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.create_mesh({"data": -1, "fsdp": -1}, devices)
    with pytest.raises(ValueError, match="Unknown mesh axes"):
        sharding.create_mesh({"data": -1, "model": 1}, devices)
    with pytest.raises(ValueError, match="Invalid mesh size 0"):
        sharding.create_mesh({"data": 0}, devices)


def test_state_shardings_expected_specs(devices):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    _, abstract = abstract_train_state()
    shardings = sharding.state_shardings(abstract, mesh)

    # Dense biases without a logical name are plain arrays and stay replicated: P().
    expected = {
        ("Dense_0", "kernel"): P("fsdp", "tensor"),  # qkv projection
        ("Dense_0", "bias"): P(),
        ("Dense_1", "kernel"): P("fsdp", "tensor"),  # MLP fc1
        ("Dense_2", "kernel"): P("tensor", "fsdp"),  # MLP fc2
        ("Dense_2", "bias"): P("fsdp"),
        ("Dense_3", "kernel"): P("tensor", "fsdp"),  # attention output projection
        ("Dense_4", "kernel"): P("fsdp", "tensor"),  # vocab head
        ("LayerNorm_0", "scale"): P(None),
        ("LayerNorm_0", "bias"): P(None),
        ("patch_kernel",): P(None, None, "fsdp"),
        ("stacked",): P(None, "fsdp", "tensor"),
    }
    params = shardings["params"]
    for path, spec in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.spec == spec, path

    adam_state = shardings["opt_state"][0]
    assert adam_state.count.spec == P()
    assert adam_state.mu["Dense_2"]["kernel"].spec == P("tensor", "fsdp")
    assert adam_state.nu["stacked"].spec == P(None, "fsdp", "tensor")
    assert shardings["step"].spec == P()
    assert all(s.mesh is mesh for s in jax.tree.leaves(shardings))

    # The sharding tree matches the unboxed state, so it works as jit out_shardings.
    init, _ = abstract_train_state()
    state = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    kernel = state["params"]["Dense_2"]["kernel"]  # (32, 8) on ("tensor", "fsdp")
    assert kernel.addressable_shards[0].data.shape == (16, 4)


def test_indivisible_dimension_replicated_and_logged_once(devices, caplog):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices)
    caplog.set_level(std_logging.WARNING)
    # embed = 6 is not divisible by fsdp = 4; mlp = 24 is, but tensor has size 1.
    spec = sharding.logical_to_mesh_spec(("embed", "mlp"), (6, 24), mesh, name="w6")
    assert spec == P(None, "tensor")
    spec = sharding.logical_to_mesh_spec(("embed", "mlp"), (6, 24), mesh, name="w6")
    assert spec == P(None, "tensor")
    messages = [r.getMessage() for r in caplog.records if "Replicating dimension" in r.getMessage()]
    assert len(messages) == 1
    assert "size 6" in messages[0]
    assert "w6" in messages[0]

    # A divisible width keeps its sharding.
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (8, 24), mesh) == P("fsdp", "tensor")

    # Whole state: width 6 gets no fsdp sharding anywhere, and jit accepts the shardings.
    init, abstract = abstract_train_state(width=6)
    shardings = sharding.state_shardings(abstract, mesh)
    assert shardings["params"]["Dense_1"]["kernel"].spec == P(None, "tensor")
    assert shardings["params"]["stacked"].spec == P(None, None, "tensor")
    state = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
    np.testing.assert_allclose(state["params"]["stacked"], np.ones((3, 6, 24)))


def test_repeated_logical_names(devices):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4}, devices)
    rules = (("patch", None), ("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "data"))
    spec = sharding.logical_to_mesh_spec(
        ("patch", "patch", "patch", "embed"), (2, 2, 3, 8), mesh, rules
    )
    assert spec == P(None, None, None, "fsdp")
    # The second "mlp" finds fsdp taken and falls through to the next "mlp" rule.
    spec = sharding.logical_to_mesh_spec(("mlp", "mlp"), (8, 8), mesh, rules)
    assert spec == P("fsdp", "data")


def test_rank_mismatch_replicated(devices):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4}, devices)
    boxed = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8,), jnp.float32), ("embed", "mlp"))
    assert sharding.state_shardings({"v": boxed}, mesh)["v"].spec == P()


def test_rules_from_config_replace_defaults(devices):
    assert sharding.logical_axis_rules(None) == sharding.DEFAULT_LOGICAL_AXIS_RULES
    empty = ml_collections.ConfigDict({"sharding": {"rules": None}})
    assert sharding.logical_axis_rules(empty) == sharding.DEFAULT_LOGICAL_AXIS_RULES

    config = ml_collections.ConfigDict(
        {"sharding": {"rules": [["batch", ["data"]], ["embed", None], ["mlp", "data"]]}}
    )
    rules = sharding.logical_axis_rules(config)
    assert rules == (("batch", ("data",)), ("embed", None), ("mlp", "data"))
    mesh = sharding.create_mesh({"data": 8}, devices)
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (8, 32), mesh, rules) == P(None, "data")

    # Known axes missing from the mesh are dropped: the default rules work on a data-only mesh.
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (8, 32), mesh) == P(None, None)
    assert sharding.logical_to_mesh_spec(("batch", "embed"), (8, 32), mesh) == P(("data",), None)
    with pytest.raises(ValueError, match=r"names mesh axes \['model'\]"):
        sharding.logical_to_mesh_spec(("embed",), (8,), mesh, (("embed", "model"),))


def test_jitted_matmul_matches_numpy(devices):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    w = rng.standard_normal((8, 12)).astype(np.float32)

    x_global = sharding.host_local_batch_to_global(x, mesh)
    w_spec = sharding.logical_to_mesh_spec(("embed", "mlp"), w.shape, mesh)
    assert w_spec == P("fsdp", "tensor")
    w_sharded = jax.device_put(w, jax.sharding.NamedSharding(mesh, w_spec))

    @jax.jit
    def forward(x, w):
        y = x @ w  # (B, 4D)
        return nn.with_logical_constraint(y, ("batch", "mlp"))

    with sharding.activation_sharding(mesh):
        y = forward(x_global, w_sharded)
    np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-5, atol=1e-5)
    # The size-1 tensor axis may be dropped from the output spec; the layout is the same.
    expected = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor"))
    assert y.sharding.is_equivalent_to(expected, y.ndim)
    assert y.addressable_shards[0].data.shape == (2, 12)


def test_activation_constraint_sets_layout(devices):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices)
    x = jnp.arange(8 * 4 * 8, dtype=jnp.float32).reshape(8, 4, 8)

    def constrain(x):
        return nn.with_logical_constraint(x * 2, ("batch", "length", "embed"))

    with sharding.activation_sharding(mesh):
        y = jax.jit(constrain)(x)
    # `batch` takes both data and fsdp, so `embed` stays replicated for activations.
    expected = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, None))
    assert y.sharding.is_equivalent_to(expected, y.ndim)
    assert y.addressable_shards[0].data.shape == (2, 4, 8)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


def test_batch_sharding_layout(devices):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4, "tensor": 1}, devices)
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sharding.replicated(mesh).spec == P()

    images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    labels = np.arange(16, dtype=np.int32)
    batch = sharding.host_local_batch_to_global({"image": images, "label": labels}, mesh)
    assert batch["image"].shape == (16, 3)
    # Device k of the mesh in (data, fsdp) row-major order stores rows 2k and 2k + 1.
    position = {d.id: k for k, d in enumerate(mesh.devices.reshape(-1))}
    for shard in batch["image"].addressable_shards:
        k = position[shard.device.id]
        np.testing.assert_array_equal(np.asarray(shard.data), images[2 * k : 2 * k + 2])
    for shard in batch["label"].addressable_shards:
        k = position[shard.device.id]
        np.testing.assert_array_equal(np.asarray(shard.data), labels[2 * k : 2 * k + 2])

    with pytest.raises(ValueError, match="global batch size 12"):
        sharding.host_local_batch_to_global(np.zeros((12, 3)), mesh)

    data_only = sharding.create_mesh([("data", 8)], devices)
    assert sharding.batch_sharding(data_only).spec == P(("data",))


def test_initialize_distributed_single_process_noop(monkeypatch):
    for variable in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert sharding.initialize_distributed(None) is False
    config = ml_collections.ConfigDict({"distributed": {"num_processes": 1}})
    assert sharding.initialize_distributed(config) is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sharding.initialize_distributed(config) is False


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    sys.path.insert(0, sys.argv[3])
    import ml_collections
    from aim_jax import sharding
    process_id, port = int(sys.argv[1]), sys.argv[2]
    config = ml_collections.ConfigDict({"distributed": {
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
        "process_id": process_id}})
    assert sharding.initialize_distributed(config)
    import jax
    import numpy as np
    mesh = sharding.create_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    # Process p passes global rows 4p..4p+3 of arange(32).reshape(8, 4).
    local = np.arange(16, dtype=np.float32).reshape(4, 4) + 16 * process_id
    x = sharding.host_local_batch_to_global({"x": local}, mesh)["x"]
    total = jax.jit(lambda x: x.sum(axis=0), out_shardings=sharding.replicated(mesh))(x)
    total = np.asarray(total.addressable_shards[0].data)
    print("RESULT", jax.process_count(), jax.device_count(), x.shape, total.tolist(), flush=True)
    """
)


def test_two_process_global_sum(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, REPO_ROOT],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for worker in workers:
            output, _ = worker.communicate(timeout=120)
            outputs.append(output)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    expected = np.arange(32, dtype=np.float32).reshape(8, 4).sum(axis=0).tolist()
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
        result = [line for line in output.splitlines() if line.startswith("RESULT")]
        assert result == [f"RESULT 2 4 (8, 4) {expected}"], output[-3000:]
