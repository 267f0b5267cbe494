"""Data: sources, transforms, and the determinism/sharding promises of the pipelines."""

import gzip
import io
import itertools
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dla_jax import data
from dla_jax.data import sources, transforms


def make_config(**overrides) -> ml_collections.ConfigDict:
    config = dict(
        source="digits",
        name="digits",
        data_dir=None,
        train_split="train",
        eval_split="test",
        image_size=16,
        augment="crop",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        num_workers=0,
    )
    config.update(overrides)
    return ml_collections.ConfigDict(config)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


# ---------------------------------------------------------------- sources


def test_a_split_digits_lacks_is_named_with_the_fix():
    with pytest.raises(data.DatasetNotFoundError, match="digits has splits 'train' and 'test', not 'validation'"):
        data.get_dataset_info(make_config(eval_split="validation"))


def test_digits_split_shapes_and_determinism():
    train, test = sources.open_digits("train"), sources.open_digits("test")
    assert (len(train), len(test)) == (1437, 360)
    image, label = train[0]
    assert image.shape == (8, 8, 1) and image.dtype == np.uint8 and train.images.max() == 255
    assert all(0 <= test[i][1] < 10 for i in range(len(test)))
    train_rows = {train.images[i].tobytes() + bytes([train.labels[i]]) for i in range(len(train))}
    test_rows = {test.images[i].tobytes() + bytes([test.labels[i]]) for i in range(len(test))}
    assert len(train_rows & test_rows) < 5  # disjoint examples (digits has a few exact repeats)
    np.testing.assert_array_equal(sources.open_digits("train").images, train.images)
    info = data.get_dataset_info(make_config())
    assert info == data.DatasetInfo(10, (16, 16, 3), 1437, 360, [str(d) for d in range(10)])


def write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_files_idx_and_npz_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    labels = rng.integers(0, 4, 7).astype(np.uint8)
    labels[0] = 4
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    test_images = rng.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", image=test_images, label=np.array([0, 6, 1]))

    train = sources.open_files(str(tmp_path), "train")
    assert len(train) == 7 and train.num_classes == 7  # 1 + largest label of either split
    for i in range(7):
        np.testing.assert_array_equal(train[i][0], images[i][..., None])
        assert train[i][1] == labels[i]
    test = sources.open_files(str(tmp_path), "test")
    np.testing.assert_array_equal(test.images, test_images)
    assert [test[i][1] for i in range(3)] == [0, 6, 1]


def test_files_keras_style_npz_and_missing_message(tmp_path):
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.array([1, 2]), x_test=x[:1], y_test=np.array([0]))
    np.testing.assert_array_equal(sources.open_files(str(tmp_path), "train").images[..., 0], x)
    with pytest.raises(data.DatasetNotFoundError, match="t10k|test.npz") as e:
        sources.open_files(str(tmp_path / "empty"), "test")
    assert str(tmp_path / "empty") in str(e.value)


# ---------------------------------------------------------------- transforms


def test_pad_and_crop_is_a_window_of_the_padded_image():
    image = np.random.default_rng(1).integers(1, 256, (8, 8, 3), dtype=np.uint8)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    seen = set()
    for seed in range(40):
        crop = transforms.pad_and_crop(image, 8, 4, np.random.default_rng(seed))
        assert crop.shape == (8, 8, 3)
        windows = [(t, x) for t in range(9) for x in range(9) if np.array_equal(padded[t : t + 8, x : x + 8], crop)]
        assert windows
        seen.add(windows[0])
    assert len(seen) > 10


def test_flip_and_grey_to_rgb():
    image = np.arange(12, dtype=np.uint8).reshape(2, 6, 1)
    flips = [transforms.random_flip(image, np.random.default_rng(s)) for s in range(20)]
    assert any(np.array_equal(f, image[:, ::-1]) for f in flips)
    assert any(np.array_equal(f, image) for f in flips)
    rgb = transforms.to_rgb(image)
    assert rgb.shape == (2, 6, 3) and (rgb == image).all()


def test_train_transform_shapes_and_crop_mode_never_flips():
    config = make_config(augment="crop", image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    image = np.tile(np.arange(1, 9, dtype=np.uint8) * 30, (8, 1))[..., None]  # left-to-right ramp
    transform = transforms.make_transform(config, train=True)
    for seed in range(20):
        out = transform(image, np.random.default_rng(seed))
        assert out.shape == (8, 8, 3) and out.dtype == np.float32
        row = out[4, :, 0][out[4, :, 0] > 0]
        assert (np.diff(row) > 0).all()  # still increasing: never mirrored
    out = transforms.make_transform(make_config(augment="cifar", image_size=32), train=True)(
        np.zeros((8, 8, 1), np.uint8), np.random.default_rng(0)
    )
    assert out.shape == (32, 32, 3)


def test_imagenet_transforms():
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    config = make_config(augment="imagenet", image_size=28)
    for seed in range(10):
        out = transforms.make_transform(config, train=True)(image, np.random.default_rng(seed))
        assert out.shape == (28, 28, 3)
    resized = transforms.resize_and_center_crop(image, 28)  # short side 32, centre 28
    np.testing.assert_array_equal(resized, transforms.resize(image, 32, 48)[2:30, 10:38])


def test_normalisation_and_preprocess_for_eval():
    image = np.full((16, 16, 3), 255, np.uint8)
    image[..., 1] = 0
    out = data.preprocess_for_eval(image, make_config())
    np.testing.assert_allclose(out[0, 0], [2.0, -2.0, 2.0])  # (1 - .5)/.25, (0 - .5)/.25
    batch = data.preprocess_for_eval(np.stack([image, image]), make_config())
    assert batch.shape == (2, 16, 16, 3) and batch.dtype == np.float32


# ---------------------------------------------------------------- pipelines


def test_train_resume_is_bit_identical():
    config = make_config()
    stream = take(data.train_batches(config, global_batch_size=64, seed=3, start_step=0), 6)
    resumed = take(data.train_batches(config, global_batch_size=64, seed=3, start_step=4), 2)
    for a, b in zip(stream[4:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert stream[0]["image"].shape == (64, 16, 16, 3) and stream[0]["label"].dtype == np.int32
    other = next(data.train_batches(config, global_batch_size=64, seed=4))
    assert not np.array_equal(other["label"], stream[0]["label"])


def test_process_shares_concatenate_to_global_batch():
    config = make_config()
    whole = take(data.train_batches(config, global_batch_size=12, seed=0, start_step=2), 2)
    shares = [
        take(
            data.train_batches(config, global_batch_size=12, seed=0, start_step=2, process_index=p, process_count=2), 2
        )
        for p in range(2)
    ]
    for k in range(2):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([shares[0][k][key], shares[1][k][key]]), whole[k][key])
    assert shares[0][0]["label"].shape == (6,)


class IndexSource(sources.ArraySource):
    """A source whose label is the example index, so pipelines can be audited."""


def index_source(n: int) -> IndexSource:
    return IndexSource(np.zeros((n, 4, 4, 1), np.uint8), np.arange(n), n)


def test_epochs_are_permutations(monkeypatch):
    monkeypatch.setattr("dla_jax.data.pipeline.open_source", lambda config, split: index_source(10))
    labels = np.concatenate(
        [b["label"] for b in take(data.train_batches(make_config(image_size=4), global_batch_size=4, seed=1), 10)]
    )
    epochs = labels.reshape(4, 10)
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 4


@pytest.mark.parametrize("n,batch,processes", [(10, 4, 1), (10, 4, 2), (11, 6, 3), (7, 9, 3), (12, 6, 3)])
def test_eval_sees_every_example_once(monkeypatch, n, batch, processes):
    monkeypatch.setattr("dla_jax.data.pipeline.open_source", lambda config, split: index_source(n))
    seen = []
    for p in range(processes):
        for b in data.eval_batches(
            make_config(image_size=4), global_batch_size=batch, process_index=p, process_count=processes
        ):
            assert b["mask"].shape == (batch // processes,) and b["mask"].dtype == np.bool_
            seen.extend(b["label"][b["mask"]])
    assert sorted(seen) == list(range(n))


def test_eval_digits_counts_the_whole_split():
    batches = list(data.eval_batches(make_config(), global_batch_size=100))
    assert len(batches) == 4 and sum(b["mask"].sum() for b in batches) == 360
    assert not batches[-1]["mask"][60:].any() and (batches[-1]["image"][60:] == 0).all()


def test_bad_batch_size_for_process_count():
    with pytest.raises(ValueError, match="multiple"):
        data.eval_batches(make_config(), global_batch_size=10, process_index=0, process_count=3)


# ---------------------------------------------------------------- tfds


def test_tfds_source_through_mock_data():
    config = make_config(source="tfds", name="fashion_mnist", data_dir="/nonexistent", augment="cifar", image_size=28)
    with tfds.testing.mock_data(num_examples=10):
        info = data.get_dataset_info(config)
        assert (info.num_classes, info.num_train, info.image_shape) == (10, 10, (28, 28, 3))
        assert info.class_names[0] == "T-shirt/top"
        batches = list(data.eval_batches(config, global_batch_size=4))
        first = next(data.train_batches(config, global_batch_size=4, seed=0))
    assert sum(b["mask"].sum() for b in batches) == 10 and len(batches) == 3
    assert first["image"].shape == (4, 28, 28, 3)


class DataTinyArrayRecord(tfds.core.GeneratorBasedBuilder):
    """A 12 + 5 example ArrayRecord dataset built locally, to read the real (unmocked) path.

    Image i is filled with the value i and has label i % 3, so reads can be checked exactly.
    """

    VERSION = tfds.core.Version("1.0.0")
    url_infos = {}  # no checksums file: skips tfds' code-path lookup (needs importlib_resources)

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 6, 3)),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

    def _generate_examples(self, n):
        for i in range(n):
            image = np.full((6, 6, 3), i, np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            yield i, {"image": buffer.getvalue(), "label": i % 3}


def test_tfds_real_array_record_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(DataTinyArrayRecord, "pkg_dir_path", tmp_path)  # no README etc. to read
    builder = DataTinyArrayRecord(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()  # local generator only: nothing is downloaded
    config = make_config(
        source="tfds",
        name="data_tiny_array_record",
        data_dir=str(tmp_path),
        augment="none",
        image_size=6,
        mean=(0, 0, 0),
        std=(1 / 255,) * 3,
    )
    info = data.get_dataset_info(config)
    assert info == data.DatasetInfo(3, (6, 6, 3), 12, 5, ["a", "b", "c"])
    seen = []
    for batch in data.eval_batches(config, global_batch_size=4, process_index=1, process_count=2):
        for image, label in zip(batch["image"][batch["mask"]], batch["label"][batch["mask"]]):
            value = int(np.round(image[0, 0, 0]))
            assert np.allclose(image, value, atol=1e-4) and label == value % 3
            seen.append(value)
    assert len(seen) == 2 and len(set(seen)) == 2  # process 1 of 2 gets positions 2, 3
    epoch = np.concatenate(
        [b["image"][:, 0, 0, 0] for b in take(data.train_batches(config, global_batch_size=4, seed=0), 3)]
    )
    assert sorted(np.round(epoch).astype(int)) == list(range(12))
    # A split the prepared dataset lacks: name its splits, do not ask to rebuild it.
    config.eval_split = "validation"
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset_info(config)
    assert "cannot give split 'validation'" in str(e.value) and str(e.value).endswith("its splits: test, train")
    assert "tfds build" not in str(e.value)


def test_unprepared_tfds_says_how_to_build_without_downloading(tmp_path):
    config = make_config(source="tfds", name="cifar10", data_dir=str(tmp_path))
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.get_dataset_info(config)
    assert time.monotonic() - start < 10
    assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in str(e.value)
    assert "already prepared" not in str(e.value)  # tfds's own text says so where nothing is
    assert not list(tmp_path.iterdir())  # nothing downloaded or written
    with pytest.raises(data.DatasetNotFoundError, match="no dataset named"):
        data.get_dataset_info(make_config(source="tfds", name="no_such_dataset_xyz"))


def test_encoded_images_are_decoded():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    np.testing.assert_array_equal(sources.as_uint8_image(buffer.getvalue()), image)
