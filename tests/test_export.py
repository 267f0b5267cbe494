"""Export a trained run, load it for inference, and predict image files from the command line."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from dla_jax import inference, models
from dla_jax.data import open_source
from dla_jax.export import export_run
from dla_jax.export_format import ExportFormatError, load_export
from dla_jax.train import loop

from train_helpers import (
    cpu_env,
    delete_array_files,
    enable_compilation_cache,
    overwrite_arrays,
    tiny_digits_config,
    with_first_weight_changed,
)

enable_compilation_cache()


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
    result = subprocess.run(
        [sys.executable, "-m", "dla_jax.predict", f"--checkpoint={tmp_path / 'export'}", *map(str, paths)],
        capture_output=True,
        text=True,
        env=cpu_env(1),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].endswith("digit0.png") and len(lines) == 4 * 6
    top_class = lines[1].split()[-1]
    assert top_class == str(int(np.argmax(expected[0])))


def test_loading_a_non_export_is_a_clear_error(tmp_path):
    with pytest.raises(ExportFormatError, match="is not a dla_jax export"):
        inference.load(tmp_path)


def test_damaged_export_is_refused(tmp_path):
    """Changed values or unreadable files: a one-line error that says to export again, no traceback."""
    loop.train_and_evaluate(tiny_digits_config(train__num_steps=1), tmp_path / "run")
    export = tmp_path / "export"
    export_run(tmp_path / "run", export)
    variables, _, _ = load_export(export)
    overwrite_arrays(export / "variables", with_first_weight_changed(variables))
    with pytest.raises(ExportFormatError, match=r"is corrupt: 1 array\(s\) differ .*export it again"):
        inference.load(export)
    delete_array_files(export / "variables")
    result = subprocess.run(
        [sys.executable, "-m", "dla_jax.predict", f"--checkpoint={export}", str(tmp_path / "any.png")],
        capture_output=True,
        text=True,
        env=cpu_env(1),
        timeout=120,
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"dla_jax.predict: {export / 'variables'} cannot be read (") and "export it again" in line
