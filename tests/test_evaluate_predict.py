"""Evaluation and prediction on a tiny trained run: artifacts, scripts, bad input."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import tiny_config
from keras_ham.calibration import calibration_values
from keras_ham.evaluate import evaluate
from keras_ham.labels import CLASS_NAMES
from keras_ham.metadata import MetadataError
from keras_ham.model import ModelError
from keras_ham.predict import Predictor, expand_image_paths, predict_files, top_classes
from keras_ham.train import train


@pytest.fixture(scope="module")
def tiny_run(tiny_demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config(tiny_demo, tmp, max_epochs=1)
    return train(config, log=lambda m: None, verbose=0).run_dir, config


def test_evaluate_writes_sklearn_metrics_predictions_and_plot(tiny_run, tmp_path):
    run, config = tiny_run
    messages = []
    metrics = evaluate(run / "best.keras", config.test_csv, image_dirs=config.image_dirs,
                       out_dir=tmp_path / "eval", log=messages.append)
    test = pd.read_csv(config.test_csv)
    assert metrics["num_images"] == len(test)
    stored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_roc_auc_ovr",
                "per_class", "confusion_matrix", "num_images"):
        assert key in stored
    assert np.array(stored["confusion_matrix"]).sum() == len(test)
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(predictions.columns) == ["image_id", "true", "predicted"] + [f"p_{c}" for c in CLASS_NAMES]
    assert predictions["image_id"].tolist() == test["image_id"].tolist()
    assert predictions["true"].tolist() == test["dx"].tolist()
    np.testing.assert_allclose(predictions[[f"p_{c}" for c in CLASS_NAMES]].sum(axis=1), 1.0, atol=1e-4)
    accuracy = (predictions["true"] == predictions["predicted"]).mean()
    assert stored["accuracy"] == pytest.approx(accuracy)
    with Image.open(tmp_path / "eval" / "confusion_matrix.png") as plot:
        assert plot.size[0] > 300
    assert any("balanced accuracy" in m for m in messages)
    intervals = stored["confidence_intervals"]  # split CSVs carry lesion_id: whole lesions are resampled
    assert intervals["method"] == "percentile bootstrap over lesions" and intervals["resamples"] == 1000
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = intervals[name]
        assert 0.0 <= low <= high <= 1.0
    assert any("95% intervals" in m for m in messages)
    calibration = stored["calibration"]  # recomputed here from predictions.csv (rounded to 1e-6)
    probabilities = predictions[[f"p_{c}" for c in CLASS_NAMES]].to_numpy()
    y_true = test["dx"].map({c: i for i, c in enumerate(CLASS_NAMES)}).to_numpy()
    expected = calibration_values(y_true, probabilities)
    for name in ("ece", "classwise_ece", "brier", "nll"):
        if name != "nll":  # bounded sums: rounding to 1e-6 moves them by far less than 1e-4
            assert calibration[name] == pytest.approx(float(expected[name][0]), abs=1e-4)
        low, high = calibration["confidence_intervals"][name]
        assert low <= high
    # -log p is not bounded: a stored 0.000000 may be any p < 5e-7, so the NLL lies between the
    # values for each true-class probability at the top and the bottom of its rounding interval.
    stored_true = probabilities[np.arange(len(y_true)), y_true]
    nll_low = np.mean(-np.log(np.minimum(stored_true + 5e-7, 1.0)))
    nll_high = np.mean(-np.log(np.maximum(stored_true - 5e-7, 1e-12)))
    assert nll_low - 1e-6 <= calibration["nll"] <= nll_high + 1e-6
    summary_temperature = json.loads((run / "summary.json").read_text())["calibration"]["temperature"]
    assert calibration["temperature"] == (None if summary_temperature is None else pytest.approx(summary_temperature))
    coverage = stored["risk_coverage"]
    assert coverage["at_coverage"][0]["balanced_accuracy"] == pytest.approx(stored["balanced_accuracy"])
    assert len(coverage["thresholds"]) == 21
    for plot_name in ("reliability_diagram.png", "risk_coverage.png"):
        with Image.open(tmp_path / "eval" / plot_name) as plot:
            assert plot.size[0] > 300
    assert any("ECE" in m for m in messages) and any("risk-coverage" in m for m in messages)
    ood = stored["ood"]  # the run stores the feature-statistics threshold, and the energy one inside it
    assert ood["score"] == "feature_statistics" and ood["layer"] == "pool1_pool"
    for record in (ood, ood["energy"]):
        assert 0 <= record["flagged"] <= len(test)
        assert record["flagged_share"] == pytest.approx(record["flagged"] / len(test))
    assert ood["energy"]["score"] == "energy"
    assert any("pool1_pool channel statistics" in m for m in messages) and any("(energy >" in m for m in messages)
    # A run written before the feature score (summary.json "ood" = the energy record, no statistics
    # file) is still evaluated with its energy flag; the same counts as the energy flag above.
    old = tmp_path / "old_run"
    old.mkdir()
    shutil.copy(run / "best.keras", old / "best.keras")
    summary = json.loads((run / "summary.json").read_text())
    (old / "summary.json").write_text(json.dumps({**summary, "ood": summary["ood"]["energy"]}))
    without = evaluate(old / "best.keras", config.test_csv, image_dirs=config.image_dirs,
                       out_dir=tmp_path / "eval0", bootstrap=0, log=lambda m: None)
    assert "confidence_intervals" not in without
    assert without["ood"]["score"] == "energy" and without["ood"]["flagged"] == ood["energy"]["flagged"]


def test_tta_averages_flips(tiny_run):
    run, _ = tiny_run
    predictor = Predictor.from_file(run / "best.keras")
    tta = Predictor.from_file(run / "best.keras", tta=True)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    views = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
    expected = np.mean([predictor.predict(np.ascontiguousarray(v)) for v in views], axis=0)
    np.testing.assert_allclose(tta.predict(x), expected, atol=1e-5)


def test_evaluate_bad_inputs(tiny_run, tmp_path):
    run, config = tiny_run
    bad_label = tmp_path / "bad.csv"
    bad_label.write_text("image_id,dx\nISIC_0000001,melanoma\n")
    with pytest.raises(MetadataError, match="unknown label.*'melanoma'.*line 2"):
        evaluate(run / "best.keras", bad_label, image_dirs=config.image_dirs, out_dir=tmp_path / "e")
    missing = tmp_path / "missing.csv"
    missing.write_text("image_id,dx\nISIC_9999999,nv\n")
    with pytest.raises(MetadataError, match="ISIC_9999999"):
        evaluate(run / "best.keras", missing, image_dirs=config.image_dirs, out_dir=tmp_path / "e")
    not_a_model = tmp_path / "model.keras"
    not_a_model.write_text("nope")
    with pytest.raises(ModelError, match="model.keras: not a usable .keras model file"):
        evaluate(not_a_model, config.test_csv, image_dirs=config.image_dirs, out_dir=tmp_path / "e")
    assert not (tmp_path / "e" / "metrics.json").exists()


def test_predict_files_and_folders(tiny_run, tiny_demo, tmp_path):
    run, _ = tiny_run
    data, _ = tiny_demo
    folder = data / "HAM10000_images_part_1"
    paths = expand_image_paths([folder])
    assert paths == sorted(folder.glob("*.jpg"))
    predictor = Predictor.from_file(run / "best.keras", batch_size=5)
    probabilities = predict_files(predictor, paths[:7])
    assert probabilities.shape == (7, 7)
    ranked = top_classes(probabilities, k=3)
    assert all(r[0][1] >= r[1][1] >= r[2][1] for r in ranked)
    with pytest.raises(Exception, match="no such file or folder"):
        expand_image_paths([tmp_path / "missing.jpg"])


def test_predict_and_evaluate_scripts(tiny_run, tiny_demo, repo_root, tmp_path):
    run, config = tiny_run
    data, _ = tiny_demo
    image = sorted((data / "HAM10000_images_part_1").glob("*.jpg"))[0]
    out = subprocess.run([sys.executable, str(repo_root / "scripts" / "predict.py"), "--model", str(run / "best.keras"),
                          str(image), "--csv", str(tmp_path / "p.csv"), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(image) in out.stdout and any(name in out.stdout for name in CLASS_NAMES)
    assert pd.read_csv(tmp_path / "p.csv").shape == (1, 2 + len(CLASS_NAMES))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = subprocess.run([sys.executable, str(repo_root / "scripts" / "predict.py"), "--model", str(run / "best.keras"),
                          str(corrupt)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "corrupt.jpg" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, str(repo_root / "scripts" / "evaluate.py"), "--model", str(run / "best.keras"),
                          "--csv", config.test_csv, "--images", config.image_dirs[0], "--out", str(tmp_path / "ev")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "balanced accuracy" in out.stdout and (tmp_path / "ev" / "metrics.json").exists()


def test_evaluate_reads_isic2018_ground_truth(tiny_run, tmp_path):
    run, config = tiny_run
    test = pd.read_csv(config.test_csv)
    truth = pd.DataFrame({"image": test["image_id"]})
    for name in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"):
        truth[name] = (test["dx"] == name.lower()).astype(float)
    truth.to_csv(tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv", index=False)
    isic = evaluate(run / "best.keras", tmp_path / "ISIC2018_Task3_Test_GroundTruth.csv",
                    image_dirs=config.image_dirs, out_dir=tmp_path / "isic", bootstrap=0, log=lambda m: None)
    split = evaluate(run / "best.keras", config.test_csv, image_dirs=config.image_dirs,
                     out_dir=tmp_path / "split", bootstrap=0, log=lambda m: None)
    assert isic["confusion_matrix"] == split["confusion_matrix"]
    assert isic["calibration"]["nll"] == pytest.approx(split["calibration"]["nll"])
