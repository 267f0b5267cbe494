"""Layer attention: the query/key/value projections and the two ways of combining them.

Light (MRLA-light, DLA-L) gates the current block's value with a per-head sigmoid of
q·k and adds λ times the previous output (`light_sum`); softmax (DLA-B) attends over
the values of every earlier block of the stage. Heads are contiguous groups of 32 channels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dla_jax.models import cpu_kernels
from dla_jax.models.layers import (
    at_least_float32,
    batch_norm_backward_coefficients,
    batch_statistics,
    depthwise_conv3x3_gradients,
    depthwise_kernel_gradient,
    depthwise_kernel_init,
    global_avg_pool,
    normalize,
    plain_depthwise_conv3x3,
    plain_depthwise_convs3x3,
    torch_default_uniform,
)

HEAD_DIM = 32


def attention_kernel_size(channels: int) -> int:
    """ECA-style adaptive kernel of the channel conv1d: odd, from log2(C)."""
    t = int((math.log2(channels) + 1) / 2)
    return t if t % 2 else t + 1


def _channel_conv1d_by_band(y: jax.Array, kernel: jax.Array) -> jax.Array:
    size = kernel.shape[0]
    pad = (size - 1) // 2
    channels = y.shape[-1]
    band = sum(kernel[i] * jnp.eye(channels, k=pad - i, dtype=kernel.dtype) for i in range(size))
    return jnp.dot(y, band.astype(y.dtype), precision=jax.lax.Precision.HIGHEST)


def _channel_conv1d_by_shifts(y: jax.Array, kernel: jax.Array) -> jax.Array:
    pad = (kernel.shape[0] - 1) // 2
    padded = jnp.pad(y, ((0, 0), (pad, pad)))
    return sum(kernel[i].astype(y.dtype) * padded[:, i : i + y.shape[-1]] for i in range(kernel.shape[0]))


def channel_conv1d(y: jax.Array, kernel: jax.Array) -> jax.Array:
    """torch's Conv1d(1, 1, k, padding=(k-1)/2) run along the channel axis of [B, C].

    On the CPU a product with the banded [C, C] matrix of the kernel, in full precision:
    its gradient is then a matrix product too, which XLA computes once; written as
    shifted adds, XLA:CPU fused the gradient's pads and slices into the full-size loop
    that spreads it over [H, W] and redid them at every pixel (DLA-L-20: that fusion in
    stage 0 took 25 ms instead of ~6). Elsewhere k shifted adds, which XLA:GPU fuses: on an
    H200 DLA-L-50's projections and pooling then take 0.44 ms of GPU time per step, and
    its train step compiles in 51-53 s instead of 77 (fewer matmuls to autotune).
    """
    return jax.lax.platform_dependent(y, kernel, cpu=_channel_conv1d_by_band, default=_channel_conv1d_by_shifts)


def head_scores(query: jax.Array, key: jax.Array) -> jax.Array:
    """Scaled per-head dot products: [..., C] x [..., C] -> [..., C / 32]."""
    product = query * key
    product = product.reshape(product.shape[:-1] + (-1, HEAD_DIM))
    return jnp.sum(product, axis=-1) / math.sqrt(HEAD_DIM)


def expand_heads(weights: jax.Array) -> jax.Array:
    """Per-head weights [..., G] -> per-channel [..., G * 32]."""
    return jnp.repeat(weights, HEAD_DIM, axis=-1)


class Projections(nn.Module):
    """q and k from the pooled input by channel conv1d, and the kernel of the value's depthwise 3x3 conv.

    Returns q, k as float32 [B, C] and the [3, 3, 1, C] value kernel, which the caller
    applies: DLA-B caches the value, the light families fuse it into `light_sum`.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        channels = x.shape[-1]
        size = attention_kernel_size(channels)
        query_kernel = self.param("query", torch_default_uniform(size), (size,), jnp.float32)
        key_kernel = self.param("key", torch_default_uniform(size), (size,), jnp.float32)
        value_kernel = self.param("value", depthwise_kernel_init, (3, 3, 1, channels), jnp.float32)
        pooled = global_avg_pool(x)
        return channel_conv1d(pooled, query_kernel), channel_conv1d(pooled, key_kernel), value_kernel


def light_gates(query: jax.Array, key: jax.Array) -> jax.Array:
    """MRLA-light's per-head gates sigmoid(q·k / sqrt(32)), [B, C / 32]."""
    return nn.sigmoid(head_scores(query, key))


def _per_sample(vector: jax.Array, dtype) -> jax.Array:
    return vector[:, None, None, :].astype(dtype)


def _gate_and_excite_kernel(heads, value_kernel, refresh):
    """DLA-L's refresh (gate, excite_kernel); for MRLA-light same-shaped stand-ins that are never read,
    so that both families call the same two-direction code (and CPU kernel signatures)."""
    return (heads, value_kernel) if refresh is None else refresh


def _light_sum_by_xla(out, shortcut, value_kernel, heads, lam, gate, excite_kernel, *, refresh):
    previous = shortcut
    if refresh:
        previous = shortcut * _per_sample(gate, shortcut.dtype) + plain_depthwise_conv3x3(shortcut, excite_kernel)
    value = plain_depthwise_conv3x3(out, value_kernel)
    return value * _per_sample(heads, out.dtype) + lam.astype(out.dtype) * previous


def _light_sum_by_kernel(out, shortcut, value_kernel, heads, lam, gate, excite_kernel, *, refresh, statistics):
    """(z, each image's mean of z, each image's Σ_hw (z - mean)²; zeros unless `statistics`)."""
    return cpu_kernels.light_sum_forward(
        out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh=refresh, statistics=statistics
    )


def _light_sum_with_statistics_by_kernel(*inputs, refresh):
    """z and its batch mean and biased variance, combined from the kernel's per-image ones (Chan et al.)."""
    z, image_mean, image_m2 = _light_sum_by_kernel(*inputs, refresh=refresh, statistics=True)
    accumulate = at_least_float32(z.dtype)
    image_mean, image_m2 = image_mean.astype(accumulate), image_m2.astype(accumulate)
    mean = jnp.mean(image_mean, axis=0)
    spread = jnp.sum(image_m2, axis=0) + z.shape[1] * z.shape[2] * jnp.sum(jnp.square(image_mean - mean), axis=0)
    return z, mean, spread / math.prod(z.shape[:-1])


def _light_sum_with_statistics_by_xla(*inputs, refresh):
    z = _light_sum_by_xla(*inputs, refresh=refresh)
    return z, *batch_statistics(z)[1:]


def _light_sum_with_statistics(out, shortcut, value_kernel, heads, lam, refresh):
    """(z, its batch mean, its biased batch variance), z = the light branch's sum."""
    gate, excite_kernel = _gate_and_excite_kernel(heads, value_kernel, refresh)
    inputs = (out, shortcut, value_kernel, heads, lam, gate, excite_kernel)
    return cpu_kernels.on_cpu(
        _light_sum_with_statistics_by_kernel, _light_sum_with_statistics_by_xla, *inputs, refresh=refresh is not None
    )


def _light_sum(out, shortcut, value_kernel, heads, lam, refresh):
    gate, excite_kernel = _gate_and_excite_kernel(heads, value_kernel, refresh)
    inputs = (out, shortcut, value_kernel, heads, lam, gate, excite_kernel)
    return cpu_kernels.on_cpu(_light_sum_z_by_kernel, _light_sum_by_xla, *inputs, refresh=refresh is not None)


def _light_sum_z_by_kernel(*inputs, refresh):
    return _light_sum_by_kernel(*inputs, refresh=refresh, statistics=False)[0]


@jax.custom_vjp
def light_sum(
    out: jax.Array,
    shortcut: jax.Array,
    value_kernel: jax.Array,
    heads: jax.Array,
    lam: jax.Array,
    refresh: tuple[jax.Array, jax.Array] | None,
) -> jax.Array:
    """The light families' attention_bn input: dwconv(out) · heads + λ · previous.

    previous is the shortcut (MRLA-light, `refresh=None`) or, for DLA-L with
    `refresh=(gate, excite_kernel)`, shortcut · gate + dwconv(shortcut, excite_kernel).
    `heads` are the per-channel gates [B, C], `gate` the DSU's [B, C], λ is [C].
    In training the models call `light_sum_batch_norm`, its fusion with the BatchNorm.

    The hand-written VJP saves nothing but its inputs. λ's gradient comes from the sums it
    needs anyway (Σ shortcut·dz per sample and the excite conv's kernel gradient), so
    neither `previous` nor the excite conv's output is kept or recomputed; nor is the
    value: the heads' gradient Σ_hw value·dz equals Σ_hw out·conv(dz, flipped kernel), the
    conv that out's gradient needs anyway (the depthwise conv's adjoint).
    Against autodiff: DLA-L-56 train step 11% faster and 11% less temporary memory on the
    CPU (scanned stages, where each saved tensor is one more stack written per block).
    On the CPU both directions run as `cpu_kernels` (one pass per image) where they are built.
    """
    return _light_sum(out, shortcut, value_kernel, heads, lam, refresh)


def _light_sum_forward(*inputs):
    return _light_sum(*inputs), inputs


def _xla_z(z, out, shortcut, heads, gate, value_kernel, excite_kernel, lam, *, refresh):
    """z as saved or, where the forward pass saved none for the kernels, recomputed."""
    if z is not None:
        return z
    return _light_sum_by_xla(out, shortcut, value_kernel, heads, lam, gate, excite_kernel, refresh=refresh)


def _gradient_sums_by_xla(out, shortcut, dy, heads, gate, value_kernel, excite_kernel, lam, z_mean, z, *, refresh):
    z = _xla_z(z, out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh=refresh)
    dy = dy.astype(z_mean.dtype)
    return jnp.sum(dy, axis=(0, 1, 2)), jnp.sum(dy * (z.astype(z_mean.dtype) - z_mean), axis=(0, 1, 2))


def _gradient_sums_by_kernel(out, shortcut, dy, heads, gate, value_kernel, excite_kernel, lam, z_mean, z, *, refresh):
    """The kernel's per-image sums, summed; z is None (the kernel recomputes it)."""
    sums = cpu_kernels.light_sum_gradient_sums(
        out, shortcut, dy, heads, gate, value_kernel, excite_kernel, lam, z_mean, refresh=refresh
    )
    return tuple(jnp.sum(part, axis=0) for part in sums)


def _backward_parts_by_xla(
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
    z,
    *,
    refresh,
    batch_norm,
):
    """Both input gradients are convs of dz itself, scaled after (a depthwise conv commutes with
    per-image, per-channel factors), so dz is padded once and dz·heads is never written out."""
    accumulate = jnp.promote_types(dy.dtype, jnp.float32)
    dz = dy_scale * dy.astype(accumulate) + offset
    if batch_norm:
        z = _xla_z(z, out, shortcut, heads, gate, value_kernel, excite_kernel, lam, refresh=refresh)
        dz = dz + z_scale * (z.astype(accumulate) - z_mean)
    dz = dz.astype(out.dtype)
    value_taps = depthwise_kernel_gradient(out, dz, heads)
    shortcut_dz = jnp.sum(shortcut.astype(accumulate) * dz.astype(accumulate), axis=(1, 2))
    lam_per_channel = lam.astype(dz.dtype)
    kernels = (value_kernel, excite_kernel) if refresh else (value_kernel,)
    value_conv, *excite_convs = plain_depthwise_convs3x3(dz, tuple(kernel[::-1, ::-1] for kernel in kernels))
    d_heads = jnp.sum(out.astype(accumulate) * value_conv.astype(accumulate), axis=(1, 2))
    if refresh:
        excite_taps = depthwise_kernel_gradient(shortcut, dz)
        d_shortcut = (dz * _per_sample(gate, dz.dtype) + excite_convs[0]) * lam_per_channel
    else:
        excite_taps, d_shortcut = None, dz * lam_per_channel
    return value_conv * _per_sample(heads, dz.dtype), d_shortcut, value_taps, excite_taps, shortcut_dz, d_heads


def _backward_parts_by_kernel(*inputs, refresh, batch_norm):
    """The same from `cpu_kernels.light_sum_backward`, one pass per image; the taps summed over images here.

    The last input, z, is None: the kernel recomputes z where it needs it."""
    *inputs, _ = inputs
    d_out, d_shortcut, value_taps, excite_taps, shortcut_dz, d_heads = cpu_kernels.light_sum_backward(
        *inputs, refresh=refresh, batch_norm=batch_norm
    )
    value_taps = jnp.sum(value_taps, axis=0).reshape(3, 3, -1)
    excite_taps = jnp.sum(excite_taps, axis=0).reshape(3, 3, -1) if refresh else None  # MRLA-light's are zeros
    return d_out, d_shortcut, value_taps, excite_taps, shortcut_dz, d_heads


def _light_sum_gradients(inputs, dy, dy_scale, offset, batch_norm=None):
    """light_sum's input gradients for dz = dy_scale·dy + offset, plus z_scale·(z - z_mean) for
    `batch_norm` = (z_scale, z_mean, z or None where the kernels recompute it); all but z are [C].

    The backward parts return (d_out, d_shortcut, value kernel taps, excite kernel taps or
    None, Σ_hw shortcut·dz, d_heads); λ's and the refresh's gradients follow from them.
    """
    out, shortcut, value_kernel, heads, lam, refresh = inputs
    gate, excite_kernel = _gate_and_excite_kernel(heads, value_kernel, refresh)
    z_scale, z_mean, z = batch_norm or (jnp.zeros_like(dy_scale), jnp.zeros_like(dy_scale), None)
    operands = (out, shortcut, dy, heads, gate, value_kernel, excite_kernel, lam, dy_scale, offset, z_scale, z_mean, z)
    d_out, d_shortcut, value_taps, excite_taps, shortcut_dz, d_heads = cpu_kernels.on_cpu(
        _backward_parts_by_kernel,
        _backward_parts_by_xla,
        *operands,
        refresh=refresh is not None,
        batch_norm=batch_norm is not None,
    )
    if refresh is None:
        d_lam, d_refresh = jnp.sum(shortcut_dz, axis=0), None
    else:
        d_lam = jnp.sum(gate * shortcut_dz, axis=0) + jnp.sum(excite_kernel[:, :, 0, :] * excite_taps, axis=(0, 1))
        d_excite_kernel = (lam * excite_taps)[:, :, None, :].astype(excite_kernel.dtype)
        d_refresh = ((lam * shortcut_dz).astype(gate.dtype), d_excite_kernel)
    return (
        d_out,
        d_shortcut,
        value_taps[:, :, None, :].astype(value_kernel.dtype),
        d_heads.astype(heads.dtype),
        d_lam.astype(lam.dtype),
        d_refresh,
    )


def _light_sum_backward(inputs, dz):
    channels = dz.shape[-1]
    return _light_sum_gradients(inputs, dz, jnp.ones(channels, dz.dtype), jnp.zeros(channels, dz.dtype))


light_sum.defvjp(_light_sum_forward, _light_sum_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def light_sum_batch_norm(
    out: jax.Array,
    shortcut: jax.Array,
    value_kernel: jax.Array,
    heads: jax.Array,
    lam: jax.Array,
    refresh: tuple[jax.Array, jax.Array] | None,
    scale: jax.Array,
    bias: jax.Array,
    epsilon: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`batch_norm(light_sum(...), scale, bias, epsilon)`: (y, batch mean, biased batch variance).

    One VJP for both, so that on the CPU the BatchNorm's passes over z go into the light
    branch's kernels and z is never saved: its statistics come from the forward kernel's
    per-image ones; backward, one kernel recomputes z for Σ dy·(z - mean), and the backward
    kernel recomputes it again to form dz (`batch_norm_backward_coefficients`) as it reads dy.
    Elsewhere (XLA's ops) z is saved, and it is `batch_norm` of `light_sum` by other means.
    Against `batch_norm` of `light_sum`: DLA-L-56 train step 5% faster on the CPU.
    """
    return _light_sum_batch_norm_forward(out, shortcut, value_kernel, heads, lam, refresh, scale, bias, epsilon)[0]


def _light_sum_batch_norm_forward(out, shortcut, value_kernel, heads, lam, refresh, scale, bias, epsilon):
    inputs = (out, shortcut, value_kernel, heads, lam, refresh)
    z, mean, var = _light_sum_with_statistics(*inputs)
    y, inverse_std = normalize(z.astype(mean.dtype), mean, var, scale, bias, epsilon)
    saved_z = None if cpu_kernels.in_use(out.dtype, out.shape[-1]) else z
    return (y, mean, var), (inputs, saved_z, mean, inverse_std, scale)


def _light_sum_batch_norm_backward(epsilon, residuals, cotangents):
    inputs, z, mean, inverse_std, scale = residuals
    d_y, d_mean, d_var = cotangents
    out, shortcut, value_kernel, heads, lam, refresh = inputs
    gate, excite_kernel = _gate_and_excite_kernel(heads, value_kernel, refresh)
    sum_dy, sum_dy_centered = cpu_kernels.on_cpu(
        _gradient_sums_by_kernel,
        _gradient_sums_by_xla,
        *(out, shortcut, d_y, heads, gate, value_kernel, excite_kernel, lam, mean, z),
        refresh=refresh is not None,
    )
    dy_scale, z_scale, offset, d_scale, d_bias = batch_norm_backward_coefficients(
        sum_dy, sum_dy_centered, inverse_std, scale, math.prod(d_y.shape[:-1]), d_mean, d_var
    )
    return (*_light_sum_gradients(inputs, d_y, dy_scale, offset, (z_scale, mean, z)), d_scale, d_bias)


light_sum_batch_norm.defvjp(_light_sum_batch_norm_forward, _light_sum_batch_norm_backward)


@jax.custom_vjp
def value_conv(out: jax.Array, value_kernel: jax.Array) -> jax.Array:
    """DLA-B's value dwconv(out, value_kernel), as `depthwise_conv3x3`; on the CPU by the light
    branch's kernels with neutral gates (heads 1, λ 0, no refresh).

    Their backward pass forms both gradients from one zero-padded panel of the cotangent per
    channel vector, where XLA:CPU makes several passes over it (DLA-B-56 train step 5-8%
    faster, round 11). The kernels read `out` a second time as the shortcut (from cache).
    """
    return _value_conv_forward(out, value_kernel)[0]


def _neutral_gates(out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Heads of ones [B, C] and a λ of zeros [C]: the light branch reduced to dwconv(out)."""
    return jnp.ones((out.shape[0], out.shape[-1]), out.dtype), jnp.zeros(out.shape[-1:], out.dtype)


def _value_conv_by_kernel(out, value_kernel):
    heads, lam = _neutral_gates(out)
    kernels = (value_kernel, value_kernel)
    return cpu_kernels.light_sum_forward(out, out, heads, heads, *kernels, lam, refresh=False, statistics=False)[0]


def _value_conv_forward(out, value_kernel):
    value = cpu_kernels.on_cpu(_value_conv_by_kernel, plain_depthwise_conv3x3, out, value_kernel)
    return value, (out, value_kernel)


def _value_conv_gradients_by_kernel(out, value_kernel, d_value):
    heads, lam = _neutral_gates(out)
    kernels, coefficients = (value_kernel, value_kernel), (heads[0], lam, lam, lam)  # dz = 1·d_value + 0
    images, options = (out, out, d_value), dict(refresh=False, batch_norm=False, shortcut_gradient=False)
    d_out, _, value_taps, *_ = cpu_kernels.light_sum_backward(
        *images, heads, heads, *kernels, lam, *coefficients, **options
    )
    return d_out, jnp.sum(value_taps, axis=0).reshape(3, 3, 1, -1).astype(value_kernel.dtype)


def _value_conv_backward(residuals, d_value):
    out, value_kernel = residuals
    return cpu_kernels.on_cpu(_value_conv_gradients_by_kernel, depthwise_conv3x3_gradients, out, value_kernel, d_value)


value_conv.defvjp(_value_conv_forward, _value_conv_backward)


def _first_slots_sum(filled: int, weights: jax.Array, values: jax.Array) -> jax.Array:
    return sum(weights[t, :, None, None, :] * values[t] for t in range(filled))


def _first_slots_gradients(
    filled: int, weights: jax.Array, values: jax.Array, d_out: jax.Array, d_values: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """d_weights (zero past `filled`) and d_values with this read's terms added to its first slots, in place."""
    accumulate = jnp.promote_types(weights.dtype, jnp.float32)
    d_weights = jnp.stack([jnp.sum(values[t] * d_out, axis=(1, 2), dtype=accumulate) for t in range(filled)])
    d_weights = jnp.pad(d_weights, ((0, weights.shape[0] - filled), (0, 0), (0, 0)))
    added = d_values[:filled] + (weights[:filled, :, None, None, :] * d_out[None]).astype(d_values.dtype)
    return d_weights.astype(weights.dtype), jax.lax.dynamic_update_slice_in_dim(d_values, added, 0, 0)


def over_filled_slots(branch: Callable[..., Any], filled: jax.Array, capacity: int, *operands: jax.Array) -> Any:
    """branch(k, *operands) for k = filled, a traced count in 1..capacity: one `lax.switch` branch per k.

    Each branch is written for a static k, so it reads and writes only the k filled
    slots of the cache: a stage's blocks touch n(n+1)/2 slots instead of n² (at depth 56,
    21 instead of 36). Where `filled` is a constant (unrolled stages) XLA keeps its branch alone.
    """
    branches = [functools.partial(branch, k) for k in range(1, capacity + 1)]
    return jax.lax.switch(filled - 1, branches, *operands)


def weighted_values(weights: jax.Array, values: jax.Array, filled: jax.Array) -> jax.Array:
    """Σ_{t < filled} weights[t] ⊙ values[t]: per-channel weights [T, B, C], values [T, B, H, W, C].

    DLA-B's read of its cache (the slots past `filled` are empty and their weights zero):
    the products summed in one loop. As an einsum XLA:CPU lowers it to a slow batched dot.
    """
    return over_filled_slots(_first_slots_sum, filled, values.shape[0], weights, values)


@jax.custom_vjp
def weighted_values_saving_nothing(
    weights: jax.Array, values: jax.Array, final_values: jax.Array, filled: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`weighted_values` in training: it keeps no copy of the cache and updates its cotangent in place.

    Saving the cache at every block of a stage costs T² memory and copies (at depth 56,
    zero-filling and filling those saved stacks took a fifth of the DLA-B step). Here
    `final_values` is a carry that does nothing forward; in the backward pass its
    cotangent brings the stage's *final* cache (`hand_back_final_values`). As each slot
    is written once, that equals this block's cache in every slot this block reads.

    `values` passes through too, as the carry of the cache: its cotangent, summed over the
    later blocks, then reaches this backward pass, which adds this block's terms to the
    filled slots only. Had autodiff added them, every block would add a full [T, ...]
    array. Returns (Σ_{t < filled} weights[t] ⊙ values[t], values, final_values).
    """
    return weighted_values(weights, values, filled), values, final_values


def _saving_nothing_forward(weights, values, final_values, filled):
    return (weighted_values(weights, values, filled), values, final_values), (weights, filled)


def _cache_read_gradients_by_xla(weights, values, d_out, d_values, filled):
    return over_filled_slots(_first_slots_gradients, filled, weights.shape[0], weights, values, d_out, d_values)


def _saving_nothing_backward(residuals, cotangents):
    """On the CPU one kernel sweep per filled slot (`cpu_kernels.cache_read_backward`): XLA's
    ops copied each slot out, reduced it, and added and wrote back the slots apart."""
    weights, filled = residuals
    d_out, d_values, final_values = cotangents
    d_weights, d_values = cpu_kernels.on_cpu(
        cpu_kernels.cache_read_backward, _cache_read_gradients_by_xla, weights, final_values, d_out, d_values, filled
    )
    return d_weights.astype(weights.dtype), d_values, final_values, None


weighted_values_saving_nothing.defvjp(_saving_nothing_forward, _saving_nothing_backward)


@jax.custom_vjp
def hand_back_final_values(x: jax.Array, values: jax.Array, final_values: jax.Array) -> jax.Array:
    """Returns x; in the backward pass, sends the final `values` back as `final_values`' cotangent.

    Applied to a stage's output, the last use of its cache (see `weighted_values_saving_nothing`).
    """
    return x


def _hand_back_forward(x, values, final_values):
    return x, values


def _hand_back_backward(values, d_x):
    return d_x, jnp.zeros_like(values), values


hand_back_final_values.defvjp(_hand_back_forward, _hand_back_backward)
