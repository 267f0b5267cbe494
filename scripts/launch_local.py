"""Runs one command as N cooperating JAX processes on this machine (simulated CPU devices).

Rehearses a multi-host run without a cluster: each process gets D simulated CPU
devices and the flags --coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i appended to the command. Output is streamed with a [pI] prefix;
if one process fails the others are stopped, and the exit status is non-zero.

  python scripts/launch_local.py --num_processes 2 --devices_per_process 4 -- \
      python -m dla_jax.main --config configs/cifar10.py --workdir /tmp/run
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A port the OS just considered free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(devices_per_process: int) -> dict[str, str]:
    """This environment with CPU-only JAX and D simulated devices (replacing any earlier count)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stream(index: int, proc: subprocess.Popen) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"[p{index}] {line}")
        sys.stdout.flush()


def _stop(proc: subprocess.Popen) -> None:
    """Stops a child and anything it started (it leads its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (e.g. from `timeout` or a scheduler) stops the children like Ctrl-C does."""
    raise KeyboardInterrupt


def launch(command: list[str], num_processes: int, devices_per_process: int) -> int:
    """Starts the processes, waits for all, returns 0 or the first failure's exit status."""
    signal.signal(signal.SIGTERM, _interrupt)
    address = f"127.0.0.1:{free_port()}"
    env = child_env(devices_per_process)
    procs = [
        subprocess.Popen(
            [*command, f"--coordinator_address={address}", f"--num_processes={num_processes}", f"--process_id={i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for i in range(num_processes)
    ]
    streams = [threading.Thread(target=_stream, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for thread in streams:
        thread.start()
    status = 0
    try:
        while None in (codes := [p.poll() for p in procs]):  # a list, so every process is polled
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index, status = failed[0]
                print(
                    f"[launch_local] process {index} exited with {status}; stopping the others.",
                    file=sys.stderr,
                    flush=True,
                )
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        status = 130
    for proc in procs:
        _stop(proc)
    for thread in streams:
        thread.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status if status >= 0 else 128 - status  # killed by signal S -> 128 + S, as shells do


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command each process runs")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be at least 1")
    if shutil.which(command[0]) is None:
        parser.error(f"{command[0]}: no such command")
    sys.exit(launch(command, args.num_processes, args.devices_per_process))


if __name__ == "__main__":
    main()
