"""The ResNet backbone in its two layouts, hosting any of the four families."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dla_jax.models.layers import BatchNorm, Dense, conv, global_avg_pool, relu_from_output
from dla_jax.models.stages import Stage

IMAGENET_STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
LAYOUTS = {
    # CIFAR: 3x3 stem, three stages; the DSU reduces by r = 4.
    "cifar": {"planes": (16, 32, 64), "strides": (1, 2, 2), "reduction": 4, "zero_init_last_bn": False},
    # ImageNet: 7x7 stem + max-pool, four stages, v1.5; r = 16 and bn3 starts at zero.
    "imagenet": {"planes": (64, 128, 256, 512), "strides": (1, 2, 2, 2), "reduction": 16, "zero_init_last_bn": True},
}


def stage_sizes(layout: str, depth: int) -> tuple[int, ...]:
    """Blocks per stage; raises ValueError naming the depths the layout allows."""
    if layout == "cifar":
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(
                f"depth={depth} is not allowed for layout 'cifar': use 9n+2 with n >= 1 (11, 20, 29, 56, 110, 164, ...)"
            )
        return ((depth - 2) // 9,) * 3
    if layout == "imagenet":
        if depth not in IMAGENET_STAGE_SIZES:
            raise ValueError(
                f"depth={depth} is not allowed for layout 'imagenet': use one of {sorted(IMAGENET_STAGE_SIZES)}"
            )
        return IMAGENET_STAGE_SIZES[depth]
    raise ValueError(f"layout={layout!r} is unknown: use one of {sorted(LAYOUTS)}")


class ResNet(nn.Module):
    """Stem, stages, global average pool and a linear classifier; NHWC input.

    The official CIFAR head is AvgPool(8), which on its 32x32 inputs is exactly the
    global average pool used here; other input sizes then work too.
    """

    family: str
    layout: str
    depth: int
    num_classes: int
    dsu_context: str = "per_sample"
    drop_path: float = 0.0
    head_dropout: float = 0.0
    dtype: Any = jnp.float32
    scan_blocks: bool = True
    remat_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        spec = LAYOUTS[self.layout]
        x = x.astype(self.dtype)
        if self.layout == "cifar":
            x = conv(16, 3, dtype=self.dtype, name="stem_conv")(x)
            x = relu_from_output(BatchNorm(dtype=self.dtype, name="stem_bn")(x, train))
        else:
            x = conv(64, 7, 2, dtype=self.dtype, name="stem_conv")(x)
            x = relu_from_output(BatchNorm(dtype=self.dtype, name="stem_bn")(x, train))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = []
        for index, (blocks, planes, stride) in enumerate(
            zip(stage_sizes(self.layout, self.depth), spec["planes"], spec["strides"])
        ):
            x = Stage(
                family=self.family,
                num_blocks=blocks,
                planes=planes,
                stride=stride,
                reduction=spec["reduction"],
                zero_init_last_bn=spec["zero_init_last_bn"],
                drop_path=self.drop_path,
                dsu_context=self.dsu_context,
                scan_blocks=self.scan_blocks,
                remat_attention=self.remat_attention,
                dtype=self.dtype,
                name=f"stage_{index}",
            )(x, train)
            features.append(x)
        pooled = global_avg_pool(x)
        if self.head_dropout:
            # The official ImageNet code's optional dropout before the classifier; it draws
            # from the same rng stream as DropPath (Flax folds in the module path).
            pooled = nn.Dropout(self.head_dropout, rng_collection="drop_path")(pooled, deterministic=not train)
        logits = Dense(self.num_classes, name="head")(pooled)
        return (logits, features) if return_features else logits
