"""glibc malloc tuning: a big buffer freed and allocated again is not faulted in again."""

import os
import subprocess
import sys

import pytest

from dla_jax import host_memory

# Mallocs, fills and frees a 96 MiB buffer 6 times on a thread (as XLA's runtime threads
# do) and prints the page faults of the last 5.
FAULTS_OF_REALLOCATION = """
import ctypes, resource, sys, threading
from dla_jax import host_memory
if sys.argv[1] == "tuned":
    assert host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 96 * 2**20
faults = []
def allocate_six_times():
    for i in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = libc.malloc(size)
        ctypes.memset(buffer, 1, size)
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=allocate_six_times)
thread.start()
thread.join()
print(sum(faults[1:]))
"""


def output_of_fresh_process(code: str, *args: str, drop: tuple[str, ...] = (), **env_changes: str) -> str:
    """stdout of `python -c code args`, without the user's malloc settings (and `drop`)."""
    env = {k: v for k, v in os.environ.items() if k not in host_memory.USER_SETTINGS + drop}
    env.update(env_changes)
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def faults_of_reallocation(mode: str) -> int:
    return int(output_of_fresh_process(FAULTS_OF_REALLOCATION, mode))


@pytest.mark.skipif(not host_memory.GLIBC, reason="tunes glibc's malloc only")
def test_tuned_malloc_keeps_freed_buffers_resident():
    untuned, tuned = faults_of_reallocation("default"), faults_of_reallocation("tuned")
    # 5 x 96 MiB is 120k faults of 4 KiB pages when each buffer is mapped anew (fewer with huge pages).
    assert untuned > 200
    assert tuned < untuned / 100


def test_user_malloc_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert host_memory.keep_freed_memory() is False


def tunable_in_a_fresh_process(env_changes: dict[str, str]) -> str:
    code = "from dla_jax import host_memory; print(host_memory.tunable(), host_memory.accelerator_plugins())"
    return output_of_fresh_process(code, drop=("JAX_PLATFORMS",), **env_changes)


@pytest.mark.skipif(not host_memory.GLIBC, reason="tunes glibc's malloc only")
def test_malloc_is_tuned_only_when_jax_computes_on_the_cpu(tmp_path):
    # An accelerator's buffers are not malloc's, and one arena slows its compiler's threads.
    assert tunable_in_a_fresh_process({"JAX_PLATFORMS": "cpu"}).startswith("True")
    assert tunable_in_a_fresh_process({"JAX_PLATFORMS": "cuda,cpu"}).startswith("False")
    plugin = tmp_path / "jax_plugins" / "fake_cuda_plugin"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("")
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    assert tunable_in_a_fresh_process({"PYTHONPATH": pythonpath}) == "False ['fake_cuda_plugin']"
    assert tunable_in_a_fresh_process({"PYTHONPATH": pythonpath, "JAX_PLATFORMS": "cpu"}).startswith("True")
