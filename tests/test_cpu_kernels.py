"""The compiled CPU kernels: built once into a cache, split over a mesh's devices, optional."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dla_jax.models.layer_attention import (
    hand_back_final_values,
    light_sum,
    light_sum_batch_norm,
    weighted_values,
    weighted_values_saving_nothing,
)
from dla_jax.models.layers import batch_norm

from light_sum_cases import composed_light_sum, light_sum_inputs

# Prints whether the kernels are in use and the largest gap between light_sum's gradients and
# the composition's (XLA's grouped convs, autodiff).
CHECK = """
import warnings
warnings.simplefilter("default")
import jax, jax.numpy as jnp
from dla_jax.models import cpu_kernels
from dla_jax.models.layer_attention import light_sum, light_sum_batch_norm
from dla_jax.models.layers import batch_norm
from light_sum_cases import composed_light_sum, light_sum_inputs
args = light_sum_inputs("dla_l", channels=32)
grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(*args)
         for f in (light_sum, composed_light_sum)]
gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*map(jax.tree.leaves, grads)))
print("kernels", cpu_kernels.available(), "gap", gap)
"""


def _check(cache, **env):
    tests = os.path.dirname(__file__)
    environment = dict(os.environ, DLA_JAX_CACHE=str(cache), PYTHONPATH=tests, **env)
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=environment, timeout=300)


def test_kernels_are_built_once_into_the_cache(tmp_path):
    first = _check(tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("kernels True"), first.stdout
    (library,) = tmp_path.glob("light_sum_kernels-*.so")
    built = library.stat().st_mtime_ns
    second = _check(tmp_path)
    assert second.returncode == 0 and second.stdout.startswith("kernels True"), second.stderr
    assert library.stat().st_mtime_ns == built
    assert float(second.stdout.split()[-1]) < 1e-4


def test_without_a_compiler_xla_ops_give_the_same_gradients_and_one_warning(tmp_path):
    result = _check(tmp_path, CXX="false")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("kernels False"), result.stdout
    assert float(result.stdout.split()[-1]) < 1e-4
    assert result.stderr.count("dla_jax's CPU kernels are not available") == 1, result.stderr
    assert "false failed to build light_sum_kernels.cc" in result.stderr
    assert not list(tmp_path.glob("*.so"))


def _batch_normalized(function):
    """function's output through a training BatchNorm (fixed scale and bias): y, mean and variance in one vector."""
    scale, bias = jnp.linspace(0.5, 2.0, 32), jnp.linspace(-1.0, 1.0, 32)
    if function is light_sum:
        return lambda *a: jnp.concatenate([part.ravel() for part in light_sum_batch_norm(*a, scale, bias, 1e-5)])
    return lambda *a: jnp.concatenate([part.ravel() for part in batch_norm(function(*a), scale, bias, 1e-5)])


@pytest.mark.parametrize("batch_normalized", [False, True])
def test_on_a_mesh_each_device_runs_its_own_images(batch_normalized):
    """Under `jax.set_mesh` the kernels see each device's share of the batch (no gather of
    the batch), and the gradients equal those of the composition on one device; fused with
    the BatchNorm too, whose statistics and sums are then reduced over the devices (XLA may
    gather its per-channel vectors)."""
    args = light_sum_inputs("dla_l", channels=32)
    args = jax.tree.map(lambda leaf: jnp.concatenate([leaf, leaf[:2]]) if leaf.shape[0] == 6 else leaf, args)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    sharded = jax.tree.map(lambda leaf: jax.device_put(leaf, batch) if leaf.shape[0] == 8 else leaf, args)
    ours, reference = (_batch_normalized(f) if batch_normalized else f for f in (light_sum, composed_light_sum))

    def grads(function):
        return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(function(*a))), argnums=(0, 1, 2, 3, 4, 5)))

    with jax.set_mesh(mesh):
        compiled = grads(ours).lower(*sharded).compile()
        ours = compiled(*sharded)
    kernel_calls = [line for line in compiled.as_text().splitlines() if 'custom_call_target="dla_jax_LightSum' in line]
    assert len(kernel_calls) == (3 if batch_normalized else 2)
    results = [line.split(" custom-call(")[0].split(" = ")[1] for line in kernel_calls]
    one_image = {"1", str(5 * 7)}  # its vectors [1, ...] and its 5x7 pixels [35, C]
    assert all(set(re.findall(r"f32\[(\d+),", shapes)) <= one_image for shapes in results), results
    gathered = re.findall(r"= f32\[([\d,]*)\]\S* all-gather\(", compiled.as_text())
    assert all("," not in shape for shape in gathered), gathered  # per-channel vectors at most, never images
    chex.assert_trees_all_close(ours, grads(reference)(*args), rtol=1e-5, atol=1e-4)


def _read_cache(weights, values, saving_nothing):
    """DLA-B's read of a full cache, its backward pass by the kernel (saving nothing) or by autodiff of XLA's ops."""
    filled = jnp.int32(values.shape[0] - 1)
    if not saving_nothing:
        return weighted_values(weights, values, filled)
    out, values, final_values = weighted_values_saving_nothing(weights, values, jnp.zeros_like(values), filled)
    return hand_back_final_values(out, values, final_values)


def test_on_a_mesh_the_cache_read_kernel_runs_each_devices_images():
    """DLA-B's cache read backward under `jax.set_mesh`: the cache [T, B, ...] split on its batch axis,
    the kernel sees one image per device, and the gradients equal autodiff's of XLA's ops on one device."""
    weights = jax.random.normal(jax.random.key(0), (3, 8, 32))
    values = jax.random.normal(jax.random.key(1), (3, 8, 5, 7, 32))
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = NamedSharding(mesh, P(None, ("data", "fsdp")))
    sharded = [jax.device_put(x, batch) for x in (weights, values)]

    def grads(saving_nothing):
        return jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(_read_cache(*a, saving_nothing))), argnums=(0, 1)))

    with jax.set_mesh(mesh):
        compiled = grads(True).lower(*sharded).compile()
        ours = compiled(*sharded)
    (kernel_call,) = [line for line in compiled.as_text().splitlines() if 'custom_call_target="dla_jax_Cache' in line]
    assert kernel_call.split(" custom-call(")[0].split(" = ")[1].startswith("(f32[3,1,32]{2,1,0}, f32[3,1,5,7,32]")
    assert not re.findall(r"= f32\[[\d,]*,[\d,]*\]\S* all-gather\(", compiled.as_text())
    chex.assert_trees_all_close(ours, grads(False)(weights, values), rtol=1e-5, atol=1e-5)
