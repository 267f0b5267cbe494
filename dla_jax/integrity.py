"""Reading back checkpoints and exports: notice files damaged after they were written.

A checkpoint's bytes can change after it was written (a bad disk, a partial copy, a file
edited by hand). Orbax reads back what is there: a compressed chunk fails when it no
longer decompresses (`restore_or_explain` turns that into one line), an uncompressed
one returns wrong values. So what is saved carries fingerprints of its arrays
(`fingerprints`), compared after reading (`changed_arrays`). Each array's fingerprint is
a position-weighted sum of its bits as 32-bit words, computed under `jax.jit`:
integer sums wrap the same in any order, so the fingerprint is the same however the
array is sharded, on any number of hosts, and any changed word changes it.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as a flat uint32 vector (narrower types widened, 64-bit split in two)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size > 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


def _fingerprint(x: jax.Array) -> jax.Array:
    """Σ_i word_i · (2i + 1) mod 2³²: odd weights, so one changed word always changes it, and two
    changed words leave it unchanged with odds 2⁻³²."""
    words = _words(x)
    odd = jax.lax.iota(jnp.uint32, words.size) * np.uint32(2) + np.uint32(1)
    return jnp.sum(words * odd, dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_fingerprint, tree))


def path_name(path: tuple) -> str:
    """A pytree key path as 'params/stage_0/.../kernel' (dict keys, attribute names, sequence indices)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def fingerprints(tree: Any) -> dict[str, str]:
    """`{'params/stage_0/.../kernel': '1f3a09c2', ...}`: 8 hex digits per array of `tree`."""
    sums = jax.device_get(_fingerprints(tree))
    flat = jax.tree_util.tree_flatten_with_path(sums)[0]
    return {path_name(path): f"{int(value):08x}" for path, value in flat}


def changed_arrays(tree: Any, expected: dict[str, str]) -> list[str]:
    """The paths whose fingerprint differs from `expected` (or that `expected` lacks, or has in excess)."""
    found = fingerprints(tree)
    return sorted(name for name in set(found) | set(expected) if found.get(name) != expected.get(name))


def describe_changes(tree: Any, expected: dict[str, str] | None) -> str | None:
    """Which arrays differ from the fingerprints `expected`, for an error message; None if none do, or
    if `expected` is None (saved before fingerprints were recorded, so there is nothing to check)."""
    if expected is None:
        return None
    changed = changed_arrays(tree, expected)
    if not changed:
        return None
    shown = ", ".join(changed[:3]) + (", ..." if len(changed) > 3 else "")
    return f"{len(changed)} array(s) differ from the values saved ({shown})"


Restored = TypeVar("Restored")


class UnreadableError(OSError):
    """Orbax could not read saved arrays back; the message is the innermost error's first line."""


def restore_or_explain(restore: Callable[[], Restored]) -> Restored:
    """`restore()`, an orbax read, raising UnreadableError with tensorstore's reason if it fails.

    When one read fails, orbax abandons the others in flight; they report later, from
    tensorstore's threads or as they are collected (a page of tensorstore details per array,
    "Event loop is closed", or asyncio's "Task exception was never retrieved" when another
    read failed just as orbax's loop stopped). Those reports are silenced from before the
    read (they come from other threads at once) and, after a failure, for the rest of the
    process.
    """
    report_unraisable = sys.unraisablehook
    sys.unraisablehook = _without_abandoned_reads(report_unraisable)
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addFilter(_drop_abandoned_reads)
    try:
        restored = restore()
    except Exception as err:  # orbax and tensorstore raise many kinds for files they cannot decode
        raise UnreadableError(_root_cause(err)) from err
    sys.unraisablehook = report_unraisable
    asyncio_logger.removeFilter(_drop_abandoned_reads)
    return restored


ROOT_CAUSE_CHARS = 300  # orbax's errors can embed a whole tree of restore arguments in one line


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost error (tensorstore's, naming the array and the damage), cut short."""
    while (inner := err.__cause__ or (None if err.__suppress_context__ else err.__context__)) is not None:
        err = inner
    line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return line if len(line) <= ROOT_CAUSE_CHARS else line[:ROOT_CAUSE_CHARS] + " ..."


def _is_abandoned_read(text: str) -> bool:
    """Whether a report's text comes from one of orbax's array reads."""
    return "_read_array_index" in text


def _without_abandoned_reads(report_unraisable):
    def unraisable(report) -> None:
        closed_loop = isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed"
        if not closed_loop and not _is_abandoned_read(repr(report.object)):
            report_unraisable(report)

    return unraisable


def _drop_abandoned_reads(record: logging.LogRecord) -> bool:
    """A filter for asyncio's logger: False for its report of a read orbax abandoned."""
    error = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
    return not _is_abandoned_read(record.getMessage() + error)
