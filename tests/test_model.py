
import zipfile

import keras
import numpy as np
import pytest

from conftest import probabilities_on_tensorflow
from keras_ham.config import load_config
from keras_ham.model import (
    LOGITS_LAYER,
    PREPROCESS_LAYER,
    ModelError,
    backbone_layers,
    build_model,
    classifier_input,
    load_classifier,
    set_backbone_trainable,
)

TINY = {"weights": None, "image_size": 32}


def images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


@pytest.fixture(scope="module")
def resnet50():
    return build_model(load_config(overrides=TINY))


def test_model_contract_raw_images_to_probabilities(resnet50):
    assert resnet50.input_shape == (None, 32, 32, 3)
    assert [layer.name for layer in resnet50.layers[-4:]] == ["avg_pool", "dropout", "logits", "probabilities"]
    assert resnet50.get_layer(LOGITS_LAYER).get_config()["activation"] == "linear"
    assert "conv5_block3_out" in [layer.name for layer in resnet50.layers]  # flat backbone
    probabilities = keras.ops.convert_to_numpy(resnet50(images(), training=False))
    assert probabilities.shape == (2, 7)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_preprocessing_equals_keras_applications_resnet50(resnet50):
    x = images(3)
    probe = keras.Model(resnet50.inputs[0], resnet50.get_layer(PREPROCESS_LAYER).output)
    ours = keras.ops.convert_to_numpy(probe(x, training=False))
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    assert not resnet50.get_layer(PREPROCESS_LAYER).trainable


def test_augmentation_only_in_training(resnet50):
    x = images(4, seed=1)
    first = keras.ops.convert_to_numpy(resnet50(x, training=False))
    second = keras.ops.convert_to_numpy(resnet50(x, training=False))
    np.testing.assert_array_equal(first, second)
    names = [layer.name for layer in resnet50.layers]
    assert names.index("augment_flip") < names.index(PREPROCESS_LAYER)
    plain = build_model(load_config(overrides={**TINY, "augment_flip": False, "augment_rotation": 0.0}))
    assert not any(name.startswith("augment_") for name in (layer.name for layer in plain.layers))
    extra = build_model(load_config(overrides={**TINY, "augment_zoom": 0.1, "augment_contrast": 0.2}))
    assert {"augment_zoom", "augment_contrast"} <= {layer.name for layer in extra.layers}


def test_local_weights_file_is_loaded_into_the_backbone(tmp_path):
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    kernel = source.get_layer("conv1_conv").get_weights()
    kernel[0] = np.full_like(kernel[0], 0.0123)
    source.get_layer("conv1_conv").set_weights(kernel)
    path = tmp_path / "resnet50_notop.weights.h5"
    source.save_weights(path)
    model = build_model(load_config(overrides={**TINY, "weights": str(path)}))
    np.testing.assert_allclose(model.get_layer("conv1_conv").get_weights()[0], 0.0123)


def test_weights_from_a_previous_keras_ham_model(tmp_path, resnet50):
    path = tmp_path / "previous.keras"
    resnet50.save(path)
    model = build_model(load_config(overrides={**TINY, "weights": str(path), "seed": 7}))
    np.testing.assert_array_equal(
        model.get_layer("conv5_block3_3_conv").get_weights()[0],
        resnet50.get_layer("conv5_block3_3_conv").get_weights()[0],
    )


def test_bad_weights_settings_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        build_model(load_config(overrides={**TINY, "weights": str(tmp_path / "missing.h5")}))
    fake = tmp_path / "x.h5"
    fake.write_bytes(b"0")
    with pytest.raises(ModelError, match="only available for model=resnet50"):
        build_model(load_config(overrides={**TINY, "weights": str(fake), "model": "resnet18"}))


def test_resnet18_builds_flat_with_the_same_head():
    model = build_model(load_config(overrides={**TINY, "model": "resnet18"}))
    names = [layer.name for layer in model.layers]
    assert "conv5_block2_out" in names and names[-1] == "probabilities"
    assert 10e6 < model.count_params() < 12e6  # ResNet-18 has ~11.2 M parameters


def test_freezing_backbone_keeps_head_and_fine_tuning_keeps_batchnorm_frozen(resnet50):
    set_backbone_trainable(resnet50, False)
    assert all(not layer.trainable for layer in backbone_layers(resnet50))
    assert resnet50.get_layer(LOGITS_LAYER).trainable
    frozen_count = len(resnet50.trainable_weights)
    set_backbone_trainable(resnet50, True)
    layers = backbone_layers(resnet50)
    assert all(not l.trainable for l in layers if isinstance(l, keras.layers.BatchNormalization))
    assert all(l.trainable for l in layers if isinstance(l, keras.layers.Conv2D))
    assert len(resnet50.trainable_weights) > frozen_count


def test_load_classifier_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_classifier(tmp_path / "nope.keras")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"this is not a zip")
    with pytest.raises(ModelError, match="broken.keras: not a usable .keras model file: it is not a zip archive"):
        load_classifier(broken)
    (tmp_path / "empty.keras").write_bytes(b"")
    with pytest.raises(ModelError, match="empty.keras: .*the file is empty"):
        load_classifier(tmp_path / "empty.keras")
    with pytest.raises(ModelError, match="is a folder; expected a .keras model file"):
        load_classifier(tmp_path)
    model = build_model(load_config(overrides={**TINY, "model": "resnet18", "image_size": 32}))
    model.save(tmp_path / "whole.keras")
    data = (tmp_path / "whole.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(ModelError, match="cut.keras: not a usable .keras model file"):
        load_classifier(tmp_path / "cut.keras")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:  # a zip, but not a Keras model
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ModelError, match="other.keras: cannot load model"):
        load_classifier(tmp_path / "other.keras")


@pytest.mark.parametrize("model_name", ["resnet50", "resnet18"])
def test_saved_model_loads_in_safe_mode_on_tensorflow_with_same_probabilities(tmp_path, model_name):
    model = build_model(load_config(overrides={**TINY, "model": model_name, "image_size": 48}))
    x = images(3, size=48, seed=5)
    model.save(tmp_path / "m.keras")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(probabilities_on_tensorflow(tmp_path / "m.keras", x, tmp_path), expected, atol=1e-4)


def test_batchnorm_momentum_setting_reaches_every_backbone_batchnorm_and_survives_saving(tmp_path):
    model = build_model(load_config(overrides={**TINY, "model": "resnet18", "batchnorm_momentum": 0.9}))
    norms = [l for l in backbone_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    assert norms and all(l.momentum == 0.9 for l in norms)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("conv1_bn").momentum == 0.9
    default = build_model(load_config(overrides={**TINY, "model": "resnet18"}))
    assert default.get_layer("conv1_bn").momentum == 0.99


# --------------------------------------------------------------------------- backbone registry


def test_every_backbone_is_a_config_choice_with_its_gradcam_layer():
    from keras_ham.backbones import BACKBONES
    from keras_ham.config import FIELD_HELP, MODELS

    assert MODELS == tuple(BACKBONES) and all(name in FIELD_HELP["model"] for name in BACKBONES)
    for name, backbone in BACKBONES.items():
        model = build_model(load_config(overrides={**TINY, "model": name}))
        assert backbone.gradcam_layer in [layer.name for layer in model.layers], name
        assert model.get_layer(backbone.preprocessing.layer_name) in model.layers
        assert backbone_layers(model)[0] is not model.get_layer(backbone.preprocessing.layer_name)


def test_no_backbone_has_a_strided_1x1_convolution_on_fewer_than_16_channels():
    """torch 2.14's oneDNN (3.12) writes past its workspace in the weight gradient of a strided
    1x1 convolution whose channels_last input has fewer channels than its block (8 with AVX2,
    16 with AVX-512; oneDNN issue 6035): wrong gradients, a hang or a crash, depending on the
    CPU. Keras on torch runs every convolution channels_last, so no backbone may have one. (The
    models are flat: `model.layers` holds every layer.)"""
    from keras_ham.backbones import BACKBONES

    found = {}
    for name in BACKBONES:
        model = build_model(load_config(overrides={**TINY, "model": name}))
        found[name] = [(layer.name, layer.input.shape[-1]) for layer in model.layers
                       if isinstance(layer, keras.layers.Conv2D) and tuple(layer.kernel_size) == (1, 1)
                       and max(layer.strides) > 1]
        assert all(channels >= 16 for _, channels in found[name]), (name, found[name])
    assert found["resnet50"] and found["resnet18"]  # the shortcuts: the check sees them


@pytest.fixture(scope="module")
def efficientnet():
    return build_model(load_config(overrides={**TINY, "model": "efficientnetb0", "image_size": 64}))


def _normalized(model, x):
    """What the EfficientNet stem sees: the output of keras.applications' Normalization layer."""
    layer = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    return keras.ops.convert_to_numpy(keras.Model(model.inputs[0], layer.output)(x, training=False))


def test_efficientnetb0_standardises_like_keras_applications_with_imagenet_weights(efficientnet):
    x = images(2, size=64, seed=3)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    # keras.applications EfficientNet, weights='imagenet': Rescaling(1/255), Normalization with the
    # file's ImageNet mean and variance (std**2), then Rescaling(1/sqrt(std)).
    expected = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / std / np.sqrt(std)
    np.testing.assert_allclose(_normalized(efficientnet, x), expected, atol=1e-4)
    assert efficientnet.layers[-4].name == "avg_pool" and efficientnet.get_layer("top_activation")
    assert 4e6 < efficientnet.count_params() < 4.1e6  # EfficientNetB0 without its top: 4.05 M


def test_efficientnetb0_weights_file_sets_backbone_and_its_standardisation(tmp_path):
    """The ImageNet code path with a local keras.applications weights file (no download here)."""
    source = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    kernel = source.get_layer("stem_conv").get_weights()
    kernel[0] = np.full_like(kernel[0], 0.0123)
    source.get_layer("stem_conv").set_weights(kernel)
    normalization = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    mean, variance = np.array([0.5, 0.4, 0.3], "float32"), np.array([0.04, 0.09, 0.01], "float32")
    normalization.set_weights([mean, variance, np.array(0)][: len(normalization.get_weights())])
    path = tmp_path / "efficientnetb0_notop.weights.h5"
    source.save_weights(path)
    model = build_model(load_config(overrides={**TINY, "model": "efficientnetb0", "weights": str(path)}))
    np.testing.assert_allclose(model.get_layer("stem_conv").get_weights()[0], 0.0123)
    x = images(1, seed=4)  # a weights file (not 'imagenet'): keras.applications adds no extra rescaling
    np.testing.assert_allclose(_normalized(model, x), (x / 255.0 - mean) / np.sqrt(variance), atol=1e-4)


def test_efficientnetb0_gradcam_default_layer_and_choices(efficientnet):
    from keras_ham.gradcam import GradCAM, default_layer_name, layer_choices

    assert default_layer_name(efficientnet) == "top_activation"
    choices = layer_choices(efficientnet)
    assert [size for _, size in choices] == [(2, 2), (4, 4), (8, 8)]  # 64 px: stages at /32, /16, /8
    assert choices[0][0] == "top_activation" and not any("_se_" in name for name, _ in choices)
    for name, _ in choices:
        result = GradCAM(efficientnet, layer_name=name).cam(images(2, size=64))
        assert result.heatmaps.shape == (2, 64, 64) and np.all(np.isfinite(result.heatmaps))


def test_efficientnetb0_trains_on_the_demo_and_loads_in_safe_mode_on_tensorflow(tiny_demo, tmp_path):
    from conftest import tiny_config
    from keras_ham.train import train

    config = tiny_config(tiny_demo, tmp_path, model="efficientnetb0", max_epochs=1)
    result = train(config, log=lambda message: None, verbose=0)
    assert result.epochs_run == 1 and np.isfinite(result.best_score)
    model = load_classifier(result.run_dir / "best.keras")
    x = images(3, seed=6)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probabilities_on_tensorflow(result.run_dir / "best.keras", x, tmp_path), expected,
                               atol=1e-4)


def test_predictor_on_efficientnetb0_equals_keras(efficientnet):
    """Evaluation and `predict` run models through Predictor: its torch graph (or its Keras
    fallback for layers without a torch form) must give the model's own probabilities."""
    from keras_ham.predict import Predictor

    x = images(3, size=64, seed=8)
    expected = keras.ops.convert_to_numpy(efficientnet(x, training=False))
    np.testing.assert_allclose(Predictor(efficientnet, batch_size=2).predict(x), expected, atol=1e-5)


def test_classifier_input_is_the_one_input_tensor_and_refuses_a_model_with_two():
    image = keras.Input(shape=(8, 8, 3), name="image")
    single = keras.Model(image, keras.layers.GlobalAveragePooling2D()(image))
    assert classifier_input(single) is single.inputs[0]
    other = keras.Input(shape=(3,), name="other")
    pooled = keras.layers.GlobalAveragePooling2D()(image)
    double = keras.Model([image, other], keras.layers.Add()([pooled, other]), name="two_inputs")
    with pytest.raises(ModelError, match="two_inputs: a keras-ham classifier has one input, this model has 2"):
        classifier_input(double)
