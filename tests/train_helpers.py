"""Small configs and helpers shared by the training, config and export tests."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp

from dla_jax import cli

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

# XLA's CPU compiles dominate these tests (the same train step is compiled by many runs and
# subprocesses); a persistent cache shared by all of them makes every compile after the first free.
COMPILATION_CACHE_DIR = Path(tempfile.gettempdir()) / "dla_jax_test_compilation_cache"


def enable_compilation_cache() -> None:
    jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE_DIR))


# The quickstart at its smallest: DLA-L depth 11 on 8x8 digits, a handful of steps,
# a multistep schedule (so the lr of a step does not depend on the run's length).
TINY_DIGITS = {
    "model.depth": 11,
    "model.drop_path": 0.1,
    "train.learning_rate": 0.1,
    "data.image_size": 8,
    "data.augment": "none",
    "train.batch_size": 32,
    "train.eval_batch_size": 48,
    "train.num_steps": 4,
    "train.schedule": "multistep",
    "train.decay_epochs": (0.1,),
    "train.warmup_epochs": 0.0,
    "train.log_every_steps": 1,
    "train.eval_every_epochs": 100.0,
    "train.checkpoint_every_epochs": 100.0,
}


def load_config(name: str, argument: str | None = None) -> ml_collections.ConfigDict:
    """configs/<name>.py, loaded as `--config configs/<name>.py[:argument]` loads it."""
    return cli.load_config(CONFIGS_DIR / f"{name}.py", argument)


def tiny_digits_config(**overrides) -> ml_collections.ConfigDict:
    """TINY_DIGITS on top of the quickstart, then `overrides` (keys like `train__num_steps`)."""
    config = load_config("quickstart")
    for key, value in {**TINY_DIGITS, **{k.replace("__", "."): v for k, v in overrides.items()}}.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def tiny_digits_cli(**overrides) -> list[str]:
    """The same run as `tiny_digits_config(**overrides)`, as dla_jax.main arguments."""
    values = {**TINY_DIGITS, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [f"--config={CONFIGS_DIR / 'quickstart.py'}"] + [f"--config.{k}={v}" for k, v in values.items()]


def cpu_env(device_count: int) -> dict[str, str]:
    """Environment for a subprocess with `device_count` simulated CPU devices."""
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE_DIR),
    )


def launch_local(*command: str, num_processes: int = 2, devices_per_process: int | None = None) -> list[str]:
    """The argv that runs `command` as `num_processes` local processes under scripts/launch_local.py."""
    argv = [sys.executable, "scripts/launch_local.py", "--num_processes", str(num_processes)]
    if devices_per_process is not None:
        argv += ["--devices_per_process", str(devices_per_process)]
    return [*argv, "--", *command]


def run_launcher(argv: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, capture_output=True, text=True)` for a `launch_local` argv.

    On timeout it sends SIGTERM, which the launcher passes on to its processes, and fails
    with their output; `subprocess.run` would SIGKILL the launcher and leave them running.
    """
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs) as launcher:
        try:
            stdout, stderr = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            launcher.terminate()
            stdout, stderr = launcher.communicate(timeout=30)
            raise AssertionError(f"timed out after {timeout} s:\n{stdout[-4000:]}{stderr[-2000:]}") from None
    return subprocess.CompletedProcess(argv, launcher.returncode, stdout, stderr)


def read_metrics(workdir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def with_first_weight_changed(tree):
    leaves, treedef = jax.tree.flatten(jax.device_get(tree))
    leaves[0] = leaves[0] + 1.0
    return jax.tree.unflatten(treedef, leaves)


def overwrite_arrays(directory, arrays) -> None:
    """Rewrites an orbax item in place: values that decode fine but are not the ones saved."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, arrays, force=True)
    checkpointer.wait_until_finished()


def delete_array_files(directory) -> None:
    for chunk in directory.glob("ocdbt.process_*/d/*"):
        chunk.unlink()
