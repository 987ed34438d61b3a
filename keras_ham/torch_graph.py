"""`TorchInferenceGraph`: a Keras functional model executed with plain torch ops, for inference.

Why this exists (measured with `scripts/bench.py`, see README "Performance"): calling a
Keras model on torch makes two copies of every activation per convolution (NHWC ->
contiguous NCHW -> channels_last) and runs BatchNorm as its own op. Executing the same
graph with torch ops on channels_last storage and BatchNorm folded into the convolution
ran a ResNet50 2.4-2.6x faster than the Keras call on a 2-core CPU. The maintained engines
compared with it in the benchmark (ONNX Runtime on the exported file, `torch.compile` of
the Keras model) are reported there; README "Performance" says why this graph is kept.

The private Keras attributes it needs (the functional graph's nodes by depth, whether a
layer's call takes `training`) are read through keras_ham.internals, the one module allowed
to touch them, which fails with a clear message when Keras changes them.
"""

from __future__ import annotations

import keras

from keras_ham.internals import call_takes_training, nodes_deepest_first

#: Layers that return their input unchanged at inference (training=False).
_INFERENCE_IDENTITY = (
    "Dropout",
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomContrast",
    "RandomTranslation",
)
#: Largest |difference| in probabilities tolerated between the graph and the Keras model.
GRAPH_CHECK_TOLERANCE = 1e-4


class TorchInferenceGraph:
    """A Keras functional model executed with plain torch ops, for inference only.

    Takes and returns torch tensors in Keras layout: images (N, H, W, C) float32 -> the
    model's output. Activations stay NHWC-contiguous, which is torch's `channels_last`
    memory format seen through a free `permute`, so convolutions run without the two
    copies Keras's torch backend makes. BatchNormalization (moving statistics) folds into
    the convolution that feeds it when nothing else reads that convolution's output;
    ReLU and Add run in place on intermediates nothing else reads. Conv2D, Dense,
    BatchNormalization, ReLU/softmax Activation, Add, ZeroPadding2D, MaxPooling2D (valid),
    GlobalAveragePooling2D and the identity-at-inference layers have torch forms; any
    other layer is called through Keras with training=False (named in `keras_layers`).

    Weights are copied when the graph is built: rebuild it after changing the model.
    """

    def __init__(self, model: keras.Model, *, fold_batchnorm: bool = True):
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ValueError(f"{model.name}: TorchInferenceGraph needs one input and one output.")
        self.keras_layers: list[str] = []
        self.folded_batchnorms = 0
        nodes = _graph_nodes(model)
        uses: dict[int, int] = {}  # readers of each symbolic tensor (the model output counts)
        for node in nodes:
            for tensor in node.input_tensors:
                uses[id(tensor)] = uses.get(id(tensor), 0) + 1
        self._input = id(model.inputs[0])
        self._output = id(model.outputs[0])
        uses[self._output] = uses.get(self._output, 0) + 1
        producers = {id(tensor): node for node in nodes for tensor in node.outputs}

        fold_into: dict[int, object] = {}  # id(conv node) -> its BatchNormalization node
        if fold_batchnorm:
            for node in nodes:
                if _is_channels_last_batchnorm(node):
                    source = producers.get(id(node.input_tensors[0]))
                    if (
                        source is not None
                        and _conv_form(source.operation)
                        and source.operation.activation is keras.activations.linear
                        and uses[id(node.input_tensors[0])] == 1
                    ):
                        fold_into[id(source)] = node
        folded = {id(bn) for bn in fold_into.values()}

        # In-place ops are safe on a buffer this graph made and nothing else reads. Identity
        # layers pass their input's buffer on, so reads are counted per buffer, not per tensor.
        buffer_of: dict[int, int] = {self._input: self._input}
        owned: set[int] = set()
        steps = []
        for node in nodes:
            if id(node) in folded:
                continue
            inputs = [id(tensor) for tensor in node.input_tensors]
            outputs = [id(tensor) for tensor in node.outputs]
            if id(node) in fold_into:
                outputs = [id(fold_into[id(node)].outputs[0])]
            function, kind = self._lower(node, fold_into.get(id(node)))
            for tensor_id in outputs:
                buffer_of[tensor_id] = buffer_of[inputs[0]] if kind == "identity" else tensor_id
                if kind in ("fresh", "relu", "add"):
                    owned.add(tensor_id)
            steps.append([function, inputs, outputs, kind])
        reads: dict[int, int] = {buffer_of[self._output]: 1}
        for _, inputs, _, kind in steps:
            if kind != "identity":
                for tensor_id in inputs:
                    reads[buffer_of[tensor_id]] = reads.get(buffer_of[tensor_id], 0) + 1
        for step in steps:
            function, inputs, _, kind = step
            if kind in ("relu", "add"):
                buffer = buffer_of[inputs[0]]
                if buffer in owned and reads.get(buffer) == 1:
                    step[0] = _inplace_relu if kind == "relu" else _inplace_add
        # Drop each intermediate after its last reader, so memory holds a few activations at
        # a time rather than all of them.
        last_read = {tensor_id: index for index, (_, inputs, _, _) in enumerate(steps) for tensor_id in inputs}
        self._steps = []
        for index, (function, inputs, outputs, kind) in enumerate(steps):
            release = tuple(t for t in dict.fromkeys(inputs) if last_read[t] == index and t != self._output)
            self._steps.append((function, inputs, outputs, kind == "keras", release))

    def _lower(self, node, batchnorm_node):
        """(function of torch tensors, kind); kind: fresh | identity | relu | add | keras."""
        import torch
        import torch.nn.functional as F

        operation = node.operation
        name = type(operation).__name__
        if _conv_form(operation):
            kernel = _tensor(operation.kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW
            bias = _tensor(operation.bias) if operation.use_bias else torch.zeros(kernel.shape[0], device=kernel.device)
            if batchnorm_node is not None:
                kernel, bias = _fold_batchnorm(kernel, bias, batchnorm_node.operation)
                self.folded_batchnorms += 1
            kernel = kernel.contiguous(memory_format=torch.channels_last)
            return _conv_function(operation, kernel, bias), "fresh"
        if _is_channels_last_batchnorm(node):
            mean, variance = _tensor(operation.moving_mean), _tensor(operation.moving_variance)
            gamma = _tensor(operation.gamma) if operation.scale else None
            beta = _tensor(operation.beta) if operation.center else None
            epsilon = float(operation.epsilon)

            def batchnorm(x):
                y = F.batch_norm(x.permute(0, 3, 1, 2), mean, variance, gamma, beta, False, 0.0, epsilon)
                return y.permute(0, 2, 3, 1)

            return batchnorm, "fresh"
        if type(operation) is keras.layers.Activation and _float32(operation):
            if operation.activation is keras.activations.relu:
                return torch.relu, "relu"
            if operation.activation is keras.activations.softmax:
                return (lambda x: torch.softmax(x, dim=-1)), "fresh"
        if type(operation) is keras.layers.Add and _float32(operation) and len(node.input_tensors) >= 2:
            return _add, "add"
        if type(operation) is keras.layers.ZeroPadding2D and operation.data_format == "channels_last":
            (top, bottom), (left, right) = operation.padding
            return (lambda x: F.pad(x, (0, 0, left, right, top, bottom))), "fresh"
        if (
            type(operation) is keras.layers.MaxPooling2D
            and operation.data_format == "channels_last"
            and operation.padding == "valid"
        ):
            pool, strides = tuple(operation.pool_size), tuple(operation.strides)
            return (lambda x: F.max_pool2d(x.permute(0, 3, 1, 2), pool, strides).permute(0, 2, 3, 1)), "fresh"
        if type(operation) is keras.layers.GlobalAveragePooling2D and operation.data_format == "channels_last":
            keepdims = bool(operation.keepdims)
            return (lambda x: x.mean(dim=(1, 2), keepdim=keepdims)), "fresh"
        if type(operation) is keras.layers.Dense and _float32(operation) and operation.quantization_mode is None:
            weight = _tensor(operation.kernel).T.contiguous()
            bias = _tensor(operation.bias) if operation.use_bias else None
            activation = operation.activation

            def dense(x):
                y = F.linear(x, weight, bias)
                return y if activation is keras.activations.linear else activation(y)

            return dense, "fresh"
        if name in _INFERENCE_IDENTITY and type(operation) is getattr(keras.layers, name):
            return (lambda x: x), "identity"
        self.keras_layers.append(operation.name)
        takes_training = call_takes_training(operation)

        def through_keras(values, node=node, operation=operation):
            args, kwargs = node.arguments.fill_in(values)
            if takes_training:
                kwargs["training"] = False
            return operation(*args, **kwargs)

        return through_keras, "keras"

    def __call__(self, images):
        """Run under `torch.inference_mode()`; images (N, H, W, C) on the model's device."""
        values = {self._input: images}
        for function, inputs, outputs, through_keras, release in self._steps:
            if through_keras:
                results = function(values)
                for tensor_id, value in zip(outputs, keras.tree.flatten(results)):
                    values[tensor_id] = value
            else:
                values[outputs[0]] = function(*[values[i] for i in inputs])
            for tensor_id in release:
                del values[tensor_id]
        return values[self._output]


def _graph_nodes(model: keras.Model) -> list:
    """The model's operation nodes in execution order (inputs first)."""
    return [node for node in nodes_deepest_first(model) if node.operation is not None and not node.is_input]


def model_device(model: keras.Model):
    """The torch device holding the model's weights (where its inputs must go); None without weights."""
    weights = model.weights
    return weights[0].value.device if weights else None


def _float32(layer) -> bool:
    return getattr(layer, "compute_dtype", "float32") == "float32"


def _conv_form(operation) -> bool:
    return (
        type(operation) is keras.layers.Conv2D
        and operation.data_format == "channels_last"
        and operation.padding in ("valid", "same")
        and _float32(operation)
        and operation.quantization_mode is None
    )


def _is_channels_last_batchnorm(node) -> bool:
    operation = node.operation
    if type(operation) is not keras.layers.BatchNormalization or not _float32(operation):
        return False
    if len(node.input_tensors) != 1 or len(node.input_tensors[0].shape) != 4:
        return False
    return operation.axis in (3, -1)


def _tensor(variable):
    """A detached copy of a Keras variable's torch value (on its device)."""
    return variable.value.detach().clone()


def _fold_batchnorm(kernel, bias, batchnorm):
    """Conv (OIHW kernel, bias) followed by inference BatchNorm -> one conv's (kernel, bias)."""
    import torch

    scale = torch.rsqrt(_tensor(batchnorm.moving_variance) + batchnorm.epsilon)
    if batchnorm.scale:
        scale = scale * _tensor(batchnorm.gamma)
    shift = -_tensor(batchnorm.moving_mean) * scale
    if batchnorm.center:
        shift = shift + _tensor(batchnorm.beta)
    return kernel * scale[:, None, None, None], bias * scale + shift


def _conv_function(operation, kernel, bias):
    import torch.nn.functional as F

    strides, dilation = tuple(operation.strides), tuple(operation.dilation_rate)
    groups, size = int(operation.groups), tuple(operation.kernel_size)
    same = operation.padding == "same"
    activation = operation.activation

    def conv(x):
        x = x.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW channels_last: no copy
        padding = (0, 0)
        if same:  # TensorFlow's "same": the odd pixel of padding goes after, as in Keras
            pads = []
            for axis in range(2):
                length, stride = x.shape[2 + axis], strides[axis]
                extent = (size[axis] - 1) * dilation[axis] + 1
                total = max((-(-length // stride) - 1) * stride + extent - length, 0)
                pads.append((total // 2, total - total // 2))
            if pads[0][0] == pads[0][1] and pads[1][0] == pads[1][1]:
                padding = (pads[0][0], pads[1][0])
            else:
                x = F.pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        y = F.conv2d(x, kernel, bias, strides, padding, dilation, groups).permute(0, 2, 3, 1)
        return y if activation is keras.activations.linear else activation(y)

    return conv


def _add(*tensors):
    total = tensors[0] + tensors[1]
    for tensor in tensors[2:]:
        total += tensor
    return total


def _inplace_add(*tensors):
    total = tensors[0]
    for tensor in tensors[1:]:
        total += tensor
    return total


def _inplace_relu(x):
    return x.relu_()
