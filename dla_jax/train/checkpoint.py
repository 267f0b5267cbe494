"""Periodic, atomic, keep-last-K checkpoints of the TrainState with orbax's CheckpointManager.

Each checkpoint holds the TrainState and a JSON record of the run (config, dataset facts,
parameter shapes); restoring checks that record so that a checkpoint of another model
fails loudly instead of restoring part of the weights.
"""

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from dla_jax.train.state import TrainState


class CheckpointMismatchError(ValueError):
    """The checkpoint in the work directory was written for another model or shape."""


def param_shapes(params: Any) -> dict[str, list[int]]:
    """`{'stage0/block1/conv1/kernel': [3, 3, 16, 16], ...}` for every parameter."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): list(leaf.shape) for path, leaf in flat}


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
        """Saves asynchronously (atomic: a step directory appears only once complete)."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)),
            force=True,
        )

    def read_metadata(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

    def restore_latest(self, abstract_state: TrainState, expected_metadata: dict[str, Any]) -> TrainState | None:
        """The latest state, placed per `abstract_state`'s shardings; None if there is none.

        Raises CheckpointMismatchError when the checkpoint was made for another model.
        """
        step = self.latest_step()
        if step is None:
            return None
        problem = _describe_mismatch(self.read_metadata(step), expected_metadata)
        if problem:
            raise CheckpointMismatchError(
                f"cannot resume from checkpoint step {step} in {self.directory}: {problem}; "
                "use a new --workdir or the matching config"
            )
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def close(self) -> None:
        """Waits for pending saves to land on disk."""
        self._manager.wait_until_finished()
        self._manager.close()
