"""Deployable exports of a saved classifier: ONNX, for runtimes outside Python training stacks.

The ONNX graph holds everything the `.keras` model does at inference: it takes float32 RGB
images 0..255, NHWC, at the model's size (any batch size), and returns the 7 class
probabilities; the ResNet preprocessing (RGB -> BGR, mean subtraction) is inside it, the
augmentation layers are identities at inference and drop out.

How, on the torch backend: Keras 3.15's `model.export(format="onnx")` exports a static
batch of 1 unless given an input signature with a `None` batch, and then it switches to
torch's TorchScript exporter, which fails on this model (`squeeze` over a list of axes in
the pooling: "only one element tensors can be converted to Python scalars"; see
keras-team/keras#22076 on dynamic shapes with the torch backend). So on torch this calls
`torch.onnx.export(..., dynamo=True)` - the exporter Keras itself uses for static shapes -
with a dynamic batch dimension. On the other backends it is Keras's own export (TensorFlow:
tf2onnx, which must be installed). Every export is checked: ONNX Runtime (when installed)
must reproduce the Keras probabilities on probe images before the file is moved into place.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import keras
import numpy as np

from keras_ham.errors import KerasHamError
from keras_ham.internals import keras_torch_fused_batch_norm
from keras_ham.io_utils import atomic_path, check_output_file
from keras_ham.model import INPUT_NAME, OUTPUT_LAYER, load_classifier, model_image_size

FORMATS = ("onnx",)
#: ONNX opset written (ONNX Runtime >= 1.14 runs it).
ONNX_OPSET = 18
#: Largest |difference| in probabilities tolerated between ONNX Runtime and Keras.
EXPORT_CHECK_TOLERANCE = 1e-4


class ExportError(KerasHamError, RuntimeError):
    """The model cannot be exported as asked."""


def default_export_path(model_path: str | os.PathLike, export_format: str = "onnx") -> Path:
    """runs/x/best.keras -> runs/x/best.onnx."""
    return Path(model_path).with_suffix(f".{export_format}")


def export_model_file(model_path: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                      export_format: str = "onnx") -> Path:
    """Load a `.keras` classifier and export it (default: beside it, same name); the path written."""
    if export_format not in FORMATS:
        raise ExportError(f"format {export_format!r}: expected one of {', '.join(FORMATS)}.")
    out = Path(out_path) if out_path is not None else default_export_path(model_path, export_format)
    if out.resolve() == Path(model_path).resolve():
        raise ExportError(f"{out}: the export would overwrite the model itself; pass another --out.")
    check_output_file(out)  # fail before loading the model
    model = load_classifier(model_path)
    return export_onnx(model, out)


def export_onnx(model: keras.Model, out_path: str | os.PathLike, *, opset: int = ONNX_OPSET) -> Path:
    """Write `model` as ONNX (float32, dynamic batch) to `out_path`, atomically, after ONNX
    Runtime (if installed) matched the Keras probabilities on probe images."""
    policy = getattr(getattr(model, "dtype_policy", None), "name", "float32")
    if policy != "float32":
        raise ExportError(f"{model.name}: ONNX export needs a float32 model; its dtype policy is {policy!r}.")
    size = model_image_size(model)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        try:
            if keras.backend.backend() == "torch":
                _torch_export(model, tmp, size, opset)
            else:
                spec = keras.InputSpec(shape=(None, size, size, 3), dtype="float32", name=INPUT_NAME)
                model.export(str(tmp), format="onnx", input_signature=[spec], opset_version=opset, verbose=False)
        except Exception as error:  # noqa: BLE001 - any exporter failure, named with the model
            raise ExportError(f"{model.name}: ONNX export failed ({type(error).__name__}: {error}).") from error
        difference = check_onnx_against_keras(tmp, model)
        if difference is not None and not difference <= EXPORT_CHECK_TOLERANCE:
            raise ExportError(f"{model.name}: the exported ONNX graph differs from the Keras model by "
                              f"{difference:.3g} (> {EXPORT_CHECK_TOLERANCE}) on probe images; nothing written.")
    return out_path


def _torch_export(model: keras.Model, path: Path, size: int, opset: int) -> None:
    import torch

    from keras_ham.device import model_device

    class Inference(torch.nn.Module):
        """The classifier at inference (training=False: augmentation and dropout are identities)."""

        def __init__(self, classifier):
            super().__init__()
            self.classifier = classifier

        def forward(self, image):
            return self.classifier(image, training=False)

    # A batch of 2: torch.export specializes a dimension of size 1 to a constant.
    sample = torch.zeros((2, size, size, 3), dtype=torch.float32, device=model_device(model))
    # Fused BatchNorm: the graph gets ONNX BatchNormalization nodes, which ONNX Runtime folds
    # into the convolutions; Keras's own layer exports as Sub/Mul/Add, which it cannot fold
    # (ResNet50, 128 px, batch 16: 1.12x the images/s and 19 s instead of 28 s to export).
    with contextlib.redirect_stdout(io.StringIO()), keras_torch_fused_batch_norm():
        program = torch.onnx.export(
            Inference(model).eval(), (sample,), dynamo=True, opset_version=opset, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_LAYER],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        program.optimize()
        program.save(str(path))


def check_onnx_against_keras(path: str | os.PathLike, model: keras.Model, images: np.ndarray | None = None) -> float | None:
    """Max |ONNX Runtime - Keras| in probabilities on `images` (default: 2 seeded random
    images); None when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    if images is None:
        size = model_image_size(model)
        images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    received = session.run(None, {session.get_inputs()[0].name: images})[0]
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    if received.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(received - expected)))
