
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
