"""keras_ham.internals: each private Keras/Panel attribute keras-ham uses is still there.

If one of these fails after a Keras or Panel upgrade, the message names the attribute and the
installed version: fix the function in keras_ham/internals.py (or keep the version bound in
requirements.txt and pyproject.toml).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings

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


def test_missing_conv_output_and_call_attributes_are_named(monkeypatch):
    from keras.src.backend.torch import nn as keras_torch_nn
    from keras.src.layers.convolutional.base_conv import BaseConv

    monkeypatch.delattr(keras_torch_nn, "_transpose_spatial_outputs")
    with pytest.raises(LibraryInternalsError, match=r"_transpose_spatial_outputs is missing from keras"):
        with internals.keras_torch_spatial_outputs_as_new_tensors():
            pass
    monkeypatch.delattr(BaseConv, "call")
    with pytest.raises(LibraryInternalsError, match=r"BaseConv.call"):
        with internals.keras_torch_conv_bias_in_place():
            pass


def _batchnorm_model(seed: int = 0) -> keras.Model:
    """Conv -> BN -> ReLU -> max pool -> Conv -> frozen BN -> pool -> Dense, with random BN
    weights and moving statistics so that every term of the batch norm matters."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((9, 9, 3), name="image")
    # No bias before the training-mode BN: its gradient is exactly zero, so two implementations
    # would only be compared on rounding noise (measured +-5e-6 against atol 1e-5).
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.7, name="bn1")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(5, 3, strides=2, padding="same", name="conv2")(x)
    frozen = keras.layers.BatchNormalization(epsilon=1e-3, name="bn_frozen")
    x = frozen(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 1, c), rng.normal(0, 1, c), rng.uniform(0.5, 2, c)])
    frozen.trainable = False
    return model


def _training_step(model, x):
    """Outputs, gradients of every trainable weight and the input, moving statistics after."""
    import torch

    for variable in model.trainable_variables:
        variable.value.grad = None
    inputs = torch.tensor(x, requires_grad=True)
    outputs = model(inputs, training=True)
    (outputs * torch.arange(1.0, 4.0)).sum().backward()
    grads = [v.value.grad.numpy().copy() for v in model.trainable_variables] + [inputs.grad.numpy().copy()]
    stats = [v.numpy().copy() for v in model.non_trainable_variables]
    return outputs.detach().numpy(), grads, stats


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_the_torch_fast_path_computes_what_keras_computes():
    """Training-mode outputs, every gradient and the updated moving statistics, then the
    inference outputs, equal Keras's own code; a layout view and one fused batch norm per
    BatchNormalization call are actually used inside the block, and nothing after it.

    Measured on a 2-core AMD EPYC (AVX-512), torch threads 1 and 2, model/input seeds 0-2:
    output differences <= 1.1e-6 (tolerance 1e-5); the worst gradient or statistic used <= 0.23
    of its tolerance."""
    import torch
    from keras.src.backend.torch import nn as keras_torch_nn

    # Mean 1, not larger: Keras computes the variance as E[x^2] - E[x]^2, whose cancellation
    # error grows with mean^2 / variance (at mean 3, std 2 the first kernel's gradient used 0.64
    # of its tolerance); that is Keras's rounding, not a difference in what is computed.
    x = np.random.default_rng(1).normal(1, 1, (4, 9, 9, 3)).astype("float32")
    reference, fast = _batchnorm_model(), _batchnorm_model()
    expected = _training_step(reference, x)
    calls = []
    real_batch_norm = torch.nn.functional.batch_norm

    def counting(*args, **kwargs):
        calls.append(kwargs.get("training"))
        return real_batch_norm(*args, **kwargs)

    original_call = keras.layers.BatchNormalization.call
    torch.nn.functional.batch_norm = counting
    try:
        with internals.keras_torch_fast_path():
            received = _training_step(fast, x)
            view = keras_torch_nn._transpose_spatial_inputs(torch.zeros(2, 5, 5, 3))
            fast_inference = keras.ops.convert_to_numpy(fast(x, training=False))
    finally:
        torch.nn.functional.batch_norm = real_batch_norm
    assert calls == [True, False, False, False]  # bn1 trains, the frozen one does not; then inference
    assert not view.is_contiguous() and view.is_contiguous(memory_format=torch.channels_last)
    assert keras.layers.BatchNormalization.call is original_call  # restored
    np.testing.assert_allclose(received[0], expected[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(received[1] + received[2], expected[1] + expected[2]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(received[2][0], _batchnorm_model().non_trainable_variables[0].numpy())  # stats moved
    np.testing.assert_allclose(fast_inference, keras.ops.convert_to_numpy(reference(x, training=False)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_the_fused_batch_norm_leaves_single_values_per_channel_to_keras():
    """One value per channel in training: torch's batch norm refuses it, Keras gives variance 0."""
    layer = keras.layers.BatchNormalization()
    x = np.random.default_rng(0).normal(size=(1, 1, 1, 4)).astype("float32")
    expected = keras.ops.convert_to_numpy(keras.layers.BatchNormalization()(x, training=True))
    with internals.keras_torch_fused_batch_norm():
        received = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(received, expected, atol=1e-6)


def test_the_fast_path_restores_keras_after_an_error():
    from keras.src.backend.torch import nn as keras_torch_nn

    from keras.src.backend.torch import image as keras_torch_image

    from keras.src.layers.convolutional.base_conv import BaseConv

    call, transpose = keras.layers.BatchNormalization.call, getattr(keras_torch_nn, "_transpose_spatial_inputs")
    affine, conv_call = keras_torch_image.affine_transform, BaseConv.call
    outputs = keras_torch_nn._transpose_spatial_outputs
    with pytest.raises(ZeroDivisionError):
        with internals.keras_torch_fast_path():
            assert keras_torch_image.affine_transform is not affine
            assert keras_torch_nn._transpose_spatial_outputs is not outputs and BaseConv.call is not conv_call
            1 / 0
    assert keras.layers.BatchNormalization.call is call
    assert keras_torch_nn._transpose_spatial_inputs is transpose
    assert keras_torch_image.affine_transform is affine
    assert keras_torch_nn._transpose_spatial_outputs is outputs and BaseConv.call is conv_call


def test_a_missing_batch_norm_call_is_named(monkeypatch):
    monkeypatch.delattr(keras.layers.BatchNormalization, "call")
    with pytest.raises(LibraryInternalsError, match=r"BatchNormalization.call is missing from keras"):
        with internals.keras_torch_fused_batch_norm():
            pass


# --------------------------------------------------------------------------- functional graph walk


def test_the_installed_graph_walk_is_the_one_keras_ham_reproduces():
    """Fails when Keras changes `Function._run_through_graph`: compare the new walk with
    `_graph_walk_freeing_intermediates`, update it, then add the new fingerprint. Until then
    training runs Keras's own walk (correct, more memory)."""
    fingerprint = internals.keras_graph_walk_fingerprint()
    assert fingerprint in internals.REPRODUCED_GRAPH_WALKS, (
        f"keras {keras.__version__}: Function._run_through_graph has fingerprint {fingerprint}, not one of "
        f"{sorted(internals.REPRODUCED_GRAPH_WALKS)}")


def _branching_model() -> keras.Model:
    """Branches, a layer shared by two branches, a nested model, an output that another layer
    also consumes, and a layer given the same tensor twice."""
    inner_inputs = keras.Input((6,))
    inner = keras.Model(inner_inputs, keras.layers.Dense(6, activation="relu")(inner_inputs), name="inner")
    inputs = keras.Input((6,), name="x")
    shared = keras.layers.Dense(6, name="shared")
    a = shared(inputs)
    b = shared(keras.layers.Dense(6, name="pre")(inputs))
    c = keras.layers.Add(name="twice")([a, a])
    d = inner(keras.layers.Add(name="join")([b, c]))
    first = keras.layers.Dense(3, name="first")(d)
    second = keras.layers.Dense(2, name="second")(keras.layers.Concatenate()([first, a]))
    return keras.Model(inputs, [first, second])


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="measured on torch")
def test_the_freeing_graph_walk_computes_what_keras_computes():
    import torch

    keras.utils.set_random_seed(0)
    model = _branching_model()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 6)).astype("float32"))

    def outputs_and_gradients():
        for variable in model.trainable_variables:
            variable.value.grad = None
        first, second = model(x, training=True)
        (first.square().sum() + second.sum()).backward()
        return [first.detach().numpy(), second.detach().numpy()] + [
            v.value.grad.numpy().copy() for v in model.trainable_variables]

    expected = outputs_and_gradients()
    with internals.keras_functional_frees_intermediates() as in_effect:
        received = outputs_and_gradients()
    assert in_effect
    assert len(received) == len(expected) == 2 + len(model.trainable_variables)
    for got, want in zip(received, expected):
        np.testing.assert_array_equal(got, want)  # the same ops in the same order
    # symbolic calls (building a model on top) go to Keras's own walk
    with internals.keras_functional_frees_intermediates():
        symbolic = model(keras.Input((6,)))
    assert [tuple(t.shape) for t in symbolic] == [(None, 3), (None, 2)]


class _Recorded(keras.layers.Layer):
    """Multiplies by 2 (autograd saves nothing) and keeps a weak reference to its output."""

    def __init__(self, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record  # a namespace: Keras would copy a list attribute into its own tracker

    def call(self, x):
        import weakref

        y = x * 2.0
        self.record.refs.append(weakref.ref(y))
        return y


class _CountAlive(keras.layers.Layer):
    def __init__(self, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def call(self, x):
        self.record.alive.append(sum(ref() is not None for ref in self.record.refs))
        return x + 1.0


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="measured on torch")
@pytest.mark.parametrize("freeing", [False, True])
def test_the_freeing_graph_walk_drops_outputs_after_their_last_use(freeing):
    """With Keras's own walk, all five intermediate outputs are alive when the last layer
    runs; with the freeing walk, only the one it is given."""
    import torch

    record = types.SimpleNamespace(refs=[], alive=[])
    inputs = keras.Input((4,))
    x = inputs
    for index in range(5):
        x = _Recorded(record, name=f"r{index}")(x)
    model = keras.Model(inputs, _CountAlive(record)(x))
    block = internals.keras_functional_frees_intermediates() if freeing else contextlib.nullcontext()
    record.refs.clear()
    record.alive.clear()
    with block:
        model(torch.ones(2, 4))
    assert record.alive == [1 if freeing else 5]


def test_an_unknown_graph_walk_leaves_keras_alone(monkeypatch):
    from keras.src.ops.function import Function

    walk = Function._run_through_graph
    monkeypatch.setattr(internals, "REPRODUCED_GRAPH_WALKS", {})
    with internals.keras_functional_frees_intermediates() as in_effect:
        assert not in_effect and Function._run_through_graph is walk
    monkeypatch.undo()
    with pytest.raises(ZeroDivisionError):
        with internals.keras_functional_frees_intermediates() as in_effect:
            assert in_effect and Function._run_through_graph is not walk
            1 / 0
    assert Function._run_through_graph is walk  # restored after an error


# --------------------------------------------------------------------------- torch affine transform


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
@pytest.mark.parametrize("layer, kwargs", [
    (keras.layers.RandomRotation, {"factor": 0.5, "fill_mode": "reflect"}),  # up to +-180 degrees
    (keras.layers.RandomRotation, {"factor": 0.1, "fill_mode": "reflect"}),  # keras-ham's default
    (keras.layers.RandomZoom, {"height_factor": 0.3, "fill_mode": "reflect"}),
])
def test_the_grid_sample_affine_transform_computes_what_keras_computes(layer, kwargs):
    """Same random transforms (same seed), Keras's gather-based interpolation vs grid_sample, on
    a non-square batch of uniform-noise 0..255 images (the steepest an image gets). Measured on a
    2-core AMD EPYC, torch threads 1 and 2, seeds 0-2: largest difference 2.2e-4 at this size and
    6.2e-4 at 64x64 (float rounding of the coordinates); tolerance 2e-3."""
    import torch

    calls = []
    real_grid_sample = torch.nn.functional.grid_sample

    def counting(*args, **kwargs):
        calls.append(kwargs.get("padding_mode"))
        return real_grid_sample(*args, **kwargs)

    for seed in range(3):
        x = torch.from_numpy(np.random.default_rng(seed).uniform(0, 255, (3, 11, 16, 3)).astype("float32"))
        expected = layer(**kwargs, seed=seed)(x, training=True)
        torch.nn.functional.grid_sample = counting
        try:
            with internals.keras_torch_affine_transform_by_grid_sample():
                received = layer(**kwargs, seed=seed)(x, training=True)
        finally:
            torch.nn.functional.grid_sample = real_grid_sample
        assert float((expected - x).abs().max()) > 10  # the images were transformed
        np.testing.assert_allclose(received.numpy(), expected.numpy(), rtol=0, atol=2e-3)
    assert calls == ["reflection"] * 3


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
@pytest.mark.parametrize("kwargs", [{"fill_mode": "constant"}, {"fill_mode": "reflect", "interpolation": "nearest"},
                                    {"fill_mode": "wrap"}])
def test_the_grid_sample_affine_transform_leaves_other_modes_to_keras(kwargs):
    import torch

    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32"))
    expected = keras.layers.RandomRotation(0.2, seed=1, **kwargs)(x, training=True)
    with internals.keras_torch_affine_transform_by_grid_sample():
        received = keras.layers.RandomRotation(0.2, seed=1, **kwargs)(x, training=True)
    np.testing.assert_array_equal(received.numpy(), expected.numpy())  # Keras's own code, unchanged


def test_a_missing_affine_transform_is_named(monkeypatch):
    from keras.src.backend.torch import image as keras_torch_image

    monkeypatch.delattr(keras_torch_image, "affine_transform")
    with pytest.raises(LibraryInternalsError, match=r"affine_transform is missing from keras"):
        with internals.keras_torch_affine_transform_by_grid_sample():
            pass


def _conv_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((10, 10, 3))
    # 16 channels into the strided 1x1 convolution, not fewer: torch 2.14's oneDNN (3.12) writes
    # past its workspace in that convolution's weight gradient when a channels_last input has
    # fewer channels than its block (8 with AVX2, 16 with AVX-512): with 6, the gradient came out
    # wrong and different on every call under ONEDNN_MAX_CPU_ISA=AVX2 (an AMD EPYC without
    # AVX-512 runs those kernels), and the same bug can hang or crash (oneDNN issue 6035).
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv3x3")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(5, 1, strides=2, name="conv1x1")(keras.layers.Activation("relu")(x))
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)  # not a Conv2D: left as Keras stores it
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="head")(x))
    model.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    return model


@contextlib.contextmanager
def _recorded_torch_ops():
    """Inside the block, every torch op run is appended to the yielded list as (op name, the
    shape of its output when that is one tensor, else None)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ops.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
            return out

    with Record():
        yield ops


def _kernel_copies(model, x, y) -> int:
    """Copies of a Conv2D kernel's values (either layout) made by one training step on the fast
    path, after a first step (which also builds Keras's train function)."""
    shapes = set()
    for name in ("conv3x3", "conv1x1"):
        h, w, i, o = model.get_layer(name).kernel.shape
        shapes |= {(h, w, i, o), (o, i, h, w)}
    with internals.keras_torch_fast_path():
        model.train_on_batch(x, y)
        with _recorded_torch_ops() as ops:
            model.train_on_batch(x, y)
    return sum(name in ("clone", "copy_", "_to_copy", "contiguous") and shape in shapes for name, shape in ops)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend layout")
def test_channels_last_kernels_remove_the_kernel_copies_and_change_no_result(tmp_path):
    """Same shapes and values, the same training step (up to the convolution's rounding), no
    copy of a kernel in forward or backward, and the layout survives assign and load_weights;
    saved files are the same as Keras's.

    Measured on a 2-core AMD EPYC (AVX-512), torch threads 1 and 2, seeds 0-2, also with torch
    and oneDNN limited to AVX2 and to SSE4.1 kernels (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA):
    after two AdamW steps the weights were bit-identical; the tolerance (1e-5) leaves room for a
    CPU whose convolution picks another algorithm for the other weight layout."""
    import torch

    x = np.random.default_rng(0).normal(size=(4, 10, 10, 3)).astype("float32")
    y = np.array([0, 1, 2, 1])
    reference, relaid = _conv_model(0), _conv_model(0)
    before = [v.numpy().copy() for v in relaid.weights]
    baseline_copies = _kernel_copies(_conv_model(0), x, y)

    assert internals.keras_torch_conv_kernels_channels_last(relaid) == 2 + 2 * 2  # kernels + AdamW m, v
    assert internals.keras_torch_conv_kernels_channels_last(relaid) == 0  # already done
    for variable, value in zip(relaid.weights, before):
        assert tuple(variable.shape) == value.shape
        np.testing.assert_array_equal(variable.numpy(), value)
    kernel = relaid.get_layer("conv3x3").kernel
    assert kernel.value.permute(3, 2, 0, 1).is_contiguous(memory_format=torch.channels_last)
    assert relaid.get_layer("depthwise").kernel.value.is_contiguous()

    assert baseline_copies >= 2  # Keras copies each kernel: the measurement can see a copy
    assert _kernel_copies(relaid, x, y) == 0
    with internals.keras_torch_fast_path():
        reference.train_on_batch(x, y)
        reference.train_on_batch(x, y)
    for got, want in zip(relaid.weights, reference.weights):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert relaid.get_layer("conv3x3").kernel.value.grad is not None  # trained through the relaid tensor

    kernel.assign(np.ones(kernel.shape, "float32"))
    path = tmp_path / "relaid.weights.h5"
    relaid.save_weights(path)
    reference.load_weights(path)
    relaid.load_weights(path)
    assert kernel.value.permute(3, 2, 0, 1).is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(relaid.weights, reference.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(relaid(x)), keras.ops.convert_to_numpy(reference(x)),
                               rtol=1e-5, atol=1e-6)


def _residual_model(seed: int) -> keras.Model:
    """Every case the in-place rule must take or leave (see `_in_place_elementwise`)."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    c1 = layers.Conv2D(4, 3, padding="same", name="c1")(inputs)  # bias added in place
    r1 = layers.Activation("relu", name="r1")(layers.BatchNormalization(name="b1")(c1))  # in place
    b2 = layers.BatchNormalization(name="b2")(layers.Conv2D(4, 3, padding="same", use_bias=False, name="c2")(r1))
    y = layers.BatchNormalization(name="b2b")(layers.Conv2D(4, 1, use_bias=False, name="c2b")(b2))
    a1 = layers.Add(name="a1")([b2, y])  # not into b2: c2b saved it for its backward; y takes the sum
    a0 = layers.Add(name="a0")([r1, a1])  # r1 is a ReLU's output (saved): a1 takes the sum
    r2 = layers.Activation("relu", name="r2")(a0)  # in place
    c3 = layers.Conv2D(4, 1, activation="relu", name="c3")(r2)
    r3 = layers.Activation("relu", name="r3")(c3)  # not: c3's ReLU keeps its output
    b3 = layers.BatchNormalization(name="b3")(r3)
    r4 = layers.Activation("relu", name="r4")(b3)  # not: b3 is also a model output
    twice = layers.Add(name="twice")([r4, r4])  # not: the same input twice
    pooled = layers.GlobalAveragePooling2D()(layers.Activation("relu", name="r5")(twice))  # in place
    outputs = layers.Dense(3, activation="softmax", name="head")(pooled)
    return keras.Model(inputs, [outputs, b3])


def _recorded(rule, names: list[str]):
    """`rule` (a walk's per-node function: operation first, None when it does not apply) that
    also appends the name of each operation it handles to `names`."""
    def recorded(operation, *args, **kwargs):
        result = rule(operation, *args, **kwargs)
        if result is not None:
            names.append(operation.name)
        return result
    return recorded


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
@pytest.mark.parametrize("training", [True, False])
def test_in_place_relu_and_add_change_no_result_and_run_where_safe(monkeypatch, training):
    """Outputs, every gradient and the moving statistics are bit-identical with and without the
    in-place ops, which run exactly where the rule allows (r1, a1, a0, r2, r5), in training (autograd
    would raise at backward had a saved tensor been overwritten) and in inference. Exact
    equality, not a tolerance: the same ops on the same values (checked bit-identical for
    model and input seeds 0-2, torch threads 1 and 2, on a 2-core AMD EPYC)."""
    import torch

    x = np.random.default_rng(2).normal(size=(3, 8, 8, 3)).astype("float32")
    taken = []
    factory = internals._in_place_elementwise

    def counting_factory():
        return _recorded(factory(), taken)

    def step(model, in_place: bool):
        monkeypatch.setattr(internals, "_in_place_elementwise",
                            counting_factory if in_place else (lambda: (lambda *args: None)))
        inputs = torch.tensor(x, requires_grad=training)
        with internals.keras_torch_fast_path(), torch.set_grad_enabled(training):
            probabilities, features = model(inputs, training=training)
            if not training:
                return [probabilities.numpy(), features.numpy()]
            ((probabilities * torch.arange(1.0, 4.0)).sum() + (features * features).mean()).backward()
        grads = [v.value.grad.numpy().copy() for v in model.trainable_variables] + [inputs.grad.numpy()]
        stats = [v.numpy().copy() for v in model.non_trainable_variables]
        return [probabilities.detach().numpy(), features.detach().numpy()] + grads + stats

    expected = step(_residual_model(0), in_place=False)
    assert taken == []
    received = step(_residual_model(0), in_place=True)
    assert taken == ["r1", "a1", "a0", "r2", "r5"]
    assert len(received) == len(expected)
    for got, want in zip(received, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_conv_outputs_are_new_tensors_and_the_bias_is_added_in_place():
    """On the fast path a convolution's NHWC output is a plain tensor (not a view) holding the
    same values and gradient, so the bias add runs in place; a view still takes Keras's add.
    Exact equality: the same convolution and add (checked bit-identical for seeds 0-2, torch
    threads 1 and 2, on a 2-core AMD EPYC)."""
    import torch

    layer = keras.layers.Conv2D(5, 3, name="conv")
    x = torch.tensor(np.random.default_rng(0).normal(size=(2, 7, 7, 3)).astype("float32"), requires_grad=True)
    expected = layer(x)
    (expected * expected).sum().backward()
    expected_grads = [x.grad.clone(), layer.kernel.value.grad.clone(), layer.bias.value.grad.clone()]
    x.grad = layer.kernel.value.grad = layer.bias.value.grad = None
    with internals.keras_torch_fast_path():
        from keras.src.backend.torch import nn as keras_torch_nn

        plain = keras_torch_nn._transpose_spatial_outputs(torch.zeros(2, 5, 4, 4))
        view = keras_torch_nn._transpose_spatial_outputs(torch.zeros(2, 5, 4, 4)[:, :, 1:])
        with _recorded_torch_ops() as ops:
            received = layer(x)
    seen = [name for name, _ in ops]
    assert not plain._is_view() and plain.shape == (2, 4, 4, 5) and view._is_view()
    assert "add_" in seen and "add" not in seen
    (received * received).sum().backward()
    np.testing.assert_array_equal(received.detach().numpy(), expected.detach().numpy())
    for got, want in zip([x.grad, layer.kernel.value.grad, layer.bias.value.grad], expected_grads):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_the_adam_step_is_one_this_module_reproduces():
    """Fails when Keras changes its torch Adam step: re-read it, update
    `_adam_step_tensor_by_tensor` and add the new fingerprint to REPRODUCED_ADAM_STEPS."""
    if keras.backend.backend() != "torch":
        pytest.skip("a torch-backend internal")
    fingerprint = internals.keras_torch_adam_step_fingerprint()
    assert fingerprint in internals.REPRODUCED_ADAM_STEPS, (
        f"Keras {keras.__version__}'s torch Adam step has fingerprint {fingerprint}, not one of "
        f"{sorted(internals.REPRODUCED_ADAM_STEPS)}")


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
@pytest.mark.parametrize("amsgrad, chunk", [(False, None), (False, 7), (True, None)])
def test_the_tensor_by_tensor_adam_step_is_keras_step_bit_for_bit(amsgrad, chunk, monkeypatch):
    """Three AdamW steps (weight decay included) on a model whose kernels are relaid out: every
    variable and optimizer slot is bit-identical to Keras's own step, also when the variables
    are updated in pieces (`chunk`: 7 elements, so every kernel is cut, unevenly); AMSGrad
    stays Keras's."""
    import torch

    if chunk is not None:
        monkeypatch.setattr(internals, "ADAM_CHUNK", chunk)
    from keras.src.backend.torch.optimizers import torch_adam

    original = torch_adam.Adam.__dict__["_parallel_update_step"]

    def run(tensor_by_tensor: bool):
        model = _conv_model(0)
        model.compile(optimizer=keras.optimizers.AdamW(1e-2, weight_decay=0.05, amsgrad=amsgrad), loss="mse")
        model.optimizer.build(model.trainable_variables)
        internals.keras_torch_conv_kernels_channels_last(model)
        rng = np.random.default_rng(1)
        block = internals.keras_torch_adam_tensor_by_tensor() if tensor_by_tensor else contextlib.nullcontext()
        calls = []
        with block as in_effect:
            adam = type(model.optimizer).__mro__[1]
            step = adam.__dict__["_parallel_update_step"]
            if tensor_by_tensor:
                assert in_effect and step is not original
                adam._parallel_update_step = lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs)
            try:
                for _ in range(3):
                    grads = [torch.tensor(rng.normal(size=v.shape).astype("float32"))
                             for v in model.trainable_variables]
                    if chunk is not None:  # as in training: each gradient in its variable's layout
                        grads = [torch.empty_like(v.value).copy_(g) for v, g in zip(model.trainable_variables, grads)]
                    model.optimizer.apply(grads, model.trainable_variables)
            finally:
                adam._parallel_update_step = step
        return [v.numpy() for v in model.weights + model.optimizer.variables], calls

    expected, _ = run(False)
    received, calls = run(True)
    assert calls == [1, 1, 1]
    assert torch_adam.Adam.__dict__["_parallel_update_step"] is original  # restored
    for got, want in zip(received, expected):
        np.testing.assert_array_equal(got, want)


def test_an_unknown_adam_step_is_left_to_keras(monkeypatch):
    if keras.backend.backend() != "torch":
        pytest.skip("a torch-backend internal")
    from keras.src.backend.torch.optimizers import torch_adam

    original = torch_adam.Adam.__dict__["_parallel_update_step"]
    monkeypatch.setattr(internals, "REPRODUCED_ADAM_STEPS", {})
    with internals.keras_torch_adam_tensor_by_tensor() as in_effect:
        assert not in_effect and torch_adam.Adam.__dict__["_parallel_update_step"] is original
    with internals.keras_torch_fast_path():
        assert torch_adam.Adam.__dict__["_parallel_update_step"] is original


# --------------------------------------------------------------------------- direct layer calls


def test_the_layer_call_is_one_this_module_reproduces():
    """Fails when Keras changes `Layer.__call__` or `Operation.__call__`: re-read them, check
    that `_direct_layer_call` still skips nothing that matters, then add the new fingerprints
    to REPRODUCED_LAYER_CALLS. Until then every layer goes through Keras's `__call__`."""
    fingerprints = internals.keras_layer_call_fingerprint()
    assert fingerprints in internals.REPRODUCED_LAYER_CALLS, (
        f"Keras {keras.__version__}: Layer.__call__ / Operation.__call__ have fingerprints {fingerprints}, "
        f"not one of {sorted(internals.REPRODUCED_LAYER_CALLS)}")


class _SubclassedDense(keras.layers.Dense):
    """A subclass may rely on `Layer.__call__`: it is never called directly."""


def _direct_call_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.ZeroPadding2D(1, name="pad")(inputs)
    x = layers.Conv2D(4, 3, name="conv")(x)
    x = layers.Activation("relu", name="relu")(layers.BatchNormalization(name="bn")(x))
    y = layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = layers.Add(name="add")([layers.Dropout(0.5, name="drop")(x), y])
    x = layers.MaxPooling2D(2, name="maxpool")(x)
    x = layers.Multiply(name="multiply")([x, layers.AveragePooling2D(1, name="avgpool")(x)])
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(5, name="hooked")(x)
    x = _SubclassedDense(4, name="subclassed")(x)
    x = layers.Dense(3, name="regularized", activity_regularizer="l2")(x)
    return keras.Model(inputs, layers.Dense(3, activation="softmax", name="head")(x))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
@pytest.mark.parametrize("training", [True, False])
def test_direct_layer_calls_change_no_result_and_skip_only_plain_layers(monkeypatch, training):
    """Outputs, every gradient, the moving statistics and the activity loss are bit-identical
    whether the walk calls the plain layers directly or through Keras's `Layer.__call__`
    (dropout included: the same seed stream). A layer with a torch forward hook, a subclass
    and a layer with an activity regularizer go through Keras (the hook runs once per call).
    Exact equality: the same `call` on the same values (checked bit-identical for seeds 0-2,
    torch threads 1 and 2, on a 2-core AMD EPYC)."""
    import torch

    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype("float32")
    direct_names: list[str] = []
    factory = internals._direct_layer_call

    def counting_factory():
        return _recorded(factory(), direct_names)

    def step(direct: bool):
        model = _direct_call_model(0)
        hooked = []
        model.get_layer("hooked").register_forward_hook(lambda module, args, output: hooked.append(1))
        monkeypatch.setattr(internals, "_direct_layer_call",
                            counting_factory if direct else (lambda: (lambda *args, **extra: None)))
        # conv -> bn would otherwise be run by `_conv_bias_left_to_batch_norm` (its own test)
        monkeypatch.setattr(internals, "_conv_bias_left_to_batch_norm", _no_bias_left_to_batch_norm)
        inputs = torch.tensor(x, requires_grad=training)
        with internals.keras_torch_fast_path(), torch.set_grad_enabled(training):
            probabilities = model(inputs, training=training)
            losses = [loss.detach().numpy() for loss in model.losses]
            if not training:
                return [probabilities.numpy()] + losses, hooked
            (probabilities * torch.arange(1.0, 4.0)).sum().backward()
        grads = [v.value.grad.numpy().copy() for v in model.trainable_variables] + [inputs.grad.numpy()]
        stats = [v.numpy().copy() for v in model.non_trainable_variables]
        return [probabilities.detach().numpy()] + losses + grads + stats, hooked

    expected, hooked = step(direct=False)
    assert direct_names == [] and hooked == [1]
    received, hooked = step(direct=True)
    assert hooked == [1]
    # not "relu": it runs in place (`_in_place_elementwise`), ahead of the direct call
    assert direct_names == ["pad", "conv", "bn", "drop", "depthwise", "add", "maxpool", "avgpool",
                            "multiply", "gap", "head"]
    assert len(received) == len(expected)
    for got, want in zip(received, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_an_unknown_layer_call_leaves_every_layer_to_keras(monkeypatch):
    monkeypatch.setattr(internals, "REPRODUCED_LAYER_CALLS", {})
    direct = internals._direct_layer_call()
    layer = keras.layers.Activation("relu")
    assert direct(layer, (np.zeros((1, 2), "float32"),), {}) is None
    import torch

    assert direct(layer, (torch.zeros(1, 2),), {}) is None


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_adam_scratch_temporaries_take_the_layout_of_each_variable():
    """The Adam step's `out=` temporaries: views with the variable's shape and strides into
    two distinct buffers when the variable is dense (a relaid kernel included); a fresh pair
    when it is not dense or does not fit."""
    import torch

    scratch = internals._ScratchPair(60, torch.float32, torch.device("cpu"))
    kernel = torch.zeros(5, 4, 3).permute(1, 2, 0)  # dense, not contiguous
    first, second = scratch.like(kernel)
    assert first.shape == kernel.shape and first.stride() == kernel.stride() == second.stride()
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() == scratch.buffers[0].untyped_storage().data_ptr()
    sliced = torch.zeros(4, 6)[:, ::2]
    assert not internals._dense(sliced) and internals._dense(kernel)
    for tensor in (sliced, torch.zeros(61), torch.zeros(3, dtype=torch.float64)):
        first, _ = scratch.like(tensor)
        assert first.shape == tensor.shape and first.dtype == tensor.dtype
        assert first.untyped_storage().data_ptr() != scratch.buffers[0].untyped_storage().data_ptr()


def test_adam_chunks_cut_matching_pieces_in_memory_order(monkeypatch):
    import torch

    monkeypatch.setattr(internals, "ADAM_CHUNK", 4)
    kernel = torch.arange(30.0).reshape(5, 3, 2).permute(1, 2, 0)  # dense, not contiguous
    slot = torch.empty_like(kernel).copy_(kernel)
    pieces = internals._chunks(kernel, slot)
    assert [len(a) for a, _ in pieces] == [4] * 7 + [2]
    assert torch.equal(torch.cat([a for a, _ in pieces]), torch.arange(30.0))  # memory order, all of it
    assert all(torch.equal(a, b) for a, b in pieces)  # the same elements of each tensor
    contiguous = torch.zeros(3, 2, 5)  # same shape, other strides: not cut
    assert internals._chunks(kernel, contiguous) == [(kernel, contiguous)]
    small = torch.zeros(4)
    assert internals._chunks(small, small)[0][0] is small


class _NoSharedViews(list):
    """Stands in for the walk's stack of shared-view tables: no table is ever opened."""

    def append(self, item):
        pass

    def pop(self, *args):
        return None


def _two_conv_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(4, 3, name="c0")(inputs)
    x = layers.Activation("relu", name="r0")(layers.BatchNormalization(name="b0")(x))
    a = layers.Conv2D(5, 1, name="shortcut")(x)  # x is read by two convolutions
    b = layers.Conv2D(5, 3, padding="same", name="main")(x)
    return keras.Model(inputs, layers.GlobalAveragePooling2D()(layers.Add()([a, b])))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_two_convolutions_of_one_tensor_share_its_view_and_sum_gradients_in_place(monkeypatch):
    """With the shared view, the two input gradients of `x` are summed in place (no new tensor
    of x's size at backward); results are bit-identical to one view per convolution (checked for
    seeds 0-2, torch threads 1 and 2, on a 2-core AMD EPYC), and the table is gone after the walk."""
    import torch

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")

    def step(shared: bool):
        model = _two_conv_model(0)
        if not shared:
            monkeypatch.setattr(internals, "_shared_input_views", lambda stack=_NoSharedViews(): stack)
        with internals.keras_torch_fast_path():
            outputs = model(torch.tensor(x), training=True)
            # the profiler, not a dispatch mode: under a Python mode autograd never sums in place
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as ops:
                (outputs * torch.arange(1.0, 6.0)).sum().backward()
        monkeypatch.undo()
        new_sums = [event.input_shapes[0] for event in ops.events()
                    if event.name == "aten::add" and event.input_shapes and event.input_shapes[0] in ([2, 6, 6, 4], [2, 4, 6, 6])]
        return [outputs.detach().numpy()] + [v.value.grad.numpy().copy() for v in model.trainable_variables], new_sums

    expected, sums_without = step(shared=False)
    received, sums_with = step(shared=True)
    assert sums_without and not sums_with
    assert internals._shared_input_views() == []
    for got, want in zip(received, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_the_fused_batch_norm_writes_moving_statistics_as_assign_would():
    """In place, the new moving statistics are bit-identical to those `assign` records inside a
    Keras stateless scope, where the variables themselves must stay untouched."""
    import torch

    x = torch.tensor(np.random.default_rng(0).normal(1, 2, size=(4, 5, 5, 3)).astype("float32"))

    def layer():
        keras.utils.set_random_seed(0)
        bn = keras.layers.BatchNormalization(momentum=0.8)
        bn.build(x.shape)
        bn.moving_mean.assign(np.array([0.5, -1.0, 2.0], "float32"))
        bn.moving_variance.assign(np.array([1.5, 0.25, 3.0], "float32"))
        return bn

    in_place, recorded = layer(), layer()
    with internals.keras_torch_fused_batch_norm():
        in_place(x, training=True)
        with keras.StatelessScope() as scope:
            recorded(x, training=True)
    np.testing.assert_array_equal(recorded.moving_mean.numpy(), [0.5, -1.0, 2.0])  # untouched
    for variable in ("moving_mean", "moving_variance"):
        np.testing.assert_array_equal(getattr(in_place, variable).numpy(),
                                      keras.ops.convert_to_numpy(scope.get_current_value(getattr(recorded, variable))))
    assert not np.allclose(in_place.moving_mean.numpy(), [0.5, -1.0, 2.0])


def test_each_thread_has_its_own_shared_view_stack():
    """Two Grad-CAM requests of a dashboard run in two threads: neither sees the other's table."""
    import threading

    mine = internals._shared_input_views()
    mine.append({"marker": 1})
    try:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(list(internals._shared_input_views())))
        thread.start()
        thread.join()
        assert seen == [[]] and internals._shared_input_views() is mine
    finally:
        mine.pop()


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_the_fast_path_runs_under_inference_mode_as_keras_does():
    """The Predictor runs the model inside `torch.inference_mode`, whose tensors have no version
    counter: the fast path (shared conv-input views included) must neither read one nor change
    the probabilities. A tensor read by two convolutions is the case that shares a view."""
    import torch

    model = _two_conv_model(0)
    x = torch.tensor(np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32"))
    with torch.inference_mode():
        expected = model(x, training=False).numpy()
        with internals.keras_torch_fast_path():
            received = model(x, training=False)
    assert received.is_inference()
    np.testing.assert_array_equal(received.numpy(), expected)
    assert internals._shared_input_views() == []


def _no_bias_left_to_batch_norm():
    return lambda *args: None


def _conv_bias_model(seed: int) -> keras.Model:
    """Each case `_conv_bias_left_to_batch_norm` must take or leave, with nonzero biases and
    random batch-norm statistics so that every term matters."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((9, 9, 3))
    x = layers.Conv2D(6, 3, padding="same", name="c1")(inputs)  # taken: its only reader is a training BN
    x = layers.Activation("relu")(layers.BatchNormalization(momentum=0.7, name="b1")(x))
    c2 = layers.Conv2D(6, 1, name="c2")(x)  # into a frozen (inference) BN, which adds the bias
    x = layers.BatchNormalization(name="b_frozen")(c2)
    c3 = layers.Conv2D(6, 1, name="c3")(x)  # read by a BN and an Add: left alone
    x = layers.Add()([layers.BatchNormalization(name="b3")(c3), c3])
    x = layers.BatchNormalization(name="b4")(layers.Conv2D(5, 3, activation="relu", name="c4")(x))  # not linear
    x = layers.GlobalAveragePooling2D()(layers.Activation("relu")(x))  # (a training BN's gradient to a mean is 0)
    model = keras.Model(inputs, layers.Dense(3, name="head")(x))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.bias.assign(rng.normal(0, 1, layer.bias.shape))
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 1, c), rng.normal(0, 1, c),
                               rng.uniform(0.5, 2, c)])
    model.get_layer("b_frozen").trainable = False
    return model


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
@pytest.mark.parametrize("seed", [0, 2])
def test_a_conv_bias_before_a_training_batch_norm_is_left_out_with_a_zero_gradient(monkeypatch, seed):
    """Only c1's bias is left out (c2's goes to a frozen batch norm, which adds it): the
    training outputs, every other gradient, the moving statistics and then the inference
    outputs are Keras's own up to rounding; c1's bias gradient is exactly zero where Keras sums
    rounding noise (the exact value is zero), and the biases the rule leaves alone get Keras's
    real gradient.

    "Up to rounding": against a float64 run of the same model, Keras's float32 gradients were
    off by up to 4.7e-5 and the fast path's by up to 5.5e-5 without this rule and 8.9e-5 with
    it (the fused batch norm and the convolutions round differently); a mistake in the rule
    (the bias lost from the moving mean or from inference, a real gradient zeroed) is off by
    0.1 or more. Measured on a 2-core AMD EPYC (family 26), torch threads 1 and 2, seeds 0-2:
    the worst difference used 0.25 of the tolerance; Keras's c1 bias gradient was at most
    4.5e-7, the other biases' at least 0.47."""
    import torch

    taken = []
    factory = internals._conv_bias_left_to_batch_norm

    def counting_factory():
        return _recorded(factory(), taken)

    monkeypatch.setattr(internals, "_conv_bias_left_to_batch_norm", counting_factory)
    x = np.random.default_rng(seed + 10).normal(1, 1, (4, 9, 9, 3)).astype("float32")

    def step(model, fast: bool):
        for variable in model.trainable_variables:
            variable.value.grad = None
        inputs = torch.tensor(x, requires_grad=True)
        with internals.keras_torch_fast_path() if fast else contextlib.nullcontext():
            outputs = model(inputs, training=True)
            (outputs * torch.arange(1.0, 4.0)).sum().backward()
            inference = keras.ops.convert_to_numpy(model(x, training=False))
        grads = {v.path: v.value.grad.numpy().copy() for v in model.trainable_variables}
        grads["input"] = inputs.grad.numpy().copy()
        stats = {v.path: v.numpy().copy() for v in model.non_trainable_variables}
        return outputs.detach().numpy(), grads, stats, inference

    reference = _conv_bias_model(seed)
    expected = step(reference, fast=False)
    received = step(_conv_bias_model(seed), fast=True)
    # left to their batch norms in training and inference; the frozen one (and inference) adds it back
    assert taken == ["c1", "c2", "c1", "c2"]
    tolerance = {"rtol": 1e-3, "atol": 1e-4}
    np.testing.assert_allclose(received[0], expected[0], **tolerance)
    assert set(received[1]) == set(expected[1])
    assert np.all(received[1]["c1/bias"] == 0)
    assert np.abs(expected[1]["c1/bias"]).max() < 1e-4  # Keras's: rounding noise
    for name in ("c2/bias", "c3/bias", "c4/bias"):
        assert np.abs(expected[1][name]).max() > 0.01  # real gradients, which the rule must leave
    for name, want in expected[1].items():
        if name != "c1/bias":
            np.testing.assert_allclose(received[1][name], want, **tolerance, err_msg=name)
    for name, want in expected[2].items():
        np.testing.assert_allclose(received[2][name], want, **tolerance, err_msg=name)
    assert not np.allclose(received[2]["b1/moving_mean"], _conv_bias_model(seed).get_layer("b1").moving_mean.numpy())
    np.testing.assert_allclose(received[3], expected[3], **tolerance)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
def test_a_training_step_gives_the_optimizer_a_zero_bias_gradient_not_none():
    """Keras's optimizer gets every gradient (a missing one would make it warn and skip the
    variable); from Adam's zero state a zero gradient leaves the bias where it was."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Conv2D(4, 3, name="conv")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x)))
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="sparse_categorical_crossentropy")
    model.get_layer("conv").bias.assign(np.full(4, 0.5, "float32"))
    kernel = model.get_layer("conv").kernel.numpy().copy()
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    with internals.keras_torch_fast_path(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train_on_batch(x, np.array([0, 1, 0, 1]))
    np.testing.assert_array_equal(model.get_layer("conv").bias.numpy(), np.full(4, 0.5, "float32"))
    assert not np.allclose(model.get_layer("conv").kernel.numpy(), kernel)  # it did train


def _zero_padding_model(seed: int) -> keras.Model:
    """Each case `_zero_padding_left_to_max_pool` must take (pad_a, pad_b) or leave, on a ReLU
    output with many zeros, so that windows whose maximum is 0 begin with a pad."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((12, 12, 3))
    r1 = layers.Activation("relu", name="r1")(layers.Conv2D(4, 3, padding="same", name="c1")(inputs))
    pooled = lambda x, **pool: layers.GlobalAveragePooling2D()(layers.MaxPooling2D(3, 2, **pool)(x))  # noqa: E731
    pad_e = layers.ZeroPadding2D(1, name="pad_e")(r1)  # read twice: left
    branches = [
        pooled(layers.ZeroPadding2D(1, name="pad_a")(r1)),  # taken: Activation("relu")
        pooled(layers.ZeroPadding2D(1, name="pad_b")(layers.ReLU(name="r_b")(layers.Conv2D(4, 1, name="c_b")(r1)))),  # taken
        pooled(layers.ZeroPadding2D(1, name="pad_c")(layers.Conv2D(4, 1, name="c_c")(r1))),  # not a ReLU's output
        pooled(layers.ZeroPadding2D(1, name="pad_f")(layers.ReLU(negative_slope=0.1)(layers.Conv2D(4, 1, name="c_f")(r1)))),
        pooled(layers.ZeroPadding2D(2, name="pad_d")(r1)),  # more than half the window
        pooled(layers.ZeroPadding2D(((1, 0), (1, 0)), name="pad_g")(r1)),  # not symmetric
        pooled(layers.ZeroPadding2D(1, name="pad_h")(r1), padding="same"),  # the pooling pads itself
        pooled(pad_e), layers.GlobalAveragePooling2D()(pad_e),
    ]
    model = keras.Model(inputs, layers.Dense(3, name="head")(layers.Concatenate()(branches)))
    model.get_layer("c1").bias.assign(np.full(4, -0.5, "float32"))  # more zeros after r1
    return model


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="a torch-backend internal")
@pytest.mark.parametrize("seed", [0, 1])
def test_a_relu_zero_padding_left_to_its_max_pool_changes_no_bit(monkeypatch, seed):
    """Training outputs, every weight's and the input's gradient, and inference outputs are
    bit-identical with and without the rule; it takes exactly the two paddings it may (a
    ReLU's output, read by a "valid" max pool only, symmetric, at most half the window), and
    keras.applications' ResNet50's pool1_pad."""
    import torch

    taken: list[str] = []
    factory = internals._zero_padding_left_to_max_pool

    def counting_factory():
        rules = factory()
        return types.SimpleNamespace(leave=_recorded(rules.leave, taken), pool=rules.pool)

    x = np.random.default_rng(seed + 20).normal(0, 1, (4, 12, 12, 3)).astype("float32")

    def step(fold: bool):
        monkeypatch.setattr(internals, "_zero_padding_left_to_max_pool", counting_factory if fold else
                            (lambda: types.SimpleNamespace(leave=lambda *args: None, pool=lambda *args: None)))
        model = _zero_padding_model(seed)
        inputs = torch.tensor(x, requires_grad=True)
        with internals.keras_torch_fast_path():
            outputs = model(inputs, training=True)
            (outputs * torch.arange(1.0, 4.0)).sum().backward()
            inference = keras.ops.convert_to_numpy(model(x, training=False))
        grads = {v.path: v.value.grad.numpy().copy() for v in model.trainable_variables}
        grads["input"] = inputs.grad.numpy().copy()
        return model, outputs.detach().numpy(), grads, inference

    model, *expected = step(fold=False)
    _, *received = step(fold=True)
    assert sorted(taken) == ["pad_a", "pad_a", "pad_b", "pad_b"]  # training and inference
    # a window whose maximum is 0 begins with a pad (the case where the gradient goes elsewhere)
    corner = keras.Model(model.input, model.get_layer("r1").output)(x).detach().numpy()[:, :2, :2, :]
    assert np.any(corner.max(axis=(1, 2)) == 0)
    np.testing.assert_array_equal(received[0], expected[0])
    assert set(received[1]) == set(expected[1])
    for name, want in expected[1].items():
        np.testing.assert_array_equal(received[1][name], want, err_msg=name)
    np.testing.assert_array_equal(received[2], expected[2])

    taken.clear()
    resnet = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    with internals.keras_torch_fast_path(), torch.no_grad():
        resnet(np.zeros((1, 32, 32, 3), "float32"), training=False)
    assert taken == ["pool1_pad"]
