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
from dla_jax.convert import main as convert_main
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


def test_an_official_pth_tar_converts_to_an_export_that_predicts_its_logits(tmp_path):
    """What the official cifar.py saves: the model's state dict (with DataParallel's `module.`
    prefix) inside a dict with the epoch, accuracies and optimizer state."""
    torch = pytest.importorskip("torch", reason="reading .pth checkpoints needs PyTorch")
    state, arrays = load(DATA / CIFAR["dla_l"])
    checkpoint = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 180,
            "state_dict": {f"module.{name}": torch.from_numpy(value) for name, value in state.items()},
            "acc": 95.2,
            "best_acc": 95.4,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]},
        },
        checkpoint,
    )
    out = tmp_path / "export"
    convert_checkpoint(
        str(checkpoint), str(out), family="dla_l", layout="cifar", depth=20, num_classes=10, dsu_context="per_sample"
    )
    assert_close_to_reference(inference.load(out)(nhwc(arrays["input_eval"])), arrays["logits_eval_fixed"])


def test_a_half_precision_checkpoint_is_read_as_float32(tmp_path):
    torch = pytest.importorskip("torch", reason="reading .pth checkpoints needs PyTorch")
    weights = torch.randn(4, 3)
    torch.save({"fc.weight": weights.to(torch.bfloat16), "bn.num_batches_tracked": torch.tensor(7)}, tmp_path / "m.pth")
    state = load_state_dict(str(tmp_path / "m.pth"))
    assert state["fc.weight"].dtype == np.float32 and state["bn.num_batches_tracked"] == 7
    np.testing.assert_array_equal(state["fc.weight"], weights.to(torch.bfloat16).float().numpy())


def _convert_cli(checkpoint, tmp_path, capsys) -> str:
    """Runs the convert CLI on `checkpoint`; asserts it failed cleanly and returns its message."""
    argv = ["--torch-checkpoint", str(checkpoint), "--family", "dla_l", "--layout", "cifar", "--depth", "20"]
    assert convert_main([*argv, "--num-classes", "10", "--out", str(tmp_path / "export")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and message.count("\n") == 1 and not (tmp_path / "export").exists()
    return message


def test_unreadable_npz_files_are_reported_with_what_to_do(tmp_path, capsys):
    whole = (DATA / CIFAR["dla_l"]).read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "one_array.npy", np.zeros(3))
    (tmp_path / "one_array.npy").rename(tmp_path / "one_array.npz")
    for name, message in [
        ("truncated.npz", "is not a readable .npz of arrays (BadZipFile"),
        ("text.npz", "is not a readable .npz of arrays"),
        ("one_array.npz", "holds one array, not a state dict: save the state dict with numpy.savez"),
    ]:
        assert message in _convert_cli(tmp_path / name, tmp_path, capsys), name


def test_unreadable_pth_files_are_reported_with_what_to_do(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="reading .pth checkpoints needs PyTorch")
    torch.save({"fc.weight": torch.zeros(10, 256)}, tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:100])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model_object.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    for name, message in [
        ("truncated.pth", "is not a readable PyTorch checkpoint (RuntimeError: PytorchStreamReader failed"),
        ("model_object.pth", "holds pickled Python objects besides tensors (a whole model?)"),
        ("list.pth", "holds a list that is not a state dict"),
    ]:
        assert message in _convert_cli(tmp_path / name, tmp_path, capsys), name


def test_an_export_is_not_written_over_a_file(tmp_path, capsys):
    out = tmp_path / "export"
    out.write_text("notes")
    argv = ["--torch-checkpoint", str(DATA / CIFAR["dla_l"]), "--family", "dla_l", "--layout", "cifar"]
    assert convert_main([*argv, "--depth", "20", "--num-classes", "10", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: cannot write an export to {out}: it is a file; give a directory\n"
    assert out.read_text() == "notes"


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
