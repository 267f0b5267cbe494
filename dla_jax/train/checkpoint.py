"""Periodic, atomic, keep-last-K checkpoints of the TrainState with orbax's CheckpointManager.

Each checkpoint holds the TrainState and a JSON record of the run (config, dataset facts,
parameter shapes) with the state's fingerprints; restoring checks that record, so that a
checkpoint of another model fails loudly instead of restoring part of the weights, and
a checkpoint whose files were damaged after they were written fails instead of resuming
from wrong values.
"""

import functools
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from dla_jax.integrity import UnreadableError, describe_changes, fingerprints, path_name, restore_or_explain
from dla_jax.train.state import TrainState


class CheckpointError(ValueError):
    """The work directory cannot hold the run's checkpoints, or its latest one cannot be resumed from."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint in the work directory was written for another model or shape."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint's files cannot be read, or its values are not those it was saved with."""


def param_shapes(params: Any) -> dict[str, list[int]]:
    """`{'stage0/block1/conv1/kernel': [3, 3, 16, 16], ...}` for every parameter."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_name(path): list(leaf.shape) for path, leaf in flat}


def run_metadata(config: ml_collections.ConfigDict, data_info: dict[str, Any], params: Any) -> dict[str, Any]:
    """What a checkpoint must agree with to be restored, plus what export needs."""
    return {
        "config": json.loads(config.to_json()),
        "data_info": data_info,
        "param_shapes": param_shapes(params),
    }


def _describe_mismatch(saved: dict[str, Any], expected: dict[str, Any]) -> str | None:
    saved_model, expected_model = saved["config"]["model"], expected["config"]["model"]
    architecture_keys = ("family", "layout", "depth")
    if any(saved_model.get(k) != expected_model.get(k) for k in architecture_keys):
        was = ", ".join(f"{k}={saved_model.get(k)}" for k in architecture_keys)
        now = ", ".join(f"{k}={expected_model.get(k)}" for k in architecture_keys)
        return f"it holds model ({was}) but this run builds ({now})"
    if saved["param_shapes"] != expected["param_shapes"]:
        differing = sorted(
            name
            for name in set(saved["param_shapes"]) | set(expected["param_shapes"])
            if saved["param_shapes"].get(name) != expected["param_shapes"].get(name)
        )
        shown = ", ".join(
            f"{n}: saved {saved['param_shapes'].get(n)} vs now {expected['param_shapes'].get(n)}" for n in differing[:3]
        )
        return f"{len(differing)} parameter(s) differ in shape or presence ({shown})"
    return None


class Checkpoints:
    """The run's checkpoint directory: `save` every so often, `restore_latest` on start."""

    def __init__(self, directory: str | Path, *, max_to_keep: int):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "metadata"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState, metadata: dict[str, Any]) -> None:
        """Saves asynchronously (atomic: a step directory appears only once complete), with `metadata`
        and the state's fingerprints."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        record = dict(metadata, fingerprints=fingerprints(state))
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(record)),
            force=True,
        )

    def read_metadata(self, step: int) -> dict[str, Any]:
        """The metadata saved with checkpoint `step`; CheckpointCorruptError if it cannot be read."""
        restore = functools.partial(
            self._manager.restore, step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())
        )
        try:
            metadata = restore_or_explain(restore)["metadata"]
        except UnreadableError as err:
            raise self._corrupt(step, f"its metadata cannot be read ({err})") from err
        if not isinstance(metadata, dict):
            raise self._corrupt(step, "its metadata is not the record this code saves")
        return metadata

    def restore_latest(self, abstract_state: TrainState, expected_metadata: dict[str, Any]) -> TrainState | None:
        """The latest state, placed per `abstract_state`'s shardings; None if there is none.

        Raises CheckpointMismatchError when the checkpoint was made for another model, and
        CheckpointCorruptError when its files cannot be read or its values differ from the
        fingerprints saved with them.
        """
        step = self.latest_step()
        if step is None:
            return None
        metadata = self.read_metadata(step)
        problem = _describe_mismatch(metadata, expected_metadata)
        if problem:
            raise CheckpointMismatchError(
                f"cannot resume from checkpoint step {step} in {self.directory}: {problem}; "
                "use a new --workdir or the matching config"
            )
        restore = functools.partial(
            self._manager.restore, step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        try:
            restored = restore_or_explain(restore)["state"]
        except UnreadableError as err:
            raise self._corrupt(step, f"its files cannot be read ({err})") from err
        changes = describe_changes(restored, metadata.get("fingerprints"))
        if changes:
            raise self._corrupt(step, changes)
        return restored

    def _corrupt(self, step: int, problem: str) -> CheckpointCorruptError:
        earlier = [s for s in self._manager.all_steps() if s < step]
        remedy = (
            f"delete {self.directory / str(step)} to resume from step {max(earlier)}"
            if earlier
            else f"delete {self.directory / str(step)} to start again from step 0, or use a new --workdir"
        )
        return CheckpointCorruptError(f"checkpoint step {step} in {self.directory} is corrupt: {problem}; {remedy}")

    def close(self) -> None:
        """Waits for pending saves to land on disk."""
        self._manager.wait_until_finished()
        self._manager.close()
