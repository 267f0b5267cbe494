"""End-to-end training runs: digits and mock CIFAR, exact resume, preemption, 1 vs 8 devices."""

import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dla_jax.train import loop
from dla_jax.train.checkpoint import CheckpointCorruptError, CheckpointError, CheckpointMismatchError

from train_helpers import (
    cpu_env,
    delete_array_files,
    enable_compilation_cache,
    load_config,
    overwrite_arrays,
    read_metrics,
    tiny_digits_cli,
    tiny_digits_config,
    with_first_weight_changed,
)

enable_compilation_cache()


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.batch_stats, state.opt_state)))]


@pytest.mark.slow
def test_digits_learns_and_reports(tmp_path):
    config = tiny_digits_config(train__num_steps=16, train__decay_epochs=(100.0,))
    state = loop.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 16
    records = read_metrics(tmp_path)
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert {"learning_rate", "train_accuracy", "images_per_second"} <= set(train[0])
    assert np.mean([r["train_loss"] for r in train[-4:]]) < np.mean([r["train_loss"] for r in train[:4]]) - 0.3
    (evaluation,) = [r for r in records if "eval_top1" in r]
    assert evaluation["step"] == 16 and {"eval_top5", "eval_loss"} <= set(evaluation)
    assert evaluation["eval_examples"] == 360  # 360 test digits in batches of 48: the last one padded
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "16").is_dir()


def test_eval_counts_every_example_once_for_any_batch(tmp_path):
    config = tiny_digits_config(train__num_steps=1, train__eval_batch_size=16)
    loop.train_and_evaluate(config, tmp_path)
    (evaluation,) = [r for r in read_metrics(tmp_path) if "eval_top1" in r]
    assert evaluation["eval_examples"] == 360


def test_mock_cifar10_runs(tmp_path):
    config = load_config("cifar10", "dla_l,11")
    config.data.data_dir = str(tmp_path / "no_data_here")
    config.train.update(batch_size=16, eval_batch_size=24, num_steps=3, log_every_steps=1, eval_every_epochs=100.0)
    with tfds.testing.mock_data(num_examples=40):
        loop.train_and_evaluate(config, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert all(np.isfinite(r["train_loss"]) for r in records if "train_loss" in r)
    (evaluation,) = [r for r in records if "eval_top1" in r]
    assert evaluation["eval_examples"] == 40


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    """Stopping at step 3 and running the same command again ends where an uninterrupted run does,
    and logs each step once: what a killed run logged after its last checkpoint is dropped."""
    straight = loop.train_and_evaluate(tiny_digits_config(train__num_steps=6), tmp_path / "straight")
    loop.train_and_evaluate(tiny_digits_config(train__num_steps=3), tmp_path / "resumed")
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 4, "train_loss": 99.0}\n{"step": 5, "train_lo')
    resumed = loop.train_and_evaluate(tiny_digits_config(train__num_steps=6), tmp_path / "resumed")
    for a, b in zip(leaves(straight), leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    losses = [(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / "resumed") if "train_loss" in r]
    reference = [(r["step"], r["train_loss"]) for r in read_metrics(tmp_path / "straight") if "train_loss" in r]
    assert losses == reference


def test_checkpoint_of_another_model_is_refused(tmp_path):
    loop.train_and_evaluate(tiny_digits_config(train__num_steps=1), tmp_path)
    with pytest.raises(CheckpointMismatchError, match="family=dla_l.*family=resnet"):
        loop.train_and_evaluate(tiny_digits_config(train__num_steps=2, model__family="resnet"), tmp_path)


def test_a_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("notes")
    with pytest.raises(CheckpointError, match="is a file: give a directory"):
        loop.train_and_evaluate(tiny_digits_config(train__num_steps=1), workdir)
    assert workdir.read_text() == "notes"


def test_damaged_checkpoint_is_refused_with_the_step_to_resume_from(tmp_path):
    """Changed values or unreadable files stop the run, naming the checkpoint to delete and the step
    the run then resumes from, instead of resuming from wrong values."""
    loop.train_and_evaluate(tiny_digits_config(train__num_steps=1), tmp_path)
    state = loop.train_and_evaluate(tiny_digits_config(train__num_steps=2), tmp_path)
    latest = tmp_path / "checkpoints" / "2"
    overwrite_arrays(latest / "state", state.replace(params=with_first_weight_changed(state.params)))
    remedy = f"delete {latest} to resume from step 1"
    with pytest.raises(CheckpointCorruptError, match=r"step 2 .* is corrupt: 1 array\(s\) differ .*\(params/"):
        loop.train_and_evaluate(tiny_digits_config(train__num_steps=3), tmp_path)
    delete_array_files(latest / "state")
    with pytest.raises(CheckpointCorruptError, match="its files cannot be read") as refused:
        loop.train_and_evaluate(tiny_digits_config(train__num_steps=3), tmp_path)
    assert str(refused.value).endswith(remedy)
    (latest / "state" / "_METADATA").unlink()  # orbax's error then spells out the whole state tree
    with pytest.raises(CheckpointCorruptError, match="its files cannot be read") as refused:
        loop.train_and_evaluate(tiny_digits_config(train__num_steps=3), tmp_path)
    assert str(refused.value).endswith(remedy) and len(str(refused.value)) < 600
    (latest / "metadata" / "metadata").write_text('{"config": ')
    with pytest.raises(CheckpointCorruptError, match=r"its metadata cannot be read \(Expecting value") as refused:
        loop.train_and_evaluate(tiny_digits_config(train__num_steps=3), tmp_path)
    assert str(refused.value).endswith(remedy)
    shutil.rmtree(latest)
    assert int(loop.train_and_evaluate(tiny_digits_config(train__num_steps=3), tmp_path).step) == 3


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches(tmp_path):
    """A preempted process checkpoints and exits 0; the rerun ends like an uninterrupted run."""
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        [sys.executable, "-m", "dla_jax.main", f"--workdir={workdir}", *tiny_digits_cli(train__num_steps=10_000)],
        env=cpu_env(8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, (
            process.stderr.read() if process.poll() else "timeout"
        )
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    assert "SIGTERM" in process.stderr.read()
    stopped_at = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert stopped_at >= 2
    resumed = loop.train_and_evaluate(tiny_digits_config(train__num_steps=stopped_at + 2), workdir)
    straight = loop.train_and_evaluate(tiny_digits_config(train__num_steps=stopped_at + 2), tmp_path / "straight")
    for a, b in zip(leaves(straight), leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_one_device_and_eight_devices_agree(tmp_path):
    """BatchNorm sees the global batch, so the data-parallel run follows the one-device run."""
    eight = loop.train_and_evaluate(tiny_digits_config(), tmp_path / "eight")
    assert len(jax.devices()) == 8
    result = subprocess.run(
        [sys.executable, "-m", "dla_jax.main", f"--workdir={tmp_path / 'one'}", *tiny_digits_cli()],
        env=cpu_env(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from dla_jax.export import export_run

    export_run(tmp_path / "one", tmp_path / "one_export")
    from dla_jax.export_format import load_export

    one_variables, _, _ = load_export(tmp_path / "one_export")
    eight_variables = jax.device_get(eight.variables())
    # float32 sums over the global batch reduce in another order on 8 devices (the CPU conv
    # kernel gradient is a matmul whose batch sum XLA splits per device), and a conv feeding
    # a train-mode BN has a gradient of heavily cancelling terms: up to ~2e-4 after 4 steps
    # (stem conv). The losses below must still agree to 1e-4 relative.
    for a, b in zip(jax.tree.leaves(one_variables), jax.tree.leaves(eight_variables), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=5e-4)
    one_losses = [r["train_loss"] for r in read_metrics(tmp_path / "one") if "train_loss" in r]
    eight_losses = [r["train_loss"] for r in read_metrics(tmp_path / "eight") if "train_loss" in r]
    np.testing.assert_allclose(one_losses, eight_losses, rtol=1e-4)
