"""Loading the official code's outputs (../shared/parity) for the parity tests."""

from __future__ import annotations

import pathlib

import numpy as np

DATA = pathlib.Path(__file__).parent / "data"
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "parity"
CIFAR = {
    "resnet": "cifar10_resnet_d20.npz",
    "mrla_l": "cifar10_mrla_light_d20.npz",
    "dla_l": "cifar10_dla_l_d20.npz",
    "dla_b": "cifar10_dla_b_d20.npz",
}
IMAGENET = SHARED / "imagenet_dla_l_r50.npz"


def load(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(official state dict, everything else) with int8-quantised weights dequantised."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    state = {name[3:]: value for name, value in arrays.items() if name.startswith("sd/")}
    for name, value in arrays.items():
        if name.startswith("sdq/"):
            state[name[4:]] = value.astype(np.float32) * arrays["sds/" + name[4:]]
    return state, arrays


def nhwc(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def assert_close_to_reference(ours: np.ndarray, reference: np.ndarray) -> None:
    """The agreement the spec asks for: max |Δ| <= 1e-5 * max(1, max |reference|)."""
    tolerance = 1e-5 * max(1.0, float(np.abs(reference).max()))
    error = float(np.abs(np.asarray(ours) - reference).max())
    assert error <= tolerance, f"max |Δlogit| = {error:.3g} > {tolerance:.3g}"
