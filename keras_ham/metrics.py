"""Training-time metrics and loss (Keras) and test-time metrics (scikit-learn).

Balanced accuracy (mean per-class recall) is the headline number: HAM10000 is two-thirds
`nv`, so plain accuracy rewards a model that ignores the rare, dangerous classes.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import keras
import numpy as np

from keras_ham.labels import CLASS_NAMES, NUM_CLASSES


class BalancedAccuracy(keras.metrics.Metric):
    """Mean recall over the classes present in `y_true` so far (streaming).

    Takes sparse integer labels and class probabilities; ignores `sample_weight`, so
    class weights passed to `fit` do not change what it reports.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, name: str = "balanced_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.true_counts = self.add_variable(shape=(num_classes,), initializer="zeros", name="true_counts")
        self.correct_counts = self.add_variable(shape=(num_classes,), initializer="zeros", name="correct_counts")

    def update_state(self, y_true, y_pred, sample_weight=None):
        del sample_weight
        y_true = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        predicted = keras.ops.cast(keras.ops.argmax(y_pred, axis=-1), "int32")
        true_one_hot = keras.ops.one_hot(y_true, self.num_classes, dtype=self.dtype)
        correct = keras.ops.cast(keras.ops.equal(y_true, predicted), self.dtype)
        self.true_counts.assign_add(keras.ops.sum(true_one_hot, axis=0))
        self.correct_counts.assign_add(keras.ops.sum(true_one_hot * correct[:, None], axis=0))

    def result(self):
        present = keras.ops.cast(self.true_counts > 0, self.dtype)
        recall = keras.ops.divide_no_nan(self.correct_counts, self.true_counts)
        return keras.ops.divide_no_nan(keras.ops.sum(recall * present), keras.ops.sum(present))

    def reset_state(self):
        self.true_counts.assign(keras.ops.zeros((self.num_classes,), dtype=self.dtype))
        self.correct_counts.assign(keras.ops.zeros((self.num_classes,), dtype=self.dtype))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


class SparseCrossentropyWithSmoothing(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing, taking integer labels.

    Keras's sparse loss has no label smoothing, and one-hot labels would make every
    batch seven times larger for no reason.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, label_smoothing: float = 0.0, name="crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        y_true = keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32")
        one_hot = keras.ops.one_hot(y_true, self.num_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


def classification_metrics(
    y_true: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> dict:
    """Test metrics from scikit-learn, as plain JSON-ready data.

    `y_true` are class indices, `probabilities` is (N, num_classes). ROC AUC is the
    macro one-vs-rest over the classes present in `y_true` (undefined otherwise).
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != len(y_true):
        raise ValueError(
            f"probabilities must be (N, num_classes) with N = {len(y_true)}, received {probabilities.shape}."
        )
    labels = list(range(len(class_names)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = sorted(set(y_true.tolist()))
    auc = None
    if len(present) >= 2:
        # One-vs-rest AUC per present class, then their mean (sklearn's 'macro' needs all
        # columns present; computing per class keeps absent classes from breaking it).
        per_class_auc = {}
        for index in present:
            positives = (y_true == index).astype(int)
            if 0 < positives.sum() < len(positives):
                per_class_auc[class_names[index]] = float(skm.roc_auc_score(positives, probabilities[:, index]))
        auc = float(np.mean(list(per_class_auc.values()))) if per_class_auc else None
    else:
        per_class_auc = {}
    with warnings.catch_warnings():
        # A class predicted but absent from y_true: reported once, as "classes_absent", below.
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced_accuracy = float(skm.balanced_accuracy_score(y_true, y_pred))
    return {
        "num_images": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced_accuracy,
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_roc_auc_ovr": auc,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "roc_auc_ovr": per_class_auc.get(name),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
        # Balanced accuracy, macro F1 and macro AUC average over the classes present only.
        "classes_absent": [name for index, name in enumerate(class_names) if index not in present],
    }


def format_metrics_table(metrics: dict) -> str:
    """A readable per-class table plus the headline numbers."""
    lines = [f"{'class':<7} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<7} {row['precision']:>9.3f} {row['recall']:>7.3f} {row['f1']:>6.3f} {row['support']:>8d}"
        )
    auc = metrics["macro_roc_auc_ovr"]
    lines.append("")
    lines.append(
        f"images {metrics['num_images']}  accuracy {metrics['accuracy']:.4f}  "
        f"balanced accuracy {metrics['balanced_accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}  "
        f"weighted F1 {metrics['weighted_f1']:.4f}  macro ROC AUC {'n/a' if auc is None else f'{auc:.4f}'}"
    )
    intervals = metrics.get("confidence_intervals")
    if intervals:
        labels = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}
        shown = "  ".join(f"{labels[name]} [{intervals[name][0]:.3f}, {intervals[name][1]:.3f}]"
                          for name in INTERVAL_METRICS)
        lines.append(f"{intervals['level']:.0%} intervals ({intervals['method']}, {intervals['resamples']} "
                     f"resamples): {shown}")
    absent = metrics.get("classes_absent") or []
    if absent:
        present = len(metrics["per_class"]) - len(absent)
        lines.append(f"note: no images of {', '.join(absent)} in this set; balanced accuracy, macro F1 and "
                     f"macro ROC AUC average the {present} classes present.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- uncertainty

#: Headline metrics that get a bootstrap confidence interval.
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def bootstrap_weights(
    num_images: int, groups: Sequence | None = None, *, resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """(resamples, num_images) counts: how often each image is drawn in each bootstrap resample.

    With `groups` (e.g. lesion ids) whole groups are drawn, so all images of a lesion come and
    go together: they are not independent evidence, and resampling them one by one would
    understate the uncertainty.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples)
    codes, group_index = np.unique(np.asarray(groups), return_inverse=True)
    group_counts = rng.multinomial(len(codes), np.full(len(codes), 1.0 / len(codes)), size=resamples)
    return group_counts[:, group_index]


def weighted_headline_metrics(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray,
                              num_classes: int) -> dict[str, np.ndarray]:
    """accuracy, balanced_accuracy and macro_f1 for each row of `weights` (as sample weights),
    over the classes present in that row (as `classification_metrics` does)."""
    pair = np.asarray(y_true) * num_classes + np.asarray(y_pred)
    onehot = np.zeros((len(pair), num_classes * num_classes))
    onehot[np.arange(len(pair)), pair] = 1.0
    confusion = (weights @ onehot).reshape(len(weights), num_classes, num_classes)  # [r, true, predicted]
    hits = np.einsum("rcc->rc", confusion)
    true_totals, predicted_totals = confusion.sum(axis=2), confusion.sum(axis=1)
    present = true_totals > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / true_totals, 0.0)
        precision = np.where(predicted_totals > 0, hits / predicted_totals, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    classes_present = present.sum(axis=1)
    return {
        "accuracy": hits.sum(axis=1) / confusion.sum(axis=(1, 2)),
        "balanced_accuracy": (recall * present).sum(axis=1) / classes_present,
        "macro_f1": (f1 * present).sum(axis=1) / classes_present,
    }


def bootstrap_intervals(
    y_true: Sequence[int],
    probabilities: np.ndarray,
    groups: Sequence | None = None,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap confidence intervals of the headline test metrics.

    A test split of a few hundred images gives balanced accuracy only to within several
    points (a class with a dozen images moves it by 1/7 of its recall); the interval says
    how many. Pass lesion ids as `groups` to resample whole lesions.
    """
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities)
    weights = bootstrap_weights(len(y_true), groups, resamples=resamples, seed=seed)
    values = weighted_headline_metrics(y_true, probabilities.argmax(axis=1), weights, probabilities.shape[1])
    tail = 100 * (1 - level) / 2
    intervals = {name: [float(np.percentile(values[name], tail)), float(np.percentile(values[name], 100 - tail))]
                 for name in INTERVAL_METRICS}
    unit = "lesions" if groups is not None else "images"
    return {"method": f"percentile bootstrap over {unit}", "resamples": resamples, "level": level,
            "seed": seed, **intervals}
