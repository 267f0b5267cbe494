"""Small configs and helpers shared by the training, config and export tests."""

import importlib.util
import json
from pathlib import Path

import ml_collections

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(name: str, argument: str | None = None) -> ml_collections.ConfigDict:
    """Loads configs/<name>.py the way config_flags does (by path, `file.py:argument`)."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if argument is None else module.get_config(argument)


def tiny_digits_config(**train_overrides) -> ml_collections.ConfigDict:
    """The quickstart at its smallest: DLA-L depth 11 on 8x8 digits, a handful of steps."""
    config = load_config("quickstart")
    config.model.depth = 11
    config.model.drop_path = 0.1
    config.data.image_size = 8
    config.data.augment = "crop"
    config.train.batch_size = 32
    config.train.eval_batch_size = 48
    config.train.num_steps = 4
    config.train.schedule = "multistep"
    config.train.decay_epochs = (0.1,)
    config.train.warmup_epochs = 0.0
    config.train.log_every_steps = 1
    config.train.eval_every_epochs = 100.0
    config.train.checkpoint_every_epochs = 100.0
    config.train.update(train_overrides)
    return config


def read_metrics(workdir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
