import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from keras_ham.labels import CLASS_NAMES
from keras_ham.metrics import (
    BalancedAccuracy,
    bootstrap_intervals,
    bootstrap_weights,
    weighted_headline_metrics,
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


def test_weighted_headline_metrics_equal_sklearn_with_sample_weights():
    from sklearn import metrics as skm

    rng = np.random.default_rng(3)
    y_true = rng.choice([0, 1, 2, 5], size=60)  # classes 3, 4 and 6 absent from the truth
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.integers(0, 7, 60))
    weights = bootstrap_weights(60, resamples=5, seed=1)
    values = weighted_headline_metrics(y_true, y_pred, weights.astype(float), 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for row, w in enumerate(weights):
            present = sorted(set(y_true[w > 0].tolist()))
            assert values["accuracy"][row] == pytest.approx(skm.accuracy_score(y_true, y_pred, sample_weight=w))
            assert values["balanced_accuracy"][row] == pytest.approx(
                skm.balanced_accuracy_score(y_true, y_pred, sample_weight=w))
            assert values["macro_f1"][row] == pytest.approx(
                skm.f1_score(y_true, y_pred, labels=present, average="macro", sample_weight=w, zero_division=0))


def test_bootstrap_intervals_are_reproducible_and_bracket_the_estimate():
    rng = np.random.default_rng(4)
    y_true = rng.integers(0, 7, 300)
    probabilities = np.eye(7)[np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 7, 300))]
    first = bootstrap_intervals(y_true, probabilities, resamples=400, seed=2)
    assert first == bootstrap_intervals(y_true, probabilities, resamples=400, seed=2)
    estimate = classification_metrics(y_true, probabilities)
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        low, high = first[name]
        assert low < estimate[name] < high and high - low < 0.2
    perfect = bootstrap_intervals(y_true, np.eye(7)[y_true], resamples=50)
    assert perfect["balanced_accuracy"] == [1.0, 1.0] and perfect["method"] == "percentile bootstrap over images"


def test_lesion_bootstrap_does_not_count_copies_of_a_lesion_as_evidence():
    """Five images of each lesion carry the information of one: resampling images would
    shrink the interval by about sqrt(5); resampling lesions does not."""
    rng = np.random.default_rng(5)
    y_lesion = rng.integers(0, 7, 120)
    pred_lesion = np.where(rng.random(120) < 0.6, y_lesion, rng.integers(0, 7, 120))
    y_true, predicted = np.repeat(y_lesion, 5), np.repeat(pred_lesion, 5)
    lesions = np.repeat(np.arange(120), 5)
    probabilities = np.eye(7)[predicted]

    def width(result):
        return result["balanced_accuracy"][1] - result["balanced_accuracy"][0]

    by_lesion = bootstrap_intervals(y_true, probabilities, lesions, resamples=500)
    by_image = bootstrap_intervals(y_true, probabilities, resamples=500)
    one_each = bootstrap_intervals(y_lesion, np.eye(7)[pred_lesion], resamples=500)
    assert by_lesion["method"] == "percentile bootstrap over lesions"
    assert width(by_lesion) > 1.6 * width(by_image)
    assert width(by_lesion) == pytest.approx(width(one_each), rel=0.35)
