"""Calibration: does a displayed 80 % come true 80 % of the time, and one temperature to fix it.

Measured (Guo et al. 2017; Kull et al. 2019):

- ECE, expected calibration error: the top-class confidence is cut into `ECE_BINS` equal-width
  bins; ECE is the image-weighted mean of |accuracy - mean confidence| over the bins.
- MCE, maximum calibration error: the largest of those gaps over non-empty bins.
- classwise ECE: the same for every class's own probability against "is this class", averaged
  over all classes (it sees the probabilities of the classes that were not predicted).
- Brier score (multiclass): mean over images of sum_k (p_k - y_k)^2, from 0 (perfect) to 2.
- NLL: mean of -log p(true class), the quantity temperature scaling minimises.

All of them are computed for rows of bootstrap weights at once (`calibration_values`), so
the lesion-level intervals of `keras_ham.metrics.bootstrap_weights` apply as they do to
accuracy. Fitted: `fit_temperature` finds the single T that minimises the validation NLL of
softmax(logits / T); it divides every logit by the same number, so the argmax (and so every
accuracy-type metric) is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from keras_ham.ood import OOD_FALSE_ALARM_RATE, validation_threshold

#: Equal-width bins on the top-class confidence (Guo et al. 2017 use 15).
ECE_BINS = 15
#: Metrics reported, in order: name -> label in tables.
CALIBRATION_METRICS = {"ece": "ECE", "classwise_ece": "classwise ECE", "mce": "MCE", "brier": "Brier",
                       "nll": "NLL"}
#: Search interval of the temperature; a fit at either end is reported as such.
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Probabilities are clipped here before the log, so one image given p = 0 (float32 underflow)
#: costs -log(1e-12) = 27.6 instead of infinity.
_NLL_FLOOR = 1e-12


def _checked(y_true, probabilities) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != len(y_true):
        raise ValueError(f"probabilities must be (N, num_classes) with N = {len(y_true)}, "
                         f"received {probabilities.shape}.")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= probabilities.shape[1]):
        raise ValueError(f"labels must be in 0..{probabilities.shape[1] - 1}.")
    return y_true, probabilities


def bin_index(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Bin of each confidence in [0, 1]: bin b holds (b/bins, (b+1)/bins], bin 0 also holds 0."""
    return np.clip(np.ceil(np.asarray(confidence, dtype=np.float64) * bins).astype(int) - 1, 0, bins - 1)


def _binned_gap_sums(values: np.ndarray, targets: np.ndarray, bins: int, weights: np.ndarray):
    """Per weight row and bin of `values`: (count, sum of targets - values, sum of values)."""
    onehot = np.zeros((len(values), bins))
    onehot[np.arange(len(values)), bin_index(values, bins)] = 1.0
    counts = weights @ onehot
    gaps = weights @ (onehot * (targets - values)[:, None])
    confidence = weights @ (onehot * values[:, None])
    return counts, gaps, confidence


def calibration_values(y_true, probabilities, weights: np.ndarray | None = None, *,
                       bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """ECE, classwise ECE, MCE, Brier and NLL for each row of `weights` (R, N) used as sample
    weights (bootstrap counts); without weights, one row of ones (the plain values)."""
    y_true, probabilities = _checked(y_true, probabilities)
    weights = np.ones((1, len(y_true))) if weights is None else np.asarray(weights, dtype=np.float64)
    totals = weights.sum(axis=1)
    num_classes = probabilities.shape[1]
    onehot = np.eye(num_classes)[y_true]
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(y_true)), predicted]
    correct = (predicted == y_true).astype(np.float64)
    counts, gaps, _ = _binned_gap_sums(confidence, correct, bins, weights)
    ece = np.abs(gaps).sum(axis=1) / totals
    with np.errstate(invalid="ignore", divide="ignore"):
        mce = np.where(counts > 0, np.abs(gaps) / counts, 0.0).max(axis=1)
    classwise = np.zeros(len(weights))
    for k in range(num_classes):
        _, class_gaps, _ = _binned_gap_sums(probabilities[:, k], onehot[:, k], bins, weights)
        classwise += np.abs(class_gaps).sum(axis=1) / totals
    brier = weights @ ((probabilities - onehot) ** 2).sum(axis=1) / totals
    nll = weights @ -np.log(np.maximum(probabilities[np.arange(len(y_true)), y_true], _NLL_FLOOR)) / totals
    return {"ece": ece, "classwise_ece": classwise / num_classes, "mce": mce, "brier": brier, "nll": nll}


def reliability_bins(y_true, probabilities, bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram's data: per confidence bin its range, image count, mean
    top-class confidence and accuracy (None for an empty bin)."""
    y_true, probabilities = _checked(y_true, probabilities)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(y_true)), predicted]
    index = bin_index(confidence, bins)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append({
            "low": b / bins, "high": (b + 1) / bins, "count": count,
            "confidence": float(confidence[members].mean()) if count else None,
            "accuracy": float((predicted[members] == y_true[members]).mean()) if count else None,
        })
    return rows


def calibration_metrics(y_true, probabilities, groups: Sequence | None = None, *, resamples: int = 1000,
                        level: float = 0.95, seed: int = 0, bins: int = ECE_BINS) -> dict:
    """Point values, percentile bootstrap intervals (whole `groups`, e.g. lesions, resampled
    as in `keras_ham.metrics.bootstrap_intervals`; `resamples=0`: none) and reliability bins."""
    from keras_ham.metrics import bootstrap_weights

    values = {name: float(value[0]) for name, value in calibration_values(y_true, probabilities, bins=bins).items()}
    result: dict = {**values, "bins": bins, "reliability": reliability_bins(y_true, probabilities, bins)}
    if resamples:
        weights = bootstrap_weights(len(np.asarray(y_true)), groups, resamples=resamples, seed=seed)
        resampled = calibration_values(y_true, probabilities, weights, bins=bins)
        tail = 100 * (1 - level) / 2
        result["confidence_intervals"] = {
            "method": f"percentile bootstrap over {'lesions' if groups is not None else 'images'}",
            "resamples": resamples, "level": level, "seed": seed,
            **{name: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
               for name, v in resampled.items()},
        }
    return result


def format_calibration(calibration: dict) -> str:
    """One line of values (with intervals when present)."""
    intervals = calibration.get("confidence_intervals") or {}
    parts = []
    for name, label in CALIBRATION_METRICS.items():
        interval = intervals.get(name)
        shown = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        parts.append(f"{label} {calibration[name]:.4f}{shown}")
    return f"calibration ({calibration['bins']} bins): " + "  ".join(parts)


# --------------------------------------------------------------------------- temperature


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def temperature_nll(logits: np.ndarray, y_true, temperature: float) -> float:
    """Mean -log softmax(logits / T)[true class], computed in log space (no underflow)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_normaliser = np.log(np.exp(z).sum(axis=1))
    y_true = np.asarray(y_true, dtype=int)
    return float(np.mean(log_normaliser - z[np.arange(len(y_true)), y_true]))


def fit_temperature(logits, y_true, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T in `bounds` minimising the NLL of softmax(logits / T) on (logits, y_true).

    The NLL is convex in 1/T (a log-sum-exp of a linear function of 1/T minus a linear term),
    so scipy's bounded Brent search over 1/T finds the one minimum; it is deterministic.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y_true, _ = _checked(y_true, logits)
    if len(y_true) == 0:
        raise ValueError("cannot fit a temperature on no images.")
    low, high = bounds
    result = minimize_scalar(lambda inverse: temperature_nll(logits, y_true, 1.0 / inverse),
                             bounds=(1.0 / high, 1.0 / low), method="bounded",
                             options={"xatol": 1e-7, "maxiter": 500})
    return float(1.0 / result.x)


# --------------------------------------------------------------------------- abstention

#: Coverages reported as numbers (the whole set, then the most confident 90, 80 and 50 %).
REPORTED_COVERAGES = (1.0, 0.9, 0.8, 0.5)
#: Confidence thresholds at which the share and quality of confident cases are stored.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))


def _kept_scores(y_true: np.ndarray, predicted: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and balanced accuracy (over the classes present) of the first k cases, k = 1..N."""
    onehot = np.eye(num_classes)[y_true]
    true_counts = np.cumsum(onehot, axis=0)
    hit_counts = np.cumsum(onehot * (predicted == y_true)[:, None], axis=0)
    kept = np.arange(1, len(y_true) + 1)
    accuracy = hit_counts.sum(axis=1) / kept
    present = true_counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hit_counts / np.maximum(true_counts, 1), 0.0)
    balanced = recall.sum(axis=1) / present.sum(axis=1)
    return accuracy, balanced


def risk_coverage(y_true, probabilities, coverages: Sequence[float] = REPORTED_COVERAGES,
                  thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """What setting aside the least confident cases buys.

    Cases are ordered by top-class confidence, most confident first (ties keep the input
    order, so the result is deterministic). For each coverage c the most confident
    round(c * N) cases (at least one) are kept and scored: accuracy and balanced accuracy
    (mean recall over the classes present among them). `aurc` is the area under the
    risk (1 - accuracy) - coverage curve (Geifman & El-Yaniv), averaged over k = 1..N kept
    cases; `area_balanced_accuracy` the same average of balanced accuracy. Per threshold t:
    the share of cases with confidence >= t ("confident", as the dashboard marks them; the
    comparison is at 1e-6) and their accuracy and balanced accuracy (None when none is kept).
    """
    y_true, probabilities = _checked(y_true, probabilities)
    if len(y_true) == 0:
        raise ValueError("risk-coverage needs at least one case.")
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities[np.arange(len(y_true)), predicted]
    order = np.argsort(-confidence, kind="stable")
    accuracy, balanced = _kept_scores(y_true[order], predicted[order], probabilities.shape[1])
    n = len(y_true)
    at = []
    for coverage in coverages:
        k = max(1, int(round(coverage * n)))
        at.append({"coverage": float(coverage), "kept": k, "min_confidence": float(confidence[order][k - 1]),
                   "accuracy": float(accuracy[k - 1]), "balanced_accuracy": float(balanced[k - 1])})
    rounded = np.round(confidence, 6)
    by_threshold = []
    for threshold in thresholds:
        kept = rounded >= round(float(threshold), 6)
        count = int(kept.sum())
        if count:
            scored_accuracy, scored_balanced = _kept_scores(y_true[kept], predicted[kept], probabilities.shape[1])
            accuracy_t, balanced_t = float(scored_accuracy[-1]), float(scored_balanced[-1])
        else:
            accuracy_t = balanced_t = None
        by_threshold.append({"threshold": float(threshold), "kept": count, "coverage": count / n,
                             "accuracy": accuracy_t, "balanced_accuracy": balanced_t})
    # The curve at up to 101 evenly spaced coverages, for the plot and the dashboard.
    points = np.unique(np.clip(np.round(np.linspace(0, 1, 101) * n).astype(int), 1, n))
    return {
        "num_images": n,
        "at_coverage": at,
        "aurc": float(np.mean(1.0 - accuracy)),
        "area_balanced_accuracy": float(np.mean(balanced)),
        "thresholds": by_threshold,
        "curve": {"coverage": (points / n).tolist(), "accuracy": accuracy[points - 1].tolist(),
                  "balanced_accuracy": balanced[points - 1].tolist()},
    }


def format_risk_coverage(result: dict) -> str:
    shown = "  ".join(f"{row['coverage']:.0%}: acc {row['accuracy']:.3f} bal {row['balanced_accuracy']:.3f}"
                      for row in result["at_coverage"])
    return (f"risk-coverage (most confident kept): {shown}  AURC {result['aurc']:.4f}  "
            f"area under balanced accuracy {result['area_balanced_accuracy']:.4f}")


def threshold_sentence(result: dict, threshold: float, split: str = "test") -> str | None:
    """"at 0.60, 78 % of test images are shown as confident and their balanced accuracy is
    0.71" from stored per-threshold numbers; None when `threshold` was not stored."""
    row = next((r for r in result.get("thresholds", []) if abs(r["threshold"] - float(threshold)) < 1e-6), None)
    if row is None:
        return None
    share = f"{100 * row['coverage']:.0f}\u00a0% of {split} images ({row['kept']} of {result['num_images']})"
    if row["kept"] == 0:
        return f"at {float(threshold):.2f}, none of the {result['num_images']} {split} images is shown as confident."
    return (f"at {float(threshold):.2f}, {share} are shown as confident and their balanced accuracy is "
            f"{row['balanced_accuracy']:.2f} (accuracy {row['accuracy']:.2f}).")


# --------------------------------------------------------------------------- fitting a saved model

#: Summary keys compared before and after temperature scaling.
_FIT_REPORTED = ("ece", "nll", "brier", "classwise_ece")


def model_logits(model, batches, *, batch_size: int = 32) -> np.ndarray:
    """(N, num_classes) pre-softmax class scores (`logits` layer) for a PyDataset-like iterable.

    Runs through the Predictor, so the fast torch path is used when it matches the model."""
    import keras

    from keras_ham.model import LOGITS_LAYER, ModelError, classifier_input
    from keras_ham.predict import Predictor

    try:
        logits = model.get_layer(LOGITS_LAYER).output
    except ValueError:
        raise ModelError(f"{model.name}: not a keras-ham classifier (no {LOGITS_LAYER!r} layer).") from None
    logits_model = keras.Model(classifier_input(model), logits, name=f"{model.name}_logits")
    return Predictor(logits_model, batch_size=batch_size).predict_dataset(batches).astype(np.float64)


#: Why a temperature fitted at an end of `TEMPERATURE_BOUNDS` is not applied, by end.
SKIPPED_AT_BOUND = {
    "low": "validation NLL has no interior minimum: the validation split is separable (the NLL keeps "
           "falling as T shrinks), so T would only sharpen every probability and make the images the "
           "model gets wrong near-certain",
    "high": "validation NLL has no interior minimum: it keeps falling as T grows (the logits say nothing "
            "about the validation labels), so T would only flatten every probability towards uniform",
}


def nll_minimum_side(logits, y_true) -> str | None:
    """"low" when the NLL of softmax(logits / T) keeps falling as T -> 0, "high" when it keeps
    falling as T -> infinity, None when it has a minimum at some 0 < T < infinity.

    The NLL is convex in 1/T. It falls all the way to T -> 0 exactly when every image's true
    class has the strictly largest logit (a separable set; the numerical search then stops
    anywhere on a flat, near-zero NLL, so its T alone cannot tell). Its slope at 1/T = 0 is
    mean(mean_k z_k - z_true), so it falls towards T -> infinity when the true class's logit is
    on average no higher than the mean logit."""
    z = np.asarray(logits, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=int)
    rows = np.arange(len(y_true))
    true_logit = z[rows, y_true]
    others = z.copy()
    others[rows, y_true] = -np.inf
    if np.all(true_logit > others.max(axis=1)):
        return "low"
    if np.mean(true_logit - z.mean(axis=1)) <= 0:
        return "high"
    return None


def temperature_report(logits, y_true, *, source: str | None = None, allow_bound: bool = False) -> dict:
    """Fit T on (logits, y_true) and decide whether to apply it; JSON-ready.

    When the NLL has no interior minimum (`nll_minimum_side`), or its minimum lies beyond the
    search interval, the fitted T is not trustworthy (on the demo run's error-free validation
    split T ran to 0.05 and the test NLL rose from 0.074 to 0.121): such a T is not applied ("applied": false, "skipped": why, "temperature": None)
    unless `allow_bound`. "before" are the ECE / NLL / Brier of softmax(logits) on the fit
    set, "after" those of the probabilities the model gives afterwards (equal to "before"
    when skipped); a skipped fit also stores "at_fitted_temperature".
    """
    y_true = np.asarray(y_true, dtype=int)
    fitted = fit_temperature(logits, y_true)
    low, high = TEMPERATURE_BOUNDS
    bound = nll_minimum_side(logits, y_true)
    if bound is None:  # an interior minimum, but beyond the search interval
        bound = "low" if np.isclose(fitted, low, rtol=1e-3) else "high" if np.isclose(fitted, high, rtol=1e-3) else None
    skipped = SKIPPED_AT_BOUND[bound] if bound is not None and not allow_bound else None
    before = _fit_values(logits, y_true, 1.0)
    at_fitted = _fit_values(logits, y_true, fitted)
    report = {
        "temperature": None if skipped else fitted,
        "fitted_temperature": fitted,
        "applied": skipped is None,
        "skipped": skipped,
        "fitted_on": source,
        "num_images": int(len(y_true)),
        "objective": "negative log-likelihood (bounded Brent search over 1/T)",
        "bounds": [low, high],
        "at_bound": bound is not None,
        "before": before,
        "after": dict(before if skipped else at_fitted),
        "nll_note": "NLL here is exact (log-softmax of the logits, the fit's objective); evaluation's NLL from "
                    "probabilities floors p at 1e-12, which caps what a confidently wrong image costs",
    }
    if skipped:
        report["at_fitted_temperature"] = at_fitted
    return report


def _fit_values(logits, y_true, temperature: float) -> dict:
    """The reported values of softmax(logits / T), with the NLL computed exactly from the logits.

    From probabilities the NLL has to floor p (float32 outputs underflow to 0), and with the
    floor a temperature that lowers the exact NLL can raise the floored one: measured on a
    from-scratch ResNet50 (64 px, 3 epochs, logits up to 150) on real validation images,
    exact NLL 1.803 -> 1.715 at T = 1.73 but floored 1.557 -> 1.609."""
    values = calibration_values(y_true, softmax(logits, temperature))
    out = {name: float(values[name][0]) for name in _FIT_REPORTED}
    out["nll"] = temperature_nll(logits, y_true, temperature)
    return out


def calibrate_classifier(model, batches, y_true, *, batch_size: int = 32, source: str | None = None,
                         logits: np.ndarray | None = None, allow_bound: bool = False):
    """Fit one temperature on (batches, y_true), normally the validation split.

    Returns (the model with the temperature built in, `temperature_report`). When the report
    says "applied": false (T at a bound, see `temperature_report`) the model is returned as
    given. Any temperature already in `model` is ignored by the fit: it starts from its
    logits (`logits`: already computed for `batches`).
    """
    from keras_ham.model import with_temperature

    if logits is None:
        logits = model_logits(model, batches, batch_size=batch_size)
    report = temperature_report(logits, y_true, source=source, allow_bound=allow_bound)
    return (with_temperature(model, report["temperature"]) if report["applied"] else model), report


def save_model_atomic(model, path) -> None:
    """Save a .keras file so a reader never sees a half-written one."""
    from keras_ham.device import keras_without_tensorflow
    from keras_ham.io_utils import atomic_path

    with atomic_path(path) as tmp, keras_without_tensorflow():
        model.save(tmp)


def fit_on_validation(run_dir, config, val_data, log=print, train_data=None) -> dict:
    """After training, on the validation split: the out-of-distribution threshold, and (when
    `config.calibrate`) T, with `best.keras` rewritten atomically with T built in. Returns
    {"calibration": report or None, "ood": threshold record} for summary.json.

    With `train_data` (the training split, unshuffled) and a backbone that names an
    `ood_layer`, the record is the feature-statistics score of keras_ham.ood (its Gaussian
    fitted on `train_data`, written to `RunFolder.ood_statistics`) with the energy record
    nested under "energy"; otherwise the energy record alone, as older runs have it."""
    from keras_ham.model import load_classifier
    from keras_ham.ood import fit_feature_ood, ood_layer_of
    from keras_ham.runs import RunFolder

    folder = RunFolder(run_dir)
    path = folder.best_model
    model = load_classifier(path)
    logits = model_logits(model, val_data, batch_size=config.batch_size)
    ood = fit_ood_threshold(logits, source=str(config.val_csv))
    log(f"out-of-distribution energy threshold: {ood['threshold']:.4f} (flags "
        f"{ood['false_alarm_rate']:.0%} of validation images)")
    layer = ood_layer_of(model) if train_data is not None else None
    if layer is not None:
        gaussian, record = fit_feature_ood(model, layer, train_data, val_data, batch_size=config.batch_size,
                                           train_source=str(config.train_csv), val_source=str(config.val_csv))
        gaussian.save(folder.ood_statistics)
        ood = {**record, "statistics_file": folder.ood_statistics.name, "energy": ood}
        log(f"out-of-distribution flag: {layer} channel statistics, distance above {record['threshold']:.4f} "
            f"(flags {record['false_alarm_rate']:.0%} of validation images); wrote {folder.ood_statistics}")
    if not config.calibrate:
        return {"calibration": None, "ood": ood}
    calibrated, report = calibrate_classifier(model, val_data, val_data.labels, batch_size=config.batch_size,
                                              source=str(config.val_csv), logits=logits)
    if not report["applied"]:
        log(f"warning: temperature scaling skipped, {path} kept as trained: the fit on {report['num_images']} "
            f"validation images gave T = {report['fitted_temperature']:.4f} (search interval "
            f"{report['bounds'][0]}-{report['bounds'][1]}), but {report['skipped']}.")
        return {"calibration": report, "ood": ood}
    save_model_atomic(calibrated, path)
    log(f"temperature scaling on {report['num_images']} validation images: T = {report['temperature']:.4f}; "
        f"ECE {report['before']['ece']:.4f} -> {report['after']['ece']:.4f}, "
        f"NLL {report['before']['nll']:.4f} -> {report['after']['nll']:.4f}; rewrote {path}")
    return {"calibration": report, "ood": ood}


def calibrate_file(model_path, csv_path, *, image_dirs=(), out_path=None, batch_size: int = 32,
                   allow_bound: bool = False, log=print) -> tuple[Path, dict]:
    """`scripts/calibrate.py`: fit T on a labelled CSV and write the calibrated model to a NEW
    file (default `<model stem>_calibrated.keras` beside it); an existing file is never
    overwritten, so the original model always survives. A T at an end of its search interval
    (no interior minimum of the NLL) is refused with a KerasHamError, no file written, unless
    `allow_bound`."""
    from keras_ham.dataset import HamDataset
    from keras_ham.errors import KerasHamError
    from keras_ham.labels import CLASS_TO_INDEX
    from keras_ham.metadata import read_labelled_csv, require_image_paths
    from keras_ham.model import load_classifier, model_image_size

    model_path = Path(model_path)
    out_path = Path(out_path) if out_path is not None else model_path.with_name(f"{model_path.stem}_calibrated.keras")
    if out_path.suffix != ".keras":
        raise KerasHamError(f"--out {out_path}: expected a file name ending in .keras.")
    if out_path.exists() or out_path.resolve() == model_path.resolve():
        raise KerasHamError(f"--out {out_path}: the file exists; calibration writes a new file and never "
                            "overwrites one. Choose another name or remove it.")
    if not out_path.parent.is_dir():
        raise KerasHamError(f"--out {out_path}: folder {out_path.parent} does not exist.")
    model = load_classifier(model_path)
    frame = read_labelled_csv(csv_path)
    paths = require_image_paths(frame, csv_path, image_dirs)
    labels = frame["dx"].map(CLASS_TO_INDEX).to_numpy()
    data = HamDataset(paths, None, image_size=model_image_size(model), batch_size=batch_size)
    calibrated, report = calibrate_classifier(model, data, labels, batch_size=batch_size, source=str(csv_path),
                                              allow_bound=allow_bound)
    if not report["applied"]:
        raise KerasHamError(
            f"{csv_path}: temperature scaling refused, nothing written: the fit on {report['num_images']} images "
            f"gave T = {report['fitted_temperature']:.4f} (search interval "
            f"{report['bounds'][0]}-{report['bounds'][1]}), but {report['skipped']}. Fit on a validation split the "
            f"model makes errors on, or pass --allow-bound to write it anyway.")
    report["model"] = str(model_path)
    save_model_atomic(calibrated, out_path)
    log(f"T = {report['temperature']:.4f} fitted on {report['num_images']} images of {csv_path}"
        f"{' (at the search bound)' if report['at_bound'] else ''}; on them ECE "
        f"{report['before']['ece']:.4f} -> {report['after']['ece']:.4f}, NLL {report['before']['nll']:.4f} -> "
        f"{report['after']['nll']:.4f}; wrote {out_path}")
    return out_path, report


# --------------------------------------------------------------------------- out of distribution

def energy_score(logits) -> np.ndarray:
    """-logsumexp(logits) of the raw (temperature 1) logits (Liu et al. 2020): higher means
    less like the training data. A temperature does not change it (it is built in after
    the `logits` layer), so the threshold survives calibration."""
    z = np.asarray(logits, dtype=np.float64)
    peak = z.max(axis=1)
    return -(peak + np.log(np.exp(z - peak[:, None]).sum(axis=1)))


def fit_ood_threshold(logits, *, false_alarm_rate: float = OOD_FALSE_ALARM_RATE, source: str | None = None) -> dict:
    """The energy above which an image is flagged, set so that `false_alarm_rate` of the given
    (validation) images are: the smallest stored value that flags at most that share."""
    scores = energy_score(logits)
    threshold = validation_threshold(scores, false_alarm_rate)
    return {"score": "energy", "definition": "-logsumexp(logits), raw logits", "threshold": threshold,
            "false_alarm_rate": false_alarm_rate, "flagged_on_fit": float(np.mean(scores > threshold)),
            "fitted_on": source, "num_images": int(len(scores))}


def ood_flags(logits, ood: dict) -> tuple[np.ndarray, np.ndarray]:
    """(energy scores, flagged) for the images of `logits` under a stored threshold record."""
    scores = energy_score(logits)
    return scores, scores > float(ood["threshold"])


def stored_ood_threshold(summary_path: str | Path) -> dict | None:
    """The "ood" record of a run's summary.json: the feature-statistics score (keras_ham.ood,
    its energy record nested under "energy") or, in older runs, the energy record; None when
    the file, or the record, is missing or unreadable."""
    import json

    try:
        summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    ood = summary.get("ood") if isinstance(summary, dict) else None
    return ood if isinstance(ood, dict) and isinstance(ood.get("threshold"), (int, float)) else None
