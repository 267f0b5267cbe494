r"""python -m dla_jax.main --config configs/fashion_mnist.py:dla_l,20 --workdir runs/fashion_dla_l_20

Fashion-MNIST (70,000 real 28x28 grayscale photos of clothing, 10 classes) read from the IDX
files of Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`
puts them in /usr/share/datasets/fashion-mnist; elsewhere point --config.data.data_dir at a
folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz). A small budget that runs
on 2 CPU cores in 10-15 minutes (DLA-L-20 trained about 100 images/s on 2 busy cores): images
resized to 16x16, one epoch at global batch 128 (about 470 steps), no augmentation, one
evaluation on the 10,000 test images at the end.
The argument after the colon is `family,depth` (family: resnet, mrla_l, dla_l, dla_b;
CIFAR layout, depth 9n+2). Compare the families at the same depth and budget:

  for f in resnet mrla_l dla_l; do
    python -m dla_jax.main --config configs/fashion_mnist.py:$f,20 --workdir runs/fashion_${f}_20
  done
  grep eval_top1 runs/fashion_*_20/metrics.jsonl

For a longer, stronger run: --config.data.image_size=28 --config.train.num_epochs=10
--config.data.augment=crop.
"""

from ml_collections import config_dict


def get_config(family_and_depth: str = "dla_l,20") -> config_dict.ConfigDict:
    """Returns the Fashion-MNIST run for `family,depth`."""
    parts = family_and_depth.split(",")
    if len(parts) != 2:
        raise ValueError(f"config argument must be 'family,depth', e.g. dla_l,20; got {family_and_depth!r}")
    family, depth = parts
    config = config_dict.ConfigDict()
    config.seed = 0

    config.model = config_dict.ConfigDict()
    config.model.family = family
    config.model.layout = "cifar"
    config.model.depth = int(depth)
    config.model.dsu_context = "per_sample"
    config.model.drop_path = 0.0
    config.model.head_dropout = 0.0
    config.model.dtype = "float32"
    config.model.scan_blocks = int(depth) > 56  # as configs/cifar10.py (see there)
    config.model.remat_attention = False  # True recomputes the light attention branch: less memory, slower

    config.data = config_dict.ConfigDict()
    config.data.source = "files"
    config.data.name = "fashion_mnist"
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 16
    config.data.augment = "none"
    config.data.mean = (0.2860, 0.2860, 0.2860)
    config.data.std = (0.3530, 0.3530, 0.3530)
    config.data.num_workers = 0

    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1

    config.train = config_dict.ConfigDict()
    config.train.batch_size = 128
    config.train.eval_batch_size = 400
    config.train.num_epochs = 1.0
    config.train.num_steps = 0
    config.train.learning_rate = 0.1
    config.train.lr_reference_batch_size = 128
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.schedule = "cosine"
    config.train.decay_epochs = ()
    config.train.decay_factor = 0.1
    config.train.warmup_epochs = 0.1
    config.train.label_smoothing = 0.0
    config.train.log_every_steps = 20
    config.train.eval_every_epochs = 1.0
    config.train.checkpoint_every_epochs = 0.25
    config.train.max_checkpoints_to_keep = 2
    return config
