"""HamDataset batches, shuffling, the decoded cache, split-CSV loading and class weights."""

from __future__ import annotations

import os
import pickle

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.utils.class_weight import compute_class_weight

import keras_ham.dataset as dataset_module
from keras_ham.config import Config
from keras_ham.dataset import HamDataset, class_weights, dataset_from_split_csv
from keras_ham.images import ImageError
from keras_ham.labels import CLASS_NAMES, NUM_CLASSES
from keras_ham.metadata import MetadataError

NUM_IMAGES = 10
SIZE = 16


def _write_image(path, value: int) -> None:
    """A flat image whose every pixel is (value, 255 - value, 7): identifiable after resizing."""
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[...] = (value, 255 - value, 7)
    Image.fromarray(pixels).save(path)


def _identity(images: np.ndarray) -> np.ndarray:
    """Which image (index) each flat image of a batch is."""
    return np.rint(images[:, 0, 0, 0] / 20).astype(int)


@pytest.fixture()
def image_paths(tmp_path):
    paths = []
    for index in range(NUM_IMAGES):
        path = tmp_path / f"ISIC_{index:07d}.png"
        _write_image(path, index * 20)
        paths.append(path)
    return paths


def _labels() -> np.ndarray:
    return np.arange(NUM_IMAGES) % NUM_CLASSES


def _epoch(dataset: HamDataset) -> tuple[np.ndarray, np.ndarray]:
    batches = [dataset[i] for i in range(len(dataset))]
    dataset.on_epoch_end()
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def test_batches_have_the_documented_shapes_dtypes_and_ranges(image_paths):
    dataset = HamDataset(image_paths, _labels(), image_size=SIZE, batch_size=4)
    assert len(dataset) == 3
    images, labels = dataset[0]
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.float32
    assert labels.shape == (4,) and labels.dtype == np.int32
    assert images.min() >= 0 and images.max() == 255  # raw 0..255, not rescaled
    np.testing.assert_array_equal(_identity(images), [0, 1, 2, 3])
    np.testing.assert_array_equal(labels, _labels()[:4])
    last_images, last_labels = dataset[2]  # partial batch kept
    assert last_images.shape == (2, SIZE, SIZE, 3) and list(last_labels) == [8 % 7, 9 % 7]
    with pytest.raises(IndexError):
        dataset[3]


def test_without_labels_batches_are_images_only(image_paths):
    batch = HamDataset(image_paths, image_size=SIZE, batch_size=4)[1]
    assert isinstance(batch, np.ndarray) and batch.shape == (4, SIZE, SIZE, 3)
    np.testing.assert_array_equal(_identity(batch), [4, 5, 6, 7])


def test_shuffle_changes_every_epoch_repeats_per_seed_and_labels_follow(image_paths):
    first = HamDataset(image_paths, _labels(), image_size=SIZE, batch_size=3, shuffle=True, seed=5)
    second = HamDataset(image_paths, _labels(), image_size=SIZE, batch_size=3, shuffle=True, seed=5)
    orders = []
    for _ in range(3):
        images, labels = _epoch(first)
        identity = _identity(images)
        assert sorted(identity) == list(range(NUM_IMAGES))  # each image once per epoch
        np.testing.assert_array_equal(labels, _labels()[identity])  # labels follow images
        orders.append(identity)
        np.testing.assert_array_equal(_identity(_epoch(second)[0]), identity)  # same seed, same sequence
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    other = HamDataset(image_paths, _labels(), image_size=SIZE, batch_size=3, shuffle=True, seed=6)
    assert not np.array_equal(_identity(_epoch(other)[0]), orders[0])
    resumed = HamDataset(image_paths, _labels(), image_size=SIZE, batch_size=3, shuffle=True, seed=5)
    resumed.epoch = 2
    np.testing.assert_array_equal(_identity(_epoch(resumed)[0]), orders[2])


def test_cache_is_built_once_then_read_without_decoding(image_paths, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    options = dict(image_size=SIZE, batch_size=4, shuffle=True, seed=1)
    reference = HamDataset(image_paths, _labels(), **options)  # decodes every time
    cached = HamDataset(image_paths, _labels(), cache_dir=cache_dir, **options)
    assert [p.name for p in cache_dir.iterdir()] == [cached.cache_path.name]
    array = np.load(cached.cache_path)
    assert array.shape == (NUM_IMAGES, SIZE, SIZE, 3) and array.dtype == np.uint8

    expected_epochs = [_epoch(reference) for _ in range(2)]

    def fail(*args, **kwargs):
        raise AssertionError("load_image called although the cache exists")

    monkeypatch.setattr(dataset_module, "load_image", fail)
    for expected, expected_labels in expected_epochs:  # shuffled cached batches == decoded ones
        images, labels = _epoch(cached)
        assert type(images) is np.ndarray and images.dtype == np.float32
        np.testing.assert_array_equal(images, expected)
        np.testing.assert_array_equal(labels, expected_labels)
    later_run = HamDataset(image_paths, _labels(), image_size=SIZE, batch_size=4, cache_dir=cache_dir)
    assert later_run.cache_path == cached.cache_path
    images = later_run[0][0]  # unshuffled: a slice of the memory map, copied out
    assert type(images) is np.ndarray and images.dtype == np.float32 and images.flags.writeable
    np.testing.assert_array_equal(_identity(images), [0, 1, 2, 3])
    assert len(list(cache_dir.iterdir())) == 1


def test_a_changed_file_or_size_gives_a_new_cache(image_paths, tmp_path):
    cache_dir = tmp_path / "cache"
    before = HamDataset(image_paths, image_size=SIZE, batch_size=4, cache_dir=cache_dir)
    _write_image(image_paths[1], 200)
    stat = os.stat(image_paths[1])
    os.utime(image_paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # coarse-mtime filesystems
    after = HamDataset(image_paths, image_size=SIZE, batch_size=4, cache_dir=cache_dir)
    assert after.cache_path != before.cache_path
    assert after[0][1, 0, 0, 0] == 200 and before[0][1, 0, 0, 0] == 20
    resized = HamDataset(image_paths, image_size=8, batch_size=4, cache_dir=cache_dir)
    assert resized.cache_path not in (before.cache_path, after.cache_path) and resized[0].shape[1] == 8
    assert len(list(cache_dir.glob("*.npy"))) == 3


def test_a_failed_cache_build_leaves_nothing_behind(image_paths, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    real_load = dataset_module.load_image

    def flaky(path, image_size):
        if path == image_paths[6]:
            raise ImageError(f"{path}: simulated crash")
        return real_load(path, image_size)

    monkeypatch.setattr(dataset_module, "load_image", flaky)
    with pytest.raises(ImageError, match="ISIC_0000006"):
        HamDataset(image_paths, image_size=SIZE, batch_size=4, cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == []  # no half cache, no temporary file
    monkeypatch.setattr(dataset_module, "load_image", real_load)
    dataset = HamDataset(image_paths, image_size=SIZE, batch_size=4, cache_dir=cache_dir)
    np.testing.assert_array_equal(_identity(dataset[1]), [4, 5, 6, 7])


def test_a_truncated_cache_file_is_rebuilt(image_paths, tmp_path):
    cache_dir = tmp_path / "cache"
    path = HamDataset(image_paths, image_size=SIZE, batch_size=4, cache_dir=cache_dir).cache_path
    path.write_bytes(path.read_bytes()[:300])
    dataset = HamDataset(image_paths, image_size=SIZE, batch_size=4, cache_dir=cache_dir)
    np.testing.assert_array_equal(_identity(dataset[2]), [8, 9])


@pytest.mark.parametrize("cached", [False, True])
def test_corrupt_image_error_names_the_file(image_paths, tmp_path, cached):
    image_paths[3].write_bytes(b"this is not a PNG")
    make = lambda: HamDataset(  # noqa: E731
        image_paths, image_size=SIZE, batch_size=4, cache_dir=tmp_path / "cache" if cached else None
    )
    with pytest.raises(ImageError, match="ISIC_0000003.png"):
        make()[0]
    image_paths[3].unlink()
    with pytest.raises(ImageError, match="ISIC_0000003.png"):
        make()[0]


def test_bad_labels_and_arguments_are_rejected(image_paths):
    with pytest.raises(ValueError, match="1-D sequence of 10"):
        HamDataset(image_paths, [0, 1], image_size=SIZE, batch_size=4)
    with pytest.raises(ValueError, match="label 7 at position 0"):
        HamDataset(image_paths, [7] * NUM_IMAGES, image_size=SIZE, batch_size=4)
    with pytest.raises(ValueError, match="integer"):
        HamDataset(image_paths, np.zeros(NUM_IMAGES), image_size=SIZE, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        HamDataset(image_paths, image_size=SIZE, batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        HamDataset([], image_size=SIZE, batch_size=4)


def _tiny_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, activation="softmax")(x))


@pytest.mark.parametrize("use_multiprocessing", [False, True])
def test_parallel_workers_feed_keras_in_order(image_paths, tmp_path, use_multiprocessing):
    model = _tiny_model()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    options = dict(image_size=SIZE, batch_size=3, cache_dir=tmp_path / "cache")
    serial = HamDataset(image_paths, _labels(), **options)
    parallel = HamDataset(image_paths, _labels(), workers=2, use_multiprocessing=use_multiprocessing, **options)
    shuffled = HamDataset(
        image_paths, _labels(), shuffle=True, workers=2, use_multiprocessing=use_multiprocessing, **options
    )
    history = model.fit(shuffled, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2 and shuffled.epoch >= 2  # on_epoch_end reached the dataset
    np.testing.assert_allclose(model.predict(parallel, verbose=0), model.predict(serial, verbose=0), rtol=1e-6)


def test_pickling_drops_the_memory_map(image_paths, tmp_path):
    dataset = HamDataset(image_paths, _labels(), image_size=SIZE, batch_size=4, cache_dir=tmp_path / "cache")
    expected = dataset[1]
    assert dataset._cache is not None
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._cache is None
    np.testing.assert_array_equal(clone[1][0], expected[0])


@pytest.fixture()
def split_csv(tmp_path, image_paths):
    images = tmp_path / "images"
    images.mkdir()
    for path in image_paths[:4]:
        path.rename(images / path.name)
    frame = pd.DataFrame(
        {
            "lesion_id": [f"HAM_{i}" for i in range(4)],
            "image_id": [f"ISIC_{i:07d}" for i in range(4)],
            "dx": ["nv", "mel", "vasc", "akiec"],
        }
    )
    csv_path = tmp_path / "splits" / "train.csv"
    csv_path.parent.mkdir()
    frame.to_csv(csv_path, index=False)
    return csv_path


def _config(tmp_path, **changes) -> Config:
    defaults = dict(image_size=32, batch_size=3, seed=3, cache_dir=None, image_dirs=(str(tmp_path / "images"),))
    return Config(**{**defaults, **changes})


def test_dataset_from_split_csv_maps_labels_and_uses_the_config(split_csv, tmp_path):
    dataset = dataset_from_split_csv(split_csv, _config(tmp_path), training=False)
    assert list(dataset.frame["image_id"]) == [f"ISIC_{i:07d}" for i in range(4)]
    assert [p.name for p in dataset.paths] == [f"ISIC_{i:07d}.png" for i in range(4)]
    assert list(dataset.labels) == [CLASS_NAMES.index(dx) for dx in ("nv", "mel", "vasc", "akiec")]
    assert (len(dataset), dataset.image_size, dataset.shuffle, dataset.seed) == (2, 32, False, 3)
    images, labels = dataset[0]
    assert images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(_identity(images), [0, 1, 2])
    np.testing.assert_array_equal(labels, dataset.labels[:3])
    training = dataset_from_split_csv(
        split_csv, _config(tmp_path, cache_dir=str(tmp_path / "cache"), workers=2), training=True
    )
    assert training.shuffle and training.workers == 2 and training.cache_path.is_file()


def test_dataset_from_split_csv_rejects_missing_images_and_unknown_labels(split_csv, tmp_path):
    (tmp_path / "images" / "ISIC_0000002.png").unlink()
    with pytest.raises(MetadataError, match="ISIC_0000002"):
        dataset_from_split_csv(split_csv, _config(tmp_path), training=True)
    frame = pd.read_csv(split_csv)
    frame.loc[1, "dx"] = "melanoma"
    frame.drop(index=2).to_csv(split_csv, index=False)
    with pytest.raises(MetadataError, match="'melanoma'.*line 3"):
        dataset_from_split_csv(split_csv, _config(tmp_path), training=True)


def test_class_weights_equal_sklearn_balanced_and_absent_classes_get_one():
    rng = np.random.default_rng(0)
    labels = rng.choice(NUM_CLASSES, size=500, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    labels[:NUM_CLASSES] = np.arange(NUM_CLASSES)  # every class present
    weights = class_weights(labels)
    expected = compute_class_weight("balanced", classes=np.arange(NUM_CLASSES), y=labels)
    assert list(weights) == list(range(NUM_CLASSES))
    np.testing.assert_allclose([weights[i] for i in range(NUM_CLASSES)], expected)

    partial = np.array([0, 0, 0, 5, 5, 6])  # classes 1-4 absent
    weights = class_weights(partial)
    present = np.unique(partial)
    expected = compute_class_weight("balanced", classes=present, y=partial)
    np.testing.assert_allclose([weights[int(c)] for c in present], expected)
    assert [weights[i] for i in (1, 2, 3, 4)] == [1.0] * 4
    with pytest.raises(ValueError, match="at least one label"):
        class_weights([])
    with pytest.raises(ValueError, match="0..6"):
        class_weights([0, 7])


def test_real_images_cached_equal_decoded(real_data_dir, tmp_path):
    csv_path = real_data_dir / "HAM10000_metadata.csv"
    frame = pd.read_csv(csv_path, dtype=str).iloc[:40]
    frame.to_csv(tmp_path / "some.csv", index=False)
    config = Config(image_size=64, batch_size=16, cache_dir=str(tmp_path / "cache"), image_dirs=(str(real_data_dir),))
    cached = dataset_from_split_csv(tmp_path / "some.csv", config, training=True)
    decoded = HamDataset(cached.paths, cached.labels, image_size=64, batch_size=16, shuffle=True, seed=config.seed)
    assert len(cached) == 3 and cached[2][0].shape == (8, 64, 64, 3)
    for index in range(len(cached)):
        np.testing.assert_array_equal(cached[index][0], decoded[index][0])
        np.testing.assert_array_equal(cached[index][1], decoded[index][1])
    assert 20 < cached[0][0].mean() < 235  # real skin images, not blank
