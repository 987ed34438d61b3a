"""The backbones a classifier can be built on: one `Backbone` entry each, in `BACKBONES`.

An entry says how to build the feature extractor (flat: its layers become the classifier's
layers, so Grad-CAM can reach every feature map by name), how images are preprocessed
(a frozen per-channel affine map, as a built-in 1x1 convolution inside the model, so a
saved `.keras` file takes plain 0..255 RGB images and loads in safe mode on every backend),
where ImageNet weights come from, and which layer Grad-CAM explains by default.

To add a backbone: write its entry below (and, if it has ImageNet weights, an
`imagenet_source`), then add it to the parametrised tests in tests/test_model.py; config
validation, the scripts, the dashboard and the README's config table take the names from
`BACKBONES`.

Keras is imported inside the functions only: `keras_ham.config` reads the names before the
device is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Per-channel means (BGR) of ImageNet, as `keras.applications.resnet50.preprocess_input`.
CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)
#: ImageNet per-channel mean and standard deviation of RGB in 0..1 ("torch" preprocessing).
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STDDEV_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """out[c] = scale[c] * in[source[c]] + offset[c], with `in` the 0..255 RGB image.

    Implemented as a frozen 1x1 Conv2D named `layer_name` (a built-in layer keeps the saved
    model loadable in safe mode, unlike a Lambda or a custom class).
    """

    layer_name: str
    description: str
    source: tuple[int, int, int]
    scale: np.ndarray
    offset: np.ndarray

    def kernel_and_bias(self) -> tuple[np.ndarray, np.ndarray]:
        kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for out_channel, in_channel in enumerate(self.source):
            kernel[0, 0, in_channel, out_channel] = self.scale[out_channel]
        return kernel, np.asarray(self.offset, dtype=np.float32)


def caffe_preprocessing(layer_name: str = "resnet_preprocess") -> Preprocessing:
    """RGB -> BGR and ImageNet mean subtraction ("caffe" mode of keras.applications ResNet)."""
    return Preprocessing(layer_name, "caffe: RGB->BGR, minus the ImageNet BGR mean", (2, 1, 0),
                         np.ones(3, dtype=np.float32), -CAFFE_BGR_MEAN)


def efficientnet_preprocessing(mean=IMAGENET_MEAN_RGB, variance=IMAGENET_STDDEV_RGB**2,
                               extra_scale=1.0 / np.sqrt(IMAGENET_STDDEV_RGB)) -> Preprocessing:
    """What keras.applications EfficientNet computes after its own Rescaling(1/255), in
    0..255 units: its built-in Rescaling(1/255) and Normalization (left at mean 0, variance 1
    by `weights=None`) follow inside the backbone and map it back.

    keras.applications EfficientNet with ImageNet weights standardises with the mean and
    variance stored in the weights file and then divides by sqrt(stddev) once more
    (`extra_scale`, see keras.applications.efficientnet); the defaults reproduce that.
    """
    factor = np.asarray(extra_scale, np.float32) / np.sqrt(np.asarray(variance, np.float32))
    return Preprocessing("efficientnet_preprocess", "ImageNet mean/std standardisation (keras.applications EfficientNet)",
                         (0, 1, 2), factor, -255.0 * np.asarray(mean, np.float32) * factor)


@dataclass(frozen=True)
class Backbone:
    """One backbone of the registry.

    build:           symbolic (N, S, S, 3) preprocessed images -> (N, h, w, C) feature map,
                     built from layers whose names are stable (copying weights by name).
    preprocessing:   the frozen affine map in front of it (see `Preprocessing`).
    imagenet_source: (weights, image_size) -> a standalone keras.applications model holding
                     `weights` ('imagenet' or a local .h5 file), whose layers are copied by name;
                     None when no ImageNet weights exist.
    imagenet_preprocessing: the preprocessing that goes with that source's weights (None: the
                     backbone's own `preprocessing`).
    gradcam_layer:   the layer Grad-CAM explains by default (the last feature map).
    ood_layer:       the early feature map whose channel statistics give the out-of-distribution
                     score (keras_ham.ood); measured on ResNet-18 only (README section 5),
                     the same stem layer of ResNet50 and EfficientNetB0 is an unmeasured choice.
    """

    name: str
    description: str
    build: Callable
    preprocessing: Preprocessing
    gradcam_layer: str
    imagenet_source: Callable | None = None
    imagenet_preprocessing: Callable | None = None
    ood_layer: str | None = None


# --------------------------------------------------------------------------- builders


def _resnet50_features(x):
    import keras

    return keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x).output


def _resnet50_imagenet(weights: str, image_size: int):
    import keras

    return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))


def _resnet18_features(x):
    """ResNet-18 (He et al., 2016) with basic blocks; layer names follow keras.applications."""
    import keras

    bn_axis = 3

    def basic_block(x, filters, stride, name):
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_0_conv")(x)
            shortcut = keras.layers.BatchNormalization(axis=bn_axis, epsilon=1.001e-5, name=f"{name}_0_bn")(shortcut)
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_1_conv")(x)
        x = keras.layers.BatchNormalization(axis=bn_axis, epsilon=1.001e-5, name=f"{name}_1_bn")(x)
        x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(x)
        x = keras.layers.BatchNormalization(axis=bn_axis, epsilon=1.001e-5, name=f"{name}_2_bn")(x)
        x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
        return keras.layers.Activation("relu", name=f"{name}_out")(x)

    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = keras.layers.Conv2D(64, 7, strides=2, use_bias=False, name="conv1_conv")(x)
    x = keras.layers.BatchNormalization(axis=bn_axis, epsilon=1.001e-5, name="conv1_bn")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    for stage, filters in enumerate((64, 128, 256, 512), start=2):
        for block in (1, 2):
            stride = 2 if (block == 1 and stage > 2) else 1
            x = basic_block(x, filters, stride, name=f"conv{stage}_block{block}")
    return x


def _efficientnet_b0_features(x):
    """keras.applications EfficientNetB0 without weights. Its own Rescaling(1/255) and
    Normalization (mean 0, variance 1 without weights: an identity) stay in the graph; the
    ImageNet standardisation is this backbone's preprocessing layer in front of them."""
    import keras

    return keras.applications.EfficientNetB0(include_top=False, weights=None, input_tensor=x).output


def _efficientnet_b0_imagenet(weights: str, image_size: int):
    import keras

    return keras.applications.EfficientNetB0(include_top=False, weights=weights,
                                             input_shape=(image_size, image_size, 3))


def _efficientnet_imagenet_preprocessing(source, weights: str) -> Preprocessing:
    """The standardisation stored in the weights file (the source's Normalization layer),
    and the extra 1/sqrt(stddev) keras.applications applies for weights='imagenet' only."""
    import keras

    normalizations = [layer for layer in source.layers if isinstance(layer, keras.layers.Normalization)]
    if len(normalizations) != 1:
        raise ValueError(f"expected one Normalization layer in {source.name}, found {len(normalizations)}")
    mean, variance = (np.asarray(keras.ops.convert_to_numpy(v), np.float32).reshape(-1)
                      for v in (normalizations[0].mean, normalizations[0].variance))
    extra = 1.0 / np.sqrt(IMAGENET_STDDEV_RGB) if weights == "imagenet" else np.ones(3, np.float32)
    return efficientnet_preprocessing(mean, variance, extra)


BACKBONES: dict[str, Backbone] = {
    backbone.name: backbone
    for backbone in (
        Backbone("resnet50", "ResNet50 (keras.applications)", _resnet50_features, caffe_preprocessing(),
                 "conv5_block3_out", _resnet50_imagenet, ood_layer="pool1_pool"),
        Backbone("resnet18", "ResNet-18 built in Keras (no ImageNet weights)", _resnet18_features,
                 caffe_preprocessing(), "conv5_block2_out", ood_layer="pool1_pool"),
        Backbone("efficientnetb0", "EfficientNetB0 (keras.applications)", _efficientnet_b0_features,
                 efficientnet_preprocessing(), "top_activation", _efficientnet_b0_imagenet,
                 _efficientnet_imagenet_preprocessing, ood_layer="stem_activation"),
    )
}
#: The model names config validation, the scripts and the README accept.
MODEL_NAMES = tuple(BACKBONES)
#: Names of the preprocessing layers of every backbone (they mark where the backbone starts).
PREPROCESS_LAYERS = tuple(sorted({backbone.preprocessing.layer_name for backbone in BACKBONES.values()}))


def backbone_for_model_name(model_name: str) -> Backbone | None:
    """The entry of a classifier built by keras_ham.model (named `keras_ham_<backbone>`)."""
    prefix = "keras_ham_"
    return BACKBONES.get(model_name[len(prefix):]) if model_name.startswith(prefix) else None

