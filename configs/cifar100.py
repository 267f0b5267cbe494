r"""python -m dla_jax.main --config configs/cifar100.py:dla_l,110 --workdir runs/cifar100_dla_l_110

CIFAR-100 with the paper's recipe: exactly configs/cifar10.py (see its docstring for the
recipe and the overrides) with the dataset swapped. The argument after the colon is
`family,depth`. Prepare the data with `tfds build cifar100 --data_dir=DIR --file_format=array_record`.
"""

import importlib.util
import pathlib

from ml_collections import config_dict


def _cifar10_recipe():
    """configs/cifar10.py, loaded by path (config files are not a package)."""
    spec = importlib.util.spec_from_file_location("cifar10_recipe", pathlib.Path(__file__).with_name("cifar10.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(family_and_depth: str = "dla_l,110") -> config_dict.ConfigDict:
    """Returns the CIFAR-100 recipe for `family,depth`."""
    config = _cifar10_recipe().get_config(family_and_depth)
    config.data.name = "cifar100"
    return config
