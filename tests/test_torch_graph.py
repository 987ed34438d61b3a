"""keras_ham.torch_graph.TorchInferenceGraph (the Predictor's fast torch path) must equal the
Keras model; the one private Keras attribute it reads is checked directly."""

import keras
import numpy as np
import pytest

from keras_ham.config import load_config
from keras_ham.model import build_model
from keras_ham.predict import Predictor
from keras_ham.torch_graph import TorchInferenceGraph, _graph_nodes

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch backend tests")


def images(n, size, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def randomize_batchnorm(model, seed=0):
    """Non-trivial BatchNorm statistics (a fresh model has mean 0 / variance 1)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, n).astype("float32"))


def graph_output(graph, x):
    import torch

    with torch.inference_mode():
        return graph(torch.from_numpy(x)).numpy()


def keras_output(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_graph_nodes_reads_the_functional_graph_in_execution_order():
    # Fails when Keras renames or reshapes Functional._nodes_by_depth (the one private attribute).
    inputs = keras.Input((4,), name="x")
    hidden = keras.layers.Dense(3, name="first")(inputs)
    outputs = keras.layers.Dense(2, name="second")(keras.layers.Activation("relu", name="act")(hidden))
    model = keras.Model(inputs, outputs)
    assert [node.operation.name for node in _graph_nodes(model)] == ["first", "act", "second"]


@pytest.mark.parametrize(
    "overrides",
    [
        # 40 px: odd feature maps (5 -> 3) make ResNet18's stride-2 "same" convs pad asymmetrically
        {"model": "resnet18", "image_size": 40, "augment_zoom": 0.2, "augment_contrast": 0.3},
        {"model": "resnet50", "image_size": 32},
    ],
)
def test_torch_graph_equals_keras_model_with_batchnorm_folded(overrides):
    model = build_model(load_config(overrides={"weights": None, "dropout": 0.5, **overrides}))
    randomize_batchnorm(model)
    # logits, not softmax: a near one-hot softmax would hide differences
    logits_model = keras.Model(model.inputs[0], model.get_layer("logits").output)
    graph = TorchInferenceGraph(logits_model)
    batchnorms = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert graph.folded_batchnorms == batchnorms and graph.keras_layers == []
    x = images(3, overrides["image_size"])
    before = x.copy()
    expected = keras_output(logits_model, x)
    received = graph_output(graph, x)
    np.testing.assert_allclose(received, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_array_equal(x, before)  # in-place ops never touch the caller's images


def test_torch_graph_keeps_aliased_tensors_intact_and_runs_other_layers_through_keras():
    # dropout passes its input on unchanged, so the ReLU after it must not run in place on a
    # buffer the Add still reads; Flatten/Reshape/Concatenate have no torch form here.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    shared = keras.layers.Dropout(0.5)(x)
    relu = keras.layers.Activation("relu")(shared)
    added = keras.layers.Add()([shared, relu])
    bn = keras.layers.BatchNormalization(name="bn_unfolded")(added)
    pooled = keras.layers.MaxPooling2D(2)(bn)
    flat = keras.layers.Flatten(name="flatten")(pooled)
    reshaped = keras.layers.Reshape((4, 16), name="reshape")(flat)
    joined = keras.layers.Concatenate(name="concat")([keras.layers.Flatten(name="flatten2")(reshaped), flat])
    outputs = keras.layers.Dense(5, activation="tanh")(joined)
    model = keras.Model(inputs, outputs)
    randomize_batchnorm(model, seed=3)
    graph = TorchInferenceGraph(model)
    assert graph.folded_batchnorms == 0  # the conv output is read twice: no fold
    assert set(graph.keras_layers) == {"flatten", "reshape", "flatten2", "concat"}
    x = images(2, 8, seed=5) / 50.0 - 2.5  # negative values too, so ReLU changes things
    np.testing.assert_allclose(graph_output(graph, x), keras_output(model, x), rtol=1e-5, atol=1e-5)


def test_predictor_uses_fast_path_and_matches_keras_path():
    model = build_model(load_config(overrides={"weights": None, "model": "resnet18", "image_size": 32}))
    randomize_batchnorm(model, seed=1)
    x = images(3, 32, seed=2)
    fast = Predictor(model, batch_size=2)
    slow = Predictor(model, batch_size=2, fast_path=False)
    assert fast.fast_path and not slow.fast_path
    np.testing.assert_allclose(fast.predict(x), slow.predict(x), atol=1e-5)
    fast_tta = Predictor(model, batch_size=3, tta=True).predict(x)
    np.testing.assert_allclose(fast_tta, Predictor(model, batch_size=3, tta=True, fast_path=False).predict(x), atol=1e-5)


def test_predictor_falls_back_to_keras_when_the_graph_disagrees(monkeypatch):
    model = build_model(load_config(overrides={"weights": None, "model": "resnet18", "image_size": 32}))
    monkeypatch.setattr(TorchInferenceGraph, "__call__", lambda self, x: keras.ops.ones((x.shape[0], 7)) / 2)
    with pytest.warns(UserWarning, match="differs from the Keras model"):
        predictor = Predictor(model, batch_size=2)
    assert not predictor.fast_path
    x = images(2, 32)
    np.testing.assert_allclose(predictor.predict(x), keras_output(model, x), atol=1e-6)
