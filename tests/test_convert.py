"""Converting official checkpoints: clear errors, and the CLI's export predicts like the original."""

from __future__ import annotations

import builtins
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dla_jax import data, inference
from dla_jax.convert import StateDictMismatch, convert_checkpoint, from_torch_state_dict, load_state_dict
from dla_jax.evaluate import evaluate_export
from dla_jax.models import create_model

from parity_fixtures import CIFAR, DATA, assert_close_to_reference, load, nhwc
from train_helpers import load_config


def _model():
    return create_model("dla_l", layout="cifar", depth=20, num_classes=10)


def test_mismatch_lists_missing_unexpected_and_wrongly_shaped_names():
    state, _ = load(DATA / CIFAR["dla_l"])
    del state["stages.1.excite.weight"]
    state["stages.0.extra.weight"] = np.zeros(3, np.float32)
    state["fc.weight"] = np.zeros((100, 256), np.float32)
    with pytest.raises(StateDictMismatch) as error:
        from_torch_state_dict(_model(), state)
    message = str(error.value)
    assert "missing (1): stages.1.excite.weight" in message
    assert "unexpected (1): stages.0.extra.weight" in message
    assert "wrong shape (1): fc.weight: got (100, 256), expected (10, 256)" in message


def test_state_dict_of_another_family_is_rejected():
    state, _ = load(DATA / CIFAR["resnet"])
    with pytest.raises(StateDictMismatch, match="missing"):
        from_torch_state_dict(_model(), state)


def test_pth_without_torch_names_the_extra(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.pth"
    checkpoint.write_bytes(b"not read")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"pip install 'dla_jax\[torch\]'"):
        load_state_dict(str(checkpoint))


def test_cli_writes_an_export_that_predicts_the_official_logits(tmp_path):
    out = tmp_path / "export"
    command = [sys.executable, "-m", "dla_jax.convert", "--torch-checkpoint", str(DATA / CIFAR["dla_b"])]
    command += ["--family", "dla_b", "--layout", "cifar", "--depth", "20", "--num-classes", "10", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    _, arrays = load(DATA / CIFAR["dla_b"])
    predictor = inference.load(out)
    assert_close_to_reference(predictor(nhwc(arrays["input_eval"])), arrays["logits_eval_fixed"])


def test_cli_reports_a_bad_checkpoint_without_a_traceback(tmp_path):
    command = [sys.executable, "-m", "dla_jax.convert", "--torch-checkpoint", str(DATA / CIFAR["resnet"])]
    command += [
        "--family",
        "dla_l",
        "--layout",
        "cifar",
        "--depth",
        "20",
        "--num-classes",
        "10",
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: state dict does not fit dla_l / cifar / depth 20")
    assert "Traceback" not in result.stderr


def test_a_converted_checkpoint_evaluates_with_the_cifar_config(tmp_path):
    """The README's `dla_jax.evaluate --config configs/cifar10.py` on a converted export: the config's
    preprocessing is the official one, and the metrics are those of the export's own predictions."""
    export = tmp_path / "export"
    convert_checkpoint(
        str(DATA / CIFAR["dla_l"]),
        str(export),
        family="dla_l",
        layout="cifar",
        depth=20,
        num_classes=10,
        dsu_context="per_sample",
    )
    config = load_config("cifar10", "dla_l,20")
    config.data.data_dir = str(tmp_path / "no_data_here")
    config.train.eval_batch_size = 16
    with tfds.testing.mock_data(num_examples=24):
        metrics = evaluate_export(export, config)
        batches = list(data.eval_batches(config.data, global_batch_size=16, process_index=0, process_count=1))
    predictor = inference.load(export)
    hits = [np.argmax(predictor(b["image"]), -1)[b["mask"]] == b["label"][b["mask"]] for b in batches]
    assert metrics["eval_examples"] == 24
    assert metrics["eval_top1"] == pytest.approx(np.concatenate(hits).mean())
