"""The benchmark and plotting scripts, run in-process at their tiniest (no timing thresholds)."""

import importlib.util
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from dla_jax import host_memory
from dla_jax.convert import convert_checkpoint
from dla_jax.data import open_source
from dla_jax.train import loop

from parity_fixtures import CIFAR, DATA
from train_helpers import enable_compilation_cache, tiny_digits_config

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    enable_compilation_cache()


@pytest.fixture
def malloc_tunings(monkeypatch) -> list[bool]:
    """Records the benchmark's calls to `host_memory.keep_freed_memory` instead of tuning this
    worker's malloc (one arena would slow the compiles of the tests after it)."""
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(True) or True)
    return calls


@pytest.mark.parametrize(
    "options", [[], ["--interleave", "--remat-attention", "--scan", "--no-keep-freed-memory", "--profile", "profile"]]
)
def test_benchmark_writes_json_and_markdown(tmp_path, options, malloc_tunings):
    benchmark = load_script("benchmark")
    out, table = tmp_path / "bench.json", tmp_path / "bench.md"
    options = [str(tmp_path / option) if option == "profile" else option for option in options]
    argv = ["--families", "resnet,mrla_l", "--depths", "11", "--batch-sizes", "4", "--image-size", "8"]
    argv += ["--steps", "2", "--warmup", "1", "--devices", "2", "--out", str(out), "--markdown", str(table), *options]
    assert benchmark.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["machine"]["backend"] == "cpu" and record["machine"]["host_cores"] >= 1
    assert "--xla_force_host_platform_device_count" in record["machine"]["environment"]["XLA_FLAGS"]
    tuned = "--no-keep-freed-memory" not in options
    assert record["machine"]["malloc_tuned"] == tuned and malloc_tunings == [True] * tuned
    results = record["results"]
    assert [(r["family"], r["devices"]) for r in results] == [("resnet", 2), ("mrla_l", 2)]
    for result in results:
        for mode in ("train", "eval"):
            assert result[f"{mode}_images_per_s"] > 0 and result[f"{mode}_compile_s"] > 0
            assert result[f"{mode}_xla_gflops_per_image"] > 0
            assert len(result[f"{mode}_step_times_s"]) == 2
        assert result["train_vs_resnet"] > 0
    assert table.read_text().count("\n") == 2 + len(results)
    assert all(r["remat_attention"] == ("--remat-attention" in options) for r in results)
    assert all(r["scan"] == ("--scan" in options) for r in results)  # by default as the recipe: unrolled at depth 11
    if "--profile" in options:
        # A trace per configuration, and the compiled steps whose op_name metadata maps it to modules.
        for family in ("resnet", "mrla_l"):
            name = f"{family}-cifar11-b4-float32-d2-scan-remat"
            assert list((tmp_path / "profile" / name).glob("**/*.xplane.pb")), name
            assert (tmp_path / "profile" / f"{name}-eval.hlo.txt").exists()
        assert "layer_attention" in (tmp_path / "profile" / f"{name}-train.hlo.txt").read_text()


@pytest.mark.parametrize("family", ["resnet", "dla_l"])
def test_benchmark_counts_the_flops_of_every_block(family):
    """XLA's FLOPs of ImageNet ResNet-50 / DLA-L-50, whose stages scan, against the spec's
    multiply-accumulates: a forward pass is two FLOPs per MAC (XLA skips a conv's taps on the
    zero padding, about 3% of them), a train step about three forward passes. On the scanned
    step itself XLA counts each stage's scanned blocks as one (ResNet-50: 0.56 of the spec)."""
    benchmark = load_script("benchmark")
    setting = dict(family=family, layout="imagenet", depth=50, batch_size=1, dtype="float32", devices=1)
    setting.update(image_size=224, num_classes=1000)
    mesh = benchmark.mesh_over(1)
    batch = {
        "image": jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((1,), jnp.int32),
        "mask": jax.ShapeDtypeStruct((1,), jnp.bool_),
    }
    gflops = benchmark.xla_gflops_per_image(setting, mesh, batch, ("train", "eval"), remat=False)
    spec_gflops = 2 * benchmark.SPEC_MACS[("imagenet", 50, family)] / 1e9
    assert 0.95 < gflops["eval"] / spec_gflops <= 1.0
    assert 2.9 < gflops["train"] / gflops["eval"] < 3.2


@pytest.mark.parametrize(
    "layout, depth, scanned", [("cifar", 20, False), ("cifar", 56, False), ("cifar", 110, True), ("imagenet", 50, True)]
)
def test_benchmark_times_the_stages_as_the_recipe_builds_them(layout, depth, scanned):
    benchmark = load_script("benchmark")
    assert benchmark.recipe_scans({"layout": layout, "family": "dla_l", "depth": depth}) is scanned


def test_benchmark_rejects_bad_arguments(capsys, malloc_tunings):
    benchmark = load_script("benchmark")
    for argv, message in [
        (["--families", "vgg"], "unknown"),
        (["--depths", "21"], "9n+2"),
        (["--devices", "99"], "xla_force_host_platform_device_count"),
        (["--batch-sizes", "3", "--devices", "2"], "not divisible"),
    ]:
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)
        assert message in capsys.readouterr().err


def test_benchmark_checks_the_official_code_it_is_given(tmp_path, capsys, monkeypatch, malloc_tunings):
    benchmark = load_script("benchmark")
    checkout = tmp_path / "Dynamic-Layer-Attention"
    models_folder = checkout / "image_classification" / "cifar" / "models" / "cifar"
    models_folder.mkdir(parents=True)
    for name in ("resnet", "dla_l"):
        (models_folder / f"{name}.py").touch()
    assert benchmark.official_models_folder(checkout) == models_folder
    assert benchmark.official_models_folder(models_folder) == models_folder
    official = ["--official-code", str(checkout)]
    for argv, message in [
        (["--official-code", str(tmp_path)], "holds neither"),
        ([*official, "--families", "resnet,dla_b"], "has no dla_b.py"),
        ([*official, "--families", "resnet,dla_l", "--dtypes", "bfloat16"], "in float32 on one device"),
        ([*official, "--families", "resnet,dla_l", "--layout", "imagenet", "--depths", "50"], "CIFAR models"),
    ]:
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)
        assert message in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit):
        benchmark.parse_args([*official, "--families", "resnet,dla_l"])
    assert "pip install torch einops" in capsys.readouterr().err


# Stand-ins for the official CIFAR model files: each module's constructor is called as the
# official ones are, and forward makes a zero state with `.cuda()`, as the official DSU does.
STAND_IN_OFFICIAL_MODEL = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, width, num_classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, width, 3, padding=1), nn.Linear(width, num_classes)

    def forward(self, x):
        zero_state = torch.zeros(1).cuda()
        return self.fc(self.conv(x).mean((2, 3))) + zero_state


def {name}(depth, num_classes, block_name):
    assert block_name == "bottleneck"
    return Model(depth, num_classes)
"""


def test_benchmark_times_the_official_code_beside_ours(tmp_path, malloc_tunings):
    torch = pytest.importorskip("torch", reason="timing the official code needs PyTorch")
    pytest.importorskip("einops", reason="timing the official code needs einops")
    benchmark = load_script("benchmark")
    folder = tmp_path / "official"
    folder.mkdir()
    for name in benchmark.OFFICIAL_MODELS.values():
        (folder / f"{name}.py").write_text(STAND_IN_OFFICIAL_MODEL.format(name=name))
    cuda = torch.Tensor.cuda
    out = tmp_path / "side.json"
    argv = ["--families", "resnet,mrla_l", "--depths", "11", "--batch-sizes", "4", "--steps", "2", "--warmup", "1"]
    assert benchmark.main([*argv, "--official-code", str(folder), "--out", str(out)]) == 0
    assert torch.Tensor.cuda is cuda
    results = json.loads(out.read_text())["results"]
    assert [(r["implementation"], r["family"]) for r in results] == [
        ("dla_jax", "resnet"),
        ("official-pytorch", "resnet"),
        ("dla_jax", "mrla_l"),
        ("official-pytorch", "mrla_l"),
    ]
    for result in results:
        for mode in ("train", "eval"):
            assert result[f"{mode}_images_per_s"] > 0 and len(result[f"{mode}_step_times_s"]) == 2
        assert result["train_vs_resnet"] > 0
    ours = [r for r in results if r["implementation"] == "dla_jax"]
    assert all(r["train_vs_official"] > 0 and r["eval_vs_official"] > 0 for r in ours)


def test_benchmark_ratios_pair_each_implementation_with_its_own_resnet():
    benchmark = load_script("benchmark")
    setting = dict(layout="cifar", depth=20, batch_size=128, dtype="float32", devices=1)
    steps = {("dla_jax", "resnet"): 0.5, ("dla_jax", "dla_l"): 0.6, ("official-pytorch", "resnet"): 0.4}
    steps[("official-pytorch", "dla_l")] = 1.2
    results = [
        dict(setting, implementation=implementation, family=family, train_step_s=step, eval_step_s=step / 4)
        for (implementation, family), step in steps.items()
    ]
    benchmark.add_ratios(results)
    ours, official = {r["family"]: r for r in results[:2]}, {r["family"]: r for r in results[2:]}
    assert ours["dla_l"]["train_vs_resnet"] == pytest.approx(1.2)
    assert official["dla_l"]["train_vs_resnet"] == pytest.approx(3.0)
    assert ours["dla_l"]["train_vs_official"] == pytest.approx(0.5)
    assert ours["resnet"]["eval_vs_official"] == pytest.approx(1.25)
    assert not any("train_vs_official" in r for r in official.values())


def test_plots_from_a_short_training_run(tmp_path, capsys):
    workdir = tmp_path / "run"
    config = tiny_digits_config(train__num_steps=2)
    loop.train_and_evaluate(config, workdir)
    attention = load_script("plot_layer_attention")
    out = tmp_path / "attention.png"
    assert (
        attention.main([str(workdir), "--out", str(out), "--num-images", "4", "--width", "640", "--height", "480"]) == 0
    )
    assert png_size(out) == (640, 480)
    digit, not_an_image = tmp_path / "digit.png", tmp_path / "notes.png"
    Image.fromarray(open_source(config.data, "test")[0][0][..., 0]).save(digit)  # digits are grayscale HxWx1
    not_an_image.write_text("notes")
    out = tmp_path / "attention_of_a_file.png"
    assert attention.main([str(workdir), "--out", str(out), "--images", str(digit), "--height", "600"]) == 0
    assert png_size(out) == (1200, 600)
    assert attention.main([str(workdir), "--out", str(out), "--images", str(digit), str(not_an_image)]) == 1
    assert f"cannot read image {not_an_image}" in capsys.readouterr().err

    # A run still writing (or killed mid-line) leaves a torn last line: skipped, and said so.
    other = tmp_path / "other.jsonl"
    other.write_text(
        "\n".join(json.dumps({"step": s, "train_loss": 2.0 / s, "train_accuracy": 0.1 * s}) for s in (1, 2))
        + "\n"
        + json.dumps({"step": 2, "eval_loss": 1.5, "eval_top1": 0.3})
        + '\n{"step": 3, "train_lo'
    )
    curves = load_script("plot_training_curves")
    out = tmp_path / "curves.png"
    assert curves.main([str(workdir), str(other), "--out", str(out), "--width", "800", "--height", "300"]) == 0
    assert png_size(out) == (800, 300)
    assert f"skipped 1 line(s) of {other} that are not records" in capsys.readouterr().err
    assert curves.read_records(other)[0][-1] == {"step": 2, "eval_loss": 1.5, "eval_top1": 0.3}


def test_plot_scripts_reject_missing_inputs(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script("plot_training_curves").parse_args([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert "no metrics file" in capsys.readouterr().err
    attention = load_script("plot_layer_attention")
    assert attention.main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    assert "neither an export" in capsys.readouterr().err
    # A converted official checkpoint knows no dataset to draw images from.
    export = tmp_path / "converted"
    model = dict(family="dla_l", layout="cifar", depth=20, num_classes=10, dsu_context="per_sample")
    convert_checkpoint(str(DATA / CIFAR["dla_l"]), str(export), **model)
    assert attention.main([str(export), "--out", str(tmp_path / "x.png")]) == 1
    assert "records no dataset (a converted official checkpoint): give --images" in capsys.readouterr().err
