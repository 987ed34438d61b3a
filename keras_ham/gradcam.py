"""Grad-CAM: which regions of a lesion image pushed the classifier towards a class.

Grad-CAM (Selvaraju et al., 2017) weights each channel `A_k` of a convolutional feature map
by the spatial mean of the gradient of the class *logit* (pre-softmax) with respect to it:

    w_k = mean_ij d logit_c / d A_k[i, j]        cam = ReLU(sum_k w_k * A_k)

The map is upsampled (bilinear) to the model input size and divided by its maximum, so each
heatmap lies in [0, 1]; an all-zero map (no positive evidence) stays all zero.

Model contract (what `keras_ham` trains): a flat Functional model, channels_last, raw RGB
float input in 0..255 of shape (N, H, W, 3), preprocessing and augmentation inside the model,
head `GlobalAveragePooling2D -> Dropout -> Dense(name="logits") -> Activation("softmax")`.
The model is always run with `training=False` (BatchNorm uses its moving statistics,
augmentation and dropout are off) and is never modified.

The only backend-specific code is `_gradients_torch`, `_gradients_tensorflow` and
`_gradients_jax`, chosen by `keras.backend.backend()` in `_layer_gradients`.
Drawing (`overlay`) is separate from computing (`GradCAM.cam`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import keras
import numpy as np
from PIL import Image

from keras_ham.backbones import backbone_for_model_name
from keras_ham.errors import KerasHamError
from keras_ham.images import load_image
from keras_ham.internals import producing_operation
from keras_ham.io_utils import atomic_path, ensure_output_dir
from keras_ham.model import load_classifier
from keras_ham.runs import RunFolder, read_labels

#: The layer name of the linear class scores in models built by keras_ham.
LOGITS_LAYER = "logits"

#: How many layer names an error message lists at most.
_MAX_LISTED = 12


class GradCAMError(KerasHamError, ValueError):
    """Grad-CAM cannot run: unknown or unsuitable layer, bad class index, bad image input."""


@dataclass(frozen=True)
class GradCAMResult:
    """Grad-CAM output for a batch of N images.

    heatmaps:      (N, H, W) float32 in [0, 1] at the model input size (H, W).
    probabilities: (N, num_classes) float32, the model output (softmax).
    class_indices: (N,) int64, the class each heatmap explains.
    predicted:     (N,) int64, argmax of `probabilities`.
    feature_cams:  (N, h, w) float32, ReLU(sum_k w_k A_k) at the feature-map resolution,
                   before upsampling and normalisation (the raw, comparable scale).
    layer_name:    the layer whose output A was explained.
    logits:        (N, num_classes) float32 pre-softmax class scores (for out-of-distribution scores).
    """

    heatmaps: np.ndarray
    probabilities: np.ndarray
    class_indices: np.ndarray
    predicted: np.ndarray
    feature_cams: np.ndarray
    layer_name: str
    logits: np.ndarray | None = None


# --------------------------------------------------------------------------- layers


def _is_feature_map(layer: keras.layers.Layer) -> bool:
    """True for a layer (not an Input) with a single 4-D output (N, h, w, C)."""
    if isinstance(layer, keras.layers.InputLayer):
        return False
    output = layer.output
    return hasattr(output, "shape") and len(output.shape) == 4


def feature_map_layers(model: keras.Model) -> list[str]:
    """Names of the layers Grad-CAM can explain (4-D outputs), in graph order."""
    return [layer.name for layer in model.layers if _is_feature_map(layer)]


def _listing(names: Sequence[str]) -> str:
    if not names:
        return "none: the model has no layer with a 4-D (N, h, w, C) output"
    if len(names) <= _MAX_LISTED:
        return ", ".join(names)
    return f"... ({len(names) - _MAX_LISTED} more), " + ", ".join(names[-_MAX_LISTED:])


def default_layer_name(model: keras.Model) -> str:
    """The final feature map before global pooling: the backbone's `gradcam_layer` for a
    keras-ham classifier (keras_ham.backbones), else the last layer whose output is 4-D.

    For a flat ResNet50 classifier this is "conv5_block3_out".
    """
    names = feature_map_layers(model)
    if not names:
        raise GradCAMError(f"model {model.name!r}: Grad-CAM needs a layer with a 4-D output; {_listing(names)}.")
    backbone = backbone_for_model_name(model.name)
    if backbone is not None and backbone.gradcam_layer in names:
        return backbone.gradcam_layer
    return names[-1]


def layer_choices(model: keras.Model, count: int = 3) -> list[tuple[str, tuple[int, int]]]:
    """Grad-CAM layers worth offering, deepest first, with their (h, w): the last feature map
    at each of the `count` coarsest resolutions. The first is `default_layer_name(model)`.

    The deepest map is the most class-specific but the coarsest: 7x7 for ResNet50 at 224 px,
    only 2x2 at 64 px, where it can do little more than name a quadrant. One or two stages
    earlier (e.g. conv4_block6_out, conv3_block4_out) trade some specificity for detail.
    """
    default = default_layer_name(model)
    deepest = model.get_layer(default).output.shape[1:3]
    last_at_size: dict[tuple, str] = {}
    for name in feature_map_layers(model):
        layer = model.get_layer(name)
        if isinstance(layer, keras.layers.ZeroPadding2D):  # a padded copy of the map before it
            continue
        size = tuple(layer.output.shape[1:3])
        if all(a is not None and b is not None and a < b for a, b in zip(size, deepest)):
            continue  # smaller than the final map: a squeeze-and-excitation branch (EfficientNet), not a stage
        last_at_size.pop(size, None)  # re-inserted: the dict ends up ordered by last appearance
        last_at_size[size] = name
        if name == default:
            break
    deepest_first = list(last_at_size.items())[::-1][:count]
    return [(name, size) for size, name in deepest_first]


def _find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    for layer in model.layers:
        if layer.name == name:
            return layer
    return None


def _logits_tensor(model: keras.Model, logits_layer: str | None):
    """The symbolic pre-softmax class scores and a description of where they came from.

    `logits_layer` names the linear class-score layer. When the model has no layer of that
    name (or `logits_layer` is None), the input of the model's final softmax Activation is
    used instead; if the model does not end in a softmax Activation, GradCAMError.
    """
    if logits_layer is not None:
        layer = _find_layer(model, logits_layer)
        if layer is not None:
            return layer.output, logits_layer
    last = producing_operation(model.outputs[0])
    if isinstance(last, keras.layers.Activation) and last.activation is keras.activations.softmax:
        return last.input, f"input of {last.name!r}"
    raise GradCAMError(
        f"model {model.name!r}: no layer named {logits_layer!r} and the output layer {last.name!r} "
        "is not a softmax Activation, so the pre-softmax class scores cannot be found; pass "
        "logits_layer=<name of the linear Dense layer that produces the class scores>."
    )


# --------------------------------------------------------------------------- images


def _size_of(model: keras.Model) -> tuple[int, int] | None:
    """The model's fixed (H, W) input size, or None when it accepts any size."""
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[-1] != 3:
        raise GradCAMError(f"model {model.name!r}: expected an input of shape (N, H, W, 3), got {tuple(shape)}.")
    height, width = shape[1], shape[2]
    return (int(height), int(width)) if height is not None and width is not None else None


def _rgb_float(array: np.ndarray, label: str) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 2 = gray+alpha), (H, W, 3) or (H, W, 4 = RGBA) -> (H, W, 3) float32.

    Alpha is composited onto white, as `keras_ham.images.load_image` does for files.
    """
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise GradCAMError(f"{label}: expected numeric pixels in 0..255, got dtype {array.dtype}.")
    pixels = array.astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4) or min(pixels.shape[:2]) < 1:
        raise GradCAMError(f"{label}: expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {array.shape}.")
    if not np.all(np.isfinite(pixels)):
        raise GradCAMError(f"{label}: the pixels contain NaN or infinity.")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0.0 or high > 255.0:
        raise GradCAMError(
            f"{label}: pixel values must be raw RGB in 0..255, got {low:g}..{high:g} "
            "(the model rescales inside; pass pixels before any preprocessing)."
        )
    channels = pixels.shape[2]
    if channels in (2, 4):
        alpha = pixels[:, :, -1:] / 255.0
        pixels = pixels[:, :, :-1] * alpha + 255.0 * (1.0 - alpha)
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return pixels


def _resize_rgb(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (H, W, 3) float32 in 0..255 to size=(H', W'), like `load_image`."""
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    if np.all(pixels == np.round(pixels)):
        # Integral pixels: resize as uint8 exactly as load_image does for files.
        image = Image.fromarray(pixels.astype(np.uint8))
        resized = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(resized, dtype=np.float32)
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize(
                (width, height), Image.Resampling.BILINEAR, reducing_gap=3.0
            )
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 255.0).astype(np.float32)


def _as_batch(images, size: tuple[int, int] | None) -> np.ndarray:
    """Any accepted image input -> (N, H, W, 3) float32 in 0..255 at the model input size.

    Accepts a 4-D array (N, H, W, C) with C in {1, 3, 4}, or a list whose items are arrays
    ((H, W) grayscale, (H, W, 3) RGB, (H, W, 4) RGBA; uint8 or float 0..255), PIL images,
    or file paths / bytes (decoded with `load_image`).
    """
    if isinstance(images, (list, tuple)):
        items: Iterable = images
    elif isinstance(images, np.ndarray) or hasattr(images, "__array__"):
        batch = np.asarray(images)
        if batch.ndim != 4:
            raise GradCAMError(
                f"images: expected a batch of shape (N, H, W, 3) or a list of images, got an array of shape "
                f"{batch.shape}; for one image pass image[None] or [image]."
            )
        items = list(batch)
    else:
        raise GradCAMError(f"images: expected an array (N, H, W, 3) or a list of images, got {type(images).__name__}.")
    prepared = []
    for index, item in enumerate(items):
        label = f"image {index}"
        if isinstance(item, (str, bytes, os.PathLike)):
            prepared.append(load_image(item, size).astype(np.float32))
            continue
        if isinstance(item, Image.Image):
            item = np.asarray(item.convert("RGBA") if "A" in item.getbands() else item.convert("RGB"))
        pixels = _rgb_float(np.asarray(item), label)
        prepared.append(_resize_rgb(pixels, size) if size is not None else pixels)
    if not prepared:
        raise GradCAMError("images: the batch is empty.")
    shapes = {pixels.shape for pixels in prepared}
    if len(shapes) > 1:
        raise GradCAMError(
            f"images: the model accepts any input size, so the images of one call must share one size; "
            f"got {sorted(shapes)}."
        )
    return np.stack(prepared).astype(np.float32)


def _resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (half-pixel centres, edge clamp) resize of a 2-D float map to size=(H, W)."""
    height, width = size
    if heatmap.shape == (height, width):
        return heatmap.astype(np.float32)
    image = Image.fromarray(np.ascontiguousarray(heatmap, dtype=np.float32))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def _normalise(heatmap: np.ndarray) -> np.ndarray:
    """Divide a non-negative map by its maximum; an all-zero map stays zero (no NaN)."""
    top = float(heatmap.max())
    if top <= 0.0:
        return np.zeros_like(heatmap, dtype=np.float32)
    return np.clip(heatmap / top, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- gradients
#
# Each function runs `sub_model` (inputs -> [feature map A, logits, probabilities]) once with
# training=False and returns numpy (A, dlogit_c/dA, logits, probabilities, classes), where
# classes = `requested` or, when None, the predicted class of each image. Only the gradient
# of the selected logits with respect to A is computed (the head), never the gradients of
# the backbone's parameters. The input is watched / requires grad so that A is on the
# gradient tape even when the backbone is frozen (trainable=False variables).


def _choose(probabilities: np.ndarray, requested: np.ndarray | None) -> np.ndarray:
    return np.argmax(probabilities, axis=1).astype(np.int64) if requested is None else requested


def _gradients_torch(gradcam: "GradCAM", batch: np.ndarray, requested: np.ndarray | None):
    import torch

    from keras_ham.internals import keras_torch_fast_path

    inputs = keras.ops.convert_to_tensor(batch, dtype="float32").detach().clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        with keras_torch_fast_path():  # as training runs the model; its outputs are never written in place
            feature, logits, probabilities = gradcam._sub_model(inputs, training=False)
        probabilities = gradcam._probabilities(logits, probabilities)
        classes = _choose(keras.ops.convert_to_numpy(probabilities), requested)
        index = torch.as_tensor(classes, device=logits.device)
        selected = logits.gather(1, index[:, None]).sum()
        (gradients,) = torch.autograd.grad(selected, feature)
    return feature, gradients, logits, probabilities, classes


def _gradients_tensorflow(gradcam: "GradCAM", batch: np.ndarray, requested: np.ndarray | None):
    import tensorflow as tf

    inputs = tf.convert_to_tensor(batch, dtype=tf.float32)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(inputs)
        feature, logits, probabilities = gradcam._sub_model(inputs, training=False)
        probabilities = gradcam._probabilities(logits, probabilities)
        classes = _choose(keras.ops.convert_to_numpy(probabilities), requested)
        selected = tf.reduce_sum(tf.gather(logits, classes, axis=1, batch_dims=1))
    gradients = tape.gradient(selected, feature)
    if gradients is None:
        raise GradCAMError(f"layer {gradcam.layer_name!r}: the logits do not depend on its output (no gradient).")
    return feature, gradients, logits, probabilities, classes


def _gradients_jax(gradcam: "GradCAM", batch: np.ndarray, requested: np.ndarray | None):
    # Untested in this project (jax is not installed in its environment). JAX has no tape,
    # so the head (A -> logits) is a separate sub-model differentiated with jax.grad.
    import jax
    import jax.numpy as jnp

    feature, logits, probabilities = gradcam._sub_model(batch, training=False)
    probabilities = gradcam._probabilities(logits, probabilities)
    classes = _choose(keras.ops.convert_to_numpy(probabilities), requested)
    head = gradcam._head_model()
    trainable = [variable.value for variable in head.trainable_variables]
    non_trainable = [variable.value for variable in head.non_trainable_variables]
    index = jnp.asarray(classes)[:, None]

    def selected_logits(feature_map):
        head_logits, _ = head.stateless_call(trainable, non_trainable, feature_map, training=False)
        return jnp.sum(jnp.take_along_axis(head_logits, index, axis=1))

    gradients = jax.grad(selected_logits)(feature)
    return feature, gradients, logits, probabilities, classes


_GRADIENT_FUNCTIONS: dict[str, Callable] = {
    "torch": _gradients_torch,
    "tensorflow": _gradients_tensorflow,
    "jax": _gradients_jax,
}


def _layer_gradients(gradcam: "GradCAM", batch: np.ndarray, requested: np.ndarray | None):
    """Dispatch on the Keras backend; returns numpy arrays (A, dA, logits, probabilities, classes)."""
    backend = keras.backend.backend()
    if backend not in _GRADIENT_FUNCTIONS:
        raise GradCAMError(f"Grad-CAM supports the {', '.join(_GRADIENT_FUNCTIONS)} backends, not {backend!r}.")
    feature, gradients, logits, probabilities, classes = _GRADIENT_FUNCTIONS[backend](gradcam, batch, requested)
    to_numpy = keras.ops.convert_to_numpy
    return (
        to_numpy(feature).astype(np.float64),
        to_numpy(gradients).astype(np.float64),
        to_numpy(logits).astype(np.float32),
        to_numpy(probabilities).astype(np.float32),
        classes,
    )


# --------------------------------------------------------------------------- Grad-CAM


class GradCAM:
    """Grad-CAM for a Keras classifier on the torch, tensorflow or jax backend.

    layer_name:   the layer whose 4-D output (N, h, w, C) is explained; None = the last such
                  layer (the final feature map before global pooling, "conv5_block3_out" in
                  ResNet50). Unknown or non-4-D -> GradCAMError listing the candidates.
    logits_layer: the layer giving the pre-softmax class scores. If the model has no layer of
                  that name, the input of its final softmax Activation is used; if there is
                  none, GradCAMError.

    The caller's model is not modified: a cached sub-model (inputs -> [A, logits, output])
    shares its layers and weights, and is always called with training=False.
    """

    def __init__(self, model: keras.Model, layer_name: str | None = None, logits_layer: str | None = LOGITS_LAYER):
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise GradCAMError(
                f"model {model.name!r}: expected one image input and one output, "
                f"got {len(model.inputs)} inputs and {len(model.outputs)} outputs."
            )
        self.model = model
        self.input_size = _size_of(model)
        if layer_name is None:
            layer_name = default_layer_name(model)
        layer = _find_layer(model, layer_name)
        if layer is None or not _is_feature_map(layer):
            if layer is None:
                problem = f"has no layer named {layer_name!r}"
            else:
                shape = getattr(layer.output, "shape", None)
                problem = f"layer {layer_name!r} has output shape {shape}, not a 4-D (N, h, w, C) feature map"
            raise GradCAMError(
                f"model {model.name!r} {problem}. Grad-CAM layers to choose from: {_listing(feature_map_layers(model))}."
            )
        self.layer_name = layer_name
        self._feature = layer.output
        self._logits, self.logits_source = _logits_tensor(model, logits_layer)
        if len(self._logits.shape) != 2:
            raise GradCAMError(
                f"model {model.name!r}: the class scores ({self.logits_source}) have shape "
                f"{tuple(self._logits.shape)}, expected (N, num_classes)."
            )
        self.num_classes = int(self._logits.shape[-1])
        self._output_is_logits = self._logits is model.outputs[0]
        self._sub_model = keras.Model(
            model.inputs[0], [self._feature, self._logits, model.outputs[0]], name=f"{model.name}_gradcam"
        )
        self._head = None

    def _head_model(self) -> keras.Model:
        """A -> logits as its own model (used by the jax backend only)."""
        if self._head is None:
            try:
                self._head = keras.Model(self._feature, self._logits, name=f"{self.model.name}_gradcam_head")
            except ValueError as error:
                raise GradCAMError(
                    f"layer {self.layer_name!r}: on the jax backend the logits must depend on this layer's output "
                    f"alone (choose a block output such as the default layer): {error}"
                ) from error
        return self._head

    def _probabilities(self, logits, output):
        return keras.ops.softmax(logits, axis=-1) if self._output_is_logits else output

    def _class_indices(self, class_index, count: int) -> np.ndarray | None:
        if class_index is None:
            return None
        if isinstance(class_index, (int, np.integer)) and not isinstance(class_index, bool):
            indices = np.full(count, int(class_index), dtype=np.int64)
        else:
            values = list(class_index) if isinstance(class_index, Iterable) else None
            if values is None or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
                raise GradCAMError(
                    f"class_index: expected None, an int or a sequence of ints (one per image), got {class_index!r}."
                )
            if len(values) != count:
                raise GradCAMError(f"class_index: got {len(values)} class indices for {count} images.")
            indices = np.asarray(values, dtype=np.int64)
        bad = indices[(indices < 0) | (indices >= self.num_classes)]
        if bad.size:
            raise GradCAMError(f"class_index: {int(bad[0])} is out of range; the model has {self.num_classes} classes (0..{self.num_classes - 1}).")
        return indices

    def cam(self, images, class_index=None, *, batch_size: int = 16) -> GradCAMResult:
        """Explain `images` for `class_index` (None = each image's predicted class).

        images:      (N, H, W, 3) raw RGB (uint8 or float 0..255) at any size, or a list of
                     images of different sizes/modes (see `_as_batch`); resized to the model's
                     input size when it is fixed.
        class_index: None, an int for all images, or a sequence of one int per image.
        Returns a GradCAMResult with heatmaps (N, H, W) float32 in [0, 1] at the input size.
        """
        if batch_size < 1:
            raise GradCAMError(f"batch_size must be >= 1, got {batch_size}.")
        batch = _as_batch(images, self.input_size)
        requested = self._class_indices(class_index, len(batch))
        parts = []
        for start in range(0, len(batch), batch_size):
            chunk = slice(start, start + batch_size)
            parts.append(_layer_gradients(self, batch[chunk], None if requested is None else requested[chunk]))
        feature, gradients, logits, probabilities, classes = (np.concatenate(arrays) for arrays in zip(*parts))
        if not (np.all(np.isfinite(feature)) and np.all(np.isfinite(gradients))):
            raise GradCAMError(f"layer {self.layer_name!r}: the feature map or its gradient contains NaN or infinity.")
        weights = gradients.mean(axis=(1, 2))  # (N, C): spatial mean of dlogit/dA_k
        feature_cams = np.maximum(np.einsum("nhwc,nc->nhw", feature, weights), 0.0).astype(np.float32)
        size = batch.shape[1:3]
        heatmaps = np.stack([_normalise(_resize_map(cam, size)) for cam in feature_cams])
        return GradCAMResult(
            heatmaps=heatmaps,
            probabilities=probabilities,
            class_indices=np.asarray(classes, dtype=np.int64),
            predicted=np.argmax(probabilities, axis=1).astype(np.int64),
            feature_cams=feature_cams,
            layer_name=self.layer_name,
            logits=logits,
        )

    __call__ = cam


# --------------------------------------------------------------------------- drawing


def overlay(image, heatmap: np.ndarray, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a colourised heatmap over an image: (H, W, 3) uint8 RGB at the image's size.

    image:   (H, W, 3) RGB, (H, W) grayscale or (H, W, 4) RGBA, uint8 or float 0..255.
    heatmap: (h, w) in [0, 1], resized (bilinear) to (H, W); colourised with a matplotlib
             colormap. result = (1 - alpha) * image + alpha * colour; alpha=0 gives the image.
    """
    import matplotlib

    if not 0.0 <= float(alpha) <= 1.0:
        raise GradCAMError(f"alpha must be in [0, 1], got {alpha}.")
    pixels = _rgb_float(np.asarray(image), "overlay image")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or not np.all(np.isfinite(heatmap)):
        raise GradCAMError(f"overlay heatmap: expected a finite 2-D map, got shape {heatmap.shape}.")
    try:
        colours = matplotlib.colormaps[colormap]
    except KeyError as error:
        raise GradCAMError(f"unknown matplotlib colormap {colormap!r}.") from error
    resized = np.clip(_resize_map(heatmap, pixels.shape[:2]), 0.0, 1.0)
    colour = colours(resized)[:, :, :3].astype(np.float32) * 255.0
    blended = (1.0 - alpha) * pixels + alpha * colour
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- files


def load_class_names(model_path: str | os.PathLike, num_classes: int) -> tuple[str, ...]:
    """Class names for a model: labels.json beside it if present, else keras_ham.labels.CLASS_NAMES
    (`keras_ham.runs.read_labels`: LabelsError for a bad file or a count other than `num_classes`)."""
    return read_labels(RunFolder.of_model(model_path).labels, num_classes).class_names


def parse_class(value: str | int | None, class_names: Sequence[str]) -> int | None:
    """A class name ("mel") or index ("4") -> index; None stays None (= predicted class)."""
    if value is None:
        return None
    text = str(value).strip()
    if text in class_names:
        return list(class_names).index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise GradCAMError(f"class {value!r}: expected one of {', '.join(class_names)} or an index 0..{len(class_names) - 1}.")


@dataclass(frozen=True)
class OverlayRecord:
    """One written overlay: what was predicted and what was explained."""

    image_path: Path
    overlay_path: Path
    predicted: str
    predicted_probability: float
    explained: str
    explained_probability: float


def write_overlays(
    model_path: str | os.PathLike,
    image_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    target_class: str | int | None = None,
    layer_name: str | None = None,
    alpha: float = 0.4,
    colormap: str = "jet",
    progress: Callable[[OverlayRecord], None] | None = None,
) -> list[OverlayRecord]:
    """Write `<out_dir>/<stem>_gradcam.png` (atomically) for each image; the CLI's one call.

    Every image is decoded before anything is written, so a bad file fails the run early.
    target_class: a class name, an index, or None for each image's predicted class.
    """
    model = load_classifier(model_path)
    gradcam = GradCAM(model, layer_name=layer_name)
    class_names = load_class_names(model_path, gradcam.num_classes)
    target = parse_class(target_class, class_names)
    if not image_paths:
        raise GradCAMError("no images given.")
    out_dir = Path(out_dir)
    outputs = [out_dir / f"{Path(path).stem}_gradcam.png" for path in image_paths]
    seen: dict[Path, str] = {}
    for path, output in zip(image_paths, outputs):
        if output in seen:
            raise GradCAMError(f"{path} and {seen[output]} would both write {output}; rename one of them.")
        seen[output] = str(path)
    ensure_output_dir(out_dir)
    images = [load_image(path) for path in image_paths]
    records = []
    for path, output, image in zip(image_paths, outputs, images):
        result = gradcam.cam([image], class_index=target)
        picture = overlay(image, result.heatmaps[0], alpha=alpha, colormap=colormap)
        with atomic_path(output) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
        predicted, explained = int(result.predicted[0]), int(result.class_indices[0])
        record = OverlayRecord(
            image_path=Path(path),
            overlay_path=output,
            predicted=class_names[predicted],
            predicted_probability=float(result.probabilities[0, predicted]),
            explained=class_names[explained],
            explained_probability=float(result.probabilities[0, explained]),
        )
        records.append(record)
        if progress is not None:
            progress(record)
    return records


__all__ = [
    "GradCAM",
    "GradCAMError",
    "GradCAMResult",
    "OverlayRecord",
    "default_layer_name",
    "feature_map_layers",
    "load_class_names",
    "overlay",
    "parse_class",
    "write_overlays",
]
