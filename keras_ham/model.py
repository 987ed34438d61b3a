"""The classifier: raw RGB in, class probabilities out, every step inside one Keras model.

    image (0..255 RGB) -> augmentation (training only) -> the backbone's preprocessing
      -> backbone (flat: its layers are this model's layers)
      -> global average pool -> dropout -> Dense "logits" -> softmax "probabilities"

After calibration (`with_temperature`) the head ends
      Dense "logits" -> Rescaling(1/T) "temperature" -> softmax "probabilities".

The backbones (ResNet50, ResNet-18, EfficientNetB0) and their preprocessing are entries of
`keras_ham.backbones.BACKBONES`. Preprocessing lives inside the model so a saved `.keras`
file takes plain images on any backend. The backbone is built flat (not as a nested
sub-model) so Grad-CAM can reach any feature map by name, and the head keeps logits
separate from the softmax so Grad-CAM never has to alter the model. Only built-in Keras
layers are used: a saved file loads in safe mode without importing this package.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras
import numpy as np

from keras_ham.backbones import BACKBONES, CAFFE_BGR_MEAN, MODEL_NAMES, PREPROCESS_LAYERS, Backbone, Preprocessing  # noqa: F401
from keras_ham.config import Config
from keras_ham.errors import KerasHamError
from keras_ham.labels import NUM_CLASSES

INPUT_NAME = "image"
#: The ResNets' preprocessing layer (each backbone names its own: keras_ham.backbones).
PREPROCESS_LAYER = "resnet_preprocess"
POOL_LAYER = "avg_pool"
LOGITS_LAYER = "logits"
OUTPUT_LAYER = "probabilities"
TEMPERATURE_LAYER = "temperature"


class ModelError(KerasHamError, ValueError):
    """The model cannot be built or loaded as configured."""


def _augmentation(x, config: Config):
    """Random flips/rotation/zoom/contrast; Keras runs them only when training=True."""
    seed = config.seed
    if config.augment_flip:
        x = keras.layers.RandomFlip("horizontal_and_vertical", seed=seed, name="augment_flip")(x)
    if config.augment_rotation > 0:
        x = keras.layers.RandomRotation(
            config.augment_rotation, fill_mode="reflect", seed=seed + 1, name="augment_rotation"
        )(x)
    if config.augment_zoom > 0:
        x = keras.layers.RandomZoom(config.augment_zoom, fill_mode="reflect", seed=seed + 2, name="augment_zoom")(x)
    if config.augment_contrast > 0:
        x = keras.layers.RandomContrast(
            config.augment_contrast, value_range=(0, 255), seed=seed + 3, name="augment_contrast"
        )(x)
    return x


def _preprocess_layer(preprocessing: Preprocessing) -> keras.layers.Conv2D:
    """The backbone's per-channel affine preprocessing as a frozen 1x1 convolution; its
    weights are set in `_set_preprocessing` once the model is built."""
    return keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, name=preprocessing.layer_name)


def _set_preprocessing(model: keras.Model, preprocessing: Preprocessing) -> None:
    model.get_layer(preprocessing.layer_name).set_weights(list(preprocessing.kernel_and_bias()))


def backbone_entry(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:  # Config validation makes this unreachable; kept for direct callers.
        raise ModelError(f"model={name!r}: expected one of {', '.join(MODEL_NAMES)}.") from None


def _weights_source(weights: str | None) -> str | None:
    """Validate the `weights` setting early, with a message that says what is allowed."""
    if weights is None or weights == "imagenet":
        return weights
    path = Path(weights)
    if not path.is_file():
        raise ModelError(
            f"weights={weights!r}: no such file. Use 'imagenet', null, or a path to a "
            "keras.applications '.h5'/'.weights.h5' file of the backbone or a keras-ham '.keras' model."
        )
    return str(path)


def _copy_weights_by_name(source: keras.Model, target: keras.Model, layer_names: set[str]) -> int:
    """Copy the weights of the layers named in `layer_names`. Normalization layers are skipped:
    keras.applications leaves them unnamed (so names differ between two models in one process)
    and a backbone's standardisation is its preprocessing layer (see keras_ham.backbones)."""
    copied = 0
    for layer in source.layers:
        if layer.name in layer_names and layer.weights and not isinstance(layer, keras.layers.Normalization):
            target.get_layer(layer.name).set_weights(layer.get_weights())
            copied += 1
    return copied


def _load_backbone_weights(model: keras.Model, config: Config, backbone_names: set[str]) -> None:
    weights = _weights_source(config.weights)
    if weights is None:
        return
    if weights.endswith(".keras"):
        try:
            source = keras.saving.load_model(weights, compile=False)
        except Exception as error:  # noqa: BLE001 - re-raised with the file name
            raise ModelError(f"weights={weights!r}: cannot load this .keras file ({error}).") from error
        copied = _copy_weights_by_name(source, model, backbone_names & {layer.name for layer in source.layers})
        if copied == 0:
            raise ModelError(f"weights={weights!r}: no backbone layer of this {config.model} found in the file.")
        return
    backbone = backbone_entry(config.model)
    if backbone.imagenet_source is None:
        with_weights = ", ".join(name for name, entry in BACKBONES.items() if entry.imagenet_source)
        raise ModelError(
            f"weights={weights!r} is only available for model={with_weights} (keras.applications); "
            f"for model={config.model} use null or a keras-ham '.keras' file."
        )
    # keras.applications downloads ImageNet weights (or reads a local file) into a
    # standalone backbone; copying by layer name keeps our model flat.
    source = backbone.imagenet_source(weights, config.image_size)
    _copy_weights_by_name(source, model, backbone_names)
    if backbone.imagenet_preprocessing is not None:
        _set_preprocessing(model, backbone.imagenet_preprocessing(source, weights))


def build_model(config: Config, *, num_classes: int = NUM_CLASSES) -> keras.Model:
    """Build the classifier described in the module docstring (uncompiled)."""
    _weights_source(config.weights)  # fail fast, before building anything
    size = config.image_size
    inputs = keras.Input(shape=(size, size, 3), name=INPUT_NAME)
    backbone = backbone_entry(config.model)
    x = _augmentation(inputs, config)
    x = _preprocess_layer(backbone.preprocessing)(x)
    features = backbone.build(x)
    x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(features)
    x = keras.layers.Dropout(config.dropout, seed=config.seed, name="dropout")(x)
    logits = keras.layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    probabilities = keras.layers.Activation("softmax", dtype="float32", name=OUTPUT_LAYER)(logits)
    model = keras.Model(inputs, probabilities, name=f"keras_ham_{config.model}")
    _set_preprocessing(model, backbone.preprocessing)
    if config.batchnorm_momentum is not None:
        # With few training steps (a short run from scratch), Keras's default 0.99 leaves
        # the moving statistics far from the data and inference outputs one class.
        for layer in backbone_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = config.batchnorm_momentum
    _load_backbone_weights(model, config, {layer.name for layer in backbone_layers(model)})
    return model


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The backbone's layers: everything between the preprocessing and the pooling."""
    names = [layer.name for layer in model.layers]
    starts = [index for index, name in enumerate(names) if name in PREPROCESS_LAYERS]
    if not starts or POOL_LAYER not in names:
        missing = " or ".join(PREPROCESS_LAYERS) if not starts else POOL_LAYER
        raise ModelError(f"{model.name}: not a keras-ham classifier (no {missing!r}).")
    start, stop = starts[0], names.index(POOL_LAYER)
    return model.layers[start + 1 : stop]


def set_backbone_trainable(model: keras.Model, trainable: bool) -> None:
    """Freeze or unfreeze the backbone. BatchNorm layers stay frozen (inference mode)
    once fine-tuning starts, as is usual for transfer learning on small datasets."""
    for layer in backbone_layers(model):
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable and not is_batchnorm


def classifier_input(model: keras.Model):
    """The classifier's one input tensor, to build models that share its layers.

    Not `model.inputs`: a model built on that list expects a one-element list, and Keras
    warns "The structure of `inputs` doesn't match" on every call with a plain batch."""
    if len(model.inputs) != 1:
        raise ModelError(f"{model.name}: a keras-ham classifier has one input, this model has {len(model.inputs)}.")
    return model.inputs[0]


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """The same classifier (sharing its layers and weights) with softmax(logits / T) as output.

    The division is a built-in `Rescaling(1/T)` layer between `logits` and the softmax, so
    the saved file still loads in safe mode on every backend and Grad-CAM, which reads the
    `logits` layer, is unchanged; a temperature already in `model` is replaced, not stacked.
    Dividing all logits by one positive number keeps their order: the argmax is unchanged.
    """
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise ModelError(f"temperature must be a positive finite number, received {temperature!r}.")
    try:
        logits = model.get_layer(LOGITS_LAYER).output
    except ValueError:
        raise ModelError(f"{model.name}: not a keras-ham classifier (no {LOGITS_LAYER!r} layer).") from None
    scaled = keras.layers.Rescaling(1.0 / float(temperature), name=TEMPERATURE_LAYER)(logits)
    probabilities = keras.layers.Activation("softmax", dtype="float32", name=OUTPUT_LAYER)(scaled)
    return keras.Model(classifier_input(model), probabilities, name=model.name)


def model_temperature(model: keras.Model) -> float | None:
    """The temperature stored in a calibrated classifier, None when it has none."""
    try:
        layer = model.get_layer(TEMPERATURE_LAYER)
    except ValueError:
        return None
    return 1.0 / float(layer.scale)


def _with_one_input_tensor(model: keras.Model) -> keras.Model:
    """`model`, rebuilt on its one input tensor when it was saved with a one-element input list.

    Calibrated files written before `classifier_input` existed have that list, and Keras warns
    "The structure of `inputs` doesn't match" on every call of such a model with a plain
    batch. The rebuilt model shares the loaded layers and weights: same outputs, no warning."""
    inputs = model.input
    if not (isinstance(inputs, (list, tuple)) and len(inputs) == 1 and len(model.outputs) == 1):
        return model
    return keras.Model(inputs[0], model.outputs[0], name=model.name)


def load_classifier(path: str | Path) -> keras.Model:
    """Load a saved classifier in safe mode, with a clear error for a bad file."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder; expected a .keras model file such as runs/<run>/best.keras.")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found.")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        problem = ("the file is empty" if path.stat().st_size == 0 else
                   "it is not a zip archive, as .keras models are (cut off by an interrupted copy, or another format)")
        raise ModelError(f"{path}: not a usable .keras model file: {problem}.")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001 - any failure means an unusable model file
        raise ModelError(f"{path}: cannot load model ({type(error).__name__}: {error}).") from error
    model = _with_one_input_tensor(model)
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[-1] == 3):
        raise ModelError(f"{path}: expected a model taking (N, H, W, 3) images, its input is {shape}.")
    return model


def model_image_size(model: keras.Model) -> int:
    """Square input size a loaded classifier expects."""
    height, width = model.input_shape[1:3]
    if height is None or height != width:
        raise ModelError(f"{model.name}: expected a fixed square input, got {model.input_shape}.")
    return int(height)
