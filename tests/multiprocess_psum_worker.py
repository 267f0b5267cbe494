"""Helper run by test_parallel under scripts/launch_local.py: one process of a multi-process sum.

Each process contributes its own rows of a global batch; the jitted sum must
see all of them, which only happens if jax.distributed and the gloo CPU
collectives are wired up correctly.
"""

import argparse

import numpy as np

from dla_jax import parallel

GLOBAL_BATCH = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, timeout_s=60)

    import jax  # noqa: E402 - only after initialize, which must come before any JAX call

    mesh = parallel.create_mesh(argparse.Namespace(data=-1, fsdp=2))
    rows = np.arange(GLOBAL_BATCH * 3, dtype=np.float32).reshape(GLOBAL_BATCH, 3)
    local = GLOBAL_BATCH // jax.process_count()
    start = jax.process_index() * local
    batch = parallel.global_batch({"x": rows[start : start + local]}, mesh)
    total = jax.jit(lambda b: b["x"].sum(), out_shardings=parallel.replicated(mesh))(batch)
    print(
        f"RESULT process={jax.process_index()} count={jax.process_count()} devices={jax.device_count()} "
        f"shape={batch['x'].shape} sum={float(total)} main={parallel.is_main_process()}",
        flush=True,
    )


if __name__ == "__main__":
    main()
