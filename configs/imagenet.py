r"""python -m dla_jax.main --config configs/imagenet.py:dla_l,50 --workdir runs/imagenet_dla_l_50

ImageNet-1K with the paper's recipe. The argument after the colon is `family,depth`
(family: resnet, mrla_l, dla_l, dla_b; depth 50 or 101). Recipe: SGD momentum 0.9,
lr 0.1 per 256 images (scaled linearly with the batch), 100 epochs, linear warm-up over
3 epochs then lr x0.1 every 30 epochs, weight decay 1e-4 added to the gradient,
DropPath 0.2, RandomResizedCrop(224) + flip; eval resize 256 + center crop 224.
The dataset is read with TFDS (`imagenet2012`, prepared by hand, see its TFDS page);
pass `--config.data.data_dir=DIR`. Add `--config.model.dtype=bfloat16` on accelerators.
`--config.model.head_dropout=RATE` turns on the official code's optional dropout before the
classifier (0 in the recipe).
"""

from ml_collections import config_dict


def get_config(family_and_depth: str = "dla_l,50") -> config_dict.ConfigDict:
    """Returns the ImageNet recipe for `family,depth`."""
    parts = family_and_depth.split(",")
    if len(parts) != 2:
        raise ValueError(f"config argument must be 'family,depth', e.g. dla_l,50; got {family_and_depth!r}")
    family, depth = parts
    config = config_dict.ConfigDict()
    config.seed = 0

    config.model = config_dict.ConfigDict()
    config.model.family = family
    config.model.layout = "imagenet"
    config.model.depth = int(depth)
    config.model.dsu_context = "per_sample"
    config.model.drop_path = 0.2
    config.model.head_dropout = 0.0
    config.model.dtype = "float32"
    config.model.scan_blocks = True
    config.model.remat_attention = False  # True recomputes the light attention branch: less memory, slower

    config.data = config_dict.ConfigDict()
    config.data.source = "tfds"
    config.data.name = "imagenet2012"
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 224
    config.data.augment = "imagenet"
    config.data.mean = (0.485, 0.456, 0.406)
    config.data.std = (0.229, 0.224, 0.225)
    config.data.num_workers = 8

    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1

    config.train = config_dict.ConfigDict()
    config.train.batch_size = 256
    config.train.eval_batch_size = 256
    config.train.num_epochs = 100.0
    config.train.num_steps = 0
    config.train.learning_rate = 0.1
    config.train.lr_reference_batch_size = 256
    config.train.momentum = 0.9
    config.train.weight_decay = 1e-4
    config.train.schedule = "multistep"
    config.train.decay_epochs = (30.0, 60.0, 90.0)
    config.train.decay_factor = 0.1
    config.train.warmup_epochs = 3.0
    config.train.label_smoothing = 0.0
    config.train.log_every_steps = 100
    config.train.eval_every_epochs = 1.0
    config.train.checkpoint_every_epochs = 0.5
    config.train.max_checkpoints_to_keep = 3
    return config
