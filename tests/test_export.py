"""ONNX export (keras_ham.export, scripts/export.py): ONNX Runtime must reproduce the Keras
probabilities on real images (demo images when the real subset is absent), any batch size."""

import importlib.util
import os

import keras
import numpy as np
import pytest

from keras_ham.config import load_config
from keras_ham.export import ExportError, export_onnx
from keras_ham.images import load_image
from keras_ham.metadata import IMAGE_EXTENSIONS
from keras_ham.model import build_model
from keras_ham.predict import Predictor

SIZE = 48

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch backend tests")


def five_images(tiny_demo) -> tuple[np.ndarray, str]:
    from tests.conftest import REAL_DATA_DIR

    root, source = (REAL_DATA_DIR, "real") if (REAL_DATA_DIR / "HAM10000_metadata.csv").is_file() else (tiny_demo[0], "demo")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:5]
    return np.stack([load_image(p, SIZE) for p in paths]).astype(np.float32), source


def trained_looking_model(seed=0):
    """resnet18 with non-trivial BatchNorm statistics and head, as a trained model has."""
    model = build_model(load_config(overrides={"weights": None, "model": "resnet18", "image_size": SIZE}))
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    logits = model.get_layer("logits")
    logits.kernel.assign(rng.normal(0, 0.05, logits.kernel.shape).astype("float32"))
    return model


def export_script(repo_root):
    """scripts/export.py as a module (its main(argv) returns the exit code): no new interpreter."""
    spec = importlib.util.spec_from_file_location("export_script", repo_root / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_exports_onnx_that_onnxruntime_runs_like_keras(tiny_demo, repo_root, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = trained_looking_model()
    model_path = tmp_path / "best.keras"
    model.save(model_path)
    assert export_script(repo_root).main(["--model", str(model_path), "--format", "onnx"]) == 0
    onnx_path = tmp_path / "best.onnx"  # default: beside the model
    assert f"wrote {onnx_path}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind

    import onnx

    operators = {node.op_type for node in onnx.load(onnx_path).graph.node}
    # BatchNorm exported as one batch norm, which the exporter (or ONNX Runtime) folds into the
    # convolutions, not as Keras's own Sub/Mul/Add arithmetic (20 Sub and 20 Mul here)
    assert not operators & {"Sub", "Mul"}, sorted(operators)

    images, _ = five_images(tiny_demo)
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    assert expected.std() > 1e-3  # probabilities that differ between images, not a flat 1/7
    # three lines of plain onnxruntime, as in the README
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "image" and session.get_inputs()[0].shape[1:] == [SIZE, SIZE, 3]
    for batch in (images[:1], images):  # dynamic batch: 1 and 5
        received = session.run(None, {"image": batch})[0]
        assert received.shape == (len(batch), 7)
        np.testing.assert_allclose(received, expected[: len(batch)], atol=1e-4, rtol=0)

    # The Predictor runs the export found beside the model, and only while it is current
    predictor = Predictor.from_file(model_path, batch_size=4)
    assert predictor.engine == "onnxruntime" and predictor.fast_path
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-4, rtol=0)
    os.utime(model_path, (onnx_path.stat().st_mtime + 10,) * 2)  # the model is newer than its export
    stale = Predictor.from_file(model_path, batch_size=4)
    assert stale.engine == "keras" and not stale.fast_path
    np.testing.assert_allclose(stale.predict(images), expected, atol=1e-5, rtol=0)  # Keras, on its fast path
    with pytest.warns(UserWarning, match="differs from the Keras model"):  # an export of another model
        other = Predictor(trained_looking_model(seed=1), onnx_path=onnx_path)
    assert other.engine == "keras"


def test_export_refuses_a_non_float32_model(tmp_path):
    inputs = keras.Input((32, 32, 3), name="image")
    outputs = keras.layers.Dense(7, dtype="mixed_float16")(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, outputs)
    model.dtype_policy = keras.DTypePolicy("mixed_float16")
    with pytest.raises(ExportError, match="float32"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/missing.keras"], "model file not found"),
        (["--model", "{tmp}/m.keras", "--out", "{tmp}/m.keras"], "overwrite the model itself"),
        (["--model", "{tmp}/m.keras", "--format", "tflite"], "invalid choice"),
    ],
)
def test_script_rejects_bad_input(repo_root, tmp_path, capsys, args, message):
    (tmp_path / "m.keras").write_bytes(b"")
    args = [a.format(tmp=tmp_path) for a in args]
    try:
        code = export_script(repo_root).main(args)
    except SystemExit as exit:  # argparse rejects a bad choice itself
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx"))


def test_training_writes_the_onnx_export_and_evaluation_runs_it(tiny_demo, tmp_path, monkeypatch):
    """export_onnx (the default): best.onnx beside best.keras, newer than it, recorded in the
    summary; the Predictor of evaluate/predict runs it. A failing export leaves a usable run."""
    from conftest import tiny_config
    from keras_ham import train as train_module
    from keras_ham.runs import RunFolder

    result = train_module.train(tiny_config(tiny_demo, tmp_path, export_onnx=True, max_epochs=1, image_size=SIZE),
                                log=lambda _: None,
                                verbose=0)
    folder = RunFolder(result.run_dir)
    assert folder.onnx_model.is_file()
    assert folder.onnx_model.stat().st_mtime >= folder.best_model.stat().st_mtime
    assert result.summary["onnx_export"]["written"] is True
    predictor = Predictor.from_file(folder.best_model, batch_size=4)
    assert predictor.engine == "onnxruntime"
    images, _ = five_images(tiny_demo)
    expected = keras.ops.convert_to_numpy(predictor.model(images, training=False))
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-4, rtol=0)

    import keras_ham.export

    def broken(*args, **kwargs):
        raise ExportError("exporter broke")

    monkeypatch.setattr(keras_ham.export, "export_model_file", broken)
    lines = []
    failed = train_module.train(tiny_config(tiny_demo, tmp_path, export_onnx=True, max_epochs=1, run_name="broken"),
                                log=lines.append, verbose=0)
    assert failed.summary["onnx_export"] == {"written": False, "error": "ExportError: exporter broke"}
    assert not RunFolder(failed.run_dir).onnx_model.exists() and RunFolder(failed.run_dir).best_model.is_file()
    assert any("scripts/export.py --model" in line for line in lines)
    assert Predictor.from_file(RunFolder(failed.run_dir).best_model).engine == "keras"


def test_calibrated_model_exports_with_its_temperature(tiny_demo, tmp_path):
    """A model with the temperature layer (keras_ham.model.with_temperature, as training and
    scripts/calibrate.py build it) exports through export_model_file: ONNX Runtime gives the
    calibrated probabilities (within 1e-4 of Keras), not the uncalibrated ones."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from keras_ham.calibration import save_model_atomic
    from keras_ham.export import export_model_file
    from keras_ham.model import load_classifier, model_temperature, with_temperature

    uncalibrated = trained_looking_model()
    images, _ = five_images(tiny_demo)
    plain = keras.ops.convert_to_numpy(uncalibrated(images, training=False))
    model_path = tmp_path / "best_calibrated.keras"
    save_model_atomic(with_temperature(uncalibrated, 0.4), model_path)
    calibrated = load_classifier(model_path)
    assert model_temperature(calibrated) == pytest.approx(0.4)
    expected = keras.ops.convert_to_numpy(calibrated(images, training=False))
    assert np.abs(expected - plain).max() > 1e-2  # the temperature changes the probabilities
    np.testing.assert_array_equal(expected.argmax(axis=1), plain.argmax(axis=1))

    onnx_path = export_model_file(model_path)
    assert onnx_path == tmp_path / "best_calibrated.onnx"
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    received = session.run(None, {"image": images})[0]
    np.testing.assert_allclose(received, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(received.sum(axis=1), 1.0, atol=1e-5)
    predictor = Predictor.from_file(model_path, batch_size=4)
    assert predictor.engine == "onnxruntime"
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-4, rtol=0)
