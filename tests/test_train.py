"""Tests of the pre-training loop: sharding, multi-process runs, NaN stops and init_from.

Every run trains the 2-block, width-32 model of `train_helpers.tiny_config` on Fashion-MNIST
for a few steps. The reference is a single-device run; meshes, processes and gradient
accumulation must reproduce its losses within float32 reduction-order noise.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_helpers
from train_helpers import read_losses, read_metrics, run_steps, tiny_config, train

from aim_jax import checkpointing, config_lib, sharding
from aim_jax import train as train_lib
from aim_jax.models import AIM, AIMPretrainer
from aim_jax.objective import next_patch_loss
from aim_jax.pretrained import restore_variables, save_pretrained
from aim_jax.trunk import stack_blocks, unstack_blocks

pytestmark = pytest.mark.skipif(
    not train_helpers.fashion_mnist_available(),
    reason=f"Fashion-MNIST not found in {train_helpers.FASHION_MNIST_PATH}",
)

NUM_STEPS = 6
RTOL = 1e-5


def single_device():
    return jax.devices()[:1]


def assert_losses_close(actual: dict[int, float], expected: dict[int, float], steps):
    for step in steps:
        np.testing.assert_allclose(actual[step], expected[step], rtol=RTOL, err_msg=f"step {step}")


def assert_trees_close(actual, expected, rtol=RTOL, atol=0.0):
    flat_actual = jax.tree_util.tree_leaves_with_path(actual)
    flat_expected = jax.tree.leaves(expected)
    assert len(flat_actual) == len(flat_expected)
    for (path, a), e in zip(flat_actual, flat_expected, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Single-device run of NUM_STEPS steps, checkpoints at 3 and 6; returns its workdir."""
    workdir = tmp_path_factory.mktemp("reference")
    train(tiny_config(total_steps=NUM_STEPS), workdir, single_device())
    return workdir


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The reference run on a (data 2, fsdp 4) mesh of the 8 simulated devices."""
    workdir = tmp_path_factory.mktemp("fsdp")
    config = tiny_config(total_steps=NUM_STEPS)
    config.mesh.data = 2
    config.mesh.fsdp = 4
    train(config, workdir)
    return workdir


def test_fsdp_mesh_matches_single_device(reference_run, fsdp_run):
    assert jax.device_count() == 8
    expected = read_losses(reference_run)
    assert sorted(expected) == list(range(1, NUM_STEPS + 1))
    assert_losses_close(read_losses(fsdp_run), expected, range(1, NUM_STEPS + 1))
    # The loss falls, so the comparison is not between two untrained runs.
    assert expected[NUM_STEPS] < 0.8 * expected[1]


def test_tensor_parallel_mesh_matches_single_device(reference_run, tmp_path):
    config = tiny_config(total_steps=NUM_STEPS)
    config.mesh.data = 2
    config.mesh.fsdp = 2
    config.mesh.tensor = 2
    train(config, tmp_path)
    expected = read_losses(reference_run)
    assert_losses_close(read_losses(tmp_path), expected, range(1, NUM_STEPS + 1))

    setup = train_lib.setup_training(config, str(tmp_path))  # restores the last checkpoint
    setup.manager.close()
    kernel = setup.state.params["trunk"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # (D, 4D)
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (32 // 2, 128 // 2)


def test_fsdp_mesh_shards_parameters(tmp_path):
    config = tiny_config(total_steps=NUM_STEPS)
    config.mesh.data = 2
    config.mesh.fsdp = 4
    setup = train_lib.setup_training(config, str(tmp_path))
    setup.manager.close()
    assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    kernel = setup.state.params["trunk"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # (D, 4D)
    assert kernel.sharding.spec[0] == "fsdp"
    assert kernel.addressable_shards[0].data.shape == (32 // 4, 128)


def test_checkpoint_restores_on_other_device_count(reference_run, fsdp_run, tmp_path):
    # Resume the 8-device (2, 4) run from its step-3 checkpoint on a single device.
    workdir = tmp_path / "resumed"
    shutil.copytree(fsdp_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
    config = tiny_config(total_steps=NUM_STEPS)
    setup = train_lib.setup_training(config, str(workdir), single_device())
    assert setup.start_step == 3
    assert setup.mesh.devices.size == 1
    try:
        train_lib.train_loop(setup, str(workdir))
    finally:
        setup.manager.close()
    steps = [record["step"] for record in read_metrics(workdir)]
    assert steps == list(range(1, NUM_STEPS + 1))
    assert_losses_close(read_losses(workdir), read_losses(reference_run), range(4, NUM_STEPS + 1))


def test_grad_accumulation_matches_full_batch(tmp_path):
    results = {}
    for accum in (1, 2):
        config = tiny_config(total_steps=NUM_STEPS, grad_accum_steps=accum)
        setup = train_lib.setup_training(config, str(tmp_path / f"accum{accum}"), single_device())
        setup.manager.close()
        results[accum] = run_steps(setup, 3)
    (state_1, losses_1), (state_2, losses_2) = results[1], results[2]
    np.testing.assert_allclose(losses_2, losses_1, rtol=RTOL)
    assert int(state_2.step) == int(state_1.step) == 3
    # Adam divides by sqrt(v), so parameter differences stay near float32 rounding times lr.
    assert_trees_close(state_2.params, state_1.params, rtol=1e-4, atol=1e-6)


def test_grad_accum_rejects_indivisible_batch(tmp_path):
    config = tiny_config(grad_accum_steps=3)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        train_lib.setup_training(config, str(tmp_path), single_device())


def _tiny_model_inputs():
    model_config = config_lib.to_model_config(tiny_config().model)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 28, 28, 3)).astype(np.float32))
    return model_config, images


def test_scan_remat_matches_unrolled_loss_and_grads():
    model_config, images = _tiny_model_inputs()
    prefix_len = jnp.array([3, 20], jnp.int32)
    plain = AIMPretrainer(model_config)
    params = sharding.unbox(plain.init(jax.random.key(1), images, prefix_len)["params"])
    scanned = AIMPretrainer(model_config, scan=True, remat_policy="full")
    scanned_params = {**params, "trunk": stack_blocks(params["trunk"])}

    def loss_and_grads(model):
        def loss_fn(p, mask_prefix_len):
            predictions = model.apply({"params": p}, images, mask_prefix_len)
            return next_patch_loss(predictions, images, prefix_len, model_config.patch_size)[0]

        return jax.jit(jax.value_and_grad(loss_fn))

    plain_fn = loss_and_grads(plain)
    loss, grads = plain_fn(params, prefix_len)
    scanned_loss, scanned_grads = loss_and_grads(scanned)(scanned_params, prefix_len)
    np.testing.assert_allclose(float(scanned_loss), float(loss), rtol=RTOL)
    scanned_grads = {**scanned_grads, "trunk": unstack_blocks(scanned_grads["trunk"])}
    assert_trees_close(scanned_grads, grads, rtol=1e-4, atol=1e-7)

    # A purely causal mask (prefix 1) gives another loss, so the equality needs the prefix mask.
    causal_loss, _ = plain_fn(params, jnp.ones_like(prefix_len))
    assert abs(float(causal_loss) - float(loss)) > 1e-4


def test_scan_remat_keeps_prefix_attention():
    model_config, images = _tiny_model_inputs()
    model = AIMPretrainer(model_config, scan=True, remat_policy="full")
    params = model.init(jax.random.key(2), images, jnp.array([1, 1]))["params"]
    # Patch 1 is rows 0..3, columns 4..7. Position 0 attends to it only inside the prefix.
    changed = images.at[:, 0:4, 4:8, :].add(3.0)

    @jax.jit
    def first_prediction_change_and_grad(prefix_len):
        def first_prediction(x):
            return model.apply({"params": params}, x, prefix_len)[:, 0]  # (B, ppC)

        change = first_prediction(changed) - first_prediction(images)
        grad = jax.grad(lambda x: first_prediction(x).sum())(images)[:, 0:4, 4:8, :]
        return jnp.abs(change).max(), jnp.abs(grad).max()

    for prefix, depends in ((1, False), (3, True)):
        moved, grad = first_prediction_change_and_grad(jnp.array([prefix, prefix], jnp.int32))
        if depends:
            assert float(moved) > 1e-3, f"prefix {prefix}: position 0 must see patch 1"
            assert float(grad) > 1e-6, f"prefix {prefix}: the remat backward pass lost the prefix"
        else:
            assert float(moved) == 0.0, f"prefix {prefix}: position 0 must not see patch 1"
            assert float(grad) == 0.0, f"prefix {prefix}: gradient leaks from patch 1"


def test_multi_process_matches_single_process(reference_run, tmp_path):
    workdir = tmp_path / "multi"
    port = train_helpers.free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        train_helpers.SUBPROCESS_XLA_FLAGS + " --xla_force_host_platform_device_count=2"
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(train_helpers.REPO_ROOT)
    script = str(train_helpers.REPO_ROOT / "tests" / "train_helpers.py")

    processes = []
    for process_id in range(2):
        command = [sys.executable, script, "--process_id", str(process_id)]
        command += ["--num_processes", "2", "--port", str(port), "--workdir", str(workdir)]
        command += ["--total_steps", str(NUM_STEPS)]
        processes.append(
            subprocess.Popen(
                command,
                cwd=train_helpers.REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )

    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=180)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()

    for process_id, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"process {process_id} failed:\n{output[-4000:]}"
    assert_losses_close(read_losses(workdir), read_losses(reference_run), range(1, NUM_STEPS + 1))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(total_steps=NUM_STEPS, checkpoint_every_steps=2, log_every_steps=3)
    to_global = sharding.host_local_batch_to_global
    calls = []

    def poison_fourth_batch(batch, mesh):
        calls.append(1)
        if len(calls) == 4:
            batch = {"image": np.full_like(batch["image"], np.nan)}
        return to_global(batch, mesh)

    monkeypatch.setattr(sharding, "host_local_batch_to_global", poison_fourth_batch)
    with pytest.raises(train_lib.NonFiniteError, match="at step 4.*no checkpoint after step 3"):
        train(config, tmp_path, single_device())
    monkeypatch.undo()

    # Step 4 was due to be saved; the check before the save kept it out.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert [record["step"] for record in read_metrics(tmp_path)] == [3]
    setup = train_lib.setup_training(config, str(tmp_path), single_device())
    setup.manager.close()
    assert setup.start_step == 2
    assert int(setup.state.step) == 2
    for leaf in jax.tree.leaves(setup.state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_update_if_finite_applies_or_skips():
    config = tiny_config(total_steps=10)
    config.optimizer.init_lr = 0.01  # nonzero at step 0, so the update changes the parameters
    tx, _ = train_lib.create_optimizer(config)
    params = {"kernel": jnp.asarray([[0.5, -1.0], [2.0, 0.25]]), "bias": jnp.asarray([0.1, 0.2])}
    grads = {"kernel": jnp.asarray([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.asarray([1.0, -1.0])}
    opt_state = tx.init(params)
    new_params, new_opt_state = train_lib.update_if_finite(
        tx, jnp.asarray(True), grads, params, opt_state
    )
    updates, expected_opt_state = tx.update(grads, opt_state, params)
    assert_trees_close(new_params, optax.apply_updates(params, updates), rtol=0)
    assert_trees_close(new_opt_state, expected_opt_state, rtol=0)
    assert not np.allclose(new_params["kernel"], params["kernel"])

    kept_params, kept_opt_state = train_lib.update_if_finite(
        tx, jnp.asarray(False), grads, params, opt_state
    )
    assert_trees_close(kept_params, params, rtol=0)
    assert_trees_close(kept_opt_state, opt_state, rtol=0)


def _save_classifier(directory, model_config):
    """Save a randomly initialised AIM classifier with every block; return its variables."""
    model = AIM(model_config, stop_after_probe=False)
    variables = model.init(jax.random.key(7), jnp.zeros((1, 28, 28, 3)))
    save_pretrained(directory, model_config, sharding.unbox(variables))
    return restore_variables(directory)


def test_init_from_copies_trunk_and_keeps_fresh_head(tmp_path):
    config = tiny_config(total_steps=2, scan=True)
    model_config = config_lib.to_model_config(config.model)
    pretrained = _save_classifier(tmp_path / "pretrained", model_config)["params"]

    fresh = train_lib.setup_training(config, str(tmp_path / "fresh"), single_device())
    fresh.manager.close()
    config.init_from = str(tmp_path / "pretrained")
    setup = train_lib.setup_training(config, str(tmp_path / "run"), single_device())
    assert setup.start_step == 0
    params = jax.device_get(setup.state.params)
    assert_trees_close(params["patch_embed"], pretrained["patch_embed"], rtol=0.0)
    assert_trees_close(params["trunk"], stack_blocks(pretrained["trunk"]), rtol=0.0)
    assert_trees_close(params["prediction_head"], fresh.state.params["prediction_head"], rtol=0.0)
    fresh_kernel = fresh.state.params["trunk"]["blocks"]["block"]["mlp"]["fc1"]["kernel"]
    assert not np.allclose(params["trunk"]["blocks"]["block"]["mlp"]["fc1"]["kernel"], fresh_kernel)

    # Resume order: once the run has a checkpoint, it wins over init_from.
    saved = setup.state.replace(
        step=setup.state.step + 2, params=jax.tree.map(lambda x: x + 1.0, setup.state.params)
    )
    expected = jax.device_get(saved.params)
    checkpointing.save_checkpoint(
        setup.manager, 2, saved, rng=setup.rng, data_iterator=setup.train_iter, force=True
    )
    setup.manager.close()
    resumed = train_lib.setup_training(config, str(tmp_path / "run"), single_device())
    resumed.manager.close()
    assert resumed.start_step == 2
    assert_trees_close(jax.device_get(resumed.state.params), expected, rtol=0.0)


def test_relative_workdir_checkpoints_and_resumes(tmp_path, monkeypatch):
    # Orbax rejects relative paths, so the workdir must be made absolute before Orbax gets it.
    monkeypatch.chdir(tmp_path)
    config = tiny_config(total_steps=4, checkpoint_every_steps=2)
    train(config, "workdirs/run", single_device())
    assert sorted(os.listdir(tmp_path / "workdirs" / "run" / "checkpoints")) == ["2", "4"]

    params = train_lib.load_pretrain_checkpoint("workdirs/run")[2]
    assert "prediction_head" in params

    config.total_steps = 6
    train(config, "workdirs/run", single_device())
    assert sorted(read_losses(tmp_path / "workdirs" / "run")) == [1, 2, 3, 4, 5, 6]
