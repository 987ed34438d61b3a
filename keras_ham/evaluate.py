"""Evaluate a saved classifier on a labelled CSV: metrics.json, predictions.csv, plots.

The CSV needs only `image_id` and `dx`, or is an ISIC 2018 Task 3 ground-truth CSV (`image`
plus one-hot class columns); images are found as in the split step. The
accuracy-type metrics come from scikit-learn (`keras_ham.metrics.classification_metrics`);
calibration (ECE, MCE, Brier, NLL) and the risk-coverage curve of abstaining on the least
confident cases from `keras_ham.calibration`; the share of images the run's
out-of-distribution flag raises from `keras_ham.ood`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from keras_ham.dataset import HamDataset
from keras_ham.io_utils import atomic_path, ensure_output_dir, write_csv_atomic, write_json_atomic
from keras_ham.labels import CLASS_NAMES, CLASS_TO_INDEX
from keras_ham.metadata import read_labelled_csv, require_image_paths
from keras_ham.calibration import (
    calibration_metrics,
    format_calibration,
    format_risk_coverage,
    model_logits,
    ood_flags,
    risk_coverage,
    stored_ood_threshold,
)
from keras_ham.metrics import bootstrap_intervals, classification_metrics, format_metrics_table
from keras_ham.model import model_temperature
from keras_ham.ood import FEATURE_SCORE, energy_record, feature_scorer_for_run
from keras_ham.predict import Predictor
from keras_ham.runs import EvaluationFiles, RunFolder


def default_output_dir(model_path: str | os.PathLike, csv_path: str | os.PathLike) -> Path:
    """`runs/<name>/eval_<csv stem>/`: evaluations live beside the model they judge."""
    return RunFolder.of_model(model_path).evaluation_dir(csv_path)


def predictions_frame(image_ids: Sequence[str], y_true: Sequence[int], probabilities: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "image_id": list(image_ids),
            "true": [CLASS_NAMES[i] for i in y_true],
            "predicted": [CLASS_NAMES[i] for i in probabilities.argmax(axis=1)],
        }
    )
    for index, name in enumerate(CLASS_NAMES):
        frame[f"p_{name}"] = np.round(probabilities[:, index].astype(np.float64), 6)
    return frame


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], path: Path, title: str = "Confusion matrix") -> Path:
    """Counts with row-normalised colour (recall per true class), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    figure, axes = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    image = axes.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    axes.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            axes.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                      color="white" if normalised[i, j] > 0.5 else "black", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    _pyplot().close(figure)
    return path


def plot_reliability_diagram(calibration: dict, path: Path, title: str = "Reliability diagram") -> Path:
    """Accuracy against mean top-class confidence per bin (the diagonal is perfect
    calibration), each bar labelled with its image count; written atomically."""
    plt = _pyplot()
    bins = calibration["reliability"]
    figure, axes = plt.subplots(figsize=(5.6, 5.2), dpi=110)
    width = 1.0 / calibration["bins"]
    axes.plot([0, 1], [0, 1], linestyle="--", color="#888888", label="perfect calibration")
    for row in bins:
        if not row["count"]:
            continue
        axes.bar(row["low"], row["accuracy"], width=width, align="edge", color="#9db4c8", edgecolor="#1f5f8b")
        axes.plot(row["confidence"], row["accuracy"], "o", color="#1f5f8b", markersize=3)
        axes.text(row["low"] + width / 2, min(row["accuracy"], 0.93) + 0.02, str(row["count"]), ha="center",
                  va="bottom", fontsize=7, rotation=90)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("top-class confidence (bar: bin; dot: mean confidence in the bin)")
    axes.set_ylabel("accuracy in the bin (number: images)")
    axes.set_title(f"{title}\nECE {calibration['ece']:.3f}  MCE {calibration['mce']:.3f}  "
                   f"NLL {calibration['nll']:.3f}", fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def plot_risk_coverage(result: dict, path: Path, title: str = "Risk-coverage") -> Path:
    """Accuracy and balanced accuracy of the cases kept when the least confident are set aside."""
    plt = _pyplot()
    curve = result["curve"]
    figure, axes = plt.subplots(figsize=(5.6, 4.4), dpi=110)
    axes.plot(curve["coverage"], curve["balanced_accuracy"], color="#1f5f8b", label="balanced accuracy")
    axes.plot(curve["coverage"], curve["accuracy"], color="#e07b00", label="accuracy")
    for row in result["at_coverage"]:
        axes.plot(row["coverage"], row["balanced_accuracy"], "o", color="#1f5f8b", markersize=4)
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("coverage (share of cases kept, most confident first)")
    axes.set_ylabel("score of the kept cases")
    axes.set_title(f"{title}\nAURC {result['aurc']:.3f}", fontsize=10)
    axes.legend(loc="lower left", fontsize=8)
    return _save(figure, path)


def _flag_counts(scores: np.ndarray, flagged: np.ndarray, record: dict) -> dict:
    return {**{key: record[key] for key in ("score", "threshold", "false_alarm_rate")},
            "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
            "score_median": float(np.median(scores))}


def ood_report(model, folder: RunFolder, data, *, batch_size: int = 32) -> dict:
    """{"ood": ...}: how many images of `data` the run's out-of-distribution flag raises (the
    feature-statistics score, with the energy flag under "energy"; older runs: energy only);
    {} when the run stores no threshold."""
    record = stored_ood_threshold(folder.summary)
    if record is None:
        return {}
    report = {}
    energy = energy_record(record)
    if energy is not None:  # one more pass, for the logits: the model outputs probabilities
        report = _flag_counts(*ood_flags(model_logits(model, data, batch_size=batch_size), energy), energy)
    scorer = feature_scorer_for_run(model, record, folder.ood_statistics, batch_size=batch_size)
    if scorer is not None:
        scores = scorer.dataset_scores(data)
        report = {**_flag_counts(scores, scorer.flags(scores), record), "layer": record.get("layer"),
                  **({"energy": report} if report else {})}
    return {"ood": report} if report else {}


def format_ood(ood: dict, num_images: int) -> str:
    """One line per score: how many images its flag raises."""
    def line(record: dict) -> str:
        name = f"{record['layer']} channel statistics" if record["score"] == FEATURE_SCORE else record["score"]
        return (f"out-of-distribution flag ({name} > {record['threshold']:.3f}, set to flag "
                f"{record['false_alarm_rate']:.0%} of validation images): {record['flagged']} of {num_images} images "
                f"({record['flagged_share']:.1%})")
    return "\n".join([line(ood)] + ([line(ood["energy"])] if "energy" in ood else []))


def evaluate(
    model_path: str | os.PathLike,
    csv_path: str | os.PathLike,
    *,
    image_dirs: Sequence[str | os.PathLike] = (),
    out_dir: str | os.PathLike | None = None,
    tta: bool = False,
    batch_size: int = 32,
    bootstrap: int = 1000,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate `model_path` on `csv_path`; returns the metrics and writes the artifacts.

    `bootstrap` resamples (0: none) give 95 % intervals of the headline metrics, resampling
    whole lesions when the CSV has a complete `lesion_id` column (split CSVs do)."""
    frame = read_labelled_csv(csv_path)
    paths = require_image_paths(frame, csv_path, image_dirs)
    predictor = Predictor.from_file(model_path, batch_size=batch_size, tta=tta)
    y_true = frame["dx"].map(CLASS_TO_INDEX).to_numpy()
    out = ensure_output_dir(out_dir if out_dir is not None else default_output_dir(model_path, csv_path))
    data = HamDataset(paths, None, image_size=predictor.image_size, batch_size=batch_size)
    log(f"evaluating {model_path} on {len(frame)} images from {csv_path} at {predictor.image_size}px"
        f"{' with flip TTA' if tta else ''}")
    probabilities = predictor.predict_dataset(data)
    metrics = classification_metrics(y_true, probabilities)
    lesions = frame["lesion_id"] if "lesion_id" in frame.columns else None
    groups = lesions.astype(str).to_numpy() if lesions is not None and lesions.notna().all() else None
    if bootstrap:
        metrics["confidence_intervals"] = bootstrap_intervals(y_true, probabilities, groups, resamples=bootstrap)
    metrics["calibration"] = calibration_metrics(y_true, probabilities, groups, resamples=bootstrap)
    metrics["calibration"]["temperature"] = model_temperature(predictor.model)  # None: not calibrated
    metrics["risk_coverage"] = risk_coverage(y_true, probabilities)
    metrics.update(ood_report(predictor.model, RunFolder.of_model(model_path), data, batch_size=batch_size))
    metrics.update(model=str(model_path), csv=str(csv_path), tta=tta, image_size=predictor.image_size)
    files = EvaluationFiles(out)
    write_json_atomic(files.metrics, metrics)
    write_csv_atomic(files.predictions, predictions_frame(frame["image_id"], y_true, probabilities))
    plot_confusion_matrix(metrics["confusion_matrix"], files.confusion_plot,
                          title=f"{Path(csv_path).name}: balanced accuracy {metrics['balanced_accuracy']:.3f}")
    name = Path(csv_path).name
    plot_reliability_diagram(metrics["calibration"], files.reliability_plot, title=f"{name}: reliability")
    plot_risk_coverage(metrics["risk_coverage"], files.risk_coverage_plot, title=f"{name}: risk-coverage")
    log(format_metrics_table(metrics))
    log(format_calibration(metrics["calibration"]))
    log(format_risk_coverage(metrics["risk_coverage"]))
    if "ood" in metrics:
        log(format_ood(metrics["ood"], len(frame)))
    log(f"wrote {files.metrics}, {files.predictions}, {files.confusion_plot}, {files.reliability_plot}, "
        f"{files.risk_coverage_plot}")
    return metrics
