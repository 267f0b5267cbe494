"""Every config is complete and valid; bad values stop the CLI early with a message naming the field."""

import re
import subprocess
import sys

import pytest

from dla_jax.train.validation import REQUIRED_FIELDS, ConfigError, validate_config

from train_helpers import CONFIGS_DIR, cpu_env, load_config

CONFIGS = [
    ("cifar10", None),
    ("cifar100", "resnet,20"),
    ("imagenet", "dla_l,101"),
    ("quickstart", None),
    ("fashion_mnist", "resnet,20"),
]


@pytest.mark.parametrize("name,argument", CONFIGS)
def test_config_is_complete_and_valid(name, argument):
    config = load_config(name, argument)
    for section, fields in REQUIRED_FIELDS.items():
        group = config[section] if section else config
        assert set(group.keys()) == set(fields), f"{name}: {section or 'top level'} fields differ"
    validate_config(config, device_count=4, process_count=1)  # CIFAR's published test batch is 100


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "quickstart", "fashion_mnist"])
def test_docstring_starts_with_the_command(name):
    docstring = (CONFIGS_DIR / f"{name}.py").read_text().split('"""')[1].lstrip("r")
    assert docstring.startswith(f"python -m dla_jax.main --config configs/{name}.py")


def test_family_and_depth_argument():
    config = load_config("cifar100", "mrla_l,56")
    assert (config.model.family, config.model.depth, config.data.name) == ("mrla_l", 56, "cifar100")


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("model.depth", 21, "config.model.depth=21"),
        ("model.family", "dla_x", "config.model.family='dla_x' is not allowed; choose one of resnet"),
        ("model.dtype", "float16", "config.model.dtype='float16'"),
        ("model.head_dropout", 1.0, "config.model.head_dropout=1.0 must be in [0, 1)"),
        ("train.batch_size", 100, "config.train.batch_size=100 must be divisible by the number of devices (8)"),
        ("train.schedule", "linear", "config.train.schedule='linear'"),
        ("mesh.fsdp", 3, "config.mesh.data=-1 x config.mesh.fsdp=3"),
    ],
)
def test_bad_value_names_the_field(field, value, expected):
    config = load_config("cifar10")
    config.train.eval_batch_size = 200
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate_config(config, device_count=8, process_count=1)


def test_missing_field_is_reported():
    config = load_config("quickstart")
    del config.train["label_smoothing"]
    with pytest.raises(ConfigError, match="config.train.label_smoothing is missing"):
        validate_config(config, device_count=1, process_count=1)


QUICKSTART = "quickstart.py"


@pytest.mark.parametrize(
    "config,override,expected",
    [
        (QUICKSTART, "--config.model.depth=21", "config.model.depth=21"),
        (QUICKSTART, "--config.model.family=dla_x", "config.model.family='dla_x'"),
        (QUICKSTART, "--config.train.batch_size=60", "config.train.batch_size=60 must be divisible"),
        (
            QUICKSTART,
            "--config.train.no_such_field=1",
            "unknown config field 'no_such_field' in --config.train.no_such_field=1",
        ),
        (
            QUICKSTART,
            "--config.model.famly=dla_l",
            "unknown config field 'famly' in --config.model.famly=dla_l; Did you mean \"family\"",
        ),
        (QUICKSTART, "--num_processes=2", "bad flag: Give all of --coordinator_address, --num_processes and"),
        ("no_such_config.py", None, "no_such_config.py: [Errno 2] No such file or directory"),
        ("cifar10.py:dla_l", None, "ValueError: config argument must be 'family,depth', e.g. dla_l,110; got 'dla_l'"),
    ],
)
def test_cli_stops_before_compiling(tmp_path, config, override, expected):
    """Runs in a fresh process with 8 CPU devices: clean one-line error, non-zero exit, no traceback."""
    env = cpu_env(8)
    command = [
        sys.executable,
        "-m",
        "dla_jax.main",
        f"--config={CONFIGS_DIR / config}",
        f"--workdir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        command + ([override] if override else []), capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
