"""The whole pipeline on real HAM10000 images (skipped when ../shared/data/ham10000-224 is absent).

A stratified sample of ~250 real images keeps it to seconds: split by lesion, train a tiny
model for one epoch, evaluate, predict and explain. This checks that real files (the Kaggle
layout, real metadata, real JPEGs) flow through every stage; the demo tests check learning.
"""

import json

import numpy as np
import pandas as pd

from conftest import tiny_config
from keras_ham.evaluate import evaluate
from keras_ham.gradcam import GradCAM
from keras_ham.labels import CLASS_NAMES
from keras_ham.model import load_classifier
from keras_ham.predict import Predictor, predict_files
from keras_ham.split import write_split_files
from keras_ham.train import train

PER_CLASS = 40


def test_real_images_split_train_evaluate_predict_explain(real_data_dir, tmp_path):
    metadata = pd.read_csv(real_data_dir / "HAM10000_metadata.csv")
    sample = pd.concat([rows.sample(min(len(rows), PER_CLASS), random_state=0)
                        for _dx, rows in metadata.groupby("dx")])
    assert set(sample["dx"]) == set(CLASS_NAMES)
    meta_csv = tmp_path / "HAM10000_metadata.csv"
    sample.to_csv(meta_csv, index=False)

    splits = write_split_files(meta_csv, tmp_path / "processed", seed=1, image_dirs=[real_data_dir], log=None)
    frames = {name: pd.read_csv(path) for name, path in splits.items()}
    lesions = [set(frame["lesion_id"]) for frame in frames.values()]
    assert not (lesions[0] & lesions[1] or lesions[0] & lesions[2] or lesions[1] & lesions[2])
    assert sum(len(frame) for frame in frames.values()) == len(sample)

    config = tiny_config((real_data_dir, tmp_path / "processed"), tmp_path, max_epochs=1, run_name="real")
    result = train(config, log=lambda _message: None, verbose=0)
    metrics = evaluate(result.run_dir / "best.keras", config.test_csv, image_dirs=config.image_dirs,
                       log=lambda _message: None)
    test = frames["test"]
    assert metrics["num_images"] == len(test)
    assert np.array(metrics["confusion_matrix"]).sum() == len(test)
    written = json.loads((result.run_dir / "eval_test" / "metrics.json").read_text())
    assert written["balanced_accuracy"] == metrics["balanced_accuracy"]
    predictions = pd.read_csv(result.run_dir / "eval_test" / "predictions.csv")
    assert predictions["image_id"].tolist() == test["image_id"].tolist()

    files = sorted((real_data_dir / "HAM10000_images_part_1").glob("*.jpg"))[:2]
    probabilities = predict_files(Predictor.from_file(result.run_dir / "best.keras"), files)
    assert probabilities.shape == (2, len(CLASS_NAMES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    cams = GradCAM(load_classifier(result.run_dir / "best.keras"))(files)
    assert cams.heatmaps.shape == (2, config.image_size, config.image_size)
    assert np.isfinite(cams.heatmaps).all() and cams.heatmaps.min() >= 0 and cams.heatmaps.max() <= 1
