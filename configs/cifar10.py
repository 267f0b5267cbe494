r"""python -m dla_jax.main --config configs/cifar10.py:dla_l,110 --workdir runs/cifar10_dla_l_110

CIFAR-10 with the paper's recipe. The argument after the colon is `family,depth` (family: resnet, mrla_l, dla_l, dla_b;
depth 9n+2, e.g. 20, 56, 110, 164); any field can also be overridden, e.g.
`--config.train.batch_size=256 --config.model.drop_path=0.1`.
Stages of more than six blocks (depth > 56) run their blocks as one `nn.scan`, so that
compile time does not grow with depth; shorter ones are unrolled, which on the CPU compiles
no slower and steps 13-21% faster for the layer-attention families (docs/performance.md,
round 16). The choice follows the depth after the colon; `--config.model.scan_blocks` overrides it.
Recipe: SGD momentum 0.9, lr 0.1 at batch 128, 180 epochs, lr x0.1 at epochs 100 and 150,
weight decay 1e-4 added to the gradient, DropPath 0.2, crop + flip, test batch 100
(batches must divide by the device count: on 8 devices add --config.train.eval_batch_size=200).
The dataset is read with TFDS: `tfds build cifar10 --data_dir=DIR --file_format=array_record` prepares it.
"""

from ml_collections import config_dict


def get_config(family_and_depth: str = "dla_l,110") -> config_dict.ConfigDict:
    """Returns the CIFAR-10 recipe for `family,depth`."""
    parts = family_and_depth.split(",")
    if len(parts) != 2:
        raise ValueError(f"config argument must be 'family,depth', e.g. dla_l,110; got {family_and_depth!r}")
    family, depth = parts
    config = config_dict.ConfigDict()
    config.seed = 0

    config.model = config_dict.ConfigDict()
    config.model.family = family
    config.model.layout = "cifar"
    config.model.depth = int(depth)
    config.model.dsu_context = "per_sample"
    config.model.drop_path = 0.2
    config.model.head_dropout = 0.0
    config.model.dtype = "float32"
    config.model.scan_blocks = int(depth) > 56
    config.model.remat_attention = False  # True recomputes the light attention branch: less memory, slower

    config.data = config_dict.ConfigDict()
    config.data.source = "tfds"
    config.data.name = "cifar10"
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 32
    config.data.augment = "cifar"
    config.data.mean = (0.4914, 0.4822, 0.4465)
    config.data.std = (0.2023, 0.1994, 0.2010)
    config.data.num_workers = 0

    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1

    config.train = config_dict.ConfigDict()
    config.train.batch_size = 128
    config.train.eval_batch_size = 100
    config.train.num_epochs = 180.0
    config.train.num_steps = 0
    config.train.learning_rate = 0.1
    config.train.lr_reference_batch_size = 128
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-4
    config.train.schedule = "multistep"
    config.train.decay_epochs = (100.0, 150.0)
    config.train.decay_factor = 0.1
    config.train.warmup_epochs = 0.0
    config.train.label_smoothing = 0.0
    config.train.log_every_steps = 50
    config.train.eval_every_epochs = 1.0
    config.train.checkpoint_every_epochs = 1.0
    config.train.max_checkpoints_to_keep = 3
    return config
