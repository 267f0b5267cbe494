"""Hand-written CPU kernels for the layer attention, compiled on first use, called through XLA's FFI.

XLA:CPU runs the light branch (`layer_attention.light_sum`: two depthwise 3x3 convs and
their gradients) as many memory-bound passes over [B, H, W, C] (padded copies, shifted
products, tap sums, per-image sums), and its BatchNorm as more passes over z.
`light_sum_kernels.cc` does each direction in one pass per image, while the image sits in
cache, the BatchNorm's included (see docs/performance.md, rounds 6, 9 and 10); and the
backward pass of DLA-B's cache read in one sweep per filled slot (round 11). It is
compiled with the system's C++ compiler against the running jaxlib's FFI headers, once
per source, jaxlib and compiler, into a cache directory (`$DLA_JAX_CACHE`, default
`~/.cache/dla_jax`). Without a compiler the models use XLA's own ops (the same results,
slower) and warn once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.sharding import PartitionSpec as P

SOURCE = pathlib.Path(__file__).with_name("light_sum_kernels.cc")
VECTOR_BYTES = 64
_SUFFIXES = {jnp.dtype(jnp.float32): "F32", jnp.dtype(jnp.float64): "F64"}
_HANDLERS = ("LightSumForward", "LightSumGradientSums", "LightSumBackward", "CacheReadBackward")


def _target(handler: str, dtype: Any) -> str:
    return f"dla_jax_{handler}{_SUFFIXES[jnp.dtype(dtype)]}"


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("DLA_JAX_CACHE", pathlib.Path.home() / ".cache" / "dla_jax"))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _compile(compiler: str) -> pathlib.Path:
    """The shared library for this source, jaxlib and compiler; built (and renamed into place) if not cached."""
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, compiler, *flags]).encode())
    library = _cache_dir() / f"{SOURCE.stem}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = pathlib.Path(scratch) / library.name
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, library)
    return library


@functools.cache
def available() -> bool:
    """Whether the kernels are registered with XLA (compiling them the first time); warns once if not."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
        library = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
    except (OSError, RuntimeError) as error:
        warnings.warn(
            f"dla_jax's CPU kernels are not available, so the layer attention runs as XLA's own ops "
            f"(the same results, slower): {error}",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    for handler in _HANDLERS:
        for dtype in _SUFFIXES:
            target = _target(handler, dtype)
            symbol = getattr(library, target.removeprefix("dla_jax_"))
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return True


def supports(dtype: Any, channels: int) -> bool:
    """Whether the kernels take this element type and channel count (whole SIMD vectors) and are built."""
    dtype = jnp.dtype(dtype)
    return dtype in _SUFFIXES and channels % (VECTOR_BYTES // dtype.itemsize) == 0 and available()


def in_use(dtype: Any, channels: int) -> bool:
    """Whether `on_cpu` takes the kernels for inputs of this dtype and width (decided at trace time)."""
    return jax.default_backend() == "cpu" and supports(dtype, channels)


def on_cpu(by_kernel: Callable, by_xla: Callable, *inputs: Any, **options: Any) -> Any:
    """by_kernel(*inputs, **options) on the CPU where the kernels take the first input's dtype and
    width, else by_xla(*inputs, **options); `options` are static (not traced).

    Decided at trace time: the default backend must be the CPU and the kernels built (`in_use`);
    then `platform_dependent` still lowers by_xla for any other platform.
    """
    by_kernel, by_xla = (functools.partial(branch, **options) for branch in (by_kernel, by_xla))
    first = inputs[0]
    if not in_use(first.dtype, first.shape[-1]):
        return by_xla(*inputs)
    return jax.lax.platform_dependent(*inputs, cpu=by_kernel, default=by_xla)


def over_batch_shards(
    function: Callable,
    batched: Sequence[jax.Array],
    shared: Sequence[jax.Array],
    batch_axes: Sequence[int] | None = None,
    result_batch_axes: int | Sequence[int] = 0,
) -> Any:
    """function(*batched, *shared), the batched inputs and all outputs split over the ambient mesh.

    The kernels treat every image alone, so each device runs its own images; without this
    XLA's partitioner would gather the whole batch onto every device for the custom call.
    The batch is axis 0 of every batched input and result unless `batch_axes` (one per
    batched input) and `result_batch_axes` say otherwise. Without a mesh (`jax.set_mesh`),
    or with a batch the mesh does not divide, a plain call.
    """
    batch_axes = batch_axes or (0,) * len(batched)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batched[0].shape[batch_axes[0]] % mesh.size:
        return function(*batched, *shared)

    def split(axis: int) -> P:
        return P(*(None,) * axis, mesh.axis_names)

    in_specs = tuple(split(axis) for axis in batch_axes) + (P(),) * len(shared)
    out_specs = split(result_batch_axes) if isinstance(result_batch_axes, int) else tuple(map(split, result_batch_axes))
    return jax.shard_map(function, in_specs=in_specs, out_specs=out_specs)(*batched, *shared)


def _require_support(dtype: Any, channels: int) -> None:
    if not supports(dtype, channels):
        raise ValueError(f"the CPU kernels do not take {dtype} [..., {channels}] inputs (see `on_cpu`)")


def _kernel_call(
    handler: str, batched: Sequence[jax.Array], shared: Sequence[jax.Array], results, *, as_rows: bool, **attributes
):
    """`handler` on the per-image operands (split over the mesh), then the shared ones, in the images' dtype.

    `results(images)` gives the output shapes for a share of `images` images. The images go
    to the kernel as [B·H·W, C] rows of pixels where `as_rows` (the backward passes), else in
    their own [B, H, W, C] shape (the forward pass), each where XLA hands the kernel a copy it
    makes anyway:
    * backward, a scanned block's saved input comes out of the scan's stack as one copy for
      the kernel and the 1x1 conv whose weight gradient reads it as rows, instead of two
      (DLA-L-56: one 33 MB copy less per block at stage 0);
    * forward, the block output the kernel reads is the one XLA computes for its pooling,
      instead of being computed again as rows (DLA-L-56: one pass over 3 tensors less per
      block; XLA computes it inside each consumer's fusion, and the bitcast to rows makes
      the kernel's fusion differ from the pooling's).
    """
    dtype = batched[0].dtype
    _require_support(dtype, batched[0].shape[-1])

    def call(*operands):
        shapes = results(operands[0].shape[0])
        layout = _as_rows if as_rows else tuple
        kernel = jax.ffi.ffi_call(
            _target(handler, dtype),
            [jax.ShapeDtypeStruct(layout(shape), dtype) for shape in shapes],
            vmap_method="sequential",
        )
        width = np.int64(operands[0].shape[2])
        outputs = kernel(*(x.reshape(layout(x.shape)) for x in operands), width=width, **attributes)
        return [output.reshape(shape) for output, shape in zip(outputs, shapes, strict=True)]

    batched = [operand.astype(dtype) for operand in batched]
    return over_batch_shards(call, batched, [operand.astype(dtype) for operand in shared])


def _as_rows(shape: Sequence[int]) -> tuple[int, ...]:
    """[B, H, W, C] images as [B·H·W, C] rows of pixels; other shapes as they are."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) == 4 else tuple(shape)


def _taps(kernel: jax.Array) -> jax.Array:
    """A [3, 3, 1, C] depthwise kernel as [9, C] rows, tap t = 3i + j."""
    return kernel.reshape(9, kernel.shape[-1])


def light_sum_forward(out, shortcut, heads, gate, value_kernel, excite_kernel, lam, *, refresh: bool, statistics: bool):
    """z = dwconv(out, value_kernel)·heads + λ·previous, previous = shortcut·gate + dwconv(shortcut,
    excite_kernel) (refresh) or the shortcut; heads and gate are [B, C]. Returns z and each image's
    mean of z and Σ_hw (z - mean)², [B, C] (for the BatchNorm's batch statistics; zeros unless
    `statistics`)."""
    shape, channels = out.shape[1:], out.shape[-1]

    def results(images):
        return [(images, *shape)] + [(images, channels)] * 2

    batched, shared = (out, shortcut, heads, gate), (_taps(value_kernel), _taps(excite_kernel), lam)
    return _kernel_call(
        "LightSumForward", batched, shared, results, as_rows=False, refresh=refresh, statistics=statistics
    )


def light_sum_gradient_sums(out, shortcut, dy, heads, gate, value_kernel, excite_kernel, lam, z_mean, *, refresh: bool):
    """Each image's Σ_hw dy and Σ_hw dy·(z - z_mean) [B, C], z = `light_sum_forward`'s, recomputed:
    the sums a BatchNorm of z needs for its backward pass, without z saved."""
    channels = out.shape[-1]

    def results(images):
        return [(images, channels)] * 2

    batched, shared = (out, shortcut, dy, heads, gate), (_taps(value_kernel), _taps(excite_kernel), lam, z_mean)
    return _kernel_call("LightSumGradientSums", batched, shared, results, as_rows=True, refresh=refresh)


def light_sum_backward(
    out,
    shortcut,
    dy,
    heads,
    gate,
    value_kernel,
    excite_kernel,
    lam,
    dy_scale,
    offset,
    z_scale,
    z_mean,
    *,
    refresh: bool,
    batch_norm: bool,
    shortcut_gradient: bool = True,
):
    """The backward pass of `light_sum_forward` per image, for dz = dy_scale·dy + z_scale·(z - z_mean)
    + offset (all [C]: a BatchNorm's backward pass, z recomputed in the kernel)
    where `batch_norm`, else for dz = dy_scale·dy + offset: d_out, d_shortcut [B, H, W, C] (empty,
    [B, 0, W, C], unless `shortcut_gradient`), value_taps, excite_taps [B, 9, C] (the kernels'
    gradients, before λ for the excite kernel), Σ_hw shortcut·dz and d_heads [B, C]."""
    shape, channels = out.shape[1:], out.shape[-1]

    def results(images):
        d_shortcut = (images, *shape) if shortcut_gradient else (images, 0, *shape[1:])
        return [(images, *shape), d_shortcut] + [(images, 9, channels)] * 2 + [(images, channels)] * 2

    batched = (out, shortcut, dy, heads, gate)
    shared = (_taps(value_kernel), _taps(excite_kernel), lam, dy_scale, offset, z_scale, z_mean)
    return _kernel_call(
        "LightSumBackward", batched, shared, results, as_rows=True, refresh=refresh, batch_norm=batch_norm
    )


def cache_read_backward(weights, values, d_out, d_values, filled):
    """The backward pass of DLA-B's cache read Σ_{t < filled} weights[t] ⊙ values[t], per image:
    (d_weights [T, B, C], zero past `filled`; d_values [T, B, H, W, C] with weights[t] ⊙ d_out
    added to its first `filled` slots, in place). `filled` is a traced int32 count."""
    dtype, channels = values.dtype, values.shape[-1]
    _require_support(dtype, channels)

    def call(weights, values, d_out, d_values, filled):
        kernel = jax.ffi.ffi_call(
            _target("CacheReadBackward", dtype),
            [jax.ShapeDtypeStruct(weights.shape, dtype), jax.ShapeDtypeStruct(d_values.shape, dtype)],
            vmap_method="sequential",
            input_output_aliases={3: 1},
        )
        return tuple(kernel(weights, values, d_out, d_values, filled))

    batched = [x.astype(dtype) for x in (weights, values, d_out, d_values)]
    return over_batch_shards(
        call, batched, [jnp.asarray(filled, jnp.int32)], batch_axes=(1, 1, 0, 1), result_batch_axes=(1, 1)
    )
