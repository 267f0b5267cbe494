"""Layer attention: the query/key/value projections and the two ways of combining them.

Light (MRLA-light, DLA-L) gates the current block's value with a per-head sigmoid of
q·k; softmax (DLA-B) attends over the values of every earlier block of the stage.
Heads are contiguous groups of 32 channels.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dla_jax.models.layers import depthwise_conv3x3, depthwise_kernel_init, global_avg_pool, torch_default_uniform

HEAD_DIM = 32


def attention_kernel_size(channels: int) -> int:
    """ECA-style adaptive kernel of the channel conv1d: odd, from log2(C)."""
    t = int((math.log2(channels) + 1) / 2)
    return t if t % 2 else t + 1


def channel_conv1d(y: jax.Array, kernel: jax.Array) -> jax.Array:
    """torch's Conv1d(1, 1, k, padding=(k-1)/2) run along the channel axis of [B, C]."""
    size = kernel.shape[0]
    pad = (size - 1) // 2
    channels = y.shape[-1]
    padded = jnp.pad(y, ((0, 0), (pad, pad)))
    return sum(kernel[i] * padded[:, i : i + channels] for i in range(size))


def head_scores(query: jax.Array, key: jax.Array) -> jax.Array:
    """Scaled per-head dot products: [..., C] x [..., C] -> [..., C / 32]."""
    product = query * key
    product = product.reshape(product.shape[:-1] + (-1, HEAD_DIM))
    return jnp.sum(product, axis=-1) / math.sqrt(HEAD_DIM)


def expand_heads(weights: jax.Array) -> jax.Array:
    """Per-head weights [..., G] -> per-channel [..., G * 32]."""
    return jnp.repeat(weights, HEAD_DIM, axis=-1)


class Projections(nn.Module):
    """q and k from the pooled input by channel conv1d, v by a depthwise 3x3 conv.

    Returns q, k as float32 [B, C] and v as [B, H, W, C] in the compute dtype.
    """

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        channels = x.shape[-1]
        size = attention_kernel_size(channels)
        query_kernel = self.param("query", torch_default_uniform(size), (size,), jnp.float32)
        key_kernel = self.param("key", torch_default_uniform(size), (size,), jnp.float32)
        value_kernel = self.param("value", depthwise_kernel_init, (3, 3, 1, channels), jnp.float32)
        pooled = global_avg_pool(x)
        value = depthwise_conv3x3(x.astype(self.dtype), value_kernel)
        return channel_conv1d(pooled, query_kernel), channel_conv1d(pooled, key_kernel), value


def light_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MRLA-light: value gated per head by sigmoid(q·k / sqrt(32)). Returns (out, gates)."""
    gates = nn.sigmoid(head_scores(query, key))
    return value * expand_heads(gates).astype(value.dtype)[:, None, None, :], gates


def _weighted_sum(weights: jax.Array, values: jax.Array) -> jax.Array:
    return sum(weights[t, :, None, None, :] * values[t] for t in range(values.shape[0]))


def _weighted_sum_gradients(weights: jax.Array, values: jax.Array, d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    d_values = weights[:, :, None, None, :] * d_out[None]
    accumulate = jnp.promote_types(weights.dtype, jnp.float32)
    d_weights = jnp.stack([jnp.sum(values[t] * d_out, axis=(1, 2), dtype=accumulate) for t in range(values.shape[0])])
    return d_weights.astype(weights.dtype), d_values.astype(values.dtype)


@jax.custom_vjp
def weighted_values(weights: jax.Array, values: jax.Array) -> jax.Array:
    """Σ_t weights[t] ⊙ values[t]: per-channel weights [T, B, C], values [T, B, H, W, C].

    DLA-B's read of its cache: T products summed in one loop, with a hand-written VJP.
    As an einsum XLA:CPU lowers it to a slow batched dot; autodiff of the T-term sum pads
    each term's gradient to the whole [T, ...] cache before adding (T² work per block).
    """
    return _weighted_sum(weights, values)


def _weighted_values_forward(weights, values):
    return _weighted_sum(weights, values), (weights, values)


def _weighted_values_backward(residuals, d_out):
    return _weighted_sum_gradients(*residuals, d_out)


weighted_values.defvjp(_weighted_values_forward, _weighted_values_backward)


@jax.custom_vjp
def weighted_values_saving_nothing(
    weights: jax.Array, values: jax.Array, final_values: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`weighted_values` that keeps no copy of the cache for the backward pass.

    Saving the cache at every block of a stage costs T² memory and copies (at depth 56,
    zero-filling and filling those saved stacks took a fifth of the DLA-B step). Here
    `final_values` is a carry that does nothing forward; in the backward pass its
    cotangent brings the stage's *final* cache (`hand_back_final_values`). As each slot
    is written once, that equals this block's cache in every slot this block's weights
    reach; in the others the weights are softmax zeros, so what is read there cannot
    change any gradient. Returns (Σ_t weights[t] ⊙ values[t], final_values).
    """
    return _weighted_sum(weights, values), final_values


def _saving_nothing_forward(weights, values, final_values):
    return (_weighted_sum(weights, values), final_values), weights


def _saving_nothing_backward(weights, cotangents):
    d_out, final_values = cotangents
    return (*_weighted_sum_gradients(weights, final_values, d_out), final_values)


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
