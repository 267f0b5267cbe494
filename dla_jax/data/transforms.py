"""Per-example image transforms in pure numpy/PIL, random only through an explicit rng.

The pipeline hands every example a ``numpy.random.Generator`` seeded from (seed, position
in the stream), so augmentation is reproducible and a resumed run sees identical batches.

``data_config.augment``:

* ``"cifar"``: zero-pad 4 pixels, random crop ``image_size``, random horizontal flip.
* ``"crop"``: the same pad and crop without the flip (for digits, where a flip changes
  the class, e.g. mirrored 2s and 5s).
* ``"imagenet"``: random-resized crop to ``image_size`` (area 8%-100%, aspect 3/4-4/3,
  torchvision's algorithm), random flip; evaluation resizes the short side to
  ``image_size / 0.875`` (256 for 224) and takes the centre crop.
* ``"none"``: no augmentation.

For every mode but ``"imagenet"``, images whose size is not ``image_size`` are first resized
(bilinear) to ``image_size`` x ``image_size`` (digits 8x8 -> 32x32, Fashion-MNIST 28 -> 32).
Grayscale becomes 3 channels by repeating, since the models take RGB. Normalisation scales
to [0, 1] and then applies the per-channel ``mean``/``std`` from the config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

AUGMENTATIONS = ("cifar", "crop", "imagenet", "none")
CROP_PADDING = 4
EVAL_CROP_FRACTION = 0.875  # 224 / 256


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HWC with 1, 3 or 4 channels -> 3 channels (grey repeated, alpha dropped)."""
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        return image[..., :3]
    if channels != 3:
        raise ValueError(f"cannot make RGB from {channels} channels")
    return image


def resize(
    image: np.ndarray, height: int, width: int, box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Bilinear (antialiased, like torchvision on PIL) resize of a uint8 RGB image or box of it."""
    if box is None and image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image)
    return np.asarray(pil.resize((width, height), Image.BILINEAR, box=box))


def pad_and_crop(image: np.ndarray, size: int, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pads ``padding`` pixels on each side and takes a random ``size`` window."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top = int(rng.integers(0, padded.shape[0] - size + 1))
    left = int(rng.integers(0, padded.shape[1] - size + 1))
    return padded[top : top + size, left : left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """torchvision's RandomResizedCrop: 10 tries at a random box, else a clamped centre crop."""
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return resize(image, size, size, box=(left, top, left + w, top + h))


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """ImageNet evaluation: short side to size/0.875, then the centre size x size."""
    height, width = image.shape[:2]
    short = int(round(size / EVAL_CROP_FRACTION))
    if height <= width:
        new_h, new_w = short, max(short, int(round(width * short / height)))
    else:
        new_h, new_w = max(short, int(round(height * short / width))), short
    image = resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top : top + size, left : left + size]


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 -> float32 in [0, 1] -> (x - mean) / std per channel."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return ((image.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Transform:
    """One example's preprocessing; a plain picklable object so grain workers can run it."""

    augment: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"data.augment must be one of {AUGMENTATIONS}, not {self.augment!r}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        image = to_rgb(image)
        size = self.image_size
        if self.augment == "imagenet":
            if self.train:
                image = random_flip(random_resized_crop(image, size, rng), rng)
            else:
                image = resize_and_center_crop(image, size)
        else:
            image = resize(image, size, size)
            if self.train and self.augment in ("cifar", "crop"):
                image = pad_and_crop(image, size, CROP_PADDING, rng)
            if self.train and self.augment == "cifar":
                image = random_flip(image, rng)
        return normalise(image, self.mean, self.std)


def make_transform(data_config: Any, *, train: bool) -> Transform:
    """The train or eval transform described by ``data_config``."""
    return Transform(
        augment=data_config.augment,
        image_size=int(data_config.image_size),
        mean=tuple(data_config.mean),
        std=tuple(data_config.std),
        train=train,
    )


def preprocess_for_eval(images_uint8: np.ndarray, data_config: Any) -> np.ndarray:
    """Raw uint8 images (HW, HWC or NHWC) -> float32 model input, batched iff the input was."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"preprocess_for_eval takes uint8 images, got {images.dtype}")
    if images.ndim == 2:
        images = images[..., None]
    transform = make_transform(data_config, train=False)
    if images.ndim == 3:
        return transform(images)
    return np.stack([transform(image) for image in images])
