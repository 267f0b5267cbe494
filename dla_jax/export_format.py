"""The export format: a model for inference only (weights, BN statistics, how to rebuild it).

It imports only orbax, numpy, json and `dla_jax.integrity`, so that any floor (training,
conversion of official checkpoints) can write it. An export is a directory:

* ``variables/``: an orbax StandardCheckpointer tree ``{"params", "batch_stats"}``;
* ``export.json``: ``{"format", "version", "model_config", "data_info", "fingerprints"}`` where
  ``model_config`` holds the ``create_model`` arguments (family, layout, depth,
  num_classes, dsu_context, dtype, scan_blocks) and ``data_info`` holds num_classes,
  image_shape [H, W, C], class_names (list or null) and data_config (at least image_size,
  augment, mean, std: what evaluation preprocessing needs). ``fingerprints`` (of the
  variables, `dla_jax.integrity`) is checked on loading when present.
"""

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dla_jax.integrity import UnreadableError, describe_changes, fingerprints, restore_or_explain

FORMAT_NAME = "dla_jax.export"
FORMAT_VERSION = 1
MODEL_CONFIG_KEYS = ("family", "layout", "depth", "num_classes", "dsu_context", "dtype", "scan_blocks")
DATA_INFO_KEYS = ("num_classes", "image_shape", "class_names", "data_config")
DATA_CONFIG_KEYS = ("image_size", "augment", "mean", "std")


class ExportFormatError(ValueError):
    """A directory that is not a complete export, an export record missing a field, damaged
    variables, or a path an export cannot be written to."""


def _require(record: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ExportFormatError(f"{what} lacks {', '.join(missing)} (needs {', '.join(keys)})")


def save_export(
    path: str | os.PathLike, variables: dict[str, Any], model_config: dict[str, Any], data_info: dict[str, Any]
) -> None:
    """Writes `variables` ({"params", "batch_stats"}) and the JSON record to directory `path`."""
    _require(model_config, MODEL_CONFIG_KEYS, "model_config")
    _require(data_info, DATA_INFO_KEYS, "data_info")
    _require(data_info["data_config"], DATA_CONFIG_KEYS, "data_info['data_config']")
    path = Path(path).absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = "it is a file" if path.is_file() else err.strerror or err
        raise ExportFormatError(f"cannot write an export to {path}: {reason}; give a directory") from err
    arrays = jax.tree.map(
        np.asarray, jax.device_get({"params": variables["params"], "batch_stats": variables["batch_stats"]})
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "variables", arrays, force=True)
    checkpointer.wait_until_finished()
    record = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model_config": model_config,
        "data_info": data_info,
        "fingerprints": fingerprints(arrays),
    }
    temporary = path / "export.json.tmp"
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(path / "export.json")


def load_export(
    path: str | os.PathLike, sharding: jax.sharding.Sharding | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(variables, model_config, data_info) of the export at `path`, the arrays placed per `sharding`
    (default: on the first local device)."""
    path = Path(path).absolute()
    record_path = path / "export.json"
    if not record_path.is_file() or not (path / "variables").is_dir():
        if (path / "checkpoints").is_dir():
            made_by = f"it is a training workdir: export it with `python -m dla_jax.export --workdir {path} --out DIR`"
        else:
            made_by = "make one with `python -m dla_jax.export --workdir RUN --out DIR` or `python -m dla_jax.convert`"
        raise ExportFormatError(f"{path} is not a dla_jax export (expected export.json and variables/; {made_by})")
    again = "export it again (`python -m dla_jax.export` or `python -m dla_jax.convert`)"
    try:
        record = json.loads(record_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportFormatError(f"{record_path} is not valid JSON ({err}); {again}") from err
    if not isinstance(record, dict):
        record = {"format": record}
    if record.get("format") != FORMAT_NAME or record.get("version") != FORMAT_VERSION:
        raise ExportFormatError(
            f"{record_path} has format {record.get('format')!r} version {record.get('version')!r}; "
            f"this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    checkpointer = ocp.StandardCheckpointer()
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        metadata = restore_or_explain(lambda: checkpointer.metadata(path / "variables").item_metadata)
        if metadata is None:
            raise UnreadableError("the arrays' metadata is missing")
        target = jax.tree.map(
            lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding), metadata.tree
        )
        variables = restore_or_explain(lambda: checkpointer.restore(path / "variables", target))
    except UnreadableError as err:
        raise ExportFormatError(f"{path / 'variables'} cannot be read ({err}); {again}") from err
    changes = describe_changes(variables, record.get("fingerprints"))
    if changes:
        raise ExportFormatError(f"{path / 'variables'} is corrupt: {changes}; {again}")
    return variables, record["model_config"], record["data_info"]
