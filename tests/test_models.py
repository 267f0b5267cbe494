"""Model behaviour users rely on: sizes, scan = unrolled, batch independence, DropPath, dtypes."""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dla_jax.convert import from_torch_state_dict
from dla_jax.models import FAMILIES, cpu_kernels, create_model, stack_blocks, stages, unstack_blocks
from dla_jax.models.layer_attention import (
    _channel_conv1d_by_band,
    _channel_conv1d_by_shifts,
    channel_conv1d,
    hand_back_final_values,
    light_sum,
    light_sum_batch_norm,
    value_conv,
    weighted_values,
    weighted_values_saving_nothing,
)
from dla_jax.models.layers import (
    DropPath,
    _grouped_conv3x3,
    _grouped_kernel_grad,
    batch_norm,
    conv2d,
    depthwise_conv3x3,
    relu_from_output,
    repeat_leading,
)

from light_sum_cases import composed_light_sum, grouped_conv3x3, light_sum_inputs
from parity_fixtures import CIFAR, DATA, load, nhwc

# The spec's table, from the official code.
PARAMETER_COUNTS = [
    ("cifar", 20, 10, {"resnet": 220_378, "mrla_l": 231_182, "dla_b": 405_230, "dla_l": 410_158}),
    ("cifar", 56, 10, {"resnet": 591_322, "mrla_l": 623_734, "dla_b": 795_990, "dla_l": 802_710}),
    ("cifar", 110, 10, {"resnet": 1_147_738, "mrla_l": 1_212_562, "dla_b": 1_382_130, "dla_l": 1_391_538}),
    ("cifar", 164, 10, {"resnet": 1_704_154, "mrla_l": 1_801_390, "dla_b": 1_968_270, "dla_l": 1_980_366}),
    ("cifar", 20, 100, {"resnet": 243_508, "mrla_l": 254_312, "dla_b": 428_360, "dla_l": 433_288}),
    ("cifar", 110, 100, {"resnet": 1_170_868, "mrla_l": 1_235_692, "dla_b": 1_405_260, "dla_l": 1_414_668}),
    ("imagenet", 50, 1000, {"resnet": 25_557_032, "dla_l": 28_581_812}),
    ("imagenet", 101, 1000, {"resnet": 44_549_160, "dla_l": 47_783_006}),
]


def _count(model, size):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("layout, depth, classes, counts", PARAMETER_COUNTS)
def test_parameter_counts_match_official(layout, depth, classes, counts):
    for family, expected in counts.items():
        model = create_model(family, layout=layout, depth=depth, num_classes=classes)
        assert _count(model, 32 if layout == "cifar" else 224) == expected, family


def _init(model, batch=4, size=32, seed=0):
    images = jax.random.normal(jax.random.key(seed + 1), (batch, size, size, 3))
    return jax.jit(model.init)(jax.random.key(seed), images), images


def _apply(model, variables, images):
    return jax.jit(lambda v, x: model.apply(v, x))(variables, images)


def _loss_and_stats(model, variables, images):
    def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(logits**2), (logits, updates["batch_stats"])

    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_equals_unrolled_loop(family):
    """Outputs, gradients and BN statistics of the scanned stages equal the Python loop.

    Run in float64 so that the comparison is tight: in float32 the two summation orders
    of a randomly initialised deep net differ by ~1e-3 in some gradients.
    """
    with jax.enable_x64(True):
        scanned = create_model(family, layout="cifar", depth=29, num_classes=10, dtype=jnp.float64)
        unrolled = scanned.clone(scan_blocks=False)
        variables, images = _init(scanned, size=16)
        variables = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), variables)
        images = images.astype(jnp.float64)
        unrolled_variables = unstack_blocks(variables)
        # The mapping is a bijection onto the unrolled model's own layout.
        chex.assert_trees_all_equal_shapes(
            unrolled_variables, jax.eval_shape(lambda: unrolled.init(jax.random.key(0), images))
        )
        chex.assert_trees_all_equal(stack_blocks(unrolled_variables), variables)

        grads, (logits, stats) = _loss_and_stats(scanned, variables, images)
        unrolled_grads, (unrolled_logits, unrolled_stats) = _loss_and_stats(unrolled, unrolled_variables, images)
        chex.assert_trees_all_close(logits, unrolled_logits, rtol=1e-10, atol=1e-10)
        chex.assert_trees_all_close(unstack_blocks(grads), unrolled_grads, rtol=1e-8, atol=1e-10)
        chex.assert_trees_all_close(unstack_blocks(stats), unrolled_stats, rtol=1e-10, atol=1e-12)
        chex.assert_tree_all_finite(grads)
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize("family", ["mrla_l", "dla_l"])
def test_saving_the_attention_branch_equals_recomputing_it(family):
    """`remat_attention` only trades memory for compute: same logits, gradients, BN statistics
    (in float64, where the two programs' different summation orders do not show)."""
    with jax.enable_x64(True):
        recomputed = create_model(
            family, layout="cifar", depth=11, num_classes=10, dtype=jnp.float64, remat_attention=True
        )
        variables, images = _init(recomputed, size=16)
        variables = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), variables)
        images = images.astype(jnp.float64)
        grads, (logits, stats) = _loss_and_stats(recomputed, variables, images)
        saved = recomputed.clone(remat_attention=False)
        saved_grads, (saved_logits, saved_stats) = _loss_and_stats(saved, variables, images)
        chex.assert_trees_all_close(saved_logits, logits, rtol=1e-10, atol=1e-10)
        chex.assert_trees_all_close(saved_grads, grads, rtol=1e-8, atol=1e-10)
        chex.assert_trees_all_close(saved_stats, stats, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["mrla_l", "dla_l"])
def test_the_cpu_kernels_train_the_model_as_xla_ops_do(family, monkeypatch):
    """With the light branch and its BatchNorm on the CPU kernels, the whole model in training
    has XLA's logits, gradients and BN statistics (float64)."""
    with jax.enable_x64(True):
        model = create_model(family, layout="cifar", depth=11, num_classes=10, dtype=jnp.float64)
        variables, images = _init(model, size=16)
        variables = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), variables)
        images = images.astype(jnp.float64)
        train_logits = lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"])[0]  # noqa: E731
        kernels = {"LightSumForwardF64", "LightSumGradientSumsF64", "LightSumBackwardF64"}
        assert cpu_kernel_calls(train_logits, images) == kernels
        grads, (logits, stats) = _loss_and_stats(model, variables, images)
        monkeypatch.setattr(cpu_kernels, "supports", lambda dtype, channels: False)
        assert not cpu_kernel_calls(train_logits, images)
        xla_grads, (xla_logits, xla_stats) = _loss_and_stats(model, variables, images)
        chex.assert_trees_all_close(logits, xla_logits, rtol=1e-10, atol=1e-10)
        chex.assert_trees_all_close(grads, xla_grads, rtol=1e-8, atol=1e-10)
        chex.assert_trees_all_close(stats, xla_stats, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["dla_l", "dla_b"])
def test_per_sample_logits_do_not_depend_on_the_batch(family):
    # The official weights of the parity fixture: BN statistics far from trivial.
    state, arrays = load(DATA / CIFAR[family])
    model = create_model(family, layout="cifar", depth=20, num_classes=10, dsu_context="per_sample")
    variables = from_torch_state_dict(model, state)
    images = np.concatenate([nhwc(arrays["input_eval"]), nhwc(arrays["input_train"])])
    apply = jax.jit(lambda x: model.apply(variables, x))
    together = apply(images)
    alone = jnp.concatenate([apply(images[i : i + 1]) for i in range(len(images))])
    chex.assert_trees_all_close(alone, together, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(apply(images[::-1])[::-1], together, rtol=1e-5, atol=1e-5)

    # The official behaviour is batch dependent: this is what "per_sample" removes.
    official = jax.jit(lambda x: model.clone(dsu_context="first_sample").apply(variables, x))
    official_alone = jnp.concatenate([official(images[i : i + 1]) for i in range(len(images))])
    chex.assert_trees_all_close(official_alone, together, rtol=1e-5, atol=1e-5)
    batch_effect = float(jnp.abs(official(images) - together).max())
    assert batch_effect > 1e-5 * max(1.0, float(jnp.abs(together).max())), batch_effect


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_are_finite_with_drop_path(family):
    model = create_model(family, layout="cifar", depth=11, num_classes=10, drop_path=0.2)
    variables, images = _init(model)

    def loss(params):
        logits, _ = model.apply(
            {**variables, "params": params},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"drop_path": jax.random.key(5)},
        )
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.jit(jax.grad(loss))(variables["params"])
    chex.assert_tree_all_finite(grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_drop_path_is_identity_at_rate_zero_and_in_eval():
    x = jax.random.normal(jax.random.key(0), (16, 4, 4, 8))
    rngs = {"drop_path": jax.random.key(1)}
    chex.assert_trees_all_equal(DropPath(0.0).apply({}, x, True, rngs=rngs), x)
    chex.assert_trees_all_equal(DropPath(0.5).apply({}, x, False), x)


def test_drop_path_is_unbiased_and_per_sample_in_training():
    x = jnp.ones((20_000, 2, 2, 3))
    y = DropPath(0.3).apply({}, x, True, rngs={"drop_path": jax.random.key(7)})
    per_sample = np.asarray(y).reshape(y.shape[0], -1)
    # Each sample is either dropped or kept whole (rescaled by 1/keep).
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.7], rtol=1e-6)
    assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
    assert abs(float(y.mean()) - 1.0) < 0.02
    assert abs(float((per_sample[:, 0] == 0).mean()) - 0.3) < 0.02


def test_drop_path_changes_training_output_only_with_rate():
    model = create_model("dla_l", layout="cifar", depth=11, num_classes=10, drop_path=0.5)
    variables, images = _init(model, batch=8)
    train = jax.jit(
        lambda key: model.apply(variables, images, train=True, mutable=["batch_stats"], rngs={"drop_path": key})[0]
    )
    assert not np.allclose(train(jax.random.key(0)), train(jax.random.key(1)))
    chex.assert_trees_all_equal(_apply(model, variables, images), _apply(model, variables, images))


def test_head_dropout_acts_in_training_only():
    """The dropout before the classifier draws per step in training, is off in eval, and a rate
    of 0 leaves the model deterministic (ResNet without DropPath has no other randomness)."""
    plain = create_model("resnet", layout="cifar", depth=11, num_classes=10)
    dropped = plain.clone(head_dropout=0.5)
    variables, images = _init(plain, batch=8)

    def train(model, seed):
        rngs = {"drop_path": jax.random.key(seed)}
        return model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)[0]

    assert not np.allclose(train(dropped, 0), train(dropped, 1))
    chex.assert_trees_all_equal(train(plain, 0), train(plain, 1))
    chex.assert_trees_all_equal(_apply(dropped, variables, images), _apply(plain, variables, images))
    with pytest.raises(ValueError, match="head_dropout=1.0 must be in"):
        create_model("resnet", layout="imagenet", depth=50, num_classes=10, head_dropout=1.0)


@pytest.mark.parametrize("family", ["resnet", "dla_l", "dla_b"])
def test_bfloat16_compute_stays_close_to_float32(family):
    model = create_model(family, layout="cifar", depth=11, num_classes=10)
    variables, images = _init(model, batch=4)
    reference = _apply(model, variables, images)
    half = model.clone(dtype=jnp.bfloat16)
    logits = _apply(half, variables, images)
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite(logits)
    scale = float(jnp.abs(reference).max())
    assert float(jnp.abs(logits - reference).max()) < 0.05 * max(1.0, scale)
    # Parameters stay float32 whatever the compute dtype.
    shapes = jax.eval_shape(lambda: half.init(jax.random.key(0), images))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes["params"])} == {jnp.dtype("float32")}


def test_return_features_gives_each_stage_output():
    model = create_model("dla_l", layout="cifar", depth=11, num_classes=10)
    variables, images = _init(model, batch=2)
    logits, features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, images)
    assert [f.shape for f in features] == [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256)]
    chex.assert_trees_all_close(logits, _apply(model, variables, images))


def test_imagenet_layout_runs_every_family_and_zero_inits_last_bn():
    for family in FAMILIES:
        model = create_model(family, layout="imagenet", depth=50, num_classes=7)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
        assert shapes["params"]["head"]["linear"]["kernel"].shape == (2048, 7)
    model = create_model("resnet", layout="imagenet", depth=50, num_classes=7)
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))()["params"]
    assert float(jnp.abs(params["stage_0"]["block_0"]["bottleneck"]["bn3"]["scale"]).max()) == 0.0
    assert float(params["stage_0"]["block_0"]["bottleneck"]["bn2"]["scale"].min()) == 1.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"family": "dla_x"}, "family='dla_x' is unknown"),
        ({"layout": "mnist"}, "layout='mnist' is unknown"),
        ({"depth": 21}, "9n+2"),
        ({"layout": "imagenet", "depth": 34}, "[50, 101]"),
        ({"dsu_context": "batch"}, "dsu_context"),
        ({"drop_path": 1.0}, "drop_path"),
    ],
)
def test_bad_arguments_name_what_is_allowed(kwargs, message):
    arguments = {"family": "dla_l", "layout": "cifar", "depth": 20, "num_classes": 10, **kwargs}
    family = arguments.pop("family")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        create_model(family, **arguments)


def assert_values_and_gradients_close(ours, reference, *args, atol=1e-5, gradient_atol=1e-5):
    """ours(*args) equals reference(*args), and so do the gradients of Σ sin(·) in every argument."""
    chex.assert_trees_all_close(ours(*args), reference(*args), rtol=1e-5, atol=atol)
    argnums = tuple(range(len(args)))
    gradients = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=argnums)(*args) for f in (ours, reference)]
    chex.assert_trees_all_close(*gradients, rtol=1e-5, atol=gradient_atol)


@pytest.mark.parametrize("kernel_size, stride", [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)])
def test_conv_gradients_equal_xla_convolution(kernel_size, stride):
    """conv2d's hand-written kernel gradient (used on the CPU) equals XLA's own."""
    pad = (kernel_size - 1) // 2
    x = jax.random.normal(jax.random.key(0), (3, 11, 11, 4))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 4, 5))

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    assert_values_and_gradients_close(lambda x, kernel: conv2d(x, kernel, stride, pad), reference, x, kernel)


@pytest.mark.parametrize("batch", [1, 6, 16, 17, 48])
def test_depthwise_conv_and_gradients_equal_xla_grouped_convolution(batch):
    """The nine-product depthwise conv and its custom VJP (batch split into tiles that
    divide it: 1, 6, 16, 1 and 16 here) equal XLA's grouped convolution."""
    channels = 5
    x = jax.random.normal(jax.random.key(0), (batch, 6, 7, channels))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, channels))
    assert_values_and_gradients_close(depthwise_conv3x3, grouped_conv3x3, x, kernel, gradient_atol=1e-4)


@pytest.mark.parametrize("channels", [5, 32])
def test_dla_b_value_conv_and_gradients_equal_xla_grouped_convolution(channels):
    """DLA-B's value conv by the light branch's CPU kernels with neutral gates (32 channels) or
    as `depthwise_conv3x3` (5, which the kernels do not take) equals XLA's grouped convolution."""
    x = jax.random.normal(jax.random.key(0), (3, 6, 7, channels))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, channels))
    expected = {"LightSumForwardF32", "LightSumBackwardF32"} if channels == 32 else set()
    assert cpu_kernel_calls(value_conv, x, kernel) == expected
    assert_values_and_gradients_close(value_conv, grouped_conv3x3, x, kernel, gradient_atol=1e-4)


def test_depthwise_backward_of_other_backends_equals_autodiff():
    """On GPUs/TPUs the custom VJP's input gradient is the grouped conv of dy with the
    flipped kernel, and its kernel gradient XLA's: both equal autodiff of the grouped conv."""
    channels = 5
    x, dy = (jax.random.normal(jax.random.key(seed), (12, 6, 7, channels)) for seed in (0, 1))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 1, channels))
    dx, dkernel = jax.vjp(grouped_conv3x3, x, kernel)[1](dy)
    chex.assert_trees_all_close(_grouped_conv3x3(dy, kernel[::-1, ::-1]), dx, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(_grouped_kernel_grad(x, dy, None), dkernel[:, :, 0, :], rtol=1e-5, atol=1e-4)
    scale = jax.random.uniform(jax.random.key(3), (12, channels))
    scaled_dkernel = jax.vjp(grouped_conv3x3, x, kernel)[1](dy * scale[:, None, None, :])[1]
    chex.assert_trees_all_close(_grouped_kernel_grad(x, dy, scale), scaled_dkernel[:, :, 0, :], rtol=1e-5, atol=1e-4)


def test_batch_norm_and_its_gradients_equal_autodiff_of_the_formula():
    """The training BatchNorm's hand-written VJP equals autodiff of its formula, for the
    normalised output and for the batch mean and variance it also returns."""

    def formula(x, scale, bias):
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias, mean, var

    x = 3 * jax.random.normal(jax.random.key(0), (4, 5, 6, 7)) + 1
    scale, bias = (jax.random.normal(jax.random.key(seed), (7,)) for seed in (1, 2))
    ours = _flat(lambda x, scale, bias: batch_norm(x, scale, bias, 1e-5))
    assert_values_and_gradients_close(ours, _flat(formula), x, scale, bias, gradient_atol=1e-4)


def _flat(function):
    """function's outputs raveled into one vector (so that one gradient covers them all)."""
    return lambda *args: jnp.concatenate([part.ravel() for part in function(*args)])


def test_relu_from_output_and_its_gradient_equal_jax_relu():
    """The ReLU that masks its gradient by its output equals jax.nn.relu, zero gradient at 0 included."""
    x = jnp.concatenate([jax.random.normal(jax.random.key(0), (4, 5, 6)).ravel(), jnp.zeros(7), jnp.array([-0.0])])
    assert_values_and_gradients_close(relu_from_output, jax.nn.relu, x)
    assert (jax.grad(lambda x: jnp.sum(relu_from_output(x)))(x)[-8:] == 0).all()


def test_repeat_leading_and_its_gradient_equal_a_broadcast():
    """repeat_leading equals broadcasting along a new leading axis, and its gradient (the slices
    summed in one product) equals autodiff's reduction of the broadcast."""
    x = jax.random.normal(jax.random.key(0), (4, 6))
    assert_values_and_gradients_close(
        lambda x: repeat_leading(x, 5) * jnp.arange(5.0)[:, None, None],
        lambda x: jnp.broadcast_to(x, (5, 4, 6)) * jnp.arange(5.0)[:, None, None],
        x,
    )


@pytest.mark.parametrize("dsu_context", ["per_sample", "first_sample"])
def test_dla_b_refresh_has_the_gradients_of_the_broadcast_context(dsu_context, monkeypatch):
    """DLA-B's refresh repeats w_hh(h) and c over its cache with `repeat_leading`: the model's
    logits, gradients and BN statistics equal those with a plain broadcast (float64)."""
    with jax.enable_x64(True):
        model = create_model(
            "dla_b", layout="cifar", depth=20, num_classes=10, dtype=jnp.float64, dsu_context=dsu_context
        )
        variables, images = _init(model, size=16)
        variables = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), variables)
        images = images.astype(jnp.float64)
        ours = _loss_and_stats(model, variables, images)
        monkeypatch.setattr(stages, "repeat_leading", lambda x, count: jnp.broadcast_to(x, (count, *x.shape)))
        broadcast = _loss_and_stats(model, variables, images)
        chex.assert_trees_all_close(ours, broadcast, rtol=1e-10, atol=1e-12)


def test_channel_conv1d_equals_torch_conv1d_along_channels():
    """Both ways of the q/k projection (the CPU's banded matrix product, the shifted adds
    other backends run) equal torch's zero-padded Conv1d along C, and so do their gradients."""
    for size in (3, 5):
        y = jax.random.normal(jax.random.key(size), (4, 64))
        kernel = jax.random.normal(jax.random.key(size + 1), (size,))
        expected = np.stack([np.correlate(row, np.asarray(kernel), "same") for row in np.asarray(y)])
        for implementation in (channel_conv1d, _channel_conv1d_by_band, _channel_conv1d_by_shifts):
            np.testing.assert_allclose(implementation(y, kernel), expected, rtol=1e-5, atol=1e-5)
        assert_values_and_gradients_close(_channel_conv1d_by_shifts, _channel_conv1d_by_band, y, kernel)


def cpu_kernel_calls(function, *args) -> set[str]:
    """The CPU kernels that function's value and gradient call (their FFI targets, without the prefix)."""
    text = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(function(*a))))).lower(*args).as_text()
    return set(re.findall(r"dla_jax_(\w+)", text))


@pytest.mark.parametrize("path", ["cpu_kernels", "xla"])
@pytest.mark.parametrize("family", ["mrla_l", "dla_l"])
def test_light_sum_and_its_gradients_equal_autodiff(family, path, monkeypatch):
    """The light families' fused branch (hand-written VJP) equals the autodiff composition:
    dwconv(out)·heads + λ·previous, previous = shortcut (MRLA-light) or shortcut·gate +
    dwconv(shortcut) (DLA-L); by the compiled CPU kernels and by XLA's ops (their fallback)."""
    if path == "xla":
        monkeypatch.setattr(cpu_kernels, "supports", lambda dtype, channels: False)
    args = light_sum_inputs(family, channels=32)
    expected = {"LightSumForwardF32", "LightSumBackwardF32"} if path == "cpu_kernels" else set()
    assert cpu_kernel_calls(light_sum, *args) == expected
    assert_values_and_gradients_close(light_sum, composed_light_sum, *args, gradient_atol=1e-4)


@pytest.mark.parametrize("family", ["mrla_l", "dla_l"])
def test_light_sum_kernels_in_float64_and_narrow_channels_fall_back(family):
    """The kernels' float64 build agrees with the composition to float64 precision; a channel
    count that is not whole SIMD vectors (8 in float32) takes XLA's ops, with the same results."""
    with jax.enable_x64(True):
        args = light_sum_inputs(family, channels=16, dtype=jnp.float64)
        assert cpu_kernel_calls(light_sum, *args) == {"LightSumForwardF64", "LightSumBackwardF64"}
        ours, reference = (jax.vjp(f, *args) for f in (light_sum, composed_light_sum))
        chex.assert_trees_all_close(ours[0], reference[0], rtol=1e-12, atol=1e-12)
        cotangent = jax.random.normal(jax.random.key(9), ours[0].shape, jnp.float64)
        chex.assert_trees_all_close(ours[1](cotangent), reference[1](cotangent), rtol=1e-10, atol=1e-10)
    args = light_sum_inputs(family, channels=8)
    assert not cpu_kernel_calls(light_sum, *args)
    assert_values_and_gradients_close(light_sum, composed_light_sum, *args, gradient_atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("path", ["cpu_kernels", "xla"])
@pytest.mark.parametrize("family", ["mrla_l", "dla_l"])
def test_light_sum_batch_norm_equals_batch_norm_of_the_composition(family, path, dtype, monkeypatch):
    """The light branch fused with its training BatchNorm (statistics from the forward kernel's
    per-image ones; backward, z recomputed and dz formed inside the kernels) equals `batch_norm`
    of the autodiff composition in float64: y, the batch mean and variance, and their gradients
    (in float64 to 1e-10; in float32 to 1e-4 of each one's largest value)."""
    if path == "xla":
        monkeypatch.setattr(cpu_kernels, "supports", lambda dtype, channels: False)
    with jax.enable_x64(True):
        out, *rest = light_sum_inputs(family, channels=32, dtype=jnp.float64)
        scale, bias = (jax.random.normal(jax.random.key(seed), (32,), jnp.float64) for seed in (1, 2))
        exact = (out / 4 + 2, *rest, scale, bias)  # mean far from 0 against the spread: sums must not cancel
        args = jax.tree.map(lambda leaf: leaf.astype(dtype), exact)
        ours = _flat(lambda *a: light_sum_batch_norm(*a, 1e-5))
        reference = _flat(lambda *a: batch_norm(composed_light_sum(*a[:6]), *a[6:], 1e-5))
        expected = {f"LightSum{kind}F{dtype(0).itemsize * 8}" for kind in ("Forward", "GradientSums", "Backward")}
        assert cpu_kernel_calls(ours, *args) == (expected if path == "cpu_kernels" else set())
        argnums = tuple(range(len(args)))
        results = [
            (f(*a), jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=argnums)(*a))
            for f, a in ((ours, args), (reference, exact))
        ]
        for ours_leaf, exact_leaf in zip(*map(jax.tree.leaves, results)):
            tolerance = 1e-10 if dtype == jnp.float64 else 1e-4 * float(jnp.max(jnp.abs(exact_leaf)))
            np.testing.assert_allclose(ours_leaf, exact_leaf, rtol=0, atol=tolerance)


@pytest.mark.parametrize("filled", [1, 3, 4])
def test_dla_b_weighted_values_and_gradients_equal_einsum_over_the_filled_slots(filled):
    """DLA-B's cache read equals the plain einsum over the first `filled` slots, values and gradients."""
    weights = jax.random.normal(jax.random.key(0), (4, 3, 6))
    values = jax.random.normal(jax.random.key(1), (4, 3, 5, 7, 6))
    assert_values_and_gradients_close(
        lambda weights, values: weighted_values(weights, values, jnp.int32(filled)),
        lambda weights, values: jnp.einsum("tbc,tbhwc->bhwc", weights[:filled], values[:filled]),
        weights,
        values,
    )


def _attend_over_cache(xs, query, saving_nothing, scan):
    """A DLA-B-like loop: append tanh(x + previous output) to a cache, softmax-attend over it."""
    steps = xs.shape[0]

    def step(carry, x):
        out, cache, final_values, index = carry
        cache = jax.lax.dynamic_update_index_in_dim(cache, jnp.tanh(x + out), index, 0)
        scores = jnp.mean(cache * query, axis=(2, 3))
        weights = jax.nn.softmax(jnp.where((jnp.arange(steps) <= index)[:, None, None], scores, -jnp.inf), axis=0)
        if saving_nothing:
            out, cache, final_values = weighted_values_saving_nothing(weights, cache, final_values, index + 1)
        else:
            out = weighted_values(weights, cache, index + 1)
        return (out, cache, final_values, index + 1), None

    carry = (jnp.zeros_like(xs[0]), jnp.zeros_like(xs), jnp.zeros_like(xs), 0)
    if scan:
        carry, _ = jax.lax.scan(step, carry, xs)
    else:
        for x in xs:
            carry, _ = step(carry, x)
    out, cache, final_values, _ = carry
    if saving_nothing:
        out = hand_back_final_values(out, cache, final_values)
    return jnp.sum(jnp.sin(out))


@pytest.mark.parametrize(("channels", "dtype"), [(5, jnp.float32), (16, jnp.float32), (8, jnp.float64)])
@pytest.mark.parametrize("scan", [True, False])
def test_dla_b_cache_read_saving_nothing_has_the_same_gradients(scan, channels, dtype):
    """The final cache handed back through the backward pass gives autodiff's gradients; its
    backward pass by the CPU kernel (`cpu_kernels.cache_read_backward`, 16 float32 or 8 float64
    channels) or by XLA's ops (5 channels, which the kernel does not take)."""
    with jax.enable_x64(dtype == jnp.float64):
        xs = jax.random.normal(jax.random.key(0), (4, 2, 3, 3, channels), dtype)
        query = jax.random.normal(jax.random.key(1), (2, 3, 3, channels), dtype)
        kernel = f"CacheReadBackwardF{jnp.dtype(dtype).itemsize * 8}"
        kernels = cpu_kernel_calls(lambda xs: _attend_over_cache(xs, query, True, scan), xs)
        assert kernels == ({kernel} if channels > 5 else set())
        gradient = jax.grad(_attend_over_cache, argnums=(0, 1))
        gradients = [gradient(xs, query, saving_nothing, scan) for saving_nothing in (True, False)]
        tolerance = 1e-12 if dtype == jnp.float64 else 1e-6
        chex.assert_trees_all_close(*gradients, rtol=1e-5, atol=tolerance)
