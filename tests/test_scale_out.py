"""Scale-out: several processes, FSDP and resharding restores all follow one-process training.

Every run here is the tiny digits run of train_helpers (DLA-L-11 on 8x8 digits, global batch
32, 4 steps); the reference trains it in this process on 8 simulated devices, replicated.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from dla_jax import parallel
from dla_jax.export import export_run
from dla_jax.train import loop

from train_helpers import (
    cpu_env,
    enable_compilation_cache,
    launch_local,
    read_metrics,
    run_launcher,
    tiny_digits_cli,
    tiny_digits_config,
)

enable_compilation_cache()

REPO = Path(__file__).resolve().parents[1]
RTOL, ATOL = 2e-4, 2e-5  # float32 sums in another order (other shards, other all-reduce trees)


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.batch_stats, state.opt_state)))]


def assert_states_close(actual, expected):
    for a, b in zip(leaves(actual), leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def train_losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r}


def run_main(workdir, device_count: int, **overrides) -> subprocess.Popen:
    """`python -m dla_jax.main` on the tiny run in a fresh process with `device_count` CPU devices."""
    return subprocess.Popen(
        [sys.executable, "-m", "dla_jax.main", f"--workdir={workdir}", *tiny_digits_cli(**overrides)],
        env=cpu_env(device_count),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: int = 400) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 8 devices, parameters replicated: (final state, workdir)."""
    workdir = tmp_path_factory.mktemp("reference")
    return loop.train_and_evaluate(tiny_digits_config(), workdir), workdir


@pytest.mark.slow
def test_two_processes_match_one_process(reference, tmp_path):
    """2 processes x 4 devices (the local launcher) end with the parameters of 1 process x 8 devices."""
    reference_state, reference_dir = reference
    workdir = tmp_path / "two_processes"
    result = run_launcher(
        launch_local(
            sys.executable, "-m", "dla_jax.main", f"--workdir={workdir}", *tiny_digits_cli(), devices_per_process=4
        ),
        cwd=REPO,
        env=cpu_env(4),
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "[p0] mesh {'data': 8, 'fsdp': 1} over 8 cpu device(s), 2 process(es)" in result.stdout
    assert "[p1] mesh" not in result.stdout  # only process 0 reports

    # Only process 0 writes metrics: one record per step, one evaluation, one event file.
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    (evaluation,) = [r for r in records if "eval_top1" in r]
    assert evaluation["eval_examples"] == 360  # every test digit once across both processes
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]

    losses, reference_losses = train_losses(workdir), train_losses(reference_dir)
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], [reference_losses[s] for s in range(1, 5)], rtol=1e-4)
    (reference_eval,) = [r for r in read_metrics(reference_dir) if "eval_top1" in r]
    np.testing.assert_allclose(evaluation["eval_loss"], reference_eval["eval_loss"], rtol=1e-4)

    # The 2-process checkpoint, restored here onto one process's 8 devices (the run is complete,
    # so train_and_evaluate only restores it and returns).
    restored = loop.train_and_evaluate(tiny_digits_config(), workdir)
    assert int(restored.step) == 4
    assert_states_close(restored, reference_state)


@pytest.mark.slow
def test_two_processes_evaluate_an_export_like_one_process(reference, tmp_path):
    """`dla_jax.evaluate` under the local launcher (2 processes x 4 devices): each process reads
    its share of the eval split, and process 0 prints what the one-process run logged."""
    _, reference_dir = reference
    export = tmp_path / "export"
    export_run(reference_dir, export)
    command = [sys.executable, "-m", "dla_jax.evaluate", f"--checkpoint={export}", *tiny_digits_cli()]
    result = run_launcher(launch_local(*command, devices_per_process=4), cwd=REPO, env=cpu_env(4), timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    (line,) = [line for line in result.stdout.splitlines() if "eval_top1" in line]
    prefix, printed = line.split(" ", 1)
    assert prefix == "[p0]"
    metrics = json.loads(printed)
    (logged,) = [r for r in read_metrics(reference_dir) if "eval_top1" in r]
    assert metrics["eval_examples"] == 360 and metrics["eval_top1"] == logged["eval_top1"]
    np.testing.assert_allclose(metrics["eval_loss"], logged["eval_loss"], rtol=1e-5)


@pytest.mark.slow
def test_fsdp_shards_and_resumes_on_fewer_devices(reference, tmp_path):
    """Saved at step 3 with parameters split over fsdp=2 on 8 devices; step 4 on 8, 4 and 1 devices agrees.

    The 8-device continuation (still fsdp=2) must also end where the replicated run does.
    """
    reference_state, reference_dir = reference
    saved = tmp_path / "eight"
    state = loop.train_and_evaluate(tiny_digits_config(train__num_steps=3, mesh__fsdp=2), saved)

    # Parameters and their momenta are really split: large leaves over "fsdp", small ones replicated.
    params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    sharded = [(jax.tree_util.keystr(path), leaf) for path, leaf in params if leaf.size >= parallel.FSDP_MIN_SIZE]
    assert sharded, "no parameter is large enough to shard; the test model is too small"
    for name, leaf in sharded:
        assert "fsdp" in leaf.sharding.spec, (name, leaf.sharding.spec)
        axis = list(leaf.sharding.spec).index("fsdp")
        assert {s.data.shape[axis] for s in leaf.addressable_shards} == {leaf.shape[axis] // 2}, name
    assert all(
        leaf.sharding.spec == jax.sharding.PartitionSpec() for _, leaf in params if leaf.size < parallel.FSDP_MIN_SIZE
    )
    momenta = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.size >= parallel.FSDP_MIN_SIZE]
    assert momenta and all("fsdp" in leaf.sharding.spec for leaf in momenta)
    np.testing.assert_allclose(
        list(train_losses(saved).values()), [train_losses(reference_dir)[s] for s in (1, 2, 3)], rtol=1e-4
    )

    # Resume the same checkpoint on 4 and on 1 device(s) (replicated), in fresh processes...
    copies = {devices: tmp_path / f"on_{devices}" for devices in (4, 1)}
    for copy in copies.values():
        shutil.copytree(saved, copy)
    processes = {devices: run_main(copy, devices, train__num_steps=4) for devices, copy in copies.items()}
    # ...and on the 8 devices it was saved on, here.
    continued = loop.train_and_evaluate(tiny_digits_config(mesh__fsdp=2), saved)
    for devices, process in processes.items():
        output = finish(process)
        assert "resuming from step 3" in output, output[-2000:]
        assert f"over {devices} cpu device(s)" in output

    expected = train_losses(saved)[4]
    for devices, copy in copies.items():
        assert sorted(train_losses(copy)) == [1, 2, 3, 4]  # steps 1-3 copied, only step 4 new
        np.testing.assert_allclose(train_losses(copy)[4], expected, rtol=1e-4, err_msg=f"{devices} device(s)")
    np.testing.assert_allclose(expected, train_losses(reference_dir)[4], rtol=1e-4)

    assert int(continued.step) == 4
    assert_states_close(continued, reference_state)
