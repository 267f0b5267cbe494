"""Converted official weights give the official code's logits and BN statistics."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dla_jax.convert import from_torch_state_dict
from dla_jax.models import create_model, unstack_blocks

from parity_fixtures import CIFAR, DATA, IMAGENET, assert_close_to_reference, load, nhwc


def _forward(model, variables, images, train):
    if train:
        return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, images)
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


@pytest.mark.parametrize(
    "family, scan_blocks", [(family, True) for family in sorted(CIFAR)] + [("dla_b", False), ("dla_l", False)]
)
def test_cifar_parity(family, scan_blocks):
    state, arrays = load(DATA / CIFAR[family])
    official = create_model(
        family, layout="cifar", depth=20, num_classes=10, dsu_context="first_sample", scan_blocks=scan_blocks
    )
    per_sample = official.clone(dsu_context="per_sample")
    variables = from_torch_state_dict(official, state)

    assert_close_to_reference(_forward(official, variables, nhwc(arrays["input_eval"]), False), arrays["logits_eval"])
    assert_close_to_reference(
        _forward(per_sample, variables, nhwc(arrays["input_eval"]), False), arrays["logits_eval_fixed"]
    )
    logits, updates = _forward(official, variables, nhwc(arrays["input_train"]), True)
    assert_close_to_reference(logits, arrays["logits_train"])

    # Running statistics follow PyTorch's rule (unbiased variance, momentum 0.1).
    expected = {name[len("after_train/") :]: value for name, value in arrays.items() if name.startswith("after_train/")}
    expected = {name: value for name, value in expected.items() if not name.endswith("num_batches_tracked")}
    stats = from_torch_state_dict(official.clone(scan_blocks=False), {**state, **expected})["batch_stats"]
    ours = updates["batch_stats"] if not scan_blocks else unstack_blocks(updates["batch_stats"])
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(stats)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(jax.tree.leaves(stats)) == 2 * sum(1 for n in expected if n.endswith("running_mean"))


@pytest.mark.skipif(
    not IMAGENET.exists(),
    reason=f"{IMAGENET} is absent: the 33 MB ImageNet fixture is read from ../shared/parity (CI has it)",
)
def test_imagenet_dla_l_r50_parity():
    state, arrays = load(IMAGENET)
    official = create_model("dla_l", layout="imagenet", depth=50, num_classes=1000, dsu_context="first_sample")
    variables = from_torch_state_dict(official, state)
    assert_close_to_reference(_forward(official, variables, nhwc(arrays["input_eval"]), False), arrays["logits_eval"])
    per_sample = official.clone(dsu_context="per_sample")
    assert_close_to_reference(
        _forward(per_sample, variables, nhwc(arrays["input_eval"]), False), arrays["logits_eval_fixed"]
    )
    logits, _ = _forward(official, variables, nhwc(arrays["input_train"]), True)
    assert_close_to_reference(logits, arrays["logits_train"])
