"""Checks a config before anything is built or compiled, with messages that name the field."""

import ml_collections

from dla_jax import models
from dla_jax.data import AUGMENTATIONS

DATA_SOURCES = ("tfds", "digits", "files")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("multistep", "cosine", "constant")

REQUIRED_FIELDS = {
    "": ("seed", "model", "data", "mesh", "train"),
    "model": (
        "family",
        "layout",
        "depth",
        "dsu_context",
        "drop_path",
        "head_dropout",
        "dtype",
        "scan_blocks",
        "remat_attention",
    ),
    "data": (
        "source",
        "name",
        "data_dir",
        "train_split",
        "eval_split",
        "image_size",
        "augment",
        "mean",
        "std",
        "num_workers",
    ),
    "mesh": ("data", "fsdp"),
    "train": (
        "batch_size",
        "eval_batch_size",
        "num_epochs",
        "num_steps",
        "learning_rate",
        "lr_reference_batch_size",
        "momentum",
        "weight_decay",
        "schedule",
        "decay_epochs",
        "decay_factor",
        "warmup_epochs",
        "label_smoothing",
        "log_every_steps",
        "eval_every_epochs",
        "checkpoint_every_epochs",
        "max_checkpoints_to_keep",
    ),
}


class ConfigError(ValueError):
    """A config field has a value the run cannot use; the message names the field."""


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(config: ml_collections.ConfigDict, *, device_count: int, process_count: int) -> None:
    """Raises ConfigError for the first field that is missing or has a bad value."""
    for section, fields in REQUIRED_FIELDS.items():
        group = config[section] if section else config
        for field in fields:
            if field not in group:
                where = f"config.{section}.{field}" if section else f"config.{field}"
                raise ConfigError(f"{where} is missing; every config must define it (see configs/cifar10.py)")

    model, data, train, mesh = config.model, config.data, config.train, config.mesh
    _check_choice("model.family", model.family, models.FAMILIES)
    _check_choice("model.layout", model.layout, models.LAYOUTS)
    try:
        models.validate_depth(model.layout, model.depth)
    except ValueError as err:
        raise ConfigError(f"config.model.depth={model.depth!r}: {err}") from None
    _check_choice("model.dsu_context", model.dsu_context, models.DSU_CONTEXTS)
    _check_choice("model.dtype", model.dtype, DTYPES)
    for field in ("drop_path", "head_dropout"):
        _check(0.0 <= model[field] < 1.0, f"config.model.{field}={model[field]} must be in [0, 1)")

    _check_choice("data.source", data.source, DATA_SOURCES)
    _check_choice("data.augment", data.augment, AUGMENTATIONS)
    _check(data.image_size > 0, f"config.data.image_size={data.image_size} must be positive")

    _check(mesh.fsdp >= 1, f"config.mesh.fsdp={mesh.fsdp} must be >= 1")
    _check(mesh.data == -1 or mesh.data >= 1, f"config.mesh.data={mesh.data} must be >= 1 or -1 (all devices)")
    data_size = device_count // mesh.fsdp if mesh.data == -1 else mesh.data
    _check(
        data_size * mesh.fsdp == device_count,
        f"config.mesh.data={mesh.data} x config.mesh.fsdp={mesh.fsdp} must use all {device_count} devices",
    )
    for field in ("batch_size", "eval_batch_size"):
        size = train[field]
        _check(size > 0, f"config.train.{field}={size} must be positive")
        _check(
            size % device_count == 0 and size % process_count == 0,
            f"config.train.{field}={size} must be divisible by the number of devices ({device_count})"
            f" and of processes ({process_count})",
        )

    _check(
        train.num_steps > 0 or train.num_epochs > 0,
        f"config.train.num_epochs={train.num_epochs} or config.train.num_steps={train.num_steps} must be positive",
    )
    _check_choice("train.schedule", train.schedule, SCHEDULES)
    _check(train.learning_rate > 0, f"config.train.learning_rate={train.learning_rate} must be positive")
    _check(train.lr_reference_batch_size > 0, "config.train.lr_reference_batch_size must be positive")
    _check(0.0 <= train.momentum < 1.0, f"config.train.momentum={train.momentum} must be in [0, 1)")
    _check(train.weight_decay >= 0, f"config.train.weight_decay={train.weight_decay} must be >= 0")
    _check(
        0.0 <= train.label_smoothing < 1.0, f"config.train.label_smoothing={train.label_smoothing} must be in [0, 1)"
    )
    for field in ("log_every_steps", "max_checkpoints_to_keep"):
        _check(train[field] >= 1, f"config.train.{field}={train[field]} must be >= 1")
    for field in ("eval_every_epochs", "checkpoint_every_epochs"):
        _check(train[field] > 0, f"config.train.{field}={train[field]} must be positive")
