import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from keras_ham.labels import CLASS_NAMES
from keras_ham.metrics import (
    BalancedAccuracy,
    SparseCrossentropyWithSmoothing,
    classification_metrics,
    format_metrics_table,
)


def random_case(seed, n=200):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(7, size=n, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    logits = rng.normal(size=(n, 7)) + 2.0 * np.eye(7)[y_true] * rng.uniform(0, 1, size=(n, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities.astype("float32")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_balanced_accuracy_matches_sklearn_and_ignores_sample_weight(seed):
    y_true, probabilities = random_case(seed)
    metric = BalancedAccuracy()
    for start in range(0, len(y_true), 37):  # uneven batches
        sl = slice(start, start + 37)
        metric.update_state(y_true[sl], probabilities[sl], sample_weight=np.full(len(y_true[sl]), 9.0))
    expected = balanced_accuracy_score(y_true, probabilities.argmax(1))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_smoothed_sparse_loss_equals_categorical_with_one_hot():
    import keras

    y_true, probabilities = random_case(3, n=16)
    loss = SparseCrossentropyWithSmoothing(7, label_smoothing=0.1)
    expected = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(7)[y_true], probabilities)
    assert float(loss(y_true, probabilities)) == pytest.approx(float(expected), rel=1e-5)


def test_classification_metrics_are_sklearn_values_with_absent_classes():
    y_true = np.array([5, 5, 5, 4, 4, 1, 0])
    probabilities = np.eye(7)[[5, 5, 4, 4, 5, 1, 2]] * 0.9 + 0.1 / 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # absent classes are reported in the result, not as warnings
        metrics = classification_metrics(y_true, probabilities)
    assert metrics["classes_absent"] == ["bkl", "df", "vasc"]
    assert metrics["num_images"] == 7
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["balanced_accuracy"] == pytest.approx(np.mean([0, 1, 0.5, 2 / 3]))
    assert metrics["per_class"]["df"]["support"] == 0
    assert metrics["per_class"]["nv"]["recall"] == pytest.approx(2 / 3)
    assert np.array(metrics["confusion_matrix"]).sum() == 7
    assert np.array(metrics["confusion_matrix"])[5, 4] == 1
    assert metrics["macro_roc_auc_ovr"] is not None and 0 <= metrics["macro_roc_auc_ovr"] <= 1
    table = format_metrics_table(metrics)
    assert all(name in table for name in CLASS_NAMES) and "balanced accuracy 0.5417" in table
    assert "no images of bkl, df, vasc in this set" in table and "average the 4 classes present" in table


def test_classification_metrics_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(N, num_classes\)"):
        classification_metrics([0, 1], np.zeros((3, 7)))
