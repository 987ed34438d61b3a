"""Every use of a private Keras, torch or Panel attribute, each behind one small function.

Nothing else in keras-ham touches a private attribute of a library. Private attributes can
change in any release, so requirements bound Keras to the tested minor versions (see
README "Installing") and `tests/test_internals.py` calls each function here on the installed
versions. When an attribute is gone, the function raises `LibraryInternalsError` naming the
attribute, the library version found and the tested range, rather than failing somewhere
deep inside a forward pass.

No library is imported at module level: `keras_ham.device` uses this module before Keras is
imported (Keras reads its device once, at import).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import types
from typing import Iterator

from keras_ham.errors import KerasHamError

#: The Keras versions these functions are tested with (requirements.txt says the same).
TESTED_KERAS = ">=3.14,<3.16"
#: The Panel versions `drop_panel_fast_theme_fonts` is tested with.
TESTED_PANEL = ">=1.5"


class LibraryInternalsError(KerasHamError, RuntimeError):
    """A private attribute keras-ham relies on is missing from the installed library."""


def _version(library: str) -> str:
    module = sys.modules.get(library)
    return str(getattr(module, "__version__", "unknown")) if module is not None else "not imported"


def _missing(attribute: str, library: str, tested: str, error: Exception | None = None) -> LibraryInternalsError:
    detail = f" ({type(error).__name__}: {error})" if error is not None else ""
    return LibraryInternalsError(
        f"{attribute} is missing from {library} {_version(library)}{detail}; keras-ham uses this private "
        f"attribute and is tested with {library}{tested}. Install a tested version, e.g. "
        f"pip install '{library}{tested}'."
    )


def _keras_private(module: str, attribute: str):
    """`module.attribute` of Keras, or LibraryInternalsError naming it."""
    import importlib

    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise _missing(f"{module}.{attribute}", "keras", TESTED_KERAS, error) from None


@contextlib.contextmanager
def _replaced(owner, name: str, replacement) -> Iterator[None]:
    """Inside the block `owner.name` (a module's or a class's own attribute) is
    `replacement(original)`; the original is back afterwards, also after an exception."""
    original = vars(owner)[name]
    setattr(owner, name, replacement(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


# --------------------------------------------------------------------------- keras: device, TensorFlow probe


def imported_keras_torch_device() -> str | None:
    """The device Keras's torch backend placed everything on, when Keras is already imported
    on that backend (`keras.src.backend.torch.core.DEFAULT_DEVICE`); None when it is not.

    Keras reads KERAS_TORCH_DEVICE once, at import; this tells whether that already happened.
    """
    core = sys.modules.get("keras.src.backend.torch.core")
    if core is None:
        return None
    try:
        return str(core.DEFAULT_DEVICE)
    except AttributeError as error:
        raise _missing("keras.src.backend.torch.core.DEFAULT_DEVICE", "keras", TESTED_KERAS, error) from None


@contextlib.contextmanager
def tensorflow_reported_unavailable() -> Iterator[bool]:
    """Inside the block, Keras's lazy `tensorflow` module says TensorFlow is not installed,
    if nobody has probed it yet (its private `_available` is None); yields whether it did.

    Keras asks that module whether TensorFlow is available (which imports it) when seeding
    and saving, whatever the backend; see `keras_ham.device.keras_without_tensorflow`.
    """
    try:
        from keras.src.utils.module_utils import tensorflow as lazy_tensorflow
    except ImportError as error:
        raise _missing("keras.src.utils.module_utils.tensorflow", "keras", TESTED_KERAS, error) from None
    if not hasattr(lazy_tensorflow, "_available"):
        raise _missing("keras.src.utils.module_utils.tensorflow._available (LazyModule)", "keras", TESTED_KERAS)
    if lazy_tensorflow._available is not None:  # already probed (or imported): leave it alone
        yield False
        return
    lazy_tensorflow._available = False
    try:
        yield True
    finally:
        lazy_tensorflow._available = None  # probed normally the next time anyone asks


# --------------------------------------------------------------------------- keras: optimizer


def per_variable_optimizer(optimizer_class: type) -> type:
    """A subclass of a Keras optimizer that updates one variable at a time.

    Keras's torch optimizers override `BaseOptimizer._backend_update_step` and
    `_apply_weight_decay` with fused `torch._foreach_*` kernels, which DirectML lacks; the
    subclass calls the generic per-variable versions of `BaseOptimizer` instead.
    """
    try:
        from keras.src.optimizers.base_optimizer import BaseOptimizer
    except ImportError as error:
        raise _missing("keras.src.optimizers.base_optimizer.BaseOptimizer", "keras", TESTED_KERAS, error) from None
    for name in ("_backend_update_step", "_apply_weight_decay"):
        if not callable(getattr(BaseOptimizer, name, None)) or not hasattr(optimizer_class, name):
            raise _missing(f"BaseOptimizer.{name}", "keras", TESTED_KERAS)

    class PerVariable(optimizer_class):
        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            BaseOptimizer._backend_update_step(self, grads, trainable_variables, learning_rate)

        def _apply_weight_decay(self, variables):
            BaseOptimizer._apply_weight_decay(self, variables)

    PerVariable.__name__ = PerVariable.__qualname__ = f"PerVariable{optimizer_class.__name__}"
    PerVariable.__doc__ = f"{optimizer_class.__name__} updating one variable at a time (no fused `_foreach` kernels)."
    return PerVariable


# --------------------------------------------------------------------------- keras: functional graph


def producing_operation(tensor):
    """The layer (operation) that produced a symbolic Keras tensor (`KerasTensor._keras_history`)."""
    try:
        return tensor._keras_history.operation
    except AttributeError as error:
        raise _missing("KerasTensor._keras_history.operation", "keras", TESTED_KERAS, error) from None


#: Devices on which the torch fast path below is used; elsewhere (DirectML, MPS: unmeasured)
#: Keras's own code runs unchanged.
FAST_PATH_DEVICES = ("cpu", "cuda")


def _eager_tensor(value) -> bool:
    """A plain torch tensor in eager mode: not a tensor subclass (the fake and functional
    tensors of torch.export and torch.compile) and not inside a compiler's trace, where
    tensors that share memory without being views cannot be traced."""
    import torch

    return type(value) is torch.Tensor and not torch.compiler.is_compiling()


@contextlib.contextmanager
def keras_torch_conv_inputs_as_views() -> Iterator[None]:
    """Inside the block, Keras's torch convolutions and poolings take a permuted NHWC view as
    their NCHW input instead of a contiguous copy
    (`keras.src.backend.torch.nn._transpose_spatial_inputs`).

    The permuted view of an NHWC tensor is already torch's channels_last layout, which torch's
    CPU and CUDA convolutions take directly; Keras 3.15 instead copies it to NCHW and then back
    to channels_last (`_maybe_convert_to_channels_last`): two copies of every activation per
    convolution. Keras adds the copy for torch.export, so the export path does not use this.
    """
    import torch

    _keras_private("keras.src.backend.torch.nn", "_transpose_spatial_inputs")

    def without_copy(original):
        def transpose(inputs):
            if inputs.ndim != 4 or inputs.device.type not in FAST_PATH_DEVICES:
                return original(inputs)
            stack = _shared_input_views()
            # Only tensors autograd tracks are shared: inference-mode tensors have no version
            # counter (`_version` raises), and without grad there is no sum to save.
            if not (stack and _eager_tensor(inputs) and inputs.requires_grad and torch.is_grad_enabled()):
                return torch.permute(inputs, (0, 3, 1, 2))
            views = stack[-1]
            seen = views.get(id(inputs))
            if seen is not None and seen[0] is inputs and seen[1] == inputs._version:
                return seen[2]
            view = torch.permute(inputs, (0, 3, 1, 2))
            views[id(inputs)] = (inputs, inputs._version, view)
            return view
        return transpose

    with _replaced(sys.modules["keras.src.backend.torch.nn"], "_transpose_spatial_inputs", without_copy):
        yield


_THREAD_STATE = threading.local()


def _shared_input_views() -> list[dict]:
    """This thread's stack (innermost last) of one table per running freeing graph walk: the
    NCHW views it gave convolutions and poolings, by the id of their NHWC input -> (input, its
    version then, view).

    A tensor read by two convolutions (a ResNet stage's input: the shortcut and the first
    convolution) then gets ONE view, so autograd sums the two input gradients before the
    permute's backward, in place, as for torchvision's channels_last tensors. With a view each,
    it summed two permuted views, which it does out of place: a new activation-sized tensor
    (ResNet50, 128 px, batch 32, a 2-core AMD EPYC: four sums, 19 ms of a step). Only in
    training (grad enabled, the input requires grad), where the convolution saves the view
    for its backward anyway, so holding it here keeps nothing alive longer; the walk drops
    its table when it ends.
    """
    stack = getattr(_THREAD_STATE, "shared_input_views", None)
    if stack is None:
        stack = _THREAD_STATE.shared_input_views = []
    return stack


def _permuted_as_new_tensor(tensor, dims):
    """`tensor.permute(dims)` as a tensor autograd does not track as a view of `tensor` (same
    memory, no copy): torch's `aten::_unsafe_view` of the permuted view, whose result autograd
    treats as a new tensor (torch uses it for the same purpose inside matmul).

    An in-place op on a view makes autograd rewrite the base's history (CopySlices), whose
    backward clones the whole gradient; on a plain tensor it costs nothing extra. Only for a
    fresh result that no autograd node saved (the output of a convolution, pooling or batch
    norm: their backward keeps the input, not the output) and that nothing else reads: the
    new tensor has its own version counter, so autograd could not see writes through it.
    Both ops and their backward run in C++; the autograd Function in Python this replaced cost
    about 20 ms of a ResNet50 step at 128 px, batch 32 (108 calls, forward and backward).
    """
    import torch

    view = tensor.permute(dims)
    return torch.ops.aten._unsafe_view(view, view.shape)


@contextlib.contextmanager
def keras_torch_spatial_outputs_as_new_tensors() -> Iterator[None]:
    """Inside the block, Keras's torch convolutions and poolings return their NHWC result as a
    plain tensor rather than a permuted view (`keras.src.backend.torch.nn._transpose_spatial_outputs`),
    so the bias add and the ReLU and residual Add after them can run in place (see
    `_permuted_as_new_tensor`; `_fast_path_conv_call`, `_in_place_elementwise`).

    Only a result that is not itself a view is converted; every caller in Keras 3.15 passes the
    fresh output of a torch convolution or pooling, whose backward saves its input only.
    """
    _keras_private("keras.src.backend.torch.nn", "_transpose_spatial_outputs")

    def as_new_tensor(original):
        def transpose(outputs):
            if (_eager_tensor(outputs) and 3 <= outputs.ndim <= 5 and outputs.device.type in FAST_PATH_DEVICES
                    and not outputs._is_view()):
                return _permuted_as_new_tensor(outputs, (0, *range(2, outputs.ndim), 1))
            return original(outputs)
        return transpose

    with _replaced(sys.modules["keras.src.backend.torch.nn"], "_transpose_spatial_outputs", as_new_tensor):
        yield


def _fast_path_conv_call(original_call):
    """`BaseConv.call` adding the bias in place to the convolution's fresh output (one full
    pass and one activation-sized allocation less per convolution); anything else (a view, a
    channels_first layer, an overridden `convolution_op`, not float32) is Keras's own call.

    The add itself is Keras's (`outputs + bias`, broadcast over the channels): results are
    bit-identical.
    """
    import torch
    from keras.src.layers.convolutional.base_conv import BaseConv

    def call(self, inputs):
        if not self.use_bias or self.data_format != "channels_last" or self.compute_dtype != "float32" \
                or type(self).convolution_op is not BaseConv.convolution_op:
            return original_call(self, inputs)
        outputs = self.convolution_op(inputs, self.kernel)
        bias = self.bias.value
        if not (_eager_tensor(outputs) and outputs.dtype == torch.float32 and not outputs._is_view()
                and outputs.device.type in FAST_PATH_DEVICES and bias.dtype == torch.float32):
            outputs = outputs + bias
        else:
            outputs.add_(bias)
        return self.activation(outputs) if self.activation is not None else outputs

    return call


@contextlib.contextmanager
def keras_torch_conv_bias_in_place() -> Iterator[None]:
    """Inside the block, Keras convolutions add their bias in place (`_fast_path_conv_call`)."""
    base_conv = _keras_private("keras.src.layers.convolutional.base_conv", "BaseConv")
    if "call" not in vars(base_conv) or not callable(getattr(base_conv, "convolution_op", None)):
        raise _missing("BaseConv.call / BaseConv.convolution_op", "keras", TESTED_KERAS)
    with _replaced(base_conv, "call", _fast_path_conv_call):
        yield


def keras_torch_conv_kernels_channels_last(model) -> int:
    """Store every `Conv2D` kernel of `model` on torch (and the optimizer's slots of the same
    shape, when it has one) in the memory order torch's channels_last convolution reads;
    return how many variables changed.

    Keras keeps a 2D kernel as (height, width, in, out). On every call its torch conv permutes
    it to (out, in, height, width) and copies it to channels_last
    (`keras.src.backend.torch.nn._maybe_convert_to_channels_last`), and autograd copies the
    gradient back to (height, width, in, out) before accumulating it: two transposing copies
    of every kernel per training step, about 90 ms forward alone for ResNet50 on one AMD EPYC
    core. Stored as (out, height, width, in) memory and viewed with the same shape, both are
    no-ops. Only strides change: shape, values, saved files and every result stay the same.
    Keras's own assignments (`assign`, `load_weights`) copy into the stored tensor, so the
    layout survives them. Uses public attributes only (`Variable.value`, torch's
    `Tensor.data`); `tests/test_internals.py` checks the copies are gone with this Keras.
    """
    import keras

    if keras.backend.backend() != "torch":
        return 0
    import torch

    def layers(layer):
        yield layer
        for child in getattr(layer, "layers", ()):
            yield from layers(child)

    kernels = [layer.kernel for layer in layers(model)
               if isinstance(layer, keras.layers.Conv2D) and layer.built and len(layer.kernel.shape) == 4]
    shapes = {tuple(kernel.shape) for kernel in kernels}
    optimizer = getattr(model, "optimizer", None)
    slots = [variable for variable in (optimizer.variables if optimizer is not None else ())
             if tuple(variable.shape) in shapes]
    changed = 0
    for variable in kernels + slots:
        value = variable.value
        if value.device.type not in FAST_PATH_DEVICES or value.dtype not in (torch.float32, torch.float16,
                                                                              torch.bfloat16):
            continue
        if value.permute(3, 2, 0, 1).is_contiguous(memory_format=torch.channels_last):
            continue
        with torch.no_grad():
            value.data = value.detach().permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
        changed += 1
    return changed


def _fused_batch_norm_call(original_call):
    """`BatchNormalization.call` computing the same function with one
    `torch.nn.functional.batch_norm` (forward and backward kernels fused by torch).

    Keras 3.15's torch BatchNormalization is five elementwise passes (mean, mean of squares,
    subtract, multiply, add), each keeping its own copy of the activation for autograd. The
    moving statistics are updated with Keras's own formula and the biased batch variance, as
    Keras does, in place (`Variable.assign` computes the same and copies it in: bit-identical;
    inside a Keras stateless scope through `assign`). Anything unusual (a mask, renorm,
    synchronized, not float32, a device outside FAST_PATH_DEVICES) goes to Keras's own call.

    `conv_bias` is the bias of the convolution whose output `inputs` is, not yet added: only
    the freeing graph walk passes it, for that output's only consumer (see
    `_conv_bias_left_to_batch_norm`). In training the bias is left out: a batch norm subtracts
    its batch's mean, so a constant per channel changes neither its output nor its variance,
    and the moving mean gets the batch mean plus the bias, as if it had been added. Its gradient
    (mathematically zero, in Keras a sum of rounding noise) is exactly zero: it enters the
    output as `beta + (bias - bias)`. Otherwise (inference, a frozen layer, anything Keras's own
    call gets) the bias is added first, as the convolution would have.
    """
    import torch
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    def keras_call_needed(self, inputs, mask) -> bool:
        return (
            mask is not None
            or getattr(self, "renorm", False)
            or getattr(self, "synchronized", False)
            or not isinstance(inputs, torch.Tensor)
            or inputs.dtype != torch.float32
            or self.compute_dtype != "float32"
            or inputs.ndim < 2
            or inputs.device.type not in FAST_PATH_DEVICES
        )

    def bias_left_out(self, inputs, training, conv_bias) -> bool:
        """Whether this call trains on its batch over the last axis, where the bias changes nothing."""
        channels = inputs.shape[-1]
        return (
            bool(training and self.trainable)
            and self.axis % inputs.ndim == inputs.ndim - 1
            and conv_bias.shape == (channels,)
            and inputs.numel() // max(channels, 1) >= 2
        )

    def call(self, inputs, training=None, mask=None, conv_bias=None):
        keras_call = keras_call_needed(self, inputs, mask)
        if conv_bias is not None and (keras_call or not bias_left_out(self, inputs, training, conv_bias)):
            inputs, conv_bias = _add_conv_bias(inputs, conv_bias), None
        if keras_call:
            return original_call(self, inputs, training=training, mask=mask)
        axis = self.axis % inputs.ndim
        order = [0, axis] + [i for i in range(1, inputs.ndim) if i != axis]
        inverse = sorted(range(inputs.ndim), key=order.__getitem__)
        x = inputs.permute(order)
        channels = x.shape[1]
        count = x.numel() // max(channels, 1)
        training = bool(training and self.trainable)
        if training and count < 2:  # torch refuses one value per channel; Keras gives variance 0
            return original_call(self, inputs, training=True, mask=mask)
        gamma = self.gamma.value if self.scale else None
        beta = self.beta.value if self.center else None
        if conv_bias is not None:  # in the graph with a gradient of exactly zero (see above)
            tie = conv_bias - conv_bias
            beta = tie if beta is None else beta + tie
        if training:
            batch_mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
            batch_variance = torch.ones(channels, dtype=x.dtype, device=x.device)
            # momentum=1.0 makes torch write this batch's mean and unbiased variance into them.
            outputs = torch.nn.functional.batch_norm(
                x, batch_mean, batch_variance, gamma, beta, training=True, momentum=1.0, eps=self.epsilon
            )
            biased_variance = batch_variance * ((count - 1) / count)
            if conv_bias is not None:
                batch_mean = batch_mean + conv_bias.detach()  # the mean the biased output would have had
            momentum = self.momentum
            stateless = in_stateless_scope()  # there Keras records new values instead of writing them
            for moving, batch_value in ((self.moving_mean, batch_mean), (self.moving_variance, biased_variance)):
                if stateless:
                    moving.assign(moving.value * momentum + batch_value * (1.0 - momentum))
                else:  # what `assign` computes and copies in, written in place (ResNet50: 106 assigns less)
                    with torch.no_grad():
                        moving.value.mul_(momentum).add_(batch_value * (1.0 - momentum))
        else:
            outputs = torch.nn.functional.batch_norm(
                x, self.moving_mean.value, self.moving_variance.value, gamma, beta, training=False, eps=self.epsilon
            )
        if outputs._is_view() or not _eager_tensor(outputs):
            return outputs.permute(inverse)
        return _permuted_as_new_tensor(outputs, tuple(inverse))  # so a ReLU after it runs in place

    call.takes_conv_bias = True
    return call


def _add_conv_bias(outputs, bias):
    """`outputs + bias` as the fast path's convolution adds it: in place on its fresh output."""
    import torch

    if _eager_tensor(outputs) and not outputs._is_view() and outputs.dtype == bias.dtype == torch.float32:
        return outputs.add_(bias)
    return outputs + bias


@contextlib.contextmanager
def keras_torch_fused_batch_norm() -> Iterator[None]:
    """Inside the block, `keras.layers.BatchNormalization` on torch runs as one fused torch
    batch norm (see `_fused_batch_norm_call`); the layer, its weights and saved files are
    unchanged."""
    import keras

    batch_norm = keras.layers.BatchNormalization
    if "call" not in vars(batch_norm):
        raise _missing("BatchNormalization.call", "keras", TESTED_KERAS)
    arguments = inspect.signature(batch_norm.__init__).parameters
    missing = [name for name in ("axis", "momentum", "epsilon", "center", "scale") if name not in arguments]
    if missing:
        raise _missing(f"BatchNormalization({', '.join(missing)}=...)", "keras", TESTED_KERAS)
    with _replaced(batch_norm, "call", _fused_batch_norm_call):
        yield


def _affine_transform_by_grid_sample(original):
    """`keras.src.backend.torch.image.affine_transform` as one `torch.nn.functional.grid_sample`
    for what keras-ham's augmentation asks (bilinear, fill_mode "reflect", a float32 NHWC batch,
    no projective terms); anything else goes to Keras's own.

    Keras 3.15 computes each output value from eight gathered neighbours per image, in a
    Python loop over the batch: a RandomRotation of 16 images at 128 px took 87 ms against
    6 ms for grid_sample (2-core AMD EPYC, idle; README "Performance"). Bilinear interpolation of
    half-sample-reflected neighbours is the same piecewise-linear function as grid_sample's
    reflection about the pixel edges (`align_corners=False`), so the result is the same.
    """
    import torch

    def affine_transform(images, transform, interpolation="bilinear", fill_mode="constant", fill_value=0,
                         data_format=None):
        import keras

        if (
            not isinstance(images, torch.Tensor)
            or images.ndim != 4
            or images.dtype != torch.float32
            or images.device.type not in FAST_PATH_DEVICES
            or interpolation != "bilinear"
            or fill_mode != "reflect"
            or (data_format or keras.config.image_data_format()) != "channels_last"
        ):
            return original(images, transform, interpolation=interpolation, fill_mode=fill_mode,
                            fill_value=fill_value, data_format=data_format)
        matrix = torch.as_tensor(transform, dtype=torch.float32, device=images.device)
        if matrix.ndim == 1:
            matrix = matrix.unsqueeze(0)
        if matrix.shape[-1] != 8 or bool(torch.any(matrix[:, 6:] != 0)):
            return original(images, transform, interpolation=interpolation, fill_mode=fill_mode,
                            fill_value=fill_value, data_format=data_format)
        batch, height, width, _ = images.shape
        matrix = matrix.expand(batch, 8) if matrix.shape[0] == 1 else matrix
        rows = torch.arange(height, dtype=torch.float32, device=images.device).view(1, height, 1)
        columns = torch.arange(width, dtype=torch.float32, device=images.device).view(1, 1, width)
        a0, a1, a2, b0, b1, b2 = (matrix[:, i].view(batch, 1, 1) for i in range(6))
        source_x = a0 * columns + a1 * rows + a2  # Keras: output (x, y) reads input (x', y')
        source_y = b0 * columns + b1 * rows + b2
        grid = torch.stack([(2 * source_x + 1) / width - 1, (2 * source_y + 1) / height - 1], dim=-1)
        sampled = torch.nn.functional.grid_sample(
            images.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
        return sampled.permute(0, 2, 3, 1)

    return affine_transform


@contextlib.contextmanager
def keras_torch_affine_transform_by_grid_sample() -> Iterator[None]:
    """Inside the block, Keras's torch `affine_transform` (RandomRotation, RandomZoom,
    RandomTranslation...) runs as one grid_sample where it computes the same function (see
    `_affine_transform_by_grid_sample`)."""
    _keras_private("keras.src.backend.torch.image", "affine_transform")
    with _replaced(sys.modules["keras.src.backend.torch.image"], "affine_transform", _affine_transform_by_grid_sample):
        yield


#: sha256 of the source of `keras.src.ops.function.Function._run_through_graph` in the Keras
#: versions whose graph walk `_graph_walk_freeing_intermediates` reproduces, by version.
#: Another source means Keras changed the walk: Keras's own then runs (correct, more memory).
REPRODUCED_GRAPH_WALKS = {
    "5647b6f0591c07aad94eed31cd55cd95e55ed20e258b44503c8e891a8503be08": "3.15.1",
}


def _source_fingerprint(module: str, owner: str, method_name: str) -> str | None:
    """sha256 of the source of Keras's `module.owner.method_name` as installed (defined on
    `owner` itself); None when the source is unreadable."""
    import hashlib

    method = _keras_private(module, owner).__dict__.get(method_name)
    if method is None:
        raise _missing(f"{owner}.{method_name}", "keras", TESTED_KERAS)
    try:
        return hashlib.sha256(inspect.getsource(method).encode()).hexdigest()
    except (OSError, TypeError):
        return None


@contextlib.contextmanager
def _replaced_if_reproduced(owner: type, name: str, fingerprint: str | None, reproduced: dict,
                            replacement) -> Iterator[bool]:
    """Inside the block `owner.name` is `replacement(original)` when `fingerprint` (of the
    installed source) is in `reproduced`, else untouched; yields whether it was replaced."""
    if fingerprint not in reproduced:
        yield False
        return
    with _replaced(owner, name, replacement):
        yield True


@functools.cache
def keras_graph_walk_fingerprint() -> str | None:
    """sha256 of the installed `Function._run_through_graph` source; None when unreadable.
    Computed once per process (0.8 ms: the fast path is entered per Predictor batch)."""
    return _source_fingerprint("keras.src.ops.function", "Function", "_run_through_graph")


def _in_place_elementwise():
    """The function the freeing walk asks before running a node: for a ReLU `Activation` or a
    two-input `Add` whose input dies there, it computes the node in place and returns the
    result; otherwise None (the walk calls the layer as Keras does).

    torchvision's ResNet runs its ReLUs and residual adds in place; Keras allocates a new
    activation for each, and on CPU a fresh large allocation costs more than the op (a 100 MB
    tensor: 40 ms for `a + b`, 7 ms for `a += b`, on a 2-core AMD EPYC). In place only when
    all of these hold, so no other reader or autograd node can see the write:
    - this node is the input's only consumer (an earlier one may have saved it for its
      backward), and the input is neither a model input nor an output;
    - the input was produced by a `BatchNormalization`, a `Conv2D` without activation or an
      `Add` (their backward does not keep their output) and is not a torch view;
    - float32 torch tensors on a FAST_PATH_DEVICES device, no Keras mask, same shapes.
    The arithmetic is the same op as Keras's (`relu`, `a + b`): results are bit-identical.
    """
    import keras
    import torch

    fresh_producers = (keras.layers.BatchNormalization, keras.layers.Conv2D, keras.layers.Add)
    linear = keras.activations.get("linear")
    relu = keras.activations.get("relu")

    def writable(x, value, uses, kept, producers) -> bool:
        producer = producers.get(id(x))
        return (
            uses.get(id(x)) == 1
            and id(x) not in kept
            and type(producer) in fresh_producers
            and (not isinstance(producer, keras.layers.Conv2D) or producer.activation in (None, linear))
            and _eager_tensor(value)
            and value.dtype == torch.float32
            and value.device.type in FAST_PATH_DEVICES
            and not value._is_view()
            and getattr(value, "_keras_mask", None) is None
        )

    def in_place(operation, inputs, tensor_dict, uses, kept, producers):
        is_relu = type(operation) is keras.layers.Activation and operation.activation is relu
        is_add = type(operation) is keras.layers.Add and len(inputs) == 2
        if not (is_relu or is_add) or operation.compute_dtype != "float32":
            return None
        values = [tensor_dict[id(x)] for x in inputs]
        if is_relu:
            return torch.relu_(values[0]) if writable(inputs[0], values[0], uses, kept, producers) else None
        a, b = values
        if not (_eager_tensor(a) and _eager_tensor(b) and a.shape == b.shape
                and a.dtype == b.dtype and getattr(b, "_keras_mask", None) is None
                and getattr(a, "_keras_mask", None) is None):
            return None
        if writable(inputs[0], a, uses, kept, producers):
            return a.add_(b)
        if writable(inputs[1], b, uses, kept, producers):
            return b.add_(a)
        return None

    return in_place


#: sha256 of Keras's `Layer.__call__` and `Operation.__call__` sources whose effect on a plain
#: layer `_direct_layer_call` reproduces -> the Keras version they were read from.
REPRODUCED_LAYER_CALLS = {
    ("4fb7e42e4ffd9b1ab8d23006c049981364609973d18a066a27547c29c1c31754",
     "54fc9fcb8839877d91d0d0c17672c579721ba28d9f5151106f58dc7b41b8c0ae"): "3.15.1",
}

#: Layers whose `call` the freeing walk may run without `Layer.__call__` (exact types: a
#: subclass may rely on what `__call__` does), and those of them that take `training`.
_DIRECT_CALL_LAYERS = ("Conv2D", "DepthwiseConv2D", "BatchNormalization", "Activation", "Add", "Multiply",
                       "ZeroPadding2D", "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "Dense",
                       "Dropout")
_TRAINING_LAYERS = ("BatchNormalization", "Dropout")
#: torch runs a module's hooks from `Module.__call__`; a layer with any goes through it.
_TORCH_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_TORCH_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                       "_global_backward_pre_hooks")


@functools.cache
def keras_layer_call_fingerprint() -> tuple[str | None, str | None]:
    """sha256 of the installed `Layer.__call__` and `Operation.__call__` sources."""
    return (_source_fingerprint("keras.src.layers.layer", "Layer", "__call__"),
            _source_fingerprint("keras.src.ops.operation", "Operation", "__call__"))


def _direct_call_rules():
    """What `_direct_layer_call` and `_conv_bias_left_to_batch_norm` check before they run a
    layer's `call` without `Layer.__call__`: `arguments(operation, args, kwargs)` gives (the one
    input, the `training` its node recorded) for a plain layer called plainly, else None;
    `training(recorded)` gives `training` as Keras would resolve it for a layer that takes it,
    or UNRESOLVED (no call context: Keras's own call decides). None when the installed
    `Layer.__call__` is not one in REPRODUCED_LAYER_CALLS."""
    import keras
    import torch
    from keras.src import backend
    from keras.src.backend.common import global_state
    from keras.src.distribution import distribution_lib
    from torch.nn.modules import module as torch_module

    if keras_layer_call_fingerprint() not in REPRODUCED_LAYER_CALLS:
        return None
    direct_types = {getattr(keras.layers, name) for name in _DIRECT_CALL_LAYERS}
    training_types = {getattr(keras.layers, name) for name in _TRAINING_LAYERS}
    unknown = object()  # a missing hook attribute counts as a hook

    def plain_tensor(x) -> bool:
        return _eager_tensor(x) and x.dtype == torch.float32 and getattr(x, "_keras_mask", None) is None

    def plain_layer(operation) -> bool:
        return (
            operation.built
            and operation.dtype_policy.name == "float32"
            and operation.activity_regularizer is None
            and getattr(operation, "quantization_mode", None) is None
            and not getattr(operation, "_remat_mode", unknown)
            and not any(getattr(operation, name, unknown) for name in _TORCH_MODULE_HOOKS)
        )

    def arguments(operation, args, kwargs):
        kind = type(operation)
        if kind not in direct_types or len(args) != 1 or not plain_layer(operation):
            return None
        extra = dict(kwargs)
        if extra.pop("mask", None) is not None:  # the symbolic call recorded `mask=None`
            return None
        recorded_training = extra.pop("training", None)  # and the default `training`
        if extra or (recorded_training is not None and kind not in training_types):
            return None
        (x,) = args
        if not (all(plain_tensor(t) for t in x) if isinstance(x, list) else plain_tensor(x)):
            return None
        if (backend.get_autocast_scope() is not None or distribution_lib.distribution() is not None
                or any(getattr(torch_module, name, unknown) for name in _TORCH_GLOBAL_HOOKS)):
            return None
        return x, recorded_training

    def training(recorded_training):
        context = global_state.get_global_attribute("current_call_ctx")
        if context is None:
            return UNRESOLVED
        # Keras: the model's `training` (its call context) overrides the recorded one.
        value = context.get_value("training")
        return recorded_training if value is None else value

    return types.SimpleNamespace(arguments=arguments, training=training, training_types=training_types)


#: `training` that only Keras's own `Layer.__call__` can resolve.
UNRESOLVED = object()


def _direct_layer_call():
    """The function the freeing walk asks before calling a layer: for a plain float32 layer
    it returns `layer.call(inputs[, training])`, what Keras's `Layer.__call__` would end up
    running, and otherwise None (the walk calls the layer as Keras does).

    `Layer.__call__` on torch converts and checks its inputs, resolves `training`, opens a
    name scope, checks autocast, distribution and masks, then goes through torch's
    `Module.__call__` and `Operation.__call__`: for ResNet50's 175 layers that was about 20 ms
    of a training step (2-core AMD EPYC, 128 px, batch 32: `train_on_batch` 0.95x -> 0.965x
    torchvision). For the layers below none of it changes the result, and none of it runs
    here: a layer type in `_DIRECT_CALL_LAYERS` (exactly), built, float32 policy, no activity
    regularizer, quantization or rematerialization, no torch hooks; float32 eager tensors
    without Keras masks as the one positional argument; no keyword arguments in the node but
    the `mask=None` and `training` its symbolic call recorded; no autocast scope or
    distribution; `training` as Keras resolves it: the model's (read from the call context its
    own `__call__` opened), else the recorded one (no context: Keras's call). Only when the
    installed `Layer.__call__` and `Operation.__call__` are the ones in REPRODUCED_LAYER_CALLS.
    """
    rules = _direct_call_rules()
    if rules is None:
        return lambda operation, args, kwargs, **extra: None

    def direct(operation, args, kwargs, **extra):
        """`extra`: keywords for the layer's call that its node does not hold (a left conv bias)."""
        checked = rules.arguments(operation, args, kwargs)
        if checked is None:
            return None
        x, recorded_training = checked
        if type(operation) in rules.training_types:
            training = rules.training(recorded_training)
            if training is UNRESOLVED:
                return None
            if training is not None:
                extra["training"] = training
        return operation.call(x, **extra)

    return direct


def _only_reader(node, uses, kept, readers):
    """The node that alone reads `node`'s one output, and reads nothing else; None when that
    output has other readers, is a model input or output, or `node` has several outputs.
    `readers`: a tensor's last reading node, by id (the walk's `reader`)."""
    (x,) = node.outputs if len(node.outputs) == 1 else (None,)
    if x is None or uses.get(id(x)) != 1 or id(x) in kept:
        return None
    reader = readers.get(id(x))
    return reader if reader is not None and [id(t) for t in reader.input_tensors] == [id(x)] else None


def _conv_bias_left_to_batch_norm():
    """The function the freeing walk asks before running a `Conv2D` node: when the node's output
    goes only to a `BatchNormalization` that can take the bias (see `_fused_batch_norm_call`),
    it runs the convolution without adding its bias and returns (output, bias); otherwise None.
    The walk then hands the bias to that batch norm's direct call (`_direct_layer_call`).

    keras.applications' ResNet50 has a bias in each of its 53 convolutions, each followed by a
    batch norm; torchvision's has none (a batch norm in training removes a constant per
    channel). On CPU, adding the bias to the activation and summing its gradient took 3.7 % of
    a training step (ResNet50, 128 px, batch 32, 2-core AMD EPYC family 26, 2 threads:
    `train_on_batch` 1,091 ms without this rule, 1,056 ms with it, 8 settled interleaved steps).
    Only where the direct calls run (same checks as `_direct_layer_call`): an exact `Conv2D`,
    linear, channels_last, float32, a float32 bias on a FAST_PATH_DEVICES device; its output
    is read by that one node only and is no model output; the consumer is an exact
    `BatchNormalization` over the last axis whose call is the fused one. Whether the batch norm
    then trains on its batch (and leaves the bias out) or adds it is decided in its call.
    """
    import keras
    import torch

    rules = _direct_call_rules()
    if rules is None:
        return lambda *args: None
    linear = keras.activations.get("linear")

    def takes_bias(node, uses, kept, consumers) -> bool:
        consumer = _only_reader(node, uses, kept, consumers)
        return (
            consumer is not None and type(consumer.operation) is keras.layers.BatchNormalization
            and getattr(type(consumer.operation).call, "takes_conv_bias", False)
            and consumer.operation.axis in (-1, len(node.outputs[0].shape) - 1)
        )

    def leave_bias(operation, node, args, kwargs, uses, kept, consumers):
        if type(operation) is not keras.layers.Conv2D or not operation.use_bias \
                or operation.activation not in (None, linear) or operation.data_format != "channels_last":
            return None
        checked = rules.arguments(operation, args, kwargs)
        if checked is None or not takes_bias(node, uses, kept, consumers):
            return None
        x, _ = checked
        bias = operation.bias.value
        if not (bias.dtype == torch.float32 and bias.device == x.device and x.device.type in FAST_PATH_DEVICES):
            return None
        return operation.convolution_op(x, operation.kernel), bias

    return leave_bias


def _zero_padding_left_to_max_pool():
    """The functions the freeing walk asks about a `ZeroPadding2D` node and the `MaxPooling2D`
    reading it: `leave(...)` gives the padding (rows, columns on each side) when the walk may
    skip the padding and let the pooling pad (else None); `pool(operation, args, kwargs, padding)`
    then runs the pooling on the unpadded input as one `max_pool2d` with that padding (None:
    Keras's own call must run it, after the padding).

    keras.applications' ResNet50 pads its first ReLU's output with zeros and max-pools it
    (pool1_pad, pool1_pool), as a torch max pool does with `padding=1`, except that torch pads
    with -inf. A ReLU's output is never below zero, and every 3x3 window holds at least one
    real value, so each maximum is the same value. The gradient differs only where a window's
    maximum is 0 and a pad comes first in it: Keras's call routes it to the pad, torch's to a
    zero of the ReLU, whose backward multiplies it by 0. So outputs and every weight's gradient
    are bit-identical (tested). Keras's padding copies the activation and its backward copies
    the gradient back out: fold against Keras's two layers, pad + pool + ReLU forward and
    backward, 50 -> 28 ms (32 x 64 x 64 x 64, 2-core AMD EPYC family 26, 2 threads).

    Only where the direct calls run (same checks as `_direct_layer_call`) and when: exact
    `ZeroPadding2D` and `MaxPooling2D`, channels_last, 4-D float32 on a FAST_PATH_DEVICES
    device; the padding's input comes from an `Activation("relu")` or a `ReLU()` with default
    arguments; its output is read by the pooling only and is no model output; the pooling is
    "valid" with a symmetric padding of at most half its window (what torch accepts).
    """
    import keras
    import torch

    rules = _direct_call_rules()
    if rules is None:
        return types.SimpleNamespace(leave=lambda *args: None, pool=lambda *args: None)
    relu = keras.activations.get("relu")

    def never_negative(producer) -> bool:
        if type(producer) is keras.layers.Activation:
            return producer.activation is relu
        return (type(producer) is keras.layers.ReLU and producer.max_value is None
                and producer.negative_slope == 0 and producer.threshold == 0)

    def pooling(node, uses, kept, consumers):
        consumer = _only_reader(node, uses, kept, consumers)
        pool = consumer.operation if consumer is not None else None
        if type(pool) is not keras.layers.MaxPooling2D or pool.data_format != "channels_last" \
                or str(pool.padding).lower() != "valid":
            return None
        return pool

    def leave(operation, node, args, kwargs, uses, kept, consumers, producers):
        if type(operation) is not keras.layers.ZeroPadding2D or operation.data_format != "channels_last" \
                or len(node.input_tensors) != 1 or not never_negative(producers.get(id(node.input_tensors[0]))):
            return None
        pool = pooling(node, uses, kept, consumers)
        (top, bottom), (left, right) = operation.padding
        if pool is None or top != bottom or left != right \
                or top > pool.pool_size[0] // 2 or left > pool.pool_size[1] // 2:
            return None
        checked = rules.arguments(operation, args, kwargs)
        if checked is None or checked[0].ndim != 4 or checked[0].device.type not in FAST_PATH_DEVICES:
            return None
        return top, left

    def pool(operation, args, kwargs, padding):
        checked = rules.arguments(operation, args, kwargs)
        if checked is None:
            return None
        x, _ = checked
        outputs = torch.nn.functional.max_pool2d(x.permute(0, 3, 1, 2), operation.pool_size, operation.strides,
                                                 padding=padding)
        if outputs._is_view() or not _eager_tensor(outputs):
            return outputs.permute(0, 2, 3, 1)
        return _permuted_as_new_tensor(outputs, (0, 2, 3, 1))  # as Keras's pooling returns it here

    return types.SimpleNamespace(leave=leave, pool=pool)


def _graph_walk_freeing_intermediates(original):
    """`Function._run_through_graph` as Keras 3.15 walks it, except that each intermediate
    tensor is dropped as soon as its last consumer has run.

    Keras keeps every layer's output in the walk's `tensor_dict` until the whole forward pass
    ends; torch then cannot free the outputs autograd does not save (every BatchNormalization
    and Add output of a ResNet), so a training step's peak holds about one extra activation
    per layer. A ReLU or residual Add whose input dies there runs in place
    (`_in_place_elementwise`), plain layers are called directly (`_direct_layer_call`), a
    convolution read only by a batch norm leaves its bias to it (`_conv_bias_left_to_batch_norm`),
    and a ReLU's zero padding read only by a max pool leaves the padding to it
    (`_zero_padding_left_to_max_pool`).
    Symbolic walks (`call_fn`) go to Keras's own.
    """
    from keras.src import tree

    in_place = _in_place_elementwise()
    direct_call = _direct_layer_call()
    leave_conv_bias = _conv_bias_left_to_batch_norm()
    paddings = _zero_padding_left_to_max_pool()

    def walk(self, inputs, operation_fn=lambda op: op, call_fn=None):
        if call_fn is not None:
            return original(self, inputs, operation_fn=operation_fn, call_fn=call_fn)
        stack = _shared_input_views()
        stack.append({})
        try:
            return walk_freeing(self, inputs, operation_fn)
        finally:
            stack.pop()

    def walk_freeing(self, inputs, operation_fn):
        inputs = tree.flatten(inputs)
        tensor_dict = {id(x): y for x, y in zip(self.inputs, inputs)}
        nodes = [
            node
            for depth in sorted(self._nodes_by_depth.keys(), reverse=True)
            for node in self._nodes_by_depth[depth]
            if node.operation and not node.is_input
        ]
        consumers: dict[int, int] = {}
        reader: dict[int, object] = {}  # a tensor's last reading node (its only one where consumers == 1)
        for node in nodes:
            for x in node.input_tensors:
                consumers[id(x)] = consumers.get(id(x), 0) + 1
                reader[id(x)] = node
        left_biases: dict[int, object] = {}  # a convolution output -> its bias, for the batch norm reading it
        left_paddings: dict[int, tuple] = {}  # a padding's output -> (the padding layer, its padding)
        uses = dict(consumers)  # in place only on a tensor with ONE consumer: earlier ones may have saved it
        kept = {id(x) for x in self.outputs} | {id(x) for x in self.inputs}
        producers = {id(x): node.operation for node in nodes for x in node.outputs}
        for node in nodes:
            if any(id(x) not in tensor_dict for x in node.input_tensors):
                continue  # not computable, as in Keras: its inputs stay
            operation = self._get_operation_for_node(node)
            outputs = in_place(operation, node.input_tensors, tensor_dict, uses, kept, producers)
            if outputs is None:
                args, kwargs = node.arguments.fill_in(tensor_dict)
                first = id(node.input_tensors[0]) if node.input_tensors else None
                bias = left_biases.pop(first, None)
                padded = left_paddings.pop(first, None)
                if bias is not None:
                    outputs = direct_call(operation, args, kwargs, conv_bias=bias)
                    if outputs is None:  # Keras's own call: the bias first, as the convolution adds it
                        args = (_add_conv_bias(args[0], bias),)
                elif padded is not None:  # args hold the unpadded input
                    outputs = paddings.pool(operation, args, kwargs, padded[1])
                    if outputs is None:  # Keras's own call: the padding first
                        args = (operation_fn(padded[0])(args[0]),)
                elif (left := leave_conv_bias(operation, node, args, kwargs, uses, kept, reader)) is not None:
                    outputs, left_biases[id(node.outputs[0])] = left
                elif (padding := paddings.leave(operation, node, args, kwargs, uses, kept, reader,
                                                producers)) is not None:
                    outputs = args[0]  # stands for the padded output until the pooling reads it
                    left_paddings[id(node.outputs[0])] = (operation, padding)
                else:
                    outputs = direct_call(operation, args, kwargs)
                if outputs is None:
                    outputs = operation_fn(operation)(*args, **kwargs)
                del args, kwargs
            for x, y in zip(node.outputs, tree.flatten(outputs)):
                tensor_dict[id(x)] = y
            del outputs
            for x in node.input_tensors:
                consumers[id(x)] -= 1
                if consumers[id(x)] == 0 and id(x) not in kept:
                    tensor_dict.pop(id(x), None)
        output_tensors = []
        for i, x in enumerate(self.outputs):
            if id(x) not in tensor_dict:
                path = ".".join(str(p) for p in tree.flatten_with_path(self._outputs_struct)[i][0])
                raise ValueError(f"Output with path `{path}` is not connected to `inputs`")
            output_tensors.append(tensor_dict[id(x)])
        return tree.pack_sequence_as(self._outputs_struct, output_tensors)

    return walk


@contextlib.contextmanager
def keras_functional_frees_intermediates() -> Iterator[bool]:
    """Inside the block, functional models free each layer's output after its last use (see
    `_graph_walk_freeing_intermediates`); yields whether it is in effect. Only when the
    installed walk is one in REPRODUCED_GRAPH_WALKS (it uses the same private attributes as
    that walk: `_nodes_by_depth`, `_get_operation_for_node`, `_outputs_struct`, `Node.arguments`),
    otherwise Keras's own runs unchanged."""
    function = _keras_private("keras.src.ops.function", "Function")
    with _replaced_if_reproduced(function, "_run_through_graph", keras_graph_walk_fingerprint(),
                                 REPRODUCED_GRAPH_WALKS, _graph_walk_freeing_intermediates) as in_effect:
        yield in_effect


#: sha256 of Keras's torch `Adam._parallel_update_step` source whose arithmetic
#: `_adam_step_tensor_by_tensor` reproduces -> the Keras version it was read from.
REPRODUCED_ADAM_STEPS = {
    "8034ae3d81d00f24da9c9a5d4dce70eb8c7fbc9d5c7cead8bd3b0111bcb1a8f5": "3.15.1",
}


@functools.cache
def keras_torch_adam_step_fingerprint() -> str | None:
    """sha256 of the installed `keras.src.backend.torch.optimizers.torch_adam.Adam._parallel_update_step`
    source; None when unreadable."""
    return _source_fingerprint("keras.src.backend.torch.optimizers.torch_adam", "Adam", "_parallel_update_step")


class _ScratchPair:
    """Two temporaries shaped and strided like the tensor asked for, views into two flat
    buffers of `size` elements: the Adam step writes its temporaries there (`out=`) instead
    of allocating fresh memory for each variable."""

    def __init__(self, size: int, dtype, device):
        import torch

        self.buffers = [torch.empty(size, dtype=dtype, device=device) for _ in range(2)]

    def like(self, tensor):
        import torch

        buffer = self.buffers[0]
        if tensor.dtype != buffer.dtype or tensor.device != buffer.device or tensor.numel() > buffer.numel() \
                or not _dense(tensor):
            return torch.empty_like(tensor), torch.empty_like(tensor)
        size = tensor.numel()
        return tuple(buffer[:size].as_strided(tensor.shape, tensor.stride()) for buffer in self.buffers)


#: Elements of one piece of a large variable in the Adam step (4 MB of float32): all its
#: passes run on a piece while it is still in the CPU's cache.
ADAM_CHUNK = 1 << 20


def _chunks(*tensors):
    """The tensors (one shape, the same dense strides) as matching flat pieces of at most
    ADAM_CHUNK elements in memory order; the tensors themselves when they are smaller or
    their layouts differ."""
    first = tensors[0]
    size = first.numel()
    if size <= ADAM_CHUNK or not _dense(first) or any(t.stride() != first.stride() for t in tensors[1:]):
        return [tensors]
    flats = [t.as_strided((size,), (1,), t.storage_offset()) for t in tensors]
    return [tuple(flat[start:start + ADAM_CHUNK] for flat in flats) for start in range(0, size, ADAM_CHUNK)]


def _dense(tensor) -> bool:
    """Whether the tensor's elements fill its memory span exactly (a permutation of a
    contiguous layout), so a flat buffer of `numel` elements can hold it with its strides."""
    dims = sorted((stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _adam_step_tensor_by_tensor(original):
    """Keras 3.15's torch Adam (and AdamW) update with the same arithmetic, one variable at a
    time.

    Keras's step runs `torch._foreach_*` ops that return new lists (`g * g`, `sqrt(v)`,
    `+ epsilon`, `m * alpha`, the quotient): five model-sized temporaries per step, 94 MB each
    for ResNet50, every one freshly allocated. On a 2-core AMD EPYC (64 px, batch 8) the
    optimizer took 166 ms of a 550 ms step. On CPU a foreach op is a loop over the tensors
    anyway; one tensor at a time, the temporaries are at most one kernel's size, and they are
    written (`out=`) into two buffers reused for every variable (`_ScratchPair`): ResNet50's
    step, gradients in the kernels' layout, same machine: 71 -> 65 ms with 2 threads, 93 -> 70
    ms with 1 (torch's AdamW: 63 and 76 ms). A variable over ADAM_CHUNK elements is updated
    piece by piece (`_chunks`), so its ten passes read a piece from cache rather than memory:
    another 6-10 ms (2 threads, 4 interleaved runs of 20 steps; pieces of 2^16 to 2^21
    elements measured, 2^20 best). The ops and their order are Keras's, element by element, so
    the results are bit-identical (tested). AMSGrad goes to Keras's own.
    """
    import torch
    from keras.src import ops

    def step(self, grads, variables, learning_rate):
        if self.amsgrad:
            return original(self, grads, variables, learning_rate)
        keras_variables = variables
        variables = [v.value for v in variables]
        dtype = variables[0].dtype
        lr = ops.cast(learning_rate, dtype)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1_power = ops.power(ops.cast(self.beta_1, dtype), local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, dtype), local_step)
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        scratch = _ScratchPair(min(max(variable.numel() for variable in variables), ADAM_CHUNK),
                               dtype, variables[0].device)
        for keras_variable, variable, grad in zip(keras_variables, variables, grads):
            index = self._get_variable_index(keras_variable)
            for variable_part, m, v, grad_part in _chunks(variable, self._momentums[index].value,
                                                          self._velocities[index].value, grad):
                first, second = scratch.like(variable_part)
                m.mul_(self.beta_1)
                m.add_(grad_part, alpha=1 - self.beta_1)
                v.mul_(self.beta_2)
                v.add_(torch.mul(grad_part, grad_part, out=first), alpha=1 - self.beta_2)
                denominator = torch.sqrt(v, out=first).add_(self.epsilon)
                variable_part.add_(torch.mul(m, alpha, out=second).div_(denominator), alpha=-1)

    return step


@contextlib.contextmanager
def keras_torch_adam_tensor_by_tensor() -> Iterator[bool]:
    """Inside the block, Keras's torch Adam and AdamW update tensor by tensor (see
    `_adam_step_tensor_by_tensor`); yields whether it is in effect: only when the installed
    step is one in REPRODUCED_ADAM_STEPS (it reads the same private attributes as that step:
    `_momentums`, `_velocities`, `_get_variable_index`), otherwise Keras's own runs."""
    adam = _keras_private("keras.src.backend.torch.optimizers.torch_adam", "Adam")
    with _replaced_if_reproduced(adam, "_parallel_update_step", keras_torch_adam_step_fingerprint(),
                                 REPRODUCED_ADAM_STEPS, _adam_step_tensor_by_tensor) as in_effect:
        yield in_effect


@contextlib.contextmanager
def keras_torch_fast_path() -> Iterator[None]:
    """The torch-backend speed-ups above together; nothing on other backends.

    Used around training and the Keras inference engine. Measured on a 2-core AMD EPYC,
    ResNet50 at 128 px, batch 16: see README "Performance".
    """
    import keras

    if keras.backend.backend() != "torch":
        yield
        return
    with (
        keras_torch_conv_inputs_as_views(),
        keras_torch_spatial_outputs_as_new_tensors(),
        keras_torch_conv_bias_in_place(),
        keras_torch_fused_batch_norm(),
        keras_functional_frees_intermediates(),
        keras_torch_affine_transform_by_grid_sample(),
        keras_torch_adam_tensor_by_tensor(),
    ):
        yield


# --------------------------------------------------------------------------- panel


def drop_panel_fast_theme_fonts() -> None:
    """Remove the web-font stylesheet (Google Fonts) from Panel's Fast design
    (`panel.theme.Fast._resources["font"]`), so the page contacts no third party."""
    import panel as pn

    try:
        resources = pn.theme.Fast._resources
    except AttributeError as error:
        raise _missing("panel.theme.Fast._resources", "panel", TESTED_PANEL, error) from None
    if not isinstance(resources, dict):
        raise _missing("panel.theme.Fast._resources (a dict)", "panel", TESTED_PANEL)
    pn.theme.Fast._resources = {kind: value for kind, value in resources.items() if kind != "font"}
