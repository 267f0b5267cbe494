"""Tests for dla_jax.parallel: mesh, FSDP rule, global batches, multi-process start-up."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dla_jax import parallel

from train_helpers import launch_local, run_launcher

REPO = Path(__file__).resolve().parents[1]


def mesh_config(data: int, fsdp: int) -> SimpleNamespace:
    return SimpleNamespace(data=data, fsdp=fsdp)


# --- create_mesh -------------------------------------------------------------


def test_create_mesh_fills_data_axis():
    mesh = parallel.create_mesh(mesh_config(-1, 1))
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_create_mesh_data_and_fsdp():
    mesh = parallel.create_mesh(mesh_config(4, 2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert mesh.size == jax.device_count()


@pytest.mark.parametrize(
    "data, fsdp, match",
    [
        (4, 4, r"4 \* 4 = 16.*8 devices"),
        (3, 1, r"3 \* 1 = 3.*8 devices"),
        (-1, 3, r"fsdp=3 does not divide the 8 devices"),
        (0, 1, r"config.mesh.data"),
        (8, 0, r"config.mesh.fsdp"),
    ],
)
def test_create_mesh_rejects_bad_shapes(data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        parallel.create_mesh(mesh_config(data, fsdp))


# --- state_shardings ---------------------------------------------------------


def abstract_state() -> dict:
    sds = jax.ShapeDtypeStruct
    return {
        "params": {
            "conv": {"kernel": sds((3, 3, 64, 128), jnp.float32), "bias": sds((128,), jnp.float32)},
            "dense": {"kernel": sds((1000, 30), jnp.float32)},
            "odd": {"kernel": sds((129, 255), jnp.float32)},
            "square": {"kernel": sds((256, 256), jnp.float32)},
            "small": {"kernel": sds((3, 3, 16, 16), jnp.float32)},
            "scanned": {"kernel": sds((18, 3, 3, 16, 16), jnp.float32)},  # blocks stacked by nn.scan
            "taps": {"kernel": sds((64, 3, 3, 63, 127), jnp.float32)},  # no feature dim divisible
        },
        "step": sds((), jnp.int32),
    }


def test_state_shardings_fsdp_splits_large_leaves():
    mesh = parallel.create_mesh(mesh_config(4, 2))
    abstract = abstract_state()
    shardings = parallel.state_shardings(mesh, abstract)
    params = shardings["params"]
    assert params["conv"]["kernel"].spec == P(None, None, None, "fsdp")
    assert params["dense"]["kernel"].spec == P("fsdp", None)
    assert params["square"]["kernel"].spec == P(None, "fsdp")  # ties go to the later dimension
    assert params["odd"]["kernel"].spec == P()  # nothing divisible by 2
    assert params["small"]["kernel"].spec == P()  # below FSDP_MIN_SIZE
    assert params["scanned"]["kernel"].spec == P(None, None, None, None, "fsdp")  # never the scan axis
    assert params["taps"]["kernel"].spec == P("fsdp", None, None, None, None)
    assert params["conv"]["bias"].spec == P()
    assert shardings["step"].spec == P()

    kernel = jax.device_put(jnp.ones((3, 3, 64, 128)), params["conv"]["kernel"])
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 64, 64)}
    bias = jax.device_put(jnp.ones((128,)), params["conv"]["bias"])
    assert {s.data.shape for s in bias.addressable_shards} == {(128,)}


def test_state_shardings_replicates_everything_without_fsdp():
    mesh = parallel.create_mesh(mesh_config(-1, 1))
    shardings = parallel.state_shardings(mesh, abstract_state())
    assert all(s.spec == P() for s in jax.tree.leaves(shardings))


def test_describe_shardings_lists_paths_shapes_specs():
    mesh = parallel.create_mesh(mesh_config(4, 2))
    abstract = abstract_state()
    table = parallel.describe_shardings(parallel.state_shardings(mesh, abstract), abstract)
    assert "params/conv/kernel" in table
    assert "(3, 3, 64, 128)" in table
    assert "P(None, None, None, 'fsdp')" in table
    assert table.splitlines()[-1] == "9 arrays: 5 sharded over fsdp, 4 replicated."
    without_shapes = parallel.describe_shardings(parallel.state_shardings(mesh, abstract))
    assert any(line.split()[:2] == ["params/conv/kernel", "?"] for line in without_shapes.splitlines())


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(128, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(10)(nn.relu(x).mean((1, 2)))


def test_unannotated_flax_model_jits_with_fsdp_shardings():
    """The pattern the train loop uses: init and apply jitted with our shardings, no model annotations."""
    mesh = parallel.create_mesh(mesh_config(4, 2))
    model = TinyNet()
    x = np.ones((16, 8, 8, 64), np.float32)
    init = lambda key: model.init(key, x, train=False)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(mesh, abstract)
    variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    assert variables["params"]["Conv_0"]["kernel"].sharding.spec == P(None, None, None, "fsdp")
    batch = parallel.global_batch({"image": x}, mesh)
    logits = jax.jit(
        lambda v, b: model.apply(v, b["image"], train=False),
        in_shardings=(shardings, {"image": parallel.batch_sharding(mesh)}),
        out_shardings=parallel.batch_sharding(mesh),
    )(variables, batch)
    assert logits.shape == (16, 10)
    np.testing.assert_allclose(logits, model.apply(jax.device_get(variables), x, train=False), rtol=1e-4, atol=1e-4)


# --- global_batch ------------------------------------------------------------


def test_global_batch_single_process():
    mesh = parallel.create_mesh(mesh_config(4, 2))
    images = np.arange(16 * 2, dtype=np.float32).reshape(16, 2)
    labels = np.arange(16, dtype=np.int32)
    batch = parallel.global_batch({"image": images, "label": labels}, mesh)
    assert batch["image"].shape == (16, 2)
    assert batch["image"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(batch["image"]), images)
    np.testing.assert_array_equal(np.asarray(batch["label"]), labels)


def test_global_batch_rejects_indivisible_batch():
    mesh = parallel.create_mesh(mesh_config(-1, 1))
    with pytest.raises(ValueError, match=r"12 rows.*multiple of 8"):
        parallel.global_batch({"image": np.zeros((12, 2), np.float32)}, mesh)


def test_is_main_process_single_process():
    assert parallel.is_main_process()


# --- initialize_distributed --------------------------------------------------


def test_initialize_distributed_is_a_no_op_on_one_machine(monkeypatch):
    for var in (
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "TPU_PROCESS_ADDRESSES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(var, raising=False)
    parallel.initialize_distributed()
    parallel.initialize_distributed("127.0.0.1:1234", 1, 0)
    assert not jax.distributed.is_initialized()


def test_cluster_detection(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    monkeypatch.delenv("TPU_PROCESS_ADDRESSES", raising=False)
    monkeypatch.delenv("MEGASCALE_COORDINATOR_ADDRESS", raising=False)
    assert parallel._cluster_environment() in (None, "Cloud TPU VM")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert parallel._cluster_environment() == "SLURM"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-0,host-1")
    assert parallel._cluster_environment() == "TPU pod"


def test_initialize_distributed_needs_all_flags_or_none():
    with pytest.raises(ValueError, match="--coordinator_address, --num_processes and --process_id"):
        parallel.initialize_distributed("127.0.0.1:1234", 2, None)


def run_alone(process_id: int, timeout_s: int) -> tuple[subprocess.CompletedProcess, float, str]:
    """Runs one process of a 2-process job whose partner never comes, with a hard timeout."""
    sys.path.insert(0, str(REPO / "scripts"))
    from launch_local import child_env, free_port

    address = f"127.0.0.1:{free_port()}"
    code = textwrap.dedent(f"""
        from dla_jax import parallel
        parallel.initialize_distributed({address!r}, 2, {process_id}, timeout_s={timeout_s})
    """)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env(1), cwd=REPO, capture_output=True, text=True, timeout=timeout_s + 60
    )
    return result, time.monotonic() - start, address


def test_unreachable_coordinator_fails_fast_with_clear_message():
    result, elapsed, address = run_alone(process_id=1, timeout_s=5)
    assert result.returncode != 0
    assert elapsed < 30
    assert f"could not reach the JAX coordinator at {address} within 5 s" in result.stderr
    assert "--coordinator_address, --num_processes and --process_id" in result.stderr


def test_coordinator_without_peers_aborts_after_timeout():
    result, elapsed, address = run_alone(process_id=0, timeout_s=5)
    assert result.returncode != 0
    assert elapsed < 30
    assert f"joining coordinator {address}" in result.stderr
    assert "DEADLINE_EXCEEDED" in result.stderr


# --- several processes -------------------------------------------------------


def test_two_processes_agree_on_a_global_sum():
    start = time.monotonic()
    result = run_launcher(
        launch_local(sys.executable, "tests/multiprocess_psum_worker.py", devices_per_process=4), cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = float(np.arange(16 * 3).sum())
    for process in range(2):
        assert (
            f"[p{process}] RESULT process={process} count=2 devices=8 shape=(16, 3) sum={expected} main={process == 0}"
        ) in result.stdout, result.stdout
    assert time.monotonic() - start < 60


def test_launcher_stops_everyone_when_one_process_fails():
    code = "import sys, time; i = int(sys.argv[-1].split('=')[1]); time.sleep(0 if i else 60); sys.exit(3)"
    start = time.monotonic()
    result = run_launcher(launch_local(sys.executable, "-c", code), cwd=REPO, timeout=60)
    assert result.returncode == 3
    assert "process 1 exited with 3" in result.stderr
    assert time.monotonic() - start < 30


def test_launcher_refuses_a_command_it_cannot_start_before_starting_any():
    for argv, message in [
        (launch_local("no_such_command_xyz"), "no_such_command_xyz: no such command"),
        (launch_local(sys.executable, "-c", "pass", num_processes=0), "must be at least 1"),
    ]:
        result = run_launcher(argv, cwd=REPO, timeout=60)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
