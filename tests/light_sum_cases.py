"""Inputs for the light layer attention's sum and its reference in XLA's own ops (shared by two test files)."""

import jax
import jax.numpy as jnp


def grouped_conv3x3(x, kernel):
    """XLA's own depthwise 3x3 conv, padding 1: the reference for ours."""
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
    )


def light_sum_inputs(family, channels, dtype=jnp.float32):
    """Random light_sum arguments on 6 images of 5x7 pixels (borders on every side)."""
    keys = jax.random.split(jax.random.key(0), 7)
    out, shortcut = (jax.random.normal(key, (6, 5, 7, channels), dtype) for key in keys[:2])
    value_kernel, excite_kernel = (jax.random.normal(key, (3, 3, 1, channels), dtype) for key in keys[2:4])
    heads, gate = (jax.random.normal(key, (6, channels), dtype) for key in keys[4:6])
    lam = jax.random.normal(keys[6], (channels,), dtype)
    refresh = (gate, excite_kernel) if family == "dla_l" else None
    return out, shortcut, value_kernel, heads, lam, refresh


def composed_light_sum(out, shortcut, value_kernel, heads, lam, refresh):
    """The light branch as XLA's grouped convs and autodiff: the reference for `light_sum`."""
    previous = shortcut
    if refresh is not None:
        previous = shortcut * refresh[0][:, None, None, :] + grouped_conv3x3(shortcut, refresh[1])
    return grouped_conv3x3(out, value_kernel) * heads[:, None, None, :] + lam * previous
