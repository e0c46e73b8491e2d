"""A training run killed with SIGKILL and restarted in its workdir resumes bit-exactly.

The run is `python -m aim_jax.train` in a subprocess. It is killed once between saves and once
while an asynchronous checkpoint save is in flight (a `<step>.orbax-checkpoint-tmp*` directory
exists). The restarted run must ignore the partial checkpoint, and its per-step losses must
equal those of an uninterrupted run exactly.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_helpers
from train_helpers import read_metrics

pytestmark = pytest.mark.skipif(
    not train_helpers.fashion_mnist_available(),
    reason=f"Fashion-MNIST not found in {train_helpers.FASHION_MNIST_PATH}",
)

TOTAL_STEPS = 24
CHECKPOINT_EVERY = 2
TMP_MARKER = ".orbax-checkpoint-tmp"
RUN_TIMEOUT_S = 240


def launch(workdir: Path) -> subprocess.Popen:
    """Start the runlocal Fashion-MNIST training of the tiny model in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "aim_jax.train"]
    command += ["--config", "configs/fashion_mnist.py:runlocal", "--workdir", str(workdir)]
    command += list(train_helpers.TINY_MODEL_FLAGS)
    command += [
        f"--config.total_steps={TOTAL_STEPS}",
        f"--config.checkpoint_every_steps={CHECKPOINT_EVERY}",
        "--config.log_every_steps=1",
    ]
    env = dict(os.environ)
    env["XLA_FLAGS"] = train_helpers.SUBPROCESS_XLA_FLAGS
    env["JAX_PLATFORMS"] = "cpu"
    log_index = len(list(workdir.glob("log_*.txt")))
    log = open(workdir / f"log_{log_index}.txt", "w")  # noqa: SIM115 (closed by the process end)
    return subprocess.Popen(
        command, cwd=train_helpers.REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def checkpoint_entries(workdir: Path) -> tuple[list[int], list[str]]:
    """Return (complete checkpoint steps, temporary directory names) in `workdir/checkpoints`."""
    try:
        names = os.listdir(workdir / "checkpoints")
    except FileNotFoundError:
        return [], []
    complete = sorted(int(name) for name in names if name.isdigit())
    return complete, sorted(name for name in names if TMP_MARKER in name)


def logged_steps(workdir: Path) -> int:
    try:
        return len(read_metrics(workdir))
    except (FileNotFoundError, ValueError):
        return 0


def wait_until(process: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"The run exited with {process.returncode} before {what}.")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"Timed out waiting for {what}.")
        time.sleep(0.001)


def kill_during_save(process: subprocess.Popen, workdir: Path) -> tuple[str, list[int]]:
    """SIGKILL `process` while one of its checkpoint saves is in flight.

    The process is stopped with SIGSTOP as soon as a new temporary directory appears and
    killed only if that directory still exists, so the kill lands inside the save.

    Returns:
        The temporary directory name and the complete steps at the kill.
    """
    _, old_tmp = checkpoint_entries(workdir)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail("The run finished before a save in flight could be caught.")
        _, tmp = checkpoint_entries(workdir)
        new_tmp = [name for name in tmp if name not in old_tmp]
        if new_tmp:
            process.send_signal(signal.SIGSTOP)
            complete, tmp = checkpoint_entries(workdir)
            if new_tmp[0] in tmp:
                process.kill()
                process.wait()
                return new_tmp[0], complete
            process.send_signal(signal.SIGCONT)
        time.sleep(0.001)
    process.kill()
    pytest.fail("Timed out waiting for a checkpoint save in flight.")


def start_step(workdir: Path, log_index: int) -> int:
    text = (workdir / f"log_{log_index}.txt").read_text()
    match = re.search(r"Starting at step (\d+) \((\w+)\)", text)
    assert match, f"no start line in log {log_index}:\n{text[-3000:]}"
    return int(match.group(1))


def finish(process: subprocess.Popen, workdir: Path) -> None:
    returncode = process.wait(timeout=RUN_TIMEOUT_S)
    logs = sorted(workdir.glob("log_*.txt"))
    assert returncode == 0, f"run failed:\n{logs[-1].read_text()[-4000:]}"


def test_killed_run_resumes_bit_exactly(tmp_path):
    reference_dir, workdir = tmp_path / "reference", tmp_path / "killed"
    reference = launch(reference_dir)

    # 1. Kill between steps once a checkpoint exists and a few more steps are logged.
    first = launch(workdir)
    wait_until(
        first,
        lambda: checkpoint_entries(workdir)[0] and logged_steps(workdir) >= 5,
        "a checkpoint and 5 logged steps",
    )
    first.kill()
    first.wait()
    complete_after_first, _ = checkpoint_entries(workdir)
    assert complete_after_first

    # 2. Restart, then kill while a save is in flight.
    second = launch(workdir)
    partial_name, complete_at_kill = kill_during_save(second, workdir)
    partial_step = int(partial_name.split(".")[0])
    assert start_step(workdir, 1) == complete_after_first[-1]
    assert partial_step not in complete_at_kill
    assert complete_at_kill[-1] < partial_step

    # 3. Restart and run to the end: the partial checkpoint is not restored, and is removed.
    third = launch(workdir)
    finish(third, workdir)
    assert start_step(workdir, 2) == complete_at_kill[-1]
    complete, tmp = checkpoint_entries(workdir)
    assert tmp == []
    assert complete[-1] == TOTAL_STEPS

    finish(reference, reference_dir)
    expected = read_metrics(reference_dir)
    actual = read_metrics(workdir)
    assert [record["step"] for record in actual] == list(range(1, TOTAL_STEPS + 1))
    assert [record["step"] for record in expected] == list(range(1, TOTAL_STEPS + 1))
    for want, got in zip(expected, actual, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert got[key] == want[key], f"step {want['step']} {key}: {got[key]} != {want[key]}"
