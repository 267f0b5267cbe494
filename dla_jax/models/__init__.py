"""Model families: plain ResNet, MRLA-light, DLA-L and DLA-B, CIFAR and ImageNet layouts."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from dla_jax.models.resnet import LAYOUTS, ResNet, stage_sizes
from dla_jax.models.stages import DSU_CONTEXTS, FAMILIES, stack_blocks, unstack_blocks

__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "DSU_CONTEXTS",
    "create_model",
    "from_config",
    "validate_depth",
    "stage_sizes",
    "stack_blocks",
    "unstack_blocks",
]


def validate_depth(layout: str, depth: int) -> None:
    """Raise ValueError naming the allowed depths if `depth` does not fit `layout`."""
    stage_sizes(layout, depth)


def create_model(
    family: str,
    *,
    layout: str,
    depth: int,
    num_classes: int,
    dsu_context: str = "per_sample",
    drop_path: float = 0.0,
    head_dropout: float = 0.0,
    dtype: Any = jnp.float32,
    scan_blocks: bool = True,
    remat_attention: bool = False,
) -> nn.Module:
    """Build a ResNet of `family` ("resnet", "mrla_l", "dla_l", "dla_b").

    `dsu_context="first_sample"` reproduces the official code's refresh, which uses
    sample 0's DSU context for the whole batch; "per_sample" refreshes each sample with
    its own. `scan_blocks=False` unrolls the stages (tree layout: see `unstack_blocks`).
    `drop_path` (stochastic depth of the attention branches) and `head_dropout` (dropout
    before the classifier) act in training only. `remat_attention` recomputes the light
    attention branch (MRLA-light, DLA-L) in the backward pass instead of saving it: less
    memory, slower (10% on the CPU, 13% on a GPU).
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is unknown: use one of {list(FAMILIES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown: use one of {sorted(LAYOUTS)}")
    validate_depth(layout, depth)
    if dsu_context not in DSU_CONTEXTS:
        raise ValueError(f"dsu_context={dsu_context!r} is unknown: use one of {list(DSU_CONTEXTS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be at least 1")
    for name, rate in (("drop_path", drop_path), ("head_dropout", head_dropout)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name}={rate} must be in [0, 1)")
    return ResNet(
        family=family,
        layout=layout,
        depth=depth,
        num_classes=num_classes,
        dsu_context=dsu_context,
        drop_path=drop_path,
        head_dropout=head_dropout,
        dtype=jnp.dtype(dtype),
        scan_blocks=scan_blocks,
        remat_attention=remat_attention,
    )


def from_config(model_config: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The model a training config's `model` section (or an export's model config) describes.

    Exports hold no `drop_path`, `head_dropout` or `remat_attention`: they only act in
    training, so they take their inference values there.
    """
    return create_model(
        model_config["family"],
        layout=model_config["layout"],
        depth=model_config["depth"],
        num_classes=num_classes,
        dsu_context=model_config["dsu_context"],
        drop_path=model_config.get("drop_path", 0.0),
        head_dropout=model_config.get("head_dropout", 0.0),
        dtype=jnp.dtype(model_config["dtype"]),
        scan_blocks=model_config["scan_blocks"],
        remat_attention=model_config.get("remat_attention", False),
    )
