"""The prediction path of evaluation and the `predict` script (the dashboard takes its
probabilities from the Grad-CAM pass, which runs the same model with training=False).

`Predictor` runs the model with ONNX Runtime on the model's ONNX export when one sits beside
the `.keras` file (training writes it: config `export_onnx`; `scripts/export.py` for older
models), else through Keras, on torch inside `keras_torch_fast_path` (fused BatchNorm, no
layout copies). ONNX Runtime is checked against the Keras model on a probe image before it is
used. Measured reason (README "Performance"): ONNX Runtime beat keras-ham's former home-made
torch graph, which was retired with its private-attribute uses.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import keras
import numpy as np

from keras_ham.images import IMAGE_EXTENSIONS, ImageError, load_image
from keras_ham.labels import CLASS_NAMES
from keras_ham.model import load_classifier, model_image_size
from keras_ham.device import model_device
from keras_ham.internals import keras_torch_fast_path

#: Largest difference from the Keras probabilities on a probe image at which an ONNX export is used.
ENGINE_CHECK_TOLERANCE = 1e-4

#: Test-time augmentation views: identity, horizontal, vertical and both flips.
TTA_FLIPS = ((False, False), (False, True), (True, False), (True, True))


def _flip(images: np.ndarray, vertical: bool, horizontal: bool) -> np.ndarray:
    if vertical:
        images = images[:, ::-1]
    if horizontal:
        images = images[:, :, ::-1]
    return np.ascontiguousarray(images)


def onnx_beside(model_path: str | os.PathLike) -> Path | None:
    """The ONNX export beside a model file (best.keras -> best.onnx, as scripts/export.py
    writes it) when it exists and is not older than the model; else None."""
    model_path = Path(model_path)
    onnx_path = model_path.with_suffix(".onnx")
    if onnx_path.is_file() and model_path.is_file() and onnx_path.stat().st_mtime >= model_path.stat().st_mtime:
        return onnx_path
    return None


class Predictor:
    """Class probabilities for batches of raw RGB images (N, S, S, 3), 0..255.

    Engines (`self.engine` says which is in use; `self.fast_path` is True for the first):
      "onnxruntime"  with `onnx_path` (`from_file` finds the export beside the model, see
                     `onnx_beside`), onnxruntime installed and the model on the CPU;
      "keras"        the model called through Keras.
    ONNX Runtime is used only after it matched the Keras model on a probe image; when it does
    not (or cannot run the file) a warning says so and Keras runs the model.
    """

    def __init__(self, model: keras.Model, *, batch_size: int = 32, tta: bool = False, fast_path: bool = True,
                 onnx_path: str | os.PathLike | None = None):
        self.model = model
        self.batch_size = batch_size
        self.tta = tta
        self.image_size = model_image_size(model)
        self._backend = keras.backend.backend()
        self._device = model_device(model) if self._backend == "torch" else None
        self._session = self._open_onnx(Path(onnx_path)) if fast_path and onnx_path is not None else None
        self.engine = "onnxruntime" if self._session else "keras"
        self.fast_path = self.engine != "keras"

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "Predictor":
        """The model in `path`; with its ONNX export beside it (not older), ONNX Runtime runs it."""
        kwargs.setdefault("onnx_path", onnx_beside(path))
        return cls(load_classifier(path), **kwargs)

    def _probe(self) -> np.ndarray:
        return np.random.default_rng(0).uniform(0, 255, (1, self.image_size, self.image_size, 3)).astype(np.float32)

    def _open_onnx(self, path: Path):
        if self._device is not None and self._device.type != "cpu":
            return None  # the model is on an accelerator: Keras runs it there
        try:
            import onnxruntime
        except ImportError:
            return None
        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            probe = self._probe()
            received = session.run(None, {name: probe})[0]
            expected = keras.ops.convert_to_numpy(self.model(probe, training=False))
        except Exception as error:  # noqa: BLE001 - any failure means: try the next engine
            warnings.warn(f"{path}: ONNX Runtime cannot run it ({error}); not using it.", stacklevel=3)
            return None
        difference = float(np.max(np.abs(expected - received))) if expected.shape == received.shape else np.inf
        if not difference <= ENGINE_CHECK_TOLERANCE:
            warnings.warn(f"{path}: differs from the Keras model by {difference:.3g} (> {ENGINE_CHECK_TOLERANCE}) on "
                          "a probe image (an export of another model?); not using it.", stacklevel=3)
            return None
        self._onnx_input = name
        return session

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        if self._session is not None:
            return self._session.run(None, {self._onnx_input: batch})[0]
        if self._backend == "torch":
            import torch

            with torch.inference_mode(), keras_torch_fast_path():
                output = self.model(torch.from_numpy(batch).to(self._device), training=False)
            return output.cpu().numpy()
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
