"""What the entry points that take a `--config` file share: parsing it, joining the other
processes of a multi-host run, reporting failures in one line."""

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import app, flags, logging

from dla_jax import host_memory, parallel
from dla_jax.train.validation import ConfigError


def load_config(path: Path, argument: str | None = None) -> ml_collections.ConfigDict:
    """The config file at `path` loaded as `--config path[:argument]` loads it (by path; configs
    are not a package), without overrides: for code that reads a recipe outside an entry point."""
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if argument is None else module.get_config(argument)


def define_process_flags() -> None:
    """--coordinator_address, --num_processes and --process_id, read by `start`."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host only).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host only).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host only).")


def start(argv: list[str], *, program: str) -> None:
    """What these entry points do before any JAX computation: refuse stray arguments, quieten absl,
    keep freed memory (on the CPU), and join the other processes (from the process flags, or from a
    cluster JAX recognises, or not at all); a failure to join is one line (exit 2 for the flags)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    host_memory.keep_freed_memory()
    values = flags.FLAGS
    try:
        parallel.initialize_distributed(values.coordinator_address, values.num_processes, values.process_id)
    except ValueError as err:
        print(f"{program}: bad flag: {err}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        print(f"{program}: {err}", file=sys.stderr)
        sys.exit(1)


def _unknown_field(err: BaseException) -> tuple[str, str]:
    """(field, hint) from ml_collections' error for an unknown override: a KeyError, maybe inside an
    AttributeError, whose message is the quoted field and maybe a line 'Did you mean "x" ...?'."""
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    field, _, hint = str(err.args[0] if err.args else err).partition("\n")
    return field.strip("\"'"), hint.strip()


def _config_file_error(err: flags.Error) -> str:
    """ml_collections puts the whole traceback of a failing `get_config` into its error; keep
    the flag and the exception's own line ("flag --config=F:ARG: ValueError: ...")."""
    flag, marker, trace = str(err).partition("Error whilst parsing config file:")
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    return f"{flag.rstrip()} {lines[-1].strip()}" if marker and lines else str(err)


def _deferred_config_error(values: flags.FlagValues) -> str | None:
    """ml_collections defers a config file that fails to load (missing, unreadable) to the config's
    first use, so that --help works; this reports it before any work starts."""
    if "config" not in values or values["config"].value is None:
        return None
    config = values["config"].value
    if isinstance(config, ml_collections.ConfigDict):
        return None
    try:
        config.lock()
    except OSError as err:
        reason = str(err).strip().splitlines()[-1].strip()
        return f"--config: cannot load {values['config'].config_filename}: {reason}"
    return None


def parse_flags(argv: list[str], *, program: str) -> list[str]:
    """absl's parsing, with ml_collections' errors for a config file that fails to load and for
    unknown or ill-typed overrides made one line (then exit 2):
    `app.run(main, flags_parser=functools.partial(parse_flags, program=...))`."""
    try:
        remaining = flags.FLAGS(argv)
        message = _deferred_config_error(flags.FLAGS)
        if message is None:
            return remaining
    except flags.Error as err:
        message = _config_file_error(err)
    except (AttributeError, KeyError) as err:
        key, hint = _unknown_field(err)
        given = [arg for arg in argv[1:] if arg.startswith("--config.") and key in arg]
        advice = hint or "see the config file for the fields"
        message = f"unknown config field {key!r} in {' '.join(given) or 'the overrides'}; {advice}"
    except (TypeError, ValueError) as err:
        message = str(err)
    print(f"{program}: bad flag: {message}", file=sys.stderr)
    sys.exit(2)


def run_reporting(program: str, work: Callable[[], object], failures: tuple[type[Exception], ...]) -> int:
    """Runs `work`: 0, or after one line on stderr, 2 for a ConfigError ("bad config") and 1 for one
    of `failures` (missing data, a refused checkpoint or export)."""
    try:
        work()
    except ConfigError as err:
        print(f"{program}: bad config: {err}", file=sys.stderr)
        return 2
    except failures as err:
        print(f"{program}: {err}", file=sys.stderr)
        return 1
    return 0
