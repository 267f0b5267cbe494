"""python -m dla_jax.main --config configs/<file>.py --workdir DIR [--config.<field>=<value> ...]

Trains and evaluates the experiment a config file describes, resuming from the latest
checkpoint in DIR. For a multi-host run without a cluster launcher JAX recognises, give
every process --coordinator_address, --num_processes and --process_id.
"""

import functools

from absl import app, flags
from ml_collections import config_flags

from dla_jax import cli
from dla_jax.data import DatasetNotFoundError
from dla_jax.train import loop
from dla_jax.train.checkpoint import CheckpointError

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cifar10.py:dla_l,110.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
cli.define_process_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    cli.start(argv, program="dla_jax.main")
    train = functools.partial(loop.train_and_evaluate, FLAGS.config, FLAGS.workdir)
    return cli.run_reporting("dla_jax.main", train, (DatasetNotFoundError, CheckpointError))


if __name__ == "__main__":
    app.run(main, flags_parser=functools.partial(cli.parse_flags, program="dla_jax.main"))
