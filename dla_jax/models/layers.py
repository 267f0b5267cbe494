"""Basic layers shared by every family, written to match PyTorch's numerics.

PyTorch semantics matter here because converted official checkpoints must give the
official logits: 3x3 convs pad 1 on each side (Flax's "SAME" does not on stride 2),
BatchNorm keeps the *unbiased* running variance, and inits follow torch's defaults.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# Kaiming-normal, fan-out: the official code's init for every Conv2d (depthwise too).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_uniform(fan_in: int) -> Initializer:
    """torch's default Linear/Conv1d init for weights and biases: U(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _conv2d(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _kernel_grad_by_conv(x: jax.Array, kernel: jax.Array, dy: jax.Array, stride: int, pad: int) -> jax.Array:
    return jax.vjp(lambda k: _conv2d(x, k, stride, pad), kernel)[1](dy)[0]


def _kernel_grad_by_matmuls(x: jax.Array, kernel: jax.Array, dy: jax.Array, stride: int, pad: int) -> jax.Array:
    """dW[i, j] = x_window(i, j)ᵀ · dy: one matmul per kernel tap.

    Each tap is contracted into [Cout, Cin] and the small result transposed: contracting
    into [Cin, Cout] made XLA:CPU transpose-copy x, and in unrolled stages it fused the
    whole chain of earlier blocks into that copy (ResNet-56 unrolled step 19% slower).
    """
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = dy.shape[1], dy.shape[2]
    taps = [
        [
            jnp.einsum(
                "bhwc,bhwd->dc",
                padded[:, i : i + stride * (height - 1) + 1 : stride, j : j + stride * (width - 1) + 1 : stride],
                dy,
                preferred_element_type=jnp.promote_types(dy.dtype, jnp.float32),
            )
            for j in range(kernel.shape[1])
        ]
        for i in range(kernel.shape[0])
    ]
    return jnp.array(taps).swapaxes(2, 3).astype(kernel.dtype)


def _input_grad(x: jax.Array, kernel: jax.Array, dy: jax.Array, stride: int, pad: int) -> jax.Array:
    """dx: for stride 1, the conv of dy with the kernel flipped and its I/O swapped, in HWIO.

    Autodiff's transposed conv reads the kernel as HWOI; inside a `while` loop XLA:CPU
    then runs it without YNNPACK, ~10x slower. Strided convs (never inside the scan) keep it.
    """
    if stride == 1:
        flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
        return _conv2d(dy, flipped, 1, kernel.shape[0] - 1 - pad)
    return jax.vjp(lambda inputs: _conv2d(inputs, kernel, stride, pad), x)[1](dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, pad: int) -> jax.Array:
    """NHWC x HWIO convolution, symmetric padding; its gradients avoid XLA:CPU traps.

    Inside a `while` loop (our `nn.scan` over blocks) XLA:CPU computes both gradients of
    a convolution far slower than outside one: the kernel gradient about 30x (on the CPU
    it is taken as k*k matmuls instead; other backends keep the transposed convolution),
    the input gradient about 10x (see `_input_grad`).
    """
    return _conv2d(x, kernel, stride, pad)


def _conv2d_forward(x, kernel, stride, pad):
    return _conv2d(x, kernel, stride, pad), (x, kernel)


def _conv2d_backward(stride, pad, residuals, dy):
    x, kernel = residuals
    dx = _input_grad(x, kernel, dy, stride, pad)
    dkernel = jax.lax.platform_dependent(
        x,
        kernel,
        dy,
        cpu=functools.partial(_kernel_grad_by_matmuls, stride=stride, pad=pad),
        default=functools.partial(_kernel_grad_by_conv, stride=stride, pad=pad),
    )
    return dx, dkernel


conv2d.defvjp(_conv2d_forward, _conv2d_backward)


class Conv(nn.Module):
    """A bias-free conv padding (kernel-1)/2 on each side, as torch's `padding=k//2`."""

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", conv_kernel_init, shape, jnp.float32)
        pad = (self.kernel_size - 1) // 2
        return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad)


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, name: str) -> Conv:
    """The convolutions of every family (stem, bottleneck, projection shortcut)."""
    return Conv(features, kernel, stride, dtype, name=name)


class Dense(nn.Module):
    """A Linear layer with torch's default init (the classifier and the DSU's MLPs)."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        return nn.Dense(
            self.features,
            dtype=self.dtype,
            kernel_init=torch_default_uniform(fan_in),
            bias_init=torch_default_uniform(fan_in),
            name="linear",
        )(x)


@jax.custom_vjp
def relu_from_output(x: jax.Array) -> jax.Array:
    """ReLU whose gradient is masked by its output (y > 0, i.e. x > 0) instead of a saved mask of x.

    For a ReLU whose output is kept for the backward pass anyway (the input of a conv or
    dense layer, a block output the layer attention reads), the mask is one tensor less
    to save: in the stage's scan, one stack less to zero-fill, write and read back per block.
    """
    return jnp.maximum(x, 0)


def _relu_from_output_forward(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_from_output_backward(y, dy):
    return (jnp.where(y > 0, dy, jnp.zeros_like(dy)),)


relu_from_output.defvjp(_relu_from_output_forward, _relu_from_output_backward)


def _pad(x: jax.Array) -> jax.Array:
    """Zero-pad H and W by 1 behind a barrier, so XLA keeps one padded tensor and slices it.

    Without it XLA folds the pad into each of the nine shifted slices, and XLA:CPU then
    writes them out as nine separate copies (DLA-L-20 train step 8% slower).
    """
    return jax.lax.optimization_barrier(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))


def materialized(array: jax.Array) -> jax.Array:
    """The array times the identity: the same values, but computed by an op XLA does not fuse.

    Inside the stage's scan a block's weights are dynamic slices of the stacked weights.
    Fused into a full-size elementwise loop, the slice is recomputed at every element,
    and XLA:CPU runs that loop 3-4x slower than with a plain operand (measured: five
    chained 32x32x64 depthwise convs at batch 128 in a scan, 80 ms against 26 ms). The
    product is exact; it costs a [rows, C] x [C, C] matmul.
    """
    rows = array.reshape(-1, array.shape[-1])
    identity = jnp.eye(array.shape[-1], dtype=array.dtype)
    return jnp.dot(rows, identity, precision=jax.lax.Precision.HIGHEST).reshape(array.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def repeat_leading(x: jax.Array, count: int) -> jax.Array:
    """x repeated `count` times along a new leading axis, [count, *x.shape].

    Its gradient sums the `count` slices as one product with a vector of ones, where
    autodiff of a broadcast reduces the leading axis: XLA:CPU reduces a short leading axis
    of a large array 20-50x slower than adding its slices ([6, 128, 768]: 4.9 against
    0.1 ms). Adding them, XLA fused the adds with the producers' arithmetic and redid it;
    the product takes the cotangent as computed. DLA-B's refresh repeats the context over
    its cache this way: its DSU's backward pass at depth 56 fell from 287 to 141 ms of op
    time per step (docs/performance.md, round 13).
    """
    return jnp.broadcast_to(x, (count, *x.shape))


def _repeat_leading_forward(x, count):
    return repeat_leading(x, count), None


def _repeat_leading_backward(count, _, cotangent):
    rows = cotangent.reshape(count, -1)
    total = jnp.dot(jnp.ones(count, rows.dtype), rows, precision=jax.lax.Precision.HIGHEST)
    return (total.reshape(cotangent.shape[1:]),)


repeat_leading.defvjp(_repeat_leading_forward, _repeat_leading_backward)


def materialized_on_cpu(array: jax.Array) -> jax.Array:
    """`materialized` on the CPU, the array itself elsewhere (other backends' loops are not slowed)."""
    return jax.lax.platform_dependent(array, cpu=materialized, default=lambda unchanged: unchanged)


def _shifted_products(x: jax.Array, kernels: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """Σ_ij pad(x)[i:i+H, j:j+W] * kernel[i, j] for each kernel: depthwise 3x3 convs that fuse into one loop each.

    x is padded once for all the kernels (a full-size pass saved per extra kernel).
    """
    height, width = x.shape[1], x.shape[2]
    padded = _pad(x)
    results = []
    for kernel in kernels:
        kernel = materialized(kernel.astype(x.dtype))
        out = None
        for i in range(3):
            for j in range(3):
                term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, 0]
                out = term if out is None else out + term
        results.append(out)
    return tuple(results)


def _tap_sums(padded: jax.Array, dy: jax.Array, scale: jax.Array | None, accumulate: Dtype) -> jax.Array:
    """Σ_bhw padded[b, h+i, w+j] * dy[b, h, w] (* scale[b]) for the nine taps (i, j), as [9, C].

    Each tap first sums its products over the images one by one inside one elementwise
    loop, so the final reduction runs over a tensor as many times smaller: XLA:CPU's
    reductions over slices are slow.
    """
    height, width = dy.shape[1], dy.shape[2]

    def product(k, i, j):
        term = padded[k : k + 1, i : i + height, j : j + width, :].astype(accumulate) * dy[k : k + 1].astype(accumulate)
        return term if scale is None else term * scale[k].astype(accumulate)

    images = range(dy.shape[0])
    taps = [functools.reduce(jnp.add, (product(k, i, j) for k in images)) for i in range(3) for j in range(3)]
    return jnp.sum(jnp.stack(taps, axis=-2), axis=(0, 1, 2))


def _depthwise_kernel_grad(x: jax.Array, dy: jax.Array, scale: jax.Array | None) -> jax.Array:
    """dkernel[i, j] = Σ_bhw pad(x)[b, h+i, w+j] * dy[b, h, w] (* scale[b]), as [3, 3, C] in float32+.

    A loop over batch tiles of up to 16 images (`_batch_tile`), small enough to stay in
    cache while the nine taps read them (`_tap_sums`); 20% faster than nine passes over
    the whole batch on CPU for the 32x32 and 16x16 stages.
    """
    accumulate = jnp.promote_types(dy.dtype, jnp.float32)
    padded = _pad(x)
    tile = _batch_tile(x.shape[0])

    def add_tile(index, total):
        rows = [jax.lax.dynamic_slice_in_dim(a, index * tile, tile) for a in (padded, dy)]
        scales = None if scale is None else jax.lax.dynamic_slice_in_dim(scale, index * tile, tile)
        return total + _tap_sums(*rows, scales, accumulate)

    total = jax.lax.fori_loop(0, x.shape[0] // tile, add_tile, jnp.zeros((9, x.shape[-1]), accumulate))
    return total.reshape(3, 3, -1)


def _batch_tile(batch: int, most: int = 16) -> int:
    """The largest divisor of the batch up to `most`: the images one tile sums."""
    return max(k for k in range(1, min(batch, most) + 1) if batch % k == 0)


def _grouped_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """XLA's own depthwise 3x3 conv (a grouped convolution, one group per channel), padding 1."""
    return jax.lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _grouped_kernel_grad(x: jax.Array, dy: jax.Array, scale: jax.Array | None) -> jax.Array:
    """The kernel gradient of XLA's grouped conv for dy (* scale), as [3, 3, C] in float32+ (the CPU branch's type)."""
    if scale is not None:
        dy = dy * scale[:, None, None, :].astype(dy.dtype)
    zeros = jnp.zeros((3, 3, 1, x.shape[-1]), x.dtype)
    dkernel = jax.vjp(lambda kernel: _grouped_conv3x3(x, kernel), zeros)[1](dy)[0]
    return dkernel[:, :, 0, :].astype(jnp.promote_types(dy.dtype, jnp.float32))


def _grouped_convs3x3(x: jax.Array, kernels: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(_grouped_conv3x3(x, kernel) for kernel in kernels)


def plain_depthwise_convs3x3(x: jax.Array, kernels: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """`depthwise_conv3x3` of one input with each kernel, without its VJP (for other hand-written VJPs)."""
    return jax.lax.platform_dependent(x, kernels, cpu=_shifted_products, default=_grouped_convs3x3)


def plain_depthwise_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`depthwise_conv3x3` without its VJP, for use inside other hand-written VJPs."""
    return plain_depthwise_convs3x3(x, (kernel,))[0]


def depthwise_kernel_gradient(x: jax.Array, dy: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    """The [3, 3, C] kernel gradient of `depthwise_conv3x3` at x for output cotangent dy, in float32+.

    `scale` [B, C], if given, multiplies dy per image and channel; on the CPU inside the
    loop that reads dy anyway, so that the scaled dy is never written out.
    """
    return jax.lax.platform_dependent(x, dy, scale, cpu=_depthwise_kernel_grad, default=_grouped_kernel_grad)


@jax.custom_vjp
def depthwise_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise 3x3 conv, padding 1: nine shifted products on the CPU, XLA's grouped conv elsewhere.

    `kernel` is [3, 3, 1, C] (Flax's grouped-conv layout). XLA's grouped convolution is
    slow on CPU; nine shifted multiply-adds fuse into one loop and are exact. On a GPU
    cuDNN's grouped conv is the faster one (H200, bf16, ResNet-50 stage 0: forward 0.30
    against 0.58 ms, kernel gradient 0.31 against 0.89 ms for the best XLA reduction).
    The custom VJP keeps only `x` for the backward pass (autodiff of the nine products
    would keep nine shifted copies) and, on the CPU, computes the kernel gradient in a
    form XLA:CPU runs fast (see `_depthwise_kernel_grad`).
    """
    return plain_depthwise_conv3x3(x, kernel)


def _depthwise_forward(x, kernel):
    return plain_depthwise_conv3x3(x, kernel), (x, kernel)


def depthwise_conv3x3_gradients(x: jax.Array, kernel: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`depthwise_conv3x3`'s (dx, dkernel): dx is the same conv of dy with the kernel flipped;
    dkernel sums x's shifts times dy."""
    dx = plain_depthwise_conv3x3(dy, kernel[::-1, ::-1])
    return dx, depthwise_kernel_gradient(x, dy)[:, :, None, :].astype(kernel.dtype)


def _depthwise_backward(residuals, dy):
    return depthwise_conv3x3_gradients(*residuals, dy)


depthwise_conv3x3.defvjp(_depthwise_forward, _depthwise_backward)


def depthwise_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """Kaiming-normal fan-out for a depthwise [3, 3, 1, C] kernel: std sqrt(2 / (9 C))."""
    fan_out = shape[0] * shape[1] * shape[3]
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)


def batch_statistics(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x in at least float32, its per-channel mean and biased variance (over all but the last axis)."""
    x = x.astype(at_least_float32(x.dtype))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    return x, mean, jnp.mean(jnp.square(x - mean), axis=axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Training-mode BatchNorm: (y, batch mean, biased batch variance), y in at least float32.

    Its VJP keeps only x (in its own dtype) and per-channel vectors, and recomputes the
    normalised x from them: autodiff kept two full-size float32 tensors per BN, which in
    the stage's scan are two stacks written every block, and its backward pass took three
    reductions and three full-size passes where the closed form needs two and one.
    """
    return _batch_norm_forward(x, scale, bias, epsilon)[0]


def normalize(x32: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """BatchNorm's (x - mean) / sqrt(var + epsilon) · scale + bias, and 1 / sqrt(var + epsilon)."""
    inverse_std = jax.lax.rsqrt(var + epsilon)
    return (x32 - mean) * (inverse_std * scale) + bias, inverse_std


def _batch_norm_forward(x, scale, bias, epsilon):
    x32, mean, var = batch_statistics(x)
    y, inverse_std = normalize(x32, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, mean, inverse_std, scale)


def _batch_norm_backward(epsilon, residuals, cotangents):
    """dx = γ/σ · (dy - mean(dy) - x̂ · mean(dy · x̂)), plus the (usually zero) terms of the statistics."""
    x, mean, inverse_std, scale = residuals
    d_y, d_mean, d_var = cotangents
    count = math.prod(x.shape[:-1])
    axes = tuple(range(x.ndim - 1))
    centered = x.astype(mean.dtype) - mean
    normalized = centered * inverse_std
    d_bias = jnp.sum(d_y, axis=axes)
    d_scale = jnp.sum(d_y * normalized, axis=axes)
    d_x = (scale * inverse_std) * (d_y - d_bias / count - normalized * (d_scale / count))
    d_x = d_x + d_mean / count + centered * (2 * d_var / count)
    return d_x.astype(x.dtype), d_scale, d_bias


batch_norm.defvjp(_batch_norm_forward, _batch_norm_backward)


def batch_norm_backward_coefficients(
    sum_dy: jax.Array,
    sum_dy_centered: jax.Array,
    inverse_std: jax.Array,
    scale: jax.Array,
    count: int,
    d_mean: jax.Array,
    d_var: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """`batch_norm`'s backward pass as a per-channel affine map: dx = dy_scale·dy + centered_scale·(x - mean) + offset.

    From the per-channel sums Σ dy and Σ dy·(x - mean), for a caller that applies the map
    inside a kernel that reads dy and x anyway. Returns (dy_scale, centered_scale, offset,
    d_scale, d_bias).
    """
    d_scale = sum_dy_centered * inverse_std
    dy_scale = scale * inverse_std
    centered_scale = (2 * d_var - dy_scale * inverse_std * d_scale) / count
    offset = (d_mean - dy_scale * sum_dy) / count
    return dy_scale, centered_scale, offset, d_scale, sum_dy


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch's semantics (eps 1e-5, momentum 0.1, unbiased running var).

    Statistics are computed in (at least) float32 over every axis but the channel axis. Under a
    sharded `jax.jit` the batch axis is global, so the statistics are those of the global
    batch whatever the device count.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    scale_init: Initializer = nn.initializers.ones
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | jax.ShapeDtypeStruct, train: bool, fused: Callable | None = None) -> jax.Array:
        """`fused(scale, bias, epsilon) -> (y, mean, var)`, where given, does in training what
        `batch_norm(x, ...)` does, for an x whose producer normalises it in its own kernels
        (x is then only read for its shape)."""
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        if not train:
            x32 = x.astype(at_least_float32(x.dtype))
            y, _ = normalize(x32, running_mean.value, running_var.value, scale, bias, self.epsilon)
            return y.astype(self.dtype)
        y, mean, var = (fused or functools.partial(batch_norm, x))(scale, bias, self.epsilon)
        if not self.is_initializing():
            count = math.prod(x.shape[:-1])
            unbiased = var * (count / max(count - 1, 1))
            running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
            running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
        return y.astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample: drops a residual branch, rescaling kept ones by 1/keep."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("drop_path"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def at_least_float32(dtype: Dtype) -> jnp.dtype:
    """Where statistics and gates are computed: float32, or float64 under x64 tests."""
    return jnp.promote_types(dtype, jnp.float32)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, C] mean in at least float32 (the GAP of the spec)."""
    return jnp.mean(x.astype(at_least_float32(x.dtype)), axis=(1, 2))
