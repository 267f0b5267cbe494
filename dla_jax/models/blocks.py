"""The bottleneck residual block (ResNet v1.5: the stride sits on the 3x3 conv)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dla_jax.models.layers import BatchNorm, conv, relu_from_output

EXPANSION = 4


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1-BN, + shortcut, ReLU.

    Returns the block output and its shortcut tensor (the input, or its projection):
    the layer-attention families reuse the shortcut as the previous layer's output.
    `zero_init_last_bn` starts bn3 at γ = 0 (the official ImageNet init). `output_kept`
    says the caller keeps the block output for its own backward pass (the layer-attention
    branch reads it), so the final ReLU takes its gradient mask from that output; the
    plain ResNet keeps the final ReLU's own mask (one byte per element), as nothing else
    in the block keeps its output.
    """

    planes: int
    stride: int
    project: bool
    zero_init_last_bn: bool = False
    output_kept: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        width = self.planes * EXPANSION
        out = conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = relu_from_output(BatchNorm(dtype=self.dtype, name="bn1")(out, train))
        out = conv(self.planes, 3, self.stride, dtype=self.dtype, name="conv2")(out)
        out = relu_from_output(BatchNorm(dtype=self.dtype, name="bn2")(out, train))
        out = conv(width, 1, dtype=self.dtype, name="conv3")(out)
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        out = BatchNorm(scale_init=last_scale, dtype=self.dtype, name="bn3")(out, train)
        shortcut = x
        if self.project:
            shortcut = conv(width, 1, self.stride, dtype=self.dtype, name="downsample_conv")(x)
            shortcut = BatchNorm(dtype=self.dtype, name="downsample_bn")(shortcut, train)
        final_relu = relu_from_output if self.output_kept else nn.relu
        return final_relu(out + shortcut), shortcut
