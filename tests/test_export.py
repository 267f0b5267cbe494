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
from dla_jax.export_format import ExportFormatError
from dla_jax.train import loop

from train_helpers import cpu_env, enable_compilation_cache, tiny_digits_config

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
