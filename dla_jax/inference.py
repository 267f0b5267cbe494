"""Load an export (from dla_jax.export or dla_jax.convert) as a jitted predict function."""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dla_jax import data, models
from dla_jax.export_format import load_export, save_export

__all__ = ["Predictor", "load", "read_images", "save_export"]


@dataclasses.dataclass(frozen=True)
class Predictor:
    """`predictor(images)` -> logits [B, num_classes] for normalised NHWC float32 images.

    `preprocess` turns raw uint8 images (HWC or NHWC, any size) into that input, the same
    way evaluation did during training.
    """

    model: Any
    predict: Callable[[jax.Array], jax.Array]
    variables: dict[str, Any]
    model_config: dict[str, Any]
    data_info: dict[str, Any]

    def __call__(self, images: np.ndarray | jax.Array) -> jax.Array:
        return self.predict(self.variables, jnp.asarray(images, jnp.float32))

    def preprocess(self, images_uint8: np.ndarray) -> np.ndarray:
        return data.preprocess_for_eval(images_uint8, ml_collections.ConfigDict(self.data_info["data_config"]))

    @property
    def class_names(self) -> list[str]:
        names = self.data_info.get("class_names")
        return list(names) if names else [str(i) for i in range(self.model_config["num_classes"])]


def load(path: str | os.PathLike) -> Predictor:
    """Reads the export at `path` and builds its model in eval mode."""
    variables, model_config, data_info = load_export(path)
    model = models.from_config(model_config, model_config["num_classes"])
    predict = jax.jit(lambda variables, images: model.apply(variables, images, train=False).astype(jnp.float32))
    return Predictor(model=model, predict=predict, variables=variables, model_config=model_config, data_info=data_info)


def read_images(image_paths: list[str | os.PathLike]) -> list[np.ndarray]:
    """Each file as an RGB uint8 array; OSError naming the first file that is missing or not an image."""
    images = []
    for path in image_paths:
        try:
            with Image.open(path) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError as err:  # missing, unreadable, or not an image PIL knows (UnidentifiedImageError)
            raise OSError(f"cannot read image {path}: {err.strerror or err}") from err
    return images
