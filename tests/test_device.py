import os
import subprocess
import sys

import pytest

from keras_ham.device import DeviceChoice, DeviceError, choose_device


def probes(directml=None, cuda=False, mps=False):
    return {"directml": lambda: directml, "cuda": lambda: cuda, "mps": lambda: mps}


def test_auto_prefers_env_variable_over_everything():
    choice = choose_device("auto", environ={"KERAS_TORCH_DEVICE": "cuda:1"}, probes=probes("privateuseone:0", True, True))
    assert (choice.kind, choice.torch_device) == ("env", "cuda:1")


@pytest.mark.parametrize(
    "available, expected",
    [
        (dict(directml="privateuseone:0", cuda=True, mps=True), ("directml", "privateuseone:0")),
        (dict(cuda=True, mps=True), ("cuda", "cuda")),
        (dict(mps=True), ("mps", "mps")),
        (dict(), ("cpu", "cpu")),
    ],
)
def test_auto_order_directml_cuda_mps_cpu(available, expected):
    choice = choose_device("auto", environ={}, probes=probes(**available))
    assert (choice.kind, choice.torch_device) == expected
    assert choice.reason


def test_explicit_request_for_missing_device_is_an_error_with_install_hint():
    with pytest.raises(DeviceError, match="requirements-directml.txt"):
        choose_device("directml", environ={}, probes=probes())
    with pytest.raises(DeviceError, match="cuda"):
        choose_device("cuda", environ={}, probes=probes())
    assert choose_device("cpu", environ={}, probes=probes(cuda=True)).torch_device == "cpu"
    assert choose_device("mps", environ={}, probes=probes(mps=True)).torch_device == "mps"


def test_unknown_device_name_is_rejected():
    with pytest.raises(DeviceError, match="expected auto"):
        choose_device("tpu", environ={}, probes=probes())


def test_configure_device_sets_keras_device_before_import(tmp_path):
    # A fresh interpreter: Keras must pick up the device chosen before its import.
    code = (
        "from keras_ham.device import configure_device\n"
        "c = configure_device('cpu', log=None)\n"
        "import keras\n"
        "from keras.src.backend.torch.core import get_device\n"
        "print(keras.backend.backend(), get_device(), c.kind)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_TORCH_DEVICE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split()[-3:] == ["torch", "cpu", "cpu"]


def test_per_variable_adamw_matches_fused_adamw():
    """The DirectML optimizer path (no torch._foreach ops) gives the same update."""
    import keras
    import numpy as np

    from keras_ham.device import make_optimizer

    def one_step(optimizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5)(inputs)))
        model.compile(optimizer=optimizer, loss="mse")
        x = np.linspace(-1, 1, 32, dtype="float32").reshape(8, 4)
        model.fit(x, np.ones((8, 3), "float32"), epochs=2, batch_size=4, verbose=0, shuffle=False)
        return [w.copy() for w in model.get_weights()]

    fused = one_step(make_optimizer(1e-2, 1e-2, None))
    directml = DeviceChoice("directml", "privateuseone:0", "test")
    optimizer = make_optimizer(1e-2, 1e-2, directml)
    assert type(optimizer).__name__ == "PerVariableAdamW"
    per_variable = one_step(optimizer)
    for a, b in zip(fused, per_variable):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def words_printed_on_torch(code: str) -> list[str]:
    """Run `code` in a fresh Python process on the torch backend; the words it printed."""
    env = dict(os.environ, KERAS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    return out.stdout.split()


def test_set_random_seed_is_reproducible_and_leaves_tensorflow_unimported():
    """Seeding a torch process must not import TensorFlow (Keras's own helper does)."""
    code = (
        "import random, sys\n"
        "import numpy as np, torch, keras\n"
        "from keras.src.utils import rng_utils\n"
        "from keras_ham.device import set_random_seed\n"
        "def draw():\n"
        "    layer = keras.layers.Dropout(0.5)\n"
        "    x = keras.ops.ones((64,))\n"
        "    return [random.random(), float(np.random.rand()), float(torch.rand(())),\n"
        "            keras.ops.convert_to_numpy(layer(x, training=True)).tolist()]\n"
        "set_random_seed(7); first = draw()\n"
        "set_random_seed(7); second = draw()\n"
        "set_random_seed(8); other = draw()\n"
        "print(first == second, first != other, 'tensorflow' in sys.modules, rng_utils.tf._available is None)\n"
    )
    assert words_printed_on_torch(code)[-4:] == ["True", "True", "False", "True"]


def test_saving_inside_keras_without_tensorflow_does_not_import_it(tmp_path):
    """best.keras is written inside this block during training; the file must still load
    (its TensorFlow round trip is tested in test_demo_pipeline / test_model)."""
    code = (
        "import sys\n"
        "import numpy as np, keras\n"
        "from keras.src.utils.module_utils import tensorflow as lazy\n"
        "from keras_ham.device import keras_without_tensorflow\n"
        "inputs = keras.Input((4,))\n"
        "model = keras.Model(inputs, keras.layers.Dense(3, activation='softmax')(inputs))\n"
        "with keras_without_tensorflow():\n"
        f"    model.save({str(tmp_path / 'm.keras')!r})\n"
        "imported = 'tensorflow' in sys.modules\n"
        f"loaded = keras.saving.load_model({str(tmp_path / 'm.keras')!r}, safe_mode=True)\n"
        "x = np.ones((2, 4), 'float32')\n"
        "same = np.allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))\n"
        "print(imported, same, lazy._available is None or lazy._available)\n"
    )
    assert words_printed_on_torch(code)[-3:] == ["False", "True", "True"]
