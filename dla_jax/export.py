"""python -m dla_jax.export --workdir DIR --out EXPORT

Writes the latest checkpoint of a training run as an inference-only export: parameters,
BatchNorm statistics and the model and data description, without optimizer state.
Load it with `dla_jax.inference.load(EXPORT)` or `python -m dla_jax.predict`.
"""

import sys
from pathlib import Path

import jax
import ml_collections
from absl import app, flags, logging

from dla_jax.export_format import ExportFormatError, save_export
from dla_jax.train.checkpoint import CheckpointError, Checkpoints
from dla_jax.train.loop import build_run, with_shardings

flags.DEFINE_string("workdir", None, "Training work directory (the one given to dla_jax.main).")
flags.DEFINE_string("out", None, "Directory to write the export to.")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def export_run(workdir: str | Path, out: str | Path) -> int:
    """Exports the latest checkpoint under `workdir`; returns its step."""
    directory = Path(workdir).absolute() / "checkpoints"
    checkpoints = Checkpoints(directory, max_to_keep=1) if directory.is_dir() else None
    step = None if checkpoints is None else checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}; train with dla_jax.main first")
    metadata = checkpoints.read_metadata(step)
    config = ml_collections.ConfigDict(metadata["config"])
    data_info = metadata["data_info"]
    run = build_run(config, data_info)
    on_one_device = jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), run.abstract_state
    )
    state = checkpoints.restore_latest(with_shardings(run.abstract_state, on_one_device), run.metadata)
    checkpoints.close()
    model_config = {
        key: config.model[key] for key in ("family", "layout", "depth", "dsu_context", "dtype", "scan_blocks")
    }
    model_config["num_classes"] = data_info["num_classes"]
    save_export(out, state.variables(), model_config, data_info)
    return step


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        step = export_run(FLAGS.workdir, FLAGS.out)
    except (FileNotFoundError, CheckpointError, ExportFormatError) as err:
        print(f"dla_jax.export: {err}", file=sys.stderr)
        return 1
    print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.out}")
    return 0


if __name__ == "__main__":
    app.run(main)
