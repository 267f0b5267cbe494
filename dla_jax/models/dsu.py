"""The Dynamic Sharing Unit: an LSTM-like cell without output gate, one per stage.

It runs twice per block: the forward context path folds each block's pooled output into
the stage context (h, c); the backward refresh asks the same cell, given that context,
for a per-channel gate that rescales an earlier output.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dla_jax.models.layers import Dense, at_least_float32, relu_from_output

Context = tuple[jax.Array, jax.Array]


class _MLP(nn.Module):
    """Linear(C -> C/r) -> ReLU -> Linear(C/r -> 3C), the official `seq`."""

    channels: int
    reduction: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = relu_from_output(Dense(self.channels // self.reduction, name="reduce")(x))
        return Dense(3 * self.channels, name="expand")(x)


class DSU(nn.Module):
    """One DSU step: (y, (h, c)) -> (h', c'), in at least float32 (the vectors are tiny).

    `hidden_terms` and `from_hidden_terms` split the step where h enters, so that the stages
    compute w_hh(h) once per block for both the refresh and the next step, and once for all
    of DLA-B's cache entries.
    """

    channels: int
    reduction: int

    def setup(self):
        self.w_ih = _MLP(self.channels, self.reduction)
        self.w_hh = _MLP(self.channels, self.reduction)

    def __call__(self, y: jax.Array, context: Context) -> Context:
        h, c = context
        return self.from_hidden_terms(y, self.hidden_terms(h), c)

    def hidden_terms(self, h: jax.Array) -> jax.Array:
        """The gates' terms from the hidden state, w_hh(h): [..., 3C]."""
        return self.w_hh(h)

    def from_hidden_terms(self, y: jax.Array, hidden_terms: jax.Array, c: jax.Array) -> Context:
        """The step for input y, given `hidden_terms(h)` and the cell state c."""
        gates = self.w_ih(y.astype(at_least_float32(y.dtype))) + hidden_terms
        input_gate, forget_gate, candidate = jnp.split(gates, 3, axis=-1)
        c = nn.sigmoid(forget_gate) * c + nn.sigmoid(input_gate) * jnp.tanh(candidate)
        return nn.sigmoid(c), c


def zero_context(batch: int, channels: int, dtype: jnp.dtype) -> Context:
    """The context every stage starts from (the official code uses zeros, not noise)."""
    return jnp.zeros((batch, channels), dtype), jnp.zeros((batch, channels), dtype)


def refresh_context(context: Context, dsu_context: str) -> Context:
    """The context the refresh sees: each sample's own, or sample 0's for every sample.

    "first_sample" reproduces the official code, which indexes `hidden[0][0]` and so
    refreshes every sample of a batch with sample 0's context.
    """
    if dsu_context == "per_sample":
        return context
    return tuple(jnp.broadcast_to(part[:1], part.shape) for part in context)


def init_dsu_params(key: jax.Array, channels: int, reduction: int) -> dict:
    """The parameters of a stage's DSU, created once and shared by all its blocks."""
    zeros = jnp.zeros((1, channels), jnp.float32)
    return DSU(channels, reduction, parent=None).init(key, zeros, (zeros, zeros))["params"]


def apply_dsu(params: dict, channels: int, reduction: int, *inputs: jax.Array, method: str) -> Any:
    """Run one of the shared DSU's methods as a pure function of its parameters (usable inside
    scan/vmap): `hidden_terms` or `from_hidden_terms`, as the stages split the step.

    `parent=None` keeps the cell from binding to whichever module happens to call it.
    """
    return DSU(channels, reduction, parent=None).apply({"params": params}, *inputs, method=method)
