"""Keep freed memory in the process, so that a step does not fault its buffers in again.

XLA:CPU allocates each step's temporaries and outputs anew. glibc gives the runtime's
threads arenas of their own, which serve a block over 64 MiB by `mmap` and unmap it on
`free`, so the kernel zero-fills every page of it again on the next step: on the 2-core
CI machine a DLA-L-20 train step (batch 128) took 500k page faults and 1.2 s of system
time in 1.9 s. One arena that neither maps nor trims keeps those pages: the same step
then takes 1.3 s, with no faults. Entry points call `keep_freed_memory` before JAX
starts its runtime; `MALLOC_ARENA_MAX`, `MALLOC_MMAP_MAX_` or `MALLOC_TRIM_THRESHOLD_` in
the environment mean the user has chosen, and it leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
NEVER = -1  # as M_TRIM_THRESHOLD: never trim (mallopt(3))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tunable() -> bool:
    """glibc's malloc, and no malloc settings of the user's in the environment."""
    return GLIBC and not any(name in os.environ for name in USER_SETTINGS)


def keep_freed_memory() -> bool:
    """One malloc arena, no mmap, no trimming; True when applied (`tunable()`)."""
    if not tunable():
        return False
    libc = ctypes.CDLL(None)
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
