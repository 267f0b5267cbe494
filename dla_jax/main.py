"""python -m dla_jax.main --config configs/<file>.py --workdir DIR [--config.<field>=<value> ...]

Trains and evaluates the experiment a config file describes, resuming from the latest
checkpoint in DIR. For a multi-host run without a cluster launcher JAX recognises, give
every process --coordinator_address, --num_processes and --process_id.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dla_jax import host_memory, parallel
from dla_jax.data import DatasetNotFoundError
from dla_jax.train import loop
from dla_jax.train.checkpoint import CheckpointError
from dla_jax.train.validation import ConfigError

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cifar10.py:dla_l,110.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host only).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host only).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host only).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _unknown_field(err: BaseException) -> tuple[str, str]:
    """(field, hint) from ml_collections' error for an unknown override: a KeyError, maybe inside an
    AttributeError, whose message is the quoted field and maybe a line 'Did you mean "x" ...?'."""
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    field, _, hint = str(err.args[0] if err.args else err).partition("\n")
    return field.strip("\"'"), hint.strip()


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with ml_collections' errors for unknown or ill-typed overrides made one line."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        message = str(err)
    except (AttributeError, KeyError) as err:
        key, hint = _unknown_field(err)
        given = [arg for arg in argv[1:] if arg.startswith("--config.") and key in arg]
        advice = hint or "see the config file for the fields"
        message = f"unknown config field {key!r} in {' '.join(given) or 'the overrides'}; {advice}"
    except (TypeError, ValueError) as err:
        message = str(err)
    print(f"dla_jax.main: bad flag: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    host_memory.keep_freed_memory()
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except ConfigError as err:
        print(f"dla_jax.main: bad config: {err}", file=sys.stderr)
        return 2
    except (DatasetNotFoundError, CheckpointError) as err:
        print(f"dla_jax.main: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
