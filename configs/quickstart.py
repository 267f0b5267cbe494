r"""python -m dla_jax.main --config configs/quickstart.py --workdir runs/quickstart

DLA-L (CIFAR layout, depth 20) on the 1,797 handwritten digits bundled with scikit-learn:
nothing to download, one to three minutes on 2 CPU cores, 95-98% test accuracy on the 360
held-out digits (97.2% as last measured; 95.3-96.9% before changes that only reordered
float sums in the gradients). The 8x8 digits are resized to 12x12 (the model ends in a global average
pool, so any size works; 8x8 trains faster but reached only 95.6%) and are not augmented:
a 4-pixel crop is most of the image, a flip another digit. Try
`--config.model.family=resnet` for the baseline, then
`python -m dla_jax.export --workdir runs/quickstart --out runs/quickstart_export`.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
    """Returns the quickstart run: DLA-L-20 on digits."""
    config = config_dict.ConfigDict()
    config.seed = 0

    config.model = config_dict.ConfigDict()
    config.model.family = "dla_l"
    config.model.layout = "cifar"
    config.model.depth = 20
    config.model.dsu_context = "per_sample"
    config.model.drop_path = 0.0
    config.model.head_dropout = 0.0
    config.model.dtype = "float32"
    config.model.scan_blocks = False
    config.model.remat_attention = False  # True recomputes the light attention branch: less memory, slower

    config.data = config_dict.ConfigDict()
    config.data.source = "digits"
    config.data.name = "digits"
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 12
    config.data.augment = "none"
    config.data.mean = (0.5, 0.5, 0.5)
    config.data.std = (0.5, 0.5, 0.5)
    config.data.num_workers = 0

    config.mesh = config_dict.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1

    config.train = config_dict.ConfigDict()
    config.train.batch_size = 64
    config.train.eval_batch_size = 120
    config.train.num_epochs = 15.0
    config.train.num_steps = 0
    config.train.learning_rate = 0.1
    config.train.lr_reference_batch_size = 64
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.schedule = "cosine"
    config.train.decay_epochs = ()
    config.train.decay_factor = 0.1
    config.train.warmup_epochs = 1.0
    config.train.label_smoothing = 0.0
    config.train.log_every_steps = 20
    config.train.eval_every_epochs = 5.0
    config.train.checkpoint_every_epochs = 5.0
    config.train.max_checkpoints_to_keep = 2
    return config
