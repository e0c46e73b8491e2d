"""Tests for aim_jax.checkpointing: resharded restore, crash safety, retention, resume order."""

import os

# Must be set before JAX creates its CPU backend; `tests/conftest.py` may already have set it.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import grain  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from aim_jax import checkpointing  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_mesh(shape, devices):
    count = int(np.prod(shape))
    return Mesh(np.asarray(devices[:count]).reshape(shape), ("data", "fsdp"))


def state_shardings(mesh):
    return {
        "params": {
            "w": NamedSharding(mesh, P("data", "fsdp")),
            "b": NamedSharding(mesh, P("fsdp")),
        },
        "opt_state": {"mu": NamedSharding(mesh, P(None, "fsdp"))},
        "step": NamedSharding(mesh, P()),
    }


def host_state(step):
    """Deterministic state values; `w` differs for every step."""
    return {
        "params": {
            "w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16) + 1000.0 * step,
            "b": np.linspace(-1.0, 1.0, 16, dtype=np.float32),
        },
        "opt_state": {"mu": np.full((8, 16), 0.5 * step, dtype=np.float32)},
        "step": np.int32(step),
    }


def place(tree, shardings):
    return jax.tree.map(lambda value, sharding: jax.device_put(value, sharding), tree, shardings)


def abstract_of(tree):
    return jax.tree.map(lambda value: jax.ShapeDtypeStruct(np.shape(value), value.dtype), tree)


def make_iterator():
    dataset = grain.MapDataset.range(40).shuffle(seed=7).batch(4)
    return iter(dataset.to_iter_dataset())


@pytest.fixture(scope="module")
def devices():
    if jax.device_count() < 8:
        pytest.skip(
            f"needs 8 devices, found {jax.device_count()}: set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts"
        )
    return jax.devices()[:8]


def test_restore_onto_other_meshes(tmp_path, devices):
    save_mesh = make_mesh((2, 4), devices)
    state = place(host_state(3), state_shardings(save_mesh))
    rng = jax.random.key(42)
    iterator = make_iterator()
    for _ in range(3):
        next(iterator)
    config = ml_collections.ConfigDict({"model": "aim-600M", "lr": 1e-3})

    manager = checkpointing.create_checkpoint_manager(
        tmp_path, save_interval_steps=1, max_to_keep=2
    )
    assert checkpointing.save_checkpoint(
        manager, 3, state, rng=rng, data_iterator=iterator, config=config
    )
    expected_batches = [next(iterator) for _ in range(2)]
    manager.wait_until_finished()
    assert manager.all_steps() == [3]
    assert sorted(os.listdir(tmp_path / "3")) == sorted(
        ["_CHECKPOINT_METADATA", "commit_success.txt", "config", "data", "rng", "state"]
    )
    manager.close()

    expected = host_state(3)
    for shape in [(4, 2), (8, 1), (1, 1)]:
        mesh = make_mesh(shape, devices)
        manager = checkpointing.create_checkpoint_manager(
            tmp_path, save_interval_steps=1, max_to_keep=2
        )
        fresh_iterator = make_iterator()
        restored = checkpointing.restore_latest(
            manager,
            abstract_of(expected),
            state_shardings(mesh),
            rng_template=jax.random.key(0),
            data_iterator=fresh_iterator,
        )
        manager.close()
        assert restored.step == 3
        for path, value in jax.tree_util.tree_leaves_with_path(restored.state):
            want = expected
            for key in path:
                want = want[key.key]
            np.testing.assert_array_equal(np.asarray(value), want, err_msg=str((shape, path)))
        w = restored.state["params"]["w"]
        assert w.sharding.mesh.devices.shape == shape
        assert w.addressable_shards[0].data.shape == (8 // shape[0], 16 // shape[1])
        np.testing.assert_array_equal(
            jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(42))
        )
        assert restored.config == {"lr": 1e-3, "model": "aim-600M"}
        assert restored.data_restored
        for want in expected_batches:
            np.testing.assert_array_equal(next(fresh_iterator), want)


def test_raw_rng_and_missing_step(tmp_path):
    manager = checkpointing.create_checkpoint_manager(
        tmp_path, save_interval_steps=1, max_to_keep=None, async_save=False
    )
    state = {"x": jnp.arange(4.0)}
    checkpointing.save_checkpoint(manager, 5, state, rng=jax.random.PRNGKey(9))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpointing.restore_checkpoint(
        manager,
        5,
        abstract_of({"x": np.zeros(4, np.float32)}),
        {"x": single},
        rng_template=jax.random.PRNGKey(0),
    )
    np.testing.assert_array_equal(restored.state["x"], np.arange(4.0))
    np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(9))
    assert restored.rng.dtype == jnp.uint32
    assert restored.config is None
    with pytest.raises(FileNotFoundError, match="No complete checkpoint for step 6"):
        checkpointing.restore_checkpoint(manager, 6, {"x": state["x"]}, {"x": single})
    with pytest.raises(FileNotFoundError, match="has no data iterator state"):
        checkpointing.restore_checkpoint(
            manager, 5, {"x": state["x"]}, {"x": single}, data_iterator=make_iterator()
        )
    manager.close()


def test_interval_and_retention(tmp_path):
    manager = checkpointing.create_checkpoint_manager(
        tmp_path, save_interval_steps=2, max_to_keep=2
    )
    started = []
    for step in range(1, 8):
        state = {"x": jnp.full((3,), float(step))}
        if checkpointing.save_checkpoint(manager, step, state):
            started.append(step)
    manager.wait_until_finished()
    assert started == [2, 4, 6]
    assert manager.all_steps() == [4, 6]

    # The final step is forced even though 7 is not a multiple of the interval.
    assert checkpointing.save_checkpoint(manager, 7, {"x": jnp.full((3,), 7.0)}, force=True)
    # A step that exists is never written again.
    assert not checkpointing.save_checkpoint(manager, 7, {"x": jnp.zeros(3)}, force=True)
    manager.wait_until_finished()
    assert manager.all_steps() == [6, 7]
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restored = checkpointing.restore_latest(manager, {"x": jnp.zeros(3)}, {"x": single})
    np.testing.assert_array_equal(restored.state["x"], np.full((3,), 7.0))
    manager.close()

    with pytest.raises(ValueError, match="save_interval_steps must be a positive int, got 0"):
        checkpointing.create_checkpoint_manager(tmp_path, save_interval_steps=0, max_to_keep=1)

    config = ml_collections.ConfigDict({"checkpoint_every_steps": 3, "keep_checkpoints": 0})
    manager = checkpointing.checkpoint_manager_from_config(tmp_path / "run", config)
    assert str(manager.directory) == str(tmp_path / "run" / "checkpoints")
    assert manager.should_save(3)
    assert not manager.should_save(4)
    manager.close()


# Saves step 1, then starts an asynchronous save of step 2 whose step rename never happens,
# so the parent can SIGKILL the process while step 2 is still a temporary directory.
_CRASHING_SAVER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    sys.path.insert(0, sys.argv[2])
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from aim_jax import checkpointing

    directory = sys.argv[1]
    manager = checkpointing.create_checkpoint_manager(
        directory, save_interval_steps=1, max_to_keep=3)
    checkpointing.save_checkpoint(manager, 1, {"w": jnp.full((64, 64), 1.0)})
    manager.wait_until_finished()

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize_items_only(self):
        # Items are renamed as usual; the step directory "2" never is.
        if self.get_final().name != "2":
            return await finalize(self)
        open(os.path.join(directory, "rename_reached"), "w").close()
        while True:
            await asyncio.sleep(1)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize_items_only
    checkpointing.save_checkpoint(manager, 2, {"w": jnp.full((64, 64), 2.0)})
    time.sleep(600)
    """
)


def test_killed_save_is_never_restored(tmp_path):
    directory = tmp_path / "checkpoints"
    script = tmp_path / "saver.py"
    script.write_text(_CRASHING_SAVER)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    saver = subprocess.Popen(
        [sys.executable, str(script), str(directory), REPO_ROOT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (directory / "rename_reached").exists():
            if saver.poll() is not None:
                output = saver.stdout.read().decode()[-3000:]
                pytest.fail(f"saver exited with {saver.returncode} before the rename: {output}")
            assert time.monotonic() < deadline, "saver did not reach the rename in 120 s"
            time.sleep(0.1)
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    assert saver.returncode == -signal.SIGKILL

    # Step 2 was fully written but never renamed from its temporary name.
    temporary = directory / "2.orbax-checkpoint-tmp"
    assert temporary.is_dir()
    assert (temporary / "state").is_dir()
    # A second unfinished step, as left by a crash before any item was written.
    (directory / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (directory / "rename_reached").unlink()
    assert ocp.utils.is_checkpoint_finalized(directory / "1")
    assert not ocp.utils.is_checkpoint_finalized(temporary)

    manager = checkpointing.create_checkpoint_manager(
        directory, save_interval_steps=1, max_to_keep=3
    )
    assert manager.latest_step() == 1
    assert manager.all_steps() == [1]

    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    restored = checkpointing.restore_latest(manager, abstract, {"w": single})
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], np.full((64, 64), 1.0))

    # The new manager deletes the leftovers in the background and waits for that before its
    # first save, so step 2 can be saved again.
    assert checkpointing.save_checkpoint(manager, 2, {"w": jnp.full((64, 64), 2.0)})
    manager.wait_until_finished()
    assert manager.all_steps() == [1, 2]
    assert sorted(os.listdir(directory)) == ["1", "2"]
    restored = checkpointing.restore_latest(manager, abstract, {"w": single})
    np.testing.assert_array_equal(restored.state["w"], np.full((64, 64), 2.0))
    manager.close()


def fresh_train_state():
    return {
        "params": {"dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}},
        "opt_state": {"mu": {"dense": {"kernel": jnp.full((2, 3), 0.25), "bias": jnp.ones(3)}}},
        "step": jnp.int32(0),
    }


def test_restore_or_initialize_order(tmp_path):
    pretrained = {
        "params": {
            "dense": {
                "kernel": np.arange(6, dtype=np.float64).reshape(2, 3),
                "bias": np.array([7.0, 8.0, 9.0]),
            }
        }
    }
    init_calls = []
    loaded_from = []

    def init_fn():
        init_calls.append(1)
        return fresh_train_state()

    def load_fn(directory):
        loaded_from.append(directory)
        return pretrained

    state = fresh_train_state()
    abstract = abstract_of(state)
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: single, state)
    manager = checkpointing.create_checkpoint_manager(
        tmp_path / "checkpoints", save_interval_steps=1, max_to_keep=1
    )

    # (3) No checkpoint and no init_from: fresh initialisation.
    result = checkpointing.restore_or_initialize(
        manager, init_fn, abstract, shardings, rng=jax.random.PRNGKey(1)
    )
    assert result.source == "scratch"
    assert result.step == 0
    np.testing.assert_array_equal(result.state["params"]["dense"]["bias"], np.zeros(3))
    np.testing.assert_array_equal(result.rng, jax.random.PRNGKey(1))

    # (2) init_from: params from the loader, optimizer state and step from init_fn.
    result = checkpointing.restore_or_initialize(
        manager,
        init_fn,
        abstract,
        shardings,
        init_from="/pretrained/aim",
        load_pretrained_fn=load_fn,
    )
    assert result.source == "init_from"
    assert loaded_from == ["/pretrained/aim"]
    kernel = result.state["params"]["dense"]["kernel"]
    np.testing.assert_array_equal(kernel, np.arange(6.0).reshape(2, 3))
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(result.state["params"]["dense"]["bias"], [7.0, 8.0, 9.0])
    np.testing.assert_array_equal(result.state["opt_state"]["mu"]["dense"]["kernel"], 0.25)

    # (1) A complete checkpoint wins over init_from, and init_fn is not called.
    saved = jax.tree.map(lambda x: x + 5, fresh_train_state())
    checkpointing.save_checkpoint(manager, 12, saved, rng=jax.random.PRNGKey(4))
    manager.wait_until_finished()
    calls_before = len(init_calls)
    result = checkpointing.restore_or_initialize(
        manager,
        init_fn,
        abstract,
        shardings,
        init_from="/pretrained/aim",
        rng=jax.random.PRNGKey(1),
        load_pretrained_fn=load_fn,
    )
    assert result.source == "checkpoint"
    assert result.step == 12
    assert len(init_calls) == calls_before
    np.testing.assert_array_equal(result.state["params"]["dense"]["bias"], np.full(3, 5.0))
    np.testing.assert_array_equal(result.state["step"], 5)
    np.testing.assert_array_equal(result.rng, jax.random.PRNGKey(4))
    manager.close()


def test_merge_pretrained_mismatches():
    target = fresh_train_state()["params"]
    wrong_shape = {"dense": {"kernel": np.zeros((3, 2)), "bias": np.zeros(3)}}
    with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(3, 2\).*expects \(2, 3\)"):
        checkpointing.merge_pretrained(target, wrong_shape)

    partial = {"dense": {"kernel": np.ones((2, 3))}, "head": {"kernel": np.ones(4)}}
    with pytest.raises(ValueError, match=r"1 model paths missing.*'dense/bias'.*'head/kernel'"):
        checkpointing.merge_pretrained(target, partial)
    merged = checkpointing.merge_pretrained(target, partial, strict=False)
    np.testing.assert_array_equal(merged["dense"]["kernel"], np.ones((2, 3)))
    np.testing.assert_array_equal(merged["dense"]["bias"], np.zeros(3))
    assert set(merged) == {"dense"}

    with pytest.raises(ValueError, match="No variable collection copied"):
        checkpointing.apply_pretrained(fresh_train_state(), {"ema": {}})


def test_load_pretrained_variables_reads_orbax(tmp_path):
    variables = {
        "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "batch_stats": {"mean": np.array([0.5, 1.5], dtype=np.float32)},
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "model" / "variables", variables)
    loaded = checkpointing.load_pretrained_variables(tmp_path / "model")
    assert isinstance(loaded["params"]["w"], np.ndarray)
    np.testing.assert_array_equal(loaded["params"]["w"], variables["params"]["w"])
    np.testing.assert_array_equal(loaded["batch_stats"]["mean"], [0.5, 1.5])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpointing.load_pretrained_variables(tmp_path / "missing")


# Each of two processes (2 CPU devices each) saves a state sharded over a (2, 2) mesh that
# spans both processes, then restores it onto a (4, 1) mesh sharded along the other dimension.
_TWO_PROCESS_SAVER = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.path.insert(0, sys.argv[4])
    import grain, jax, jax.numpy as jnp, ml_collections, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from aim_jax import checkpointing, sharding

    config = ml_collections.ConfigDict({"distributed": {
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": 2,
        "process_id": process_id}})
    sharding.initialize_distributed(config)
    full = np.arange(32, dtype=np.float32).reshape(4, 8)
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2})
    w_sharding = NamedSharding(mesh, P("data", "fsdp"))
    state = {"w": jax.make_array_from_callback((4, 8), w_sharding, lambda index: full[index])}
    iterator = iter(grain.MapDataset.range(40).batch(2).to_iter_dataset())
    for _ in range(process_id + 1):  # each process has its own data position
        next(iterator)
    manager = checkpointing.create_checkpoint_manager(
        directory, save_interval_steps=1, max_to_keep=2)
    checkpointing.save_checkpoint(manager, 1, state, data_iterator=iterator)
    manager.wait_until_finished()

    other_mesh = sharding.create_mesh({"data": 4, "fsdp": 1})
    other = {"w": NamedSharding(other_mesh, P(None, "data"))}
    iterator = iter(grain.MapDataset.range(40).batch(2).to_iter_dataset())
    restored = checkpointing.restore_latest(
        manager, {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32)}, other,
        data_iterator=iterator)
    w = restored.state["w"]
    shards_match = all(
        np.array_equal(np.asarray(s.data), full[s.index]) for s in w.addressable_shards)
    shard_shape = w.addressable_shards[0].data.shape
    print("RESULT", shards_match, shard_shape, next(iterator).tolist(), flush=True)
    manager.close()
    """
)


def test_two_process_save_and_reshard(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_TWO_PROCESS_SAVER)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    directory = tmp_path / "checkpoints"
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), port, str(directory), REPO_ROOT],
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
            outputs.append(worker.communicate(timeout=120)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for process_id, (worker, output) in enumerate(zip(workers, outputs, strict=True)):
        assert worker.returncode == 0, output[-3000:]
        result = [line for line in output.splitlines() if line.startswith("RESULT")]
        # Process p advanced its iterator p + 1 batches, so its next batch is batch p + 1.
        next_batch = [2 * (process_id + 1), 2 * (process_id + 1) + 1]
        assert result == [f"RESULT True (4, 2) {next_batch}"], output[-3000:]
    assert sorted(os.listdir(directory / "1" / "data")) == [
        "commit_success.txt",
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
