"""Keep freed memory in the process, so that a step does not fault its buffers in again.

XLA:CPU allocates each step's temporaries and outputs anew. glibc gives the runtime's
threads arenas of their own, which serve a block over 64 MiB by `mmap` and unmap it on
`free`, so the kernel zero-fills every page of it again on the next step: on the 2-core
CI machine a DLA-L-20 train step (batch 128) took 500k page faults and 1.2 s of system
time in 1.9 s. One arena that neither maps nor trims keeps those pages: the same step
then takes 1.3 s, with no faults. Entry points call `keep_freed_memory` before JAX
starts its runtime (afterwards the runtime's threads keep the arenas they have, and the
faults stay); `MALLOC_ARENA_MAX`, `MALLOC_MMAP_MAX_` or `MALLOC_TRIM_THRESHOLD_` in the
environment mean the user has chosen, and it leaves malloc alone.

Only when JAX will compute on the CPU: an accelerator's buffers are not malloc's, and one
arena makes the host threads that compile (and, on a GPU, autotune) share one lock. On
the 2-core CPU DLA-L-20 compiled in 32 s instead of 23 s; on a 16-core H100 host, tuned,
ResNet-50's bfloat16 train step took 112 s to compile, where an H200 had taken 13.5 s
before this tuning existed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

import jax

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
NEVER = -1  # as M_TRIM_THRESHOLD: never trim (mallopt(3))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def accelerator_plugins() -> list[str]:
    """The accelerator backends JAX would find (PJRT plugins for CUDA or ROCm, libtpu),
    without starting its runtime."""
    try:
        import jax_plugins
    except ImportError:
        found = []
    else:
        found = [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
    found += [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def computes_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU: `JAX_PLATFORMS` (or `jax_platforms`)
    names it first, or, unset, no accelerator backend is installed."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugins()


def tunable() -> bool:
    """glibc's malloc, JAX on the CPU, and no malloc settings of the user's in the environment."""
    return GLIBC and not any(name in os.environ for name in USER_SETTINGS) and computes_on_cpu()


def keep_freed_memory() -> bool:
    """One malloc arena, no mmap, no trimming; True when applied (`tunable()`)."""
    if not tunable():
        return False
    libc = ctypes.CDLL(None)
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
