"""Random-access image sources: tfds (ArrayRecord), scikit-learn digits, files on disk.

Every source is a sequence: ``len(source)`` and ``source[i] -> (uint8 HWC image, int label)``,
plus ``num_classes`` and ``class_names``. Random access is what lets grain shuffle by
(seed, epoch) and lets each process read only its own share, so no source streams.

Sources, chosen by ``data_config.source``:

* ``"tfds"``: ``tfds`` builder ``data_config.name`` read through ``builder.as_data_source``
  (ArrayRecord, no TensorFlow at training time). The dataset must have been prepared with
  ``--file_format=array_record``; we never download or prepare, we say how.
* ``"digits"``: the 1797 real 8x8 handwritten digits bundled with scikit-learn (values
  0..16, scaled to 0..255). Fixed split, no randomness: the first 1437 images are
  ``"train"``, the last 360 (20%) are ``"test"``.
* ``"files"``: arrays on disk under ``data_config.data_dir``, split ``"train"`` or ``"test"``:
  IDX files ``{prefix}-images-idx3-ubyte[.gz]`` + ``{prefix}-labels-idx1-ubyte[.gz]``
  (prefix = the split name, or ``t10k`` for ``"test"``, as in MNIST / Fashion-MNIST); else
  ``{split}.npz`` with keys ``image``/``label`` (or ``images``/``labels``, ``x``/``y``);
  else any ``*.npz`` in the directory with ``x_{split}``/``y_{split}`` (Keras style).
  Debian's ``dataset-fashion-mnist`` package installs exactly such IDX files
  (``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``) in /usr/share/datasets/fashion-mnist.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
import pathlib
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

DIGITS_NUM_TRAIN = 1437  # the last 360 of 1797 images (20%) form the test split


class DatasetNotFoundError(ValueError):
    """A dataset missing on disk, or a split it lacks; the message says how to get or choose one."""


class Source(Protocol):
    """What the pipeline needs from a source."""

    num_classes: int
    class_names: list[str] | None

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


def as_uint8_image(image: Any) -> np.ndarray:
    """Encoded bytes (JPEG/PNG) or an array -> uint8 HWC, so sources may decode lazily."""
    if isinstance(image, (bytes, np.bytes_)):
        with Image.open(io.BytesIO(image)) as pil:
            image = np.asarray(pil.convert("RGB") if pil.mode not in ("L", "RGB") else pil)
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {image.dtype}")
    return image


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """In-memory images (N,H,W,C uint8) and labels; picklable, so grain workers can use it."""

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class TfdsSource:
    """A tfds ArrayRecord data source; decodes each record to (uint8 HWC, label)."""

    def __init__(
        self,
        data_source: Sequence[dict],
        image_key: str,
        label_key: str,
        num_classes: int,
        class_names: list[str] | None,
    ):
        self._data_source = data_source
        self._image_key = image_key
        self._label_key = label_key
        self.num_classes = num_classes
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        record = self._data_source[int(index)]
        return as_uint8_image(record[self._image_key]), int(record[self._label_key])


def tfds_build_command(name: str, data_dir: str) -> str:
    """The one command that prepares a dataset in the format we can read."""
    return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def _unreadable_tfds(builder: Any, name: str, split: str, root: str, error: Exception) -> str:
    """Why tfds gave no data source, and the fix: prepare the dataset, rebuild it with random
    access, or name one of its splits."""
    from tensorflow_datasets.core.file_adapters import FileFormat

    prepared = builder.is_prepared()
    if prepared and builder.info.available_file_formats() & set(FileFormat.with_random_access()):
        return (
            f"tfds dataset {name!r} (prepared in {builder.data_dir}) cannot give split {split!r} ({error}); "
            f"set config.data.train_split / eval_split to its splits: {', '.join(sorted(builder.info.splits))}"
        )
    if prepared:
        why = (
            f"tfds dataset {name!r} is prepared in {builder.data_dir} as "
            f"{builder.info.file_format.value}, which has no random access; rebuild it "
            f"as ArrayRecord (add --overwrite or use another data_dir):"
        )
    else:
        why = f"tfds dataset {name!r} is not prepared in {root}. Prepare it once with:"
    manual = (
        " It needs a manual download first; add --manual_dir=<dir with the archives>."
        if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
        else ""
    )
    # Where nothing is prepared, tfds's own message wrongly says it is prepared as TFRecord.
    underlying = f" Underlying error: {error}" if prepared else ""
    return (
        f"{why}\n  {tfds_build_command(name, root)}\n(needs TensorFlow and the network at "
        f"build time only).{manual}{underlying}"
    )


def open_tfds(name: str, split: str, data_dir: str | None) -> TfdsSource:
    """Opens a prepared tfds dataset without ever downloading; explains how to prepare it."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(f"tfds has no dataset named {name!r}.") from e
    root = str(builder.data_dir_root)
    try:
        data_source = builder.as_data_source(split)
    except (NotImplementedError, AssertionError, FileNotFoundError, ValueError) as e:
        raise DatasetNotFoundError(_unreadable_tfds(builder, name, split, root, e)) from e
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    label = builder.info.features[label_key]
    names = list(label.names) if getattr(label, "names", None) else None
    return TfdsSource(data_source, image_key, label_key, int(label.num_classes), names)


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


def open_digits(split: str) -> ArraySource:
    """scikit-learn's digits, first 1437 = train, last 360 = test (fixed, documented)."""
    images, labels = _digits()
    parts = {"train": slice(0, DIGITS_NUM_TRAIN), "test": slice(DIGITS_NUM_TRAIN, None)}
    if split not in parts:
        raise DatasetNotFoundError(
            f"digits has splits 'train' and 'test', not {split!r}: set config.data.train_split / eval_split"
        )
    return ArraySource(images[parts[split]], labels[parts[split]], 10, [str(d) for d in range(10)])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped), the MNIST format: magic, dims, raw data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    return array.reshape(shape).astype(np.dtype(dtypes[data[2]]).newbyteorder("="))


def _first_existing(directory: pathlib.Path, names: list[str]) -> pathlib.Path | None:
    return next((directory / n for n in names if (directory / n).exists()), None)


def _idx_names(split: str, kind: str, idx: int) -> list[str]:
    prefixes = [split] + (["t10k"] if split == "test" else [])
    return [f"{p}-{kind}{sep}idx{idx}-ubyte{gz}" for p in prefixes for sep in ("-", ".") for gz in (".gz", "")]


def _read_npz(directory: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    path = directory / f"{split}.npz"
    if path.exists():
        with np.load(path) as npz:
            for image_key, label_key in (("image", "label"), ("images", "labels"), ("x", "y")):
                if image_key in npz and label_key in npz:
                    return npz[image_key], npz[label_key]
        raise ValueError(f"{path} has keys {sorted(npz.keys())}; expected image/label, images/labels or x/y")
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as npz:
            if f"x_{split}" in npz and f"y_{split}" in npz:
                return npz[f"x_{split}"], npz[f"y_{split}"]
    return None


@functools.lru_cache(maxsize=8)
def _read_files(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    root = pathlib.Path(directory)
    image_path = _first_existing(root, _idx_names(split, "images", 3))
    label_path = _first_existing(root, _idx_names(split, "labels", 1))
    if image_path and label_path:
        images, labels = read_idx(image_path), read_idx(label_path)
    else:
        found = _read_npz(root, split) if root.is_dir() else None
        if found is None:
            raise DatasetNotFoundError(
                f"no {split!r} split found in directory {directory}: expected IDX files "
                f"{_idx_names(split, 'images', 3)[0]} and {_idx_names(split, 'labels', 1)[0]} "
                f"(also t10k-* for 'test', .gz optional), or {split}.npz with keys image/label, "
                f"or a *.npz with keys x_{split}/y_{split}."
            )
        images, labels = found
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError(
            f"{directory} {split!r}: need uint8 images (N,H,W[,C]) and N labels, "
            f"got {images.dtype}{images.shape} and {np.shape(labels)}"
        )
    return images, np.asarray(labels).astype(np.int64).reshape(-1)


def open_files(directory: str | None, split: str) -> ArraySource:
    """Arrays from IDX or npz files; classes = 1 + the largest label seen in train or test."""
    if not directory:
        raise DatasetNotFoundError("source 'files' needs data.data_dir, the directory with the files")
    images, labels = _read_files(str(directory), split)
    num_classes = int(labels.max(initial=-1)) + 1
    other = "test" if split == "train" else "train"
    try:
        num_classes = max(num_classes, int(_read_files(str(directory), other)[1].max(initial=-1)) + 1)
    except DatasetNotFoundError:
        pass
    return ArraySource(images, labels, num_classes)


def open_source(data_config: Any, split: str) -> Source:
    """The source named by ``data_config.source`` for one split."""
    kind = data_config.source
    if kind == "tfds":
        return open_tfds(data_config.name, split, data_config.get("data_dir"))
    if kind == "digits":
        return open_digits(split)
    if kind == "files":
        return open_files(data_config.get("data_dir"), split)
    raise ValueError(f"data.source must be 'tfds', 'digits' or 'files', not {kind!r}")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the model and the loop need to know; image_shape is the model input (H, W, 3)."""

    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_eval: int
    class_names: list[str] | None


def get_dataset_info(data_config: Any) -> DatasetInfo:
    """Opens both splits (cheap: no example is read) and reports sizes and classes."""
    train = open_source(data_config, data_config.train_split)
    evaluation = open_source(data_config, data_config.eval_split)
    size = int(data_config.image_size)
    return DatasetInfo(
        num_classes=max(train.num_classes, evaluation.num_classes),
        image_shape=(size, size, 3),
        num_train=len(train),
        num_eval=len(evaluation),
        class_names=train.class_names,
    )
