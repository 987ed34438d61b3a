"""Pick the torch device once, before Keras is imported.

Keras (>= 3.14) reads `KERAS_TORCH_DEVICE` a single time, when `keras` is first
imported, and places every variable and tensor there. So the choice has to be made
here, at the edge of each entry point, before anything imports Keras:

    from keras_ham.device import configure_device
    choice = configure_device(config.device)   # sets KERAS_BACKEND / KERAS_TORCH_DEVICE
    import keras                                # now on the chosen device

Order for `auto`: an explicit `KERAS_TORCH_DEVICE`, then DirectML (`torch_directml`,
Windows/WSL), CUDA, Apple MPS, CPU.

DirectML notes (see README): Keras only uses the DirectML device when
`KERAS_TORCH_DEVICE` names it before import (the cause of Keras staying on the CPU in
keras-team/keras#21228), and DirectML lacks the `torch._foreach_*` kernels that Keras's
torch optimizers use, so `make_optimizer` gives it a per-variable AdamW instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Callable, Mapping

from keras_ham.errors import KerasHamError
from keras_ham.internals import imported_keras_torch_device, per_variable_optimizer, tensorflow_reported_unavailable


#: The devices a config, `--device` and `choose_device` accept.
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps", "directml")


class DeviceError(KerasHamError, RuntimeError):
    """The requested device is not available on this machine."""


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    kind: str  # cpu | cuda | mps | directml | env
    torch_device: str  # the string handed to Keras, e.g. "cuda", "privateuseone:0"
    reason: str

    def describe(self) -> str:
        return f"device: {self.torch_device} ({self.reason})"


def _directml_device() -> str | None:
    try:
        import torch_directml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        if torch_directml.device_count() < 1:
            return None
        return str(torch_directml.device())
    except Exception:  # noqa: BLE001 - a broken DirectML install means "not available"
        return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


DEFAULT_PROBES: Mapping[str, Callable[[], object]] = {
    "directml": _directml_device,
    "cuda": _cuda_available,
    "mps": _mps_available,
}


def choose_device(
    requested: str = "auto",
    *,
    environ: Mapping[str, str] | None = None,
    probes: Mapping[str, Callable[[], object]] = DEFAULT_PROBES,
) -> DeviceChoice:
    """Decide the torch device (pure apart from the probes, which tests replace)."""
    environ = os.environ if environ is None else environ
    if requested == "auto":
        if environ.get("KERAS_TORCH_DEVICE"):
            value = environ["KERAS_TORCH_DEVICE"]
            return DeviceChoice("env", value, "KERAS_TORCH_DEVICE is set")
        directml = probes["directml"]()
        if directml:
            return DeviceChoice("directml", str(directml), "torch_directml is installed and sees a GPU")
        if probes["cuda"]():
            return DeviceChoice("cuda", "cuda", "CUDA is available")
        if probes["mps"]():
            return DeviceChoice("mps", "mps", "Apple MPS is available")
        return DeviceChoice("cpu", "cpu", "no GPU backend found")
    if requested == "cpu":
        return DeviceChoice("cpu", "cpu", "requested")
    if requested == "directml":
        directml = probes["directml"]()
        if not directml:
            raise DeviceError(
                "device=directml requested, but torch_directml is not installed or sees no GPU. "
                "Install it on Windows/WSL with: pip install -r requirements-directml.txt"
            )
        return DeviceChoice("directml", str(directml), "requested")
    if requested in ("cuda", "mps"):
        if not probes[requested]():
            raise DeviceError(f"device={requested} requested, but torch reports it is not available.")
        return DeviceChoice(requested, requested, "requested")
    raise DeviceError(f"device={requested!r}: expected {', '.join(DEVICE_NAMES[:-1])} or {DEVICE_NAMES[-1]}.")


def configure_device(requested: str = "auto", *, log: Callable[[str], None] | None = print) -> DeviceChoice:
    """Choose the device and export it for Keras; must run before `import keras`.

    Sets `KERAS_BACKEND=torch` unless a backend was already chosen. If Keras is already
    imported on the torch backend with a different device, raises `DeviceError` rather
    than silently training on the wrong device.
    """
    os.environ.setdefault("KERAS_BACKEND", "torch")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # Keras imports TensorFlow when installed
    backend = os.environ["KERAS_BACKEND"]
    if backend != "torch":
        choice = DeviceChoice("cpu" if requested in ("auto", "cpu") else requested, backend, f"backend {backend}")
        if log:
            log(f"backend: {backend} (device selection applies to the torch backend only)")
        return choice
    choice = choose_device(requested)
    if choice.kind == "cuda":  # under torchrun: this rank's LOCAL_RANK GPU
        from keras_ham.distributed import per_process_device

        choice = dataclasses.replace(choice, torch_device=per_process_device(choice.torch_device, choice.kind))
    keras_device = imported_keras_torch_device()
    if keras_device is not None and keras_device != choice.torch_device:
        if requested != "auto":
            raise DeviceError(
                f"Keras was imported before the device was chosen and uses {keras_device}; "
                f"call configure_device() before importing keras to use {choice.torch_device}."
            )
        choice = DeviceChoice("env", keras_device, "Keras was already imported")
    os.environ["KERAS_TORCH_DEVICE"] = choice.torch_device
    if log:
        log(choice.describe())
    return choice


def make_optimizer(learning_rate, weight_decay: float, choice: DeviceChoice | None = None):
    """AdamW; on DirectML a per-variable variant, since it lacks `torch._foreach_*` ops."""
    import keras

    if choice is None or choice.kind != "directml":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    return per_variable_optimizer(keras.optimizers.AdamW)(learning_rate=learning_rate, weight_decay=weight_decay)


@contextlib.contextmanager
def keras_without_tensorflow():
    """Inside this block Keras treats TensorFlow as not installed, unless it is the backend or
    already imported.

    Keras asks whether TensorFlow is available (which imports it) when seeding and when
    serializing a model, whatever the backend. In a torch process that import costs 1.5 s and
    410 MB of memory (measured on a 2-core Xeon) and prints TensorFlow's start-up log lines,
    for a framework that is never used.
    """
    import keras

    if keras.backend.backend() == "tensorflow" or "tensorflow" in sys.modules:
        yield
        return
    with tensorflow_reported_unavailable():
        yield


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed` (Python, NumPy, backend, Keras seed generator) without
    importing TensorFlow on other backends."""
    import keras

    with keras_without_tensorflow():
        keras.utils.set_random_seed(seed)


def model_device(model):
    """The torch device holding a model's weights (where its inputs must go); None without weights."""
    weights = model.weights
    return weights[0].value.device if weights else None
