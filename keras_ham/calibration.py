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

from typing import Sequence

import numpy as np

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
