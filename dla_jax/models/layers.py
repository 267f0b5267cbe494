"""Basic layers shared by every family, written to match PyTorch's numerics.

PyTorch semantics matter here because converted official checkpoints must give the
official logits: 3x3 convs pad 1 on each side (Flax's "SAME" does not on stride 2),
BatchNorm keeps the *unbiased* running variance, and inits follow torch's defaults.
"""

from __future__ import annotations

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


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype, name: str) -> nn.Conv:
    """A bias-free conv padding (kernel-1)/2 on each side, as torch's `padding=k//2`."""
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=conv_kernel_init,
        name=name,
    )


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


def depthwise_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise 3x3 conv, padding 1, as a sum of nine shifted products.

    `kernel` is [3, 3, 1, C] (Flax's grouped-conv layout). XLA's grouped convolution is
    slow on CPU; nine shifted multiply-adds fuse into one loop and are exact.
    """
    height, width = x.shape[1], x.shape[2]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    kernel = kernel.astype(x.dtype)
    out = None
    for i in range(3):
        for j in range(3):
            term = padded[:, i : i + height, j : j + width, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


def depthwise_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """Kaiming-normal fan-out for a depthwise [3, 3, 1, C] kernel: std sqrt(2 / (9 C))."""
    fan_out = shape[0] * shape[1] * shape[3]
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)


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
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        x32 = x.astype(at_least_float32(x.dtype))
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                count = math.prod(x.shape[:-1])
                unbiased = var * (count / max(count - 1, 1))
                running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
                running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
        else:
            mean, var = running_mean.value, running_var.value
        y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
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
