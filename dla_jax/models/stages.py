"""A stage: its blocks, their layer attention, and the stage's DSU.

Block 0 changes the shape and runs on its own; blocks 1..n-1 share shapes and run under
one `nn.scan`, so compile time does not grow with depth. The scan carries the stage's
running state: the activations, the DSU context of the forward context path and,
for DLA-B, a fixed-size key/value cache with a fill index (a static carry shape).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dla_jax.models.blocks import EXPANSION, Bottleneck
from dla_jax.models.dsu import apply_dsu, init_dsu_params, refresh_context, zero_context
from dla_jax.models.layer_attention import (
    Projections,
    expand_heads,
    hand_back_final_values,
    head_scores,
    light_gates,
    light_sum,
    light_sum_batch_norm,
    value_conv,
    weighted_values,
    weighted_values_saving_nothing,
)
from dla_jax.models.layers import (
    BatchNorm,
    DropPath,
    at_least_float32,
    depthwise_kernel_init,
    global_avg_pool,
    materialized_on_cpu,
    repeat_leading,
)

FAMILIES = ("resnet", "mrla_l", "dla_l", "dla_b")
DSU_CONTEXTS = ("per_sample", "first_sample")
SCANNED_BLOCKS = "blocks"


class Unit(nn.Module):
    """One block and its layer attention: the body of the stage's scan.

    `carry` holds "x" and, per family, "context" (w_hh(h), c: `_advance_context`) and
    "cache"/"index" (DLA-B).
    `shared` holds the stage's DSU (and DLA-L's depthwise conv) parameters.
    """

    family: str
    planes: int
    stride: int
    project: bool
    reduction: int
    zero_init_last_bn: bool
    drop_path: float
    dsu_context: str
    train: bool
    remat_attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry: dict, shared: dict) -> tuple[dict, None]:
        out, shortcut = Bottleneck(
            self.planes,
            self.stride,
            self.project,
            self.zero_init_last_bn,
            output_kept=self.family != "resnet",
            dtype=self.dtype,
            name="bottleneck",
        )(carry["x"], self.train)
        if self.family == "resnet":
            return {"x": out}, None
        layer_attention = Unit._layer_attention
        if self.remat_attention and self.family != "dla_b":
            # Recomputed in the backward pass instead of saved: 21% less temporary memory,
            # 10% slower on the CPU (DLA-L-56); 13% slower on an H200 (DLA-L-50).
            # DLA-B never is: its recomputation would copy the cache again.
            layer_attention = nn.remat(layer_attention)
        carry, branch = layer_attention(self, dict(carry), shared, out, shortcut)
        carry["x"] = out + DropPath(self.drop_path)(branch, self.train)
        return carry, None

    def _layer_attention(self, carry, shared, out, shortcut):
        """The family's layer-attention branch on this block's output; updates `carry`."""
        query, key, value_kernel = Projections(name="layer_attention")(out)
        if self.family == "dla_b":
            value = value_conv(out, value_kernel)
            branch = self._softmax_over_stage(carry, shared, out, query, key, value)
        else:
            branch = self._light_with_previous(carry, shared, out, shortcut, query, key, value_kernel)
        return carry, branch

    def _dsu(self, shared: dict, *inputs: Any, method: str):
        """The stage's DSU's `method` on inputs whose first is [..., C]."""
        return apply_dsu(shared["dsu"], inputs[0].shape[-1], self.reduction, *inputs, method=method)

    def _advance_context(self, carry: dict, shared: dict, out: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Folds this block's pooled output into the stage context; returns what the refresh reads.

        The context is carried as (w_hh(h), c), not (h, c): this block's refresh and the next
        block's step both read w_hh(h), so the DSU's hidden-state MLP runs once per block.
        """
        hidden_terms, c = carry["context"]
        h, c = self._dsu(shared, global_avg_pool(out), hidden_terms, c, method="from_hidden_terms")
        carry["context"] = (self._dsu(shared, h, method="hidden_terms"), c)
        return refresh_context(carry["context"], self.dsu_context)

    def _light_with_previous(self, carry, shared, out, shortcut, query, key, value_kernel) -> jax.Array:
        """MRLA-light / DLA-L: BN(light attention + λ ⊙ previous output).

        DLA-L first refreshes the previous output (the shortcut) with a DSU gate computed
        from the updated stage context, then adds the stage's depthwise conv of it. In
        training the BatchNorm runs fused with the sum (`light_sum_batch_norm`).
        """
        refresh = None
        if self.family == "dla_l":
            hidden_terms, c = self._advance_context(carry, shared, out)
            gate, _ = self._dsu(shared, global_avg_pool(shortcut), hidden_terms, c, method="from_hidden_terms")
            self.sow("intermediates", "refresh", gate)
            refresh = (gate, shared["excite"])
        gates = light_gates(query, key)
        self.sow("intermediates", "gates", gates)
        lam = self.param("lambda", nn.initializers.normal(1.0), (out.shape[-1],), jnp.float32)
        inputs = (out, shortcut, value_kernel, expand_heads(gates), lam, refresh)
        attention_bn = BatchNorm(dtype=self.dtype, name="attention_bn")
        if self.train:
            fused = functools.partial(light_sum_batch_norm, *inputs)
            return attention_bn(jax.ShapeDtypeStruct(out.shape, out.dtype), True, fused)
        return attention_bn(light_sum(*inputs), False)

    def _softmax_over_stage(self, carry, shared, out, query, key, value) -> jax.Array:
        """DLA-B: refresh the cache with the new context, append this block, attend over it.

        A cached value is stored raw with a per-channel scale: refreshing V_t ⊙ d equals
        scaling, and GAP(V_t ⊙ s) = GAP(V_t) ⊙ s, so a refresh never touches the [H, W]
        maps; they are read once, in the weighted sum.
        """
        hidden_terms, c = self._advance_context(carry, shared, out)
        cache, index = dict(carry["cache"]), carry["index"]
        capacity = cache["keys"].shape[0]
        # Every entry sees the same context: its terms w_hh(h) and c repeated over the cache.
        hidden_terms, c = repeat_leading(hidden_terms, capacity), repeat_leading(c, capacity)

        def refresh(cached_key, value_mean, value_scale, hidden_terms, c):
            def gate(y):
                return self._dsu(shared, y, hidden_terms, c, method="from_hidden_terms")[0]

            return cached_key * gate(cached_key), value_scale * gate(value_mean * value_scale)

        cache["keys"], cache["value_scales"] = jax.vmap(refresh)(
            cache["keys"], cache["value_means"], cache["value_scales"], hidden_terms, c
        )
        self.sow("intermediates", "value_scales", cache["value_scales"])
        entries = {
            "keys": key,
            "value_means": global_avg_pool(value),
            "value_scales": jnp.ones_like(key),
            "values": value,
        }
        for name, entry in entries.items():
            cache[name] = jax.lax.dynamic_update_index_in_dim(cache[name], entry.astype(cache[name].dtype), index, 0)
        scores = head_scores(repeat_leading(query, capacity), cache["keys"])
        written = (jnp.arange(capacity) <= index)[:, None, None]
        weights = jax.nn.softmax(jnp.where(written, scores, -jnp.inf), axis=0)
        self.sow("intermediates", "attention", weights)
        channel_weights = (expand_heads(weights) * cache["value_scales"]).astype(self.dtype)
        filled = index + 1
        if "final_values" in cache:
            attended, cache["values"], cache["final_values"] = weighted_values_saving_nothing(
                channel_weights, cache["values"], cache["final_values"], filled
            )
        else:
            attended = weighted_values(channel_weights, cache["values"], filled)
        carry["cache"], carry["index"] = cache, filled
        return nn.relu(BatchNorm(dtype=self.dtype, name="attention_bn")(attended, self.train))


class Stage(nn.Module):
    """n bottleneck units at one resolution, sharing one DSU (and, for DLA-L, one conv)."""

    family: str
    num_blocks: int
    planes: int
    stride: int
    reduction: int
    zero_init_last_bn: bool
    drop_path: float
    dsu_context: str
    scan_blocks: bool
    remat_attention: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = self.planes * EXPANSION
        shared = {}
        if self.family in ("dla_l", "dla_b"):
            shared["dsu"] = self.param("dsu", init_dsu_params, width, self.reduction)
        if self.family == "dla_l":
            shared["excite"] = self.param("excite", depthwise_kernel_init, (3, 3, 1, width), jnp.float32)
        shape_free = dict(
            family=self.family,
            planes=self.planes,
            reduction=self.reduction,
            zero_init_last_bn=self.zero_init_last_bn,
            drop_path=self.drop_path,
            dsu_context=self.dsu_context,
            train=train,
            remat_attention=self.remat_attention,
            dtype=self.dtype,
        )
        carry = self._initial_carry(x, width, train, shared)
        carry, _ = Unit(stride=self.stride, project=True, name="block_0", **shape_free)(carry, shared)
        rest = self.num_blocks - 1
        if rest and self.scan_blocks:
            scanned_unit = nn.scan(
                # Reads the block's slice of the stacked parameters through materialize_vectors.
                nn.map_variables(Unit, "params", trans_in_fn=materialize_vectors, init=self.is_initializing()),
                # Each block has its own weights and BN statistics (and attention maps to plot).
                variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
                # Each block needs its own init and its own DropPath mask.
                split_rngs={"params": True, "drop_path": True},
                # The stage's DSU/excite parameters are shared by every block, not stacked.
                in_axes=nn.broadcast,
                length=rest,
            )
            carry, _ = scanned_unit(stride=1, project=False, name=SCANNED_BLOCKS, **shape_free)(carry, shared)
        else:
            for j in range(1, self.num_blocks):
                carry, _ = Unit(stride=1, project=False, name=f"block_{j}", **shape_free)(carry, shared)
        if "final_values" in carry.get("cache", {}):
            return hand_back_final_values(carry["x"], carry["cache"]["values"], carry["cache"]["final_values"])
        return carry["x"]

    def _initial_carry(self, x: jax.Array, width: int, train: bool, shared: dict) -> dict:
        """The DSU's starting context (w_hh of zeros, zeros) and an empty DLA-B cache sized for this stage.

        In training the DLA-B cache also carries `final_values`, the channel that brings the
        final cache back through the backward pass (`weighted_values_saving_nothing`).
        """
        if self.family in ("resnet", "mrla_l"):
            return {"x": x}
        batch, vector_dtype = x.shape[0], at_least_float32(self.dtype)
        h, c = zero_context(batch, width, vector_dtype)
        hidden_terms = apply_dsu(shared["dsu"], width, self.reduction, h, method="hidden_terms")
        carry = {"x": x, "context": (hidden_terms, c)}
        if self.family == "dla_b":
            height, width_px = ((x.shape[1] - 1) // self.stride + 1, (x.shape[2] - 1) // self.stride + 1)
            vectors = jnp.zeros((self.num_blocks, batch, width), vector_dtype)
            carry["cache"] = {
                "keys": vectors,
                "value_means": vectors,
                "value_scales": jnp.ones_like(vectors),
                "values": jnp.zeros((self.num_blocks, batch, height, width_px, width), self.dtype),
            }
            if train:
                carry["cache"]["final_values"] = jnp.zeros_like(carry["cache"]["values"])
            carry["index"] = jnp.zeros((), jnp.int32)
        return carry


def materialize_vectors(params: dict) -> dict:
    """The block's per-channel parameters (BN scale and bias, λ, ...) as `materialized_on_cpu` arrays.

    Inside the scan they are slices of the stacked parameters, which XLA:CPU otherwise
    recomputes at every element of the full-size loops that read them (DLA-L-56 train
    step 6% faster). The depthwise kernels are materialized where they are used.
    """
    return jax.tree.map(lambda leaf: materialized_on_cpu(leaf) if leaf.ndim == 1 else leaf, params)


def unstack_blocks(tree: dict) -> dict:
    """Map a scanned variable tree to the unrolled layout (`blocks`[j-1] -> `block_{j}`)."""
    result = {}
    for name, value in tree.items():
        if name == SCANNED_BLOCKS:
            count = jax.tree.leaves(value)[0].shape[0]
            for j in range(count):
                result[f"block_{j + 1}"] = jax.tree.map(lambda leaf, j=j: leaf[j], value)
        elif isinstance(value, dict) and name != "dsu":
            result[name] = unstack_blocks(value)
        else:
            result[name] = value
    return result


def stack_blocks(tree: dict) -> dict:
    """Map an unrolled variable tree to the scanned layout (inverse of `unstack_blocks`)."""
    result = {}
    rest = sorted((k for k in tree if k.startswith("block_") and k != "block_0"), key=lambda k: int(k[6:]))
    for name, value in tree.items():
        if name in rest:
            continue
        result[name] = stack_blocks(value) if isinstance(value, dict) and name != "dsu" else value
    if rest:
        result[SCANNED_BLOCKS] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(tree[k] for k in rest))
    return result
