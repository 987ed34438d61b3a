"""Temperature scaling of a saved model: built in, portable, argmax kept, never overwriting."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from conftest import probabilities_on_tensorflow, tiny_config
from keras_ham.calibration import calibrate_file, softmax
from keras_ham.errors import KerasHamError
from keras_ham.model import (
    LOGITS_LAYER,
    TEMPERATURE_LAYER,
    classifier_input,
    load_classifier,
    model_temperature,
    with_temperature,
)
from keras_ham.predict import Predictor
from keras_ham.train import train


@pytest.fixture(scope="module")
def uncalibrated_run(tiny_demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncalibrated")
    config = tiny_config(tiny_demo, tmp, max_epochs=1, calibrate=False)
    result = train(config, log=lambda m: None, verbose=0)
    return result, config


def _logits(model, images):
    import keras

    sub = keras.Model(classifier_input(model), model.get_layer(LOGITS_LAYER).output)
    return np.asarray(keras.ops.convert_to_numpy(sub(images, training=False)), dtype=np.float64)


def test_calibrate_file_writes_a_new_portable_model_with_the_same_argmax(uncalibrated_run, tmp_path):
    result, config = uncalibrated_run
    assert result.summary["calibration"] is None  # calibrate: false
    original = result.run_dir / "best.keras"
    original_bytes = original.read_bytes()
    messages = []
    # allow_bound: a 1-epoch model's logits say little about its 16 validation images, so the fit
    # may end at a bound (refused by default: test_a_temperature_at_its_bound_is_...); this test is
    # about the file written.
    out, report = calibrate_file(original, config.val_csv, image_dirs=config.image_dirs,
                                 out_path=tmp_path / "calibrated.keras", allow_bound=True, log=messages.append)
    assert original.read_bytes() == original_bytes  # the original is untouched
    assert report["after"]["nll"] <= report["before"]["nll"] + 1e-9  # the fit minimises validation NLL
    assert "T = " in messages[0]

    before, after = load_classifier(original), load_classifier(out)
    assert model_temperature(before) is None
    assert model_temperature(after) == pytest.approx(report["temperature"], rel=1e-6)
    images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras on the torch fast path takes the Rescaling layer silently
        predictor = Predictor(after)
    calibrated = predictor.predict(images)
    logits = _logits(before, images)
    np.testing.assert_allclose(calibrated, softmax(logits, report["temperature"]), atol=1e-5)
    np.testing.assert_array_equal(calibrated.argmax(1), Predictor(before).predict(images).argmax(1))
    on_tensorflow = probabilities_on_tensorflow(out, images, tmp_path)
    np.testing.assert_allclose(on_tensorflow, calibrated, atol=1e-4)
    np.testing.assert_array_equal(on_tensorflow.argmax(1), logits.argmax(1))

    # Refits replace the temperature (no stacking) and never overwrite a file.
    with pytest.raises(KerasHamError, match="exists"):
        calibrate_file(out, config.val_csv, image_dirs=config.image_dirs, out_path=out)
    again, report2 = calibrate_file(out, config.val_csv, image_dirs=config.image_dirs,
                                    out_path=tmp_path / "again.keras", allow_bound=True, log=lambda m: None)
    assert report2["temperature"] == pytest.approx(report["temperature"], rel=1e-6)
    names = [layer.name for layer in load_classifier(again).layers]
    assert names.count(TEMPERATURE_LAYER) == 1


def test_with_temperature_rejects_bad_values(uncalibrated_run):
    model = load_classifier(uncalibrated_run[0].run_dir / "best.keras")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(KerasHamError, match="temperature"):
            with_temperature(model, bad)


def test_training_calibrates_best_keras_and_records_it(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path, max_epochs=1)
    result = train(config, log=lambda m: None, verbose=0)
    stored = json.loads((result.run_dir / "summary.json").read_text())["calibration"]
    assert stored["fitted_on"] == config.val_csv and stored["num_images"] > 0
    assert set(stored["before"]) == set(stored["after"]) >= {"ece", "nll"}
    assert stored["after"]["nll"] <= stored["before"]["nll"] + 1e-9
    model = load_classifier(result.run_dir / "best.keras")
    # Either outcome of a real fit keeps summary.json and best.keras consistent (each outcome
    # is forced in test_a_temperature_at_its_bound_is_neither_built_in_nor_written).
    if stored["applied"]:
        assert model_temperature(model) == pytest.approx(stored["temperature"], rel=1e-6)
        assert stored["temperature"] == stored["fitted_temperature"] and stored["skipped"] is None
    else:
        assert model_temperature(model) is None and stored["temperature"] is None
        assert "no interior minimum" in stored["skipped"] and stored["after"] == stored["before"]
    ood = json.loads((result.run_dir / "summary.json").read_text())["ood"]
    assert ood["score"] == "feature_statistics" and ood["energy"]["score"] == "energy"
    for record in (ood, ood["energy"]):  # both thresholds set on the validation split
        assert record["false_alarm_rate"] == 0.05
        assert record["flagged_on_fit"] <= 0.05 and record["num_images"] == stored["num_images"]
    assert (result.run_dir / ood["statistics_file"]).is_file()


def test_calibrate_script_refuses_to_overwrite(uncalibrated_run, repo_root, tmp_path):
    result, config = uncalibrated_run
    out = subprocess.run([sys.executable, str(repo_root / "scripts" / "calibrate.py"), "--model",
                          str(result.run_dir / "best.keras"), "--csv", config.val_csv,
                          "--out", str(result.run_dir / "best.keras")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "never overwrites" in out.stderr and "Traceback" not in out.stderr


def test_a_temperature_at_its_bound_is_neither_built_in_nor_written(uncalibrated_run, tmp_path, monkeypatch):
    """Training keeps best.keras as trained and says why; calibrate_file refuses (scripts: exit 2)."""
    import shutil

    import keras_ham.calibration as calibration
    from keras_ham.calibration import fit_on_validation
    from keras_ham.dataset import dataset_from_split_csv

    result, config = uncalibrated_run
    # As on a validation split without errors (tested on real logits in test_calibration.py).
    monkeypatch.setattr(calibration, "fit_temperature", lambda logits, y_true: calibration.TEMPERATURE_BOUNDS[0])
    run_dir = shutil.copytree(result.run_dir, tmp_path / "run")
    untouched = shutil.copytree(result.run_dir, tmp_path / "run2")
    original_bytes = (run_dir / "best.keras").read_bytes()
    messages = []
    val_data = dataset_from_split_csv(config.val_csv, config, training=False)
    fitted = fit_on_validation(run_dir, config.replace(calibrate=True), val_data, log=messages.append)
    report = fitted["calibration"]
    assert not report["applied"] and report["temperature"] is None and report["fitted_temperature"] == 0.05
    assert "no interior minimum" in report["skipped"] and report["after"] == report["before"]
    assert (run_dir / "best.keras").read_bytes() == original_bytes
    assert any(m.startswith("warning: temperature scaling skipped") for m in messages)
    assert fitted["ood"]["num_images"] == report["num_images"]  # the OOD threshold is still set

    with pytest.raises(KerasHamError, match="no interior minimum.*--allow-bound"):
        calibrate_file(run_dir / "best.keras", config.val_csv, image_dirs=config.image_dirs,
                       out_path=tmp_path / "refused.keras", log=lambda m: None)
    assert not (tmp_path / "refused.keras").exists()
    out, forced = calibrate_file(run_dir / "best.keras", config.val_csv, image_dirs=config.image_dirs,
                                 out_path=tmp_path / "forced.keras", allow_bound=True, log=lambda m: None)
    assert forced["applied"] and forced["at_bound"]
    assert model_temperature(load_classifier(out)) == pytest.approx(0.05, rel=1e-6)

    # An interior minimum (as on a split with errors): best.keras is rewritten with T built in.
    monkeypatch.setattr(calibration, "fit_temperature", lambda logits, y_true: 1.7)
    monkeypatch.setattr(calibration, "nll_minimum_side", lambda logits, y_true: None)
    applied = fit_on_validation(untouched, config.replace(calibrate=True), val_data, log=lambda m: None)
    assert applied["calibration"]["applied"] and applied["calibration"]["temperature"] == 1.7
    assert model_temperature(load_classifier(untouched / "best.keras")) == pytest.approx(1.7, rel=1e-6)


def test_models_built_on_a_classifier_take_a_plain_batch_without_keras_warnings(uncalibrated_run, tmp_path):
    """The temperature model (saved as best.keras by every calibrated run), calibration's logits
    model and the out-of-distribution statistics model keep the classifier's one-tensor input.
    Built on `model.inputs` (a list) they expected a one-element list, and Keras warned "The
    structure of `inputs` doesn't match" on every call with a batch, also after a save and load."""
    import keras

    from keras_ham.calibration import model_logits, save_model_atomic
    from keras_ham.gradcam import default_layer_name
    from keras_ham.ood import channel_statistics_model

    result, _ = uncalibrated_run
    model = load_classifier(result.run_dir / "best.keras")
    save_model_atomic(with_temperature(model, 0.5), tmp_path / "calibrated.keras")
    derived = [with_temperature(model, 0.5), load_classifier(tmp_path / "calibrated.keras"),
               channel_statistics_model(model, default_layer_name(model))]
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # Keras's warnings; its numpy DeprecationWarning is not ours
        outputs = [keras.ops.convert_to_numpy(sub(images, training=False)) for sub in derived]
        logits = model_logits(model, [(images, np.zeros(2, dtype="int64"))], batch_size=2)
    assert [out.shape[0] for out in outputs] == [2, 2, 2] and logits.shape == (2, 7)


def test_a_file_saved_with_a_one_element_input_list_loads_without_keras_warnings(uncalibrated_run, tmp_path):
    """Calibrated files written before classifier_input existed were built on `model.inputs`;
    load_classifier rebuilds them on the one tensor, with the same layers and probabilities."""
    import keras

    from keras_ham.calibration import save_model_atomic

    result, _ = uncalibrated_run
    model = load_classifier(result.run_dir / "best.keras")
    logits = model.get_layer(LOGITS_LAYER).output
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="old_probabilities")(logits)
    save_model_atomic(keras.Model(model.inputs, probabilities, name=model.name), tmp_path / "old.keras")
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    raw = keras.saving.load_model(tmp_path / "old.keras", compile=False)
    assert isinstance(raw.input, list)  # the file really has the old structure
    with pytest.warns(UserWarning, match="structure of `inputs`"):
        expected = keras.ops.convert_to_numpy(raw(images, training=False))
    loaded = load_classifier(tmp_path / "old.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = keras.ops.convert_to_numpy(loaded(images, training=False))
    assert not isinstance(loaded.input, list) and loaded.name == model.name
    assert loaded.get_layer(LOGITS_LAYER) is not None
    np.testing.assert_array_equal(got, expected)
