"""Export a trained run, load it for inference, evaluate it, and predict image files from the command line."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dla_jax import inference, models
from dla_jax.data import open_source
from dla_jax.evaluate import evaluate_export
from dla_jax.export import export_run
from dla_jax.export_format import ExportFormatError, load_export
from dla_jax.train import loop
from dla_jax.train.validation import ConfigError

from train_helpers import (
    cpu_env,
    delete_array_files,
    enable_compilation_cache,
    overwrite_arrays,
    read_metrics,
    tiny_digits_cli,
    tiny_digits_config,
    with_first_weight_changed,
)

enable_compilation_cache()


def run_predict(export, *images) -> subprocess.CompletedProcess:
    """`python -m dla_jax.predict --checkpoint=export images...` in a fresh one-device process."""
    command = [sys.executable, "-m", "dla_jax.predict", f"--checkpoint={export}", *map(str, images)]
    return subprocess.run(command, capture_output=True, text=True, env=cpu_env(1), timeout=120)


def test_export_load_predict_round_trip(tmp_path):
    config = tiny_digits_config(train__num_steps=2)
    state = loop.train_and_evaluate(config, tmp_path / "run")
    assert export_run(tmp_path / "run", tmp_path / "export") == 2
    assert not list((tmp_path / "export").rglob("*opt_state*"))

    predictor = inference.load(tmp_path / "export")
    assert predictor.model_config["num_classes"] == 10 and predictor.class_names == [str(i) for i in range(10)]
    test_digits = open_source(config.data, "test")
    raw = np.stack([test_digits[i][0] for i in range(4)])
    images = predictor.preprocess(raw)
    expected = models.from_config(config.model, 10).apply(jax.device_get(state.variables()), images, train=False)
    np.testing.assert_allclose(predictor(images), expected, rtol=1e-5, atol=1e-5)

    paths = []
    for i, image in enumerate(raw):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image[..., 0]).save(paths[-1])  # digits are grayscale HxWx1
    result = run_predict(tmp_path / "export", *paths)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].endswith("digit0.png") and len(lines) == 4 * 6
    top_class = lines[1].split()[-1]
    assert top_class == str(int(np.argmax(expected[0])))


def test_predict_names_an_image_it_cannot_read(tmp_path):
    """Checked before the export is loaded: a missing file or one that is not an image."""
    (tmp_path / "notes.png").write_text("not an image")
    for name, reason in [("notes.png", "cannot identify image file"), ("missing.png", "No such file or directory")]:
        result = run_predict(tmp_path, tmp_path / name)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert f"dla_jax.predict: cannot read image {tmp_path / name}: {reason}" in result.stderr


def test_loading_a_non_export_is_a_clear_error(tmp_path):
    with pytest.raises(ExportFormatError, match="is not a dla_jax export"):
        inference.load(tmp_path)


def test_exporting_an_untrained_workdir_names_the_fix_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint under .*; train with dla_jax.main first"):
        export_run(tmp_path / "never_trained", tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_damaged_export_is_refused(tmp_path):
    """Changed values or unreadable files: a one-line error that says to export again, no traceback."""
    loop.train_and_evaluate(tiny_digits_config(train__num_steps=1), tmp_path / "run")
    export = tmp_path / "export"
    export_run(tmp_path / "run", export)
    with pytest.raises(ExportFormatError, match="it is a training workdir: export it with `python -m dla_jax.export"):
        inference.load(tmp_path / "run")
    torn_record, no_metadata = shutil.copytree(export, tmp_path / "torn"), shutil.copytree(export, tmp_path / "bare")
    (torn_record / "export.json").write_text((export / "export.json").read_text()[:40])
    (no_metadata / "variables" / "_METADATA").unlink()
    for damaged, reason in [(torn_record, "export.json is not valid JSON"), (no_metadata, "metadata is missing")]:
        with pytest.raises(ExportFormatError, match=f"{reason}.*export it again"):
            inference.load(damaged)
    variables, _, _ = load_export(export)
    overwrite_arrays(export / "variables", with_first_weight_changed(variables))
    with pytest.raises(ExportFormatError, match=r"is corrupt: 1 array\(s\) differ .*export it again"):
        inference.load(export)
    delete_array_files(export / "variables")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "digit.png")
    result = run_predict(export, tmp_path / "digit.png")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after any of JAX's own warnings
    assert line.startswith(f"dla_jax.predict: {export / 'variables'} cannot be read (") and "export it again" in line


def test_evaluating_an_export_gives_the_runs_own_evaluation(tmp_path):
    """What users run on a converted official checkpoint: the eval split's top-1, top-5 and loss."""
    config = tiny_digits_config(train__num_steps=2)
    loop.train_and_evaluate(config, tmp_path / "run")
    export = tmp_path / "export"
    export_run(tmp_path / "run", export)
    (logged,) = [r for r in read_metrics(tmp_path / "run") if "eval_top1" in r]
    metrics = evaluate_export(export, config)
    assert metrics == {key: logged[key] for key in metrics}
    assert set(metrics) == {"eval_top1", "eval_top5", "eval_loss", "eval_examples"}

    config.data.mean = (0.4, 0.5, 0.5)
    with pytest.raises(ConfigError, match=r"trained with mean \[0.5, 0.5, 0.5\]; evaluate with --config.data.mean="):
        evaluate_export(export, config)

    command = [sys.executable, "-m", "dla_jax.evaluate", f"--checkpoint={export}", *tiny_digits_cli(train__num_steps=2)]
    result = subprocess.run(command, capture_output=True, text=True, env=cpu_env(8), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == metrics
