"""python -m dla_jax.evaluate --checkpoint EXPORT --config configs/<file>.py [--config.<field>=<value> ...]

Evaluates an export (from `python -m dla_jax.export` or `python -m dla_jax.convert`) on
the eval split of the config's dataset and prints one JSON line: eval_top1, eval_top5,
eval_loss and eval_examples, as training logs them. The config gives the data, the eval
batch size and the mesh; its model and training fields are not used. Its preprocessing
must be the export's, so that a converted official checkpoint is measured on the inputs
it was trained on. Across several hosts, as `dla_jax.main`: every process runs the same
command (with --coordinator_address, --num_processes and --process_id where JAX does not
recognise the cluster), and process 0 prints the line.
"""

import functools
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from dla_jax import cli, data, models, parallel
from dla_jax.data import DatasetNotFoundError
from dla_jax.export_format import DATA_CONFIG_KEYS, ExportFormatError, load_export
from dla_jax.train import loop
from dla_jax.train.validation import ConfigError, validate_config

flags.DEFINE_string("checkpoint", None, "Export directory.")
config_flags.DEFINE_config_file("config", None, "Config file whose dataset to evaluate on, e.g. configs/cifar100.py.")
cli.define_process_flags()
flags.mark_flags_as_required(["checkpoint", "config"])
FLAGS = flags.FLAGS


def _check_inputs(data_config: ml_collections.ConfigDict, export_data_config: dict[str, Any]) -> None:
    """The config must preprocess images as the export's model was trained to see them."""
    for key in DATA_CONFIG_KEYS:
        ours, theirs = json.loads(json.dumps(data_config[key])), export_data_config[key]
        if ours != theirs:
            flag_value = ",".join(map(str, theirs)) if isinstance(theirs, list) else theirs
            raise ConfigError(
                f"config.data.{key}={ours} but the export was trained with {key} {theirs}; "
                f"evaluate with --config.data.{key}={flag_value}"
            )


def evaluate_export(path: str | Path, config: ml_collections.ConfigDict) -> dict[str, float]:
    """The export's eval metrics on `config`'s eval split, on `config`'s mesh over all devices."""
    validate_config(config, device_count=jax.device_count(), process_count=jax.process_count())
    mesh = parallel.create_mesh(config.mesh)
    replicated = parallel.replicated(mesh)
    variables, model_config, data_info = load_export(path, replicated)
    _check_inputs(config.data, data_info["data_config"])
    info = data.get_dataset_info(config.data)
    if info.num_classes != model_config["num_classes"]:
        raise ConfigError(
            f"the export classifies {model_config['num_classes']} classes, "
            f"{config.data.name} has {info.num_classes}: pick the config of the dataset it was trained on"
        )
    model = models.from_config(model_config, model_config["num_classes"])
    with jax.set_mesh(mesh):  # see loop.train_and_evaluate
        return loop.evaluate(loop.eval_function(model, mesh, replicated), variables, config, mesh)


def main(argv: list[str]) -> int:
    cli.start(argv, program="dla_jax.evaluate")

    def evaluate_and_print() -> None:
        metrics = evaluate_export(FLAGS.checkpoint, FLAGS.config)
        if parallel.is_main_process():
            print(json.dumps(metrics))

    return cli.run_reporting("dla_jax.evaluate", evaluate_and_print, (DatasetNotFoundError, ExportFormatError))


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(cli.parse_flags, program="dla_jax.evaluate"))
