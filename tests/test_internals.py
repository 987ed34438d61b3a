"""keras_ham.internals: each private Keras/Panel attribute keras-ham uses is still there.

If one of these fails after a Keras or Panel upgrade, the message names the attribute and the
installed version: fix the function in keras_ham/internals.py (or keep the version bound in
requirements.txt and pyproject.toml).
"""

from __future__ import annotations

import os
import sys
import types

import keras
import numpy as np
import pytest

from keras_ham import internals
from keras_ham.internals import LibraryInternalsError


def tiny_functional_model() -> keras.Model:
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, keras.layers.Activation("softmax", name="probabilities")(logits))


def test_keras_version_is_within_the_tested_range():
    """requirements.txt bounds Keras to the versions whose internals are tested here."""
    from packaging.specifiers import SpecifierSet

    assert keras.__version__ in SpecifierSet(internals.TESTED_KERAS), (
        f"keras {keras.__version__} is outside the tested range {internals.TESTED_KERAS}: run this file, "
        "then widen TESTED_KERAS, requirements.txt and pyproject.toml together")
    requirements = open(os.path.join(os.path.dirname(__file__), "..", "requirements.txt")).read()
    assert f"keras{internals.TESTED_KERAS}" in requirements


def test_nodes_deepest_first_lists_layers_in_execution_order():
    model = tiny_functional_model()
    names = [node.operation.name for node in internals.nodes_deepest_first(model) if not node.is_input]
    assert names == ["conv", "bn", "drop", "pool", "logits", "probabilities"]


def test_call_takes_training():
    model = tiny_functional_model()
    # the layers whose inference differs from training must get training=False
    assert internals.call_takes_training(model.get_layer("drop")) is True
    assert internals.call_takes_training(model.get_layer("bn")) is True


def test_producing_operation_of_a_model_output():
    model = tiny_functional_model()
    assert internals.producing_operation(model.outputs[0]) is model.get_layer("probabilities")


def test_imported_keras_torch_device():
    device = internals.imported_keras_torch_device()
    if keras.backend.backend() == "torch":
        assert device is not None and device.startswith(("cpu", "cuda", "mps", "privateuseone"))


def test_tensorflow_reported_unavailable_until_probed(monkeypatch):
    from keras.src.utils import module_utils

    fresh = module_utils.LazyModule("tensorflow")  # as in a process that has not asked yet
    monkeypatch.setattr(module_utils, "tensorflow", fresh)
    with internals.tensorflow_reported_unavailable() as deferred:
        assert deferred and fresh.available is False
    assert fresh._available is None  # the next question probes normally
    fresh._available = True  # already probed: left alone
    with internals.tensorflow_reported_unavailable() as deferred:
        assert not deferred and fresh.available is True


def test_per_variable_optimizer_overrides_the_fused_steps():
    cls = internals.per_variable_optimizer(keras.optimizers.AdamW)
    assert cls.__name__ == "PerVariableAdamW" and issubclass(cls, keras.optimizers.AdamW)
    assert "_backend_update_step" in vars(cls) and "_apply_weight_decay" in vars(cls)
    variable = keras.Variable(np.ones(3, dtype="float32"))
    optimizer = cls(learning_rate=0.1, weight_decay=0.0)
    optimizer.apply_gradients([(keras.ops.ones(3), variable)])
    assert np.all(keras.ops.convert_to_numpy(variable) < 1.0)


def test_drop_panel_fast_theme_fonts():
    import panel as pn

    internals.drop_panel_fast_theme_fonts()
    assert "font" not in pn.theme.Fast._resources and pn.theme.Fast._resources  # the CSS stays


# --------------------------------------------------------------------------- when an attribute is gone


@pytest.mark.parametrize("function, argument, attribute", [
    (internals.nodes_deepest_first, types.SimpleNamespace(), "Functional._nodes_by_depth"),
    (internals.call_takes_training, types.SimpleNamespace(), "Layer._call_context_args"),
    (internals.producing_operation, types.SimpleNamespace(), "KerasTensor._keras_history.operation"),
])
def test_a_missing_keras_attribute_is_named_with_the_version(function, argument, attribute):
    with pytest.raises(LibraryInternalsError) as caught:
        function(argument)
    message = str(caught.value)
    assert attribute in message and f"keras {keras.__version__}" in message and internals.TESTED_KERAS in message


def test_a_missing_device_attribute_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras.src.backend.torch.core", types.SimpleNamespace())
    with pytest.raises(LibraryInternalsError, match=r"DEFAULT_DEVICE is missing from keras 3\."):
        internals.imported_keras_torch_device()


def test_a_missing_optimizer_method_is_named(monkeypatch):
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    monkeypatch.delattr(BaseOptimizer, "_apply_weight_decay")
    with pytest.raises(LibraryInternalsError, match=r"BaseOptimizer._apply_weight_decay is missing from keras"):
        internals.per_variable_optimizer(keras.optimizers.AdamW)


def test_a_missing_lazy_module_attribute_is_named(monkeypatch):
    from keras.src.utils import module_utils

    monkeypatch.setattr(module_utils, "tensorflow", types.SimpleNamespace())
    with pytest.raises(LibraryInternalsError, match=r"_available \(LazyModule\) is missing from keras"):
        with internals.tensorflow_reported_unavailable():
            pass


def test_a_missing_panel_attribute_is_named(monkeypatch):
    import panel as pn

    monkeypatch.setattr(pn.theme, "Fast", types.SimpleNamespace())  # a Panel whose Fast has no _resources
    with pytest.raises(LibraryInternalsError, match=rf"Fast._resources is missing from panel {pn.__version__}"):
        internals.drop_panel_fast_theme_fonts()


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_keras_torch_conv_inputs_as_views_changes_the_layout_path_not_the_result():
    from keras.src.backend.torch import nn as keras_torch_nn

    model = tiny_functional_model()
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    original = keras_torch_nn._transpose_spatial_inputs
    with internals.keras_torch_conv_inputs_as_views():
        assert keras_torch_nn._transpose_spatial_inputs is not original
        received = keras.ops.convert_to_numpy(model(x, training=False))
    assert keras_torch_nn._transpose_spatial_inputs is original  # restored
    np.testing.assert_allclose(received, expected, rtol=0, atol=1e-6)


def test_a_missing_conv_layout_function_is_named(monkeypatch):
    from keras.src.backend.torch import nn as keras_torch_nn

    monkeypatch.delattr(keras_torch_nn, "_transpose_spatial_inputs")
    with pytest.raises(LibraryInternalsError, match=r"_transpose_spatial_inputs is missing from keras"):
        with internals.keras_torch_conv_inputs_as_views():
            pass
