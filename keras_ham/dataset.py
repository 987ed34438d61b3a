"""Batches of images and labels for Keras `fit` / `evaluate` / `predict`.

`HamDataset` is a `keras.utils.PyDataset` over image files. Batches hold raw RGB in 0..255
(float32); the model does its own preprocessing, so a saved model takes plain images.

With `cache_dir`, every image is decoded and resized once into a memory-mapped uint8 `.npy`
(N, S, S, 3) keyed by the files (paths, sizes, mtimes) and the size, so later epochs and later
runs slice that array instead of decoding JPEGs: reading a batch is one fancy index and one
float32 conversion, far below a training step's cost.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Mapping, Sequence

import keras
import numpy as np

from keras_ham.config import Config
from keras_ham.distributed import batches_per_epoch, shard_of_batch
from keras_ham.images import ImageError, load_image
from keras_ham.io_utils import atomic_path
from keras_ham.labels import CLASS_TO_INDEX, NUM_CLASSES
from keras_ham.metadata import EVAL_COLUMNS, read_metadata, require_image_paths

#: Bump when decoding changes (e.g. `load_image` resizes differently) so old caches are not reused.
CACHE_FORMAT_VERSION = 1


def cache_key(paths: Sequence[str | os.PathLike], image_size: int) -> str:
    """Hash of the file list (absolute paths, sizes, mtimes, in order) and the image size: any
    added, removed, reordered, replaced or edited file gives a new key, hence a new cache."""
    digest = hashlib.sha256(f"keras-ham image cache v{CACHE_FORMAT_VERSION} size={image_size}\n".encode())
    for path in paths:
        try:
            stat = os.stat(path)
        except OSError as error:
            raise ImageError(f"{path}: cannot read the image file ({error.strerror or error}).") from None
        digest.update(f"{os.path.abspath(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def cache_path_for(paths: Sequence[str | os.PathLike], image_size: int, cache_dir: str | os.PathLike) -> Path:
    """Where the decoded cache of `paths` at `image_size` lives under `cache_dir`."""
    return Path(cache_dir) / f"images-{image_size}px-{len(paths)}-{cache_key(paths, image_size)}.npy"


def _is_valid_cache(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # unreadable header, or data shorter than the header says
        return False
    return array.dtype == np.uint8 and array.shape == shape


def _progress(done: int, total: int, started: float, label: str, final: bool = False) -> None:
    """One self-updating line on a terminal; only the final line in logs."""
    rate = done / max(time.perf_counter() - started, 1e-9)
    line = f"{label}: {done}/{total} images ({rate:.0f} images/s)"
    if final:
        print(("\r" if sys.stderr.isatty() else "") + line, file=sys.stderr, flush=True)
    elif sys.stderr.isatty():
        print("\r" + line, end="", file=sys.stderr, flush=True)


def build_cache(
    paths: Sequence[str | os.PathLike],
    image_size: int,
    cache_dir: str | os.PathLike,
    *,
    threads: int | None = None,
) -> Path:
    """Decode `paths` once into `<cache_dir>/images-<S>px-<N>-<key>.npy`, (N, S, S, 3) uint8 in
    row order, and return its path; an existing valid cache with the same key is reused.

    Decoding runs on a thread pool (Pillow releases the GIL). The array is written to a temporary
    file renamed into place only when complete, so a killed build never leaves a cache that a
    later run would trust. A corrupt image raises `ImageError` naming it, and nothing is kept.
    """
    path = cache_path_for(paths, image_size, cache_dir)
    shape = (len(paths), image_size, image_size, 3)
    if path.is_file() and _is_valid_cache(path, shape):
        return path
    size_mb = math.prod(shape) / 2**20
    label = f"caching {len(paths)} images at {image_size}x{image_size} ({size_mb:,.0f} MiB) into {path}"
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        try:
            _decode_into(array, paths, image_size, threads or min(8, os.cpu_count() or 1), label, started)
            array.flush()
        finally:
            del array  # unmap before the rename (or the clean-up of a failed build)
    _progress(len(paths), len(paths), started, label, final=True)
    return path


def _decode_into(array: np.ndarray, paths, image_size: int, threads: int, label: str, started: float) -> None:
    def decode(index: int) -> None:
        array[index] = load_image(paths[index], image_size)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending = {pool.submit(decode, index) for index in range(len(paths))}
        done_count = 0
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
            done_count += len(done)
            _progress(done_count, len(paths), started, label)


class HamDataset(keras.utils.PyDataset):
    """Batches `(images, labels)` (or just `images` when `labels` is None) from image files.

    images: float32 (B, image_size, image_size, 3), raw RGB in 0..255; labels: int32 (B,) class
    indices. `len()` is ceil(N / batch_size); the last, partial batch is kept. With `shuffle`,
    epoch e visits the images in the order `default_rng([seed, e]).permutation(N)`, so every
    epoch differs and the sequence repeats for the same seed; `on_epoch_end` advances `epoch`.
    Keras' `fit` also calls `on_epoch_end` once before its first epoch (EpochIterator.reset), so
    to make a resumed run see the same orders, set `dataset.epoch = epoch` from a callback's
    `on_epoch_begin`. With `world_size` W > 1 (torchrun), `rank` r gets its part of each global
    batch of W*batch_size images (`keras_ham.distributed.shard_of_batch`) and `len()` is
    ceil(N / (W*batch_size)) on every rank. With `class_weight` or W > 1 batches are
    `(images, labels, sample_weights)`: class weight times the shard's loss scale
    (`batch_weights`). With `cache_dir`, images are decoded once
    (see `build_cache`, which runs in the constructor) and read from a memory map afterwards; the
    map is opened lazily in each process, so `use_multiprocessing=True` works.

    Attributes: `paths` (list of Path), `labels` (int32 array or None, in `paths` order),
    `frame` (the split CSV rows when built by `dataset_from_split_csv`, else None),
    `cache_path` (Path or None), `class_weight` (float32 weight per class index, or None;
    settable), `rank`, `world_size`.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        image_size: int,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
        class_weight: Mapping[int, float] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size)
        self.paths = [Path(path) for path in paths]
        if not self.paths:
            raise ValueError("HamDataset needs at least one image; received an empty list of paths.")
        if int(image_size) < 1 or int(batch_size) < 1 or int(seed) < 0:
            raise ValueError(
                f"image_size and batch_size must be >= 1 and seed >= 0, received {image_size=}, {batch_size=}, {seed=}."
            )
        self.labels = None if labels is None else _check_labels(labels, len(self.paths))
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, world_size), received {rank=}, {world_size=}.")
        self.rank, self.world_size = int(rank), int(world_size)
        self.class_weight = None if class_weight is None else np.array(
            [float(class_weight.get(index, 1.0)) for index in range(NUM_CLASSES)], dtype=np.float32)
        self.epoch = 0
        self.frame = None
        self.cache_path = None if cache_dir is None else build_cache(self.paths, self.image_size, cache_dir)
        self._cache: tuple[int, np.ndarray] | None = None  # (pid that opened it, memmap)

    def __len__(self) -> int:
        return batches_per_epoch(len(self.paths), self.batch_size, self.world_size)

    @property
    def epoch(self) -> int:
        """Counter that picks the shuffle order; advanced by `on_epoch_end`, settable to resume."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)
        count = len(self.paths)
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, self._epoch]).permutation(count)
        else:
            self._order = np.arange(count)

    def on_epoch_end(self) -> None:
        self.epoch += 1

    def batch_indices(self, index: int) -> np.ndarray:
        """Indices into `paths` (and `labels`) of batch `index` in this epoch's order."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches.")
        return shard_of_batch(self._order, index, self.batch_size, self.rank, self.world_size)[0]

    def batch_weights(self, index: int) -> np.ndarray:
        """Loss weights of batch `index`: class weight (if any) times the shard's loss scale
        (1 in a single process; 0 for a padding image)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches.")
        indices, scale = shard_of_batch(self._order, index, self.batch_size, self.rank, self.world_size)
        if self.class_weight is not None and self.labels is not None:
            scale = scale * self.class_weight[self.labels[indices]]
        return scale

    def __getitem__(self, index: int):
        indices = self.batch_indices(index)
        images = self._read_cached(indices) if self.cache_path is not None else self._decode(indices)
        if self.labels is None:
            return images
        if self.class_weight is None and self.world_size == 1:
            return images, self.labels[indices]
        return images, self.labels[indices], self.batch_weights(index)

    def _decode(self, indices: np.ndarray) -> np.ndarray:
        images = np.empty((len(indices), self.image_size, self.image_size, 3), dtype=np.float32)
        for row, index in enumerate(indices):
            images[row] = load_image(self.paths[index], self.image_size)
        return images

    def _cached_array(self) -> np.ndarray:
        """The memory map, opened once per process (never pickled into worker processes)."""
        cache = self._cache
        if cache is None or cache[0] != os.getpid():
            cache = (os.getpid(), np.load(self.cache_path, mmap_mode="r"))
            self._cache = cache
        return cache[1]

    def _read_cached(self, indices: np.ndarray) -> np.ndarray:
        array = self._cached_array()
        start = int(indices[0])
        if np.array_equal(indices, np.arange(start, start + len(indices))):
            return np.asarray(array[start : start + len(indices)], dtype=np.float32)  # plain ndarray, not memmap
        # read rows in file order (sequential disk access), scatter them back to batch order
        # while converting: one pass over the uint8 data, one over the float32 output
        by_position = np.argsort(indices, kind="stable")
        images = np.empty((len(indices), self.image_size, self.image_size, 3), dtype=np.float32)
        images[by_position] = array[indices[by_position]]
        return images

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # each process maps the file itself
        return state


def _check_labels(labels, count: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != count:
        raise ValueError(f"labels must be a 1-D sequence of {count} class indices, received shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, received dtype {array.dtype}.")
    bad = np.flatnonzero((array < 0) | (array >= NUM_CLASSES))
    if len(bad):
        raise ValueError(
            f"labels must be in 0..{NUM_CLASSES - 1}; label {array[bad[0]]} at position {bad[0]} "
            f"({len(bad)} bad in all)."
        )
    return array.astype(np.int32)


def dataset_from_split_csv(csv_path: str | os.PathLike, config: Config, *, training: bool,
                           class_weight: Mapping[int, float] | None = None, rank: int = 0,
                           world_size: int = 1) -> HamDataset:
    """The dataset of a split CSV (columns image_id, dx, ...): images found under
    `config.image_dirs` and the CSV's folder (a missing image is a `MetadataError` naming it),
    labels from `dx`, shuffled when `training`. Sizes, seed, cache and workers come from `config`;
    `class_weight`, `rank` and `world_size` as in `HamDataset`."""
    frame = read_metadata(csv_path, required=EVAL_COLUMNS)
    paths = require_image_paths(frame, csv_path, config.image_dirs)
    dataset = HamDataset(
        paths,
        frame["dx"].map(CLASS_TO_INDEX).to_numpy(dtype=np.int32),
        image_size=config.image_size,
        batch_size=config.batch_size,
        shuffle=training,
        seed=config.seed,
        cache_dir=config.cache_dir,
        workers=config.workers,
        use_multiprocessing=config.use_multiprocessing,
        max_queue_size=config.max_queue_size,
        class_weight=class_weight,
        rank=rank,
        world_size=world_size,
    )
    dataset.frame = frame
    return dataset


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int = NUM_CLASSES) -> dict[int, float]:
    """Inverse-frequency loss weights {class index: weight} for `fit(class_weight=...)`.

    For classes present in `labels` this equals scikit-learn's
    `compute_class_weight("balanced")`: n_samples / (n_present_classes * count). A class absent
    from `labels` gets 1.0: it never appears in the training loss, so its weight has no effect,
    and a neutral value keeps the dict complete (Keras wants a weight for every class it meets).
    """
    array = np.asarray(labels).ravel()
    if array.size == 0:
        raise ValueError("class_weights needs at least one label; received none.")
    if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() >= num_classes:
        raise ValueError(
            f"labels must be integer class indices in 0..{num_classes - 1}, received {np.unique(array)[:10]}."
        )
    counts = np.bincount(array, minlength=num_classes)
    present = counts > 0
    weights = np.ones(num_classes)
    weights[present] = array.size / (present.sum() * counts[present])
    return {index: float(weight) for index, weight in enumerate(weights)}
