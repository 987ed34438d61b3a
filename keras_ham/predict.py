"""The one prediction path: evaluation, the `predict` script and the dashboard all use it.

On the torch backend it calls the model directly under `torch.inference_mode()` rather
than `model.predict`, which saves Keras's per-call data-adapter overhead and autograd
bookkeeping; on other backends it uses `predict_on_batch`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import keras
import numpy as np

from keras_ham.images import ImageError, load_image
from keras_ham.labels import CLASS_NAMES
from keras_ham.metadata import IMAGE_EXTENSIONS
from keras_ham.model import load_classifier, model_image_size

#: Test-time augmentation views: identity, horizontal, vertical and both flips.
TTA_FLIPS = ((False, False), (False, True), (True, False), (True, True))


def _flip(images: np.ndarray, vertical: bool, horizontal: bool) -> np.ndarray:
    if vertical:
        images = images[:, ::-1]
    if horizontal:
        images = images[:, :, ::-1]
    return np.ascontiguousarray(images)


class Predictor:
    """Class probabilities for batches of raw RGB images (N, S, S, 3), 0..255."""

    def __init__(self, model: keras.Model, *, batch_size: int = 32, tta: bool = False):
        self.model = model
        self.batch_size = batch_size
        self.tta = tta
        self.image_size = model_image_size(model)
        self._backend = keras.backend.backend()

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "Predictor":
        return cls(load_classifier(path), **kwargs)

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        if self._backend == "torch":
            import torch

            with torch.inference_mode():
                output = self.model(batch, training=False)
            return output.detach().cpu().numpy()
        return np.asarray(keras.ops.convert_to_numpy(self.model.predict_on_batch(batch)))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, num_classes) float32 probabilities; averaged over flips when `tta`."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected images of shape (N, {self.image_size}, {self.image_size}, 3), received {images.shape}."
            )
        views = TTA_FLIPS if self.tta else TTA_FLIPS[:1]
        outputs = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            probabilities = sum(self._forward(_flip(batch, v, h)) for v, h in views) / len(views)
            outputs.append(probabilities.astype(np.float32))
        if not outputs:
            return np.zeros((0, self.model.output_shape[-1]), dtype=np.float32)
        return np.concatenate(outputs)

    def predict_dataset(self, batches: Iterable) -> np.ndarray:
        """Probabilities for every batch of a PyDataset-like iterable (images or (images, labels))."""
        outputs = []
        for index in range(len(batches)):
            batch = batches[index]
            images = batch[0] if isinstance(batch, tuple) else batch
            outputs.append(self.predict(images))
        return np.concatenate(outputs) if outputs else np.zeros((0, len(CLASS_NAMES)), np.float32)


def expand_image_paths(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, and image files found (recursively, sorted) in folders."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise ImageError(f"{item}: folder holds no {', '.join(IMAGE_EXTENSIONS)} files.")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise ImageError(f"{item}: no such file or folder.")
    return paths


def top_classes(probabilities: np.ndarray, k: int = 3, class_names: Sequence[str] = CLASS_NAMES) -> list[list[tuple[str, float]]]:
    """Per image, the k most probable (class, probability) pairs, best first."""
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(class_names[i], float(row[i])) for i in indices] for row, indices in zip(probabilities, order)]


def predict_files(predictor: Predictor, paths: Sequence[Path]) -> np.ndarray:
    """Decode and classify files in batches; an unreadable file raises ImageError naming it."""
    outputs = []
    for start in range(0, len(paths), predictor.batch_size):
        chunk = paths[start : start + predictor.batch_size]
        images = np.stack([load_image(path, predictor.image_size) for path in chunk])
        outputs.append(predictor.predict(images))
    return np.concatenate(outputs) if outputs else np.zeros((0, len(CLASS_NAMES)), np.float32)
