"""Input data: random-access sources (tfds ArrayRecord, scikit-learn digits, IDX/npz files),
numpy transforms, and grain pipelines that are deterministic in (seed, step) and give each
process only its own share. See sources.py, transforms.py and pipeline.py for the details."""

from dla_jax.data.pipeline import eval_batches, train_batches
from dla_jax.data.sources import DatasetInfo, DatasetNotFoundError, get_dataset_info, open_source
from dla_jax.data.transforms import AUGMENTATIONS, preprocess_for_eval

__all__ = [
    "AUGMENTATIONS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "eval_batches",
    "get_dataset_info",
    "open_source",
    "preprocess_for_eval",
    "train_batches",
]
