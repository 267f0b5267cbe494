"""Multi-process start-up, the device mesh and the sharding rules, in one place.

Everything that knows about devices lives here so that models, data and the
train step stay device-agnostic: the loop asks this module for a mesh, for the
shardings of its state and batch, and jits with them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")

# Leaves smaller than this (elements) stay replicated under FSDP: biases, norm
# scales and small convs (<= 64 KiB in float32) save little memory when split,
# while every split leaf costs an all-gather per step.
FSDP_MIN_SIZE = 2**14

_FLAGS_HINT = "--coordinator_address, --num_processes and --process_id"


def _cluster_environment() -> str | None:
    """Names the multi-process launcher jax can auto-configure from, if we run under one.

    A plain single-machine run returns None, so that `initialize_distributed`
    does nothing there (jax would otherwise fail looking for a cluster).
    """
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len(tpu_hosts.split(",")) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "TPU pod"
    # A Cloud TPU VM gets its worker list from the metadata server, not from env vars.
    if importlib.util.find_spec("libtpu") and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "Cloud TPU VM"
    return None


def _wait_for_coordinator(coordinator_address: str, process_id: int, timeout_s: int) -> None:
    """Fails with a readable error if the coordinator's port never opens.

    jax's own client aborts the whole interpreter (SIGABRT, no Python
    exception) when it cannot register, so check reachability first, retrying
    because process 0 may start later than the others.
    """
    host, _, port = coordinator_address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Process {process_id} could not reach the JAX coordinator at "
                    f"{coordinator_address} within {timeout_s} s ({err}). Check that process 0 "
                    f"is running and that {_FLAGS_HINT} are the same on every process "
                    "(the address must be process 0's host and a free port reachable from here)."
                ) from err
            time.sleep(0.5)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """Joins the processes of a multi-host run; call it before any other JAX call.

    With explicit arguments they are used; otherwise jax's own cluster
    detection (TPU pod, SLURM, Open MPI) fills them in when such an
    environment is present; on a single machine this does nothing. Start-up
    is bounded by `timeout_s`: an unreachable coordinator raises RuntimeError,
    and a coordinator whose peers never arrive aborts after the timeout.
    """
    if jax.distributed.is_initialized():
        return
    explicit = (coordinator_address, num_processes, process_id)
    if all(arg is None for arg in explicit):
        environment = _cluster_environment()
        if environment is None:
            return
        print(
            f"[dla_jax] {environment} detected; initialising jax.distributed (timeout {timeout_s} s; "
            "an abort with DEADLINE_EXCEEDED means some process of the job did not start).",
            file=sys.stderr,
            flush=True,
        )
        try:
            jax.distributed.initialize(initialization_timeout=timeout_s)
        except ValueError as err:  # e.g. python started inside an allocation without srun/mpirun
            raise RuntimeError(
                f"{environment} detected but jax could not configure the processes ({err}). Start one "
                f"process per task with the launcher (srun, mpirun, gcloud ... --worker=all), or pass {_FLAGS_HINT}."
            ) from err
        return
    if any(arg is None for arg in explicit):
        raise ValueError(
            f"Give all of {_FLAGS_HINT} or none of them; got coordinator_address="
            f"{coordinator_address!r}, num_processes={num_processes!r}, process_id={process_id!r}."
        )
    if num_processes == 1:
        return
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id must be in [0, {num_processes}); got {process_id}.")
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, process_id, timeout_s)
    # Printed first because a failure inside jax kills the process with a C++ abort.
    print(
        f"[dla_jax] process {process_id}/{num_processes} joining coordinator {coordinator_address} "
        f"(timeout {timeout_s} s; if this aborts with DEADLINE_EXCEEDED, a process did not "
        f"start or {_FLAGS_HINT} disagree between processes).",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, summaries and exports."""
    return jax.process_index() == 0


def wait_for_all_processes(name: str, *, timeout_s: int = 1800) -> None:
    """Blocks until every process reaches the barrier `name`; a no-op in a single process.

    A coordination-service barrier (no device collective). The loop calls it once every
    process has compiled its steps: CPU (gloo) collectives give up when a peer reaches the
    first all-reduce more than 30 s later, e.g. because it was still compiling.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client jax.distributed.initialize made

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def create_mesh(mesh_config: Any) -> Mesh:
    """A ("data", "fsdp") mesh over all devices; `mesh_config.data == -1` fills the rest."""
    num_devices = jax.device_count()
    data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
    if fsdp < 1 or data == 0 or data < -1:
        raise ValueError(
            f"config.mesh.fsdp must be >= 1 and config.mesh.data >= 1 or -1; got data={data}, fsdp={fsdp}."
        )
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(
                f"config.mesh.fsdp={fsdp} does not divide the {num_devices} devices, "
                "so config.mesh.data=-1 cannot fill the rest."
            )
        data = num_devices // fsdp
    if data * fsdp != num_devices:
        raise ValueError(
            f"config.mesh.data * config.mesh.fsdp = {data} * {fsdp} = {data * fsdp}, "
            f"but there are {num_devices} devices; set config.mesh.data=-1 to use them all."
        )
    # Auto, not Explicit: the Flax models don't annotate shardings, and under Explicit a conv of a
    # batch-sharded input with an fsdp-sharded kernel raises ShardingTypeError (needs out_sharding);
    # Auto lets the compiler propagate from jit's in/out_shardings.
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(auto, auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device; FSDP devices also split data."""
    return NamedSharding(mesh, P(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device."""
    return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Splits the largest dimension divisible by `fsdp` (ties: the later one) over "fsdp".

    The trailing two (feature: in, out) dimensions are preferred: leading ones are
    the scanned-blocks stack or conv taps, and splitting the scan stack would make
    the compiler gather the whole stack instead of one block's weights per step.
    """
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    features = [(size, axis) for size, axis in candidates if axis >= len(shape) - 2]
    _, axis = max(features or candidates)
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def state_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    """The FSDP rule for a state pytree (params, batch_stats, optimizer state, step).

    Leaves with at least FSDP_MIN_SIZE elements get their largest feature (else
    any) dimension divisible by mesh.shape["fsdp"] split over "fsdp"; everything else (and
    everything when fsdp == 1) is replicated. Optimizer moments mirror their
    params, so they get the same layout.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, _fsdp_spec(tuple(getattr(leaf, "shape", ())), fsdp)),
        abstract_tree,
    )


def describe_shardings(shardings: Any, abstract_tree: Any = None) -> str:
    """A table (path, shape, spec) of a sharding tree, printed at training start.

    `abstract_tree` (same structure, leaves with `.shape`) supplies the shape
    column; without it the column shows "?".
    """
    paths_and_shardings = jax.tree_util.tree_flatten_with_path(shardings)[0]
    shapes = (
        [tuple(leaf.shape) for leaf in jax.tree.leaves(abstract_tree)]
        if abstract_tree is not None
        else ["?"] * len(paths_and_shardings)
    )
    rows = [
        (jax.tree_util.keystr(path, simple=True, separator="/"), str(shape), str(sharding.spec))
        for (path, sharding), shape in zip(paths_and_shardings, shapes, strict=True)
    ]
    header = ("path", "shape", "spec")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    sharded = sum(spec != str(P()) for _, _, spec in rows)
    lines.append(f"{len(rows)} arrays: {sharded} sharded over fsdp, {len(rows) - sharded} replicated.")
    return "\n".join(lines)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Stitches every process's slice of the batch into global arrays split over the mesh.

    Each process passes only its own rows (local_B = global_B / process_count);
    no data crosses hosts.
    """
    sharding = batch_sharding(mesh)
    local_devices = mesh.size // jax.process_count()
    out = {}
    for name, array in local_batch.items():
        if array.shape[0] % local_devices:
            raise ValueError(
                f"Batch field {name!r} has {array.shape[0]} rows on this process, not divisible by its "
                f"{local_devices} devices; make the global batch size a multiple of {mesh.size}."
            )
        out[name] = jax.make_array_from_process_local_data(sharding, array)
    return out
