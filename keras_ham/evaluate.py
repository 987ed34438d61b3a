"""Evaluate a saved classifier on a labelled CSV: metrics.json, predictions.csv, a plot.

The CSV needs only `image_id` and `dx`; images are found as in the split step. All
metrics come from scikit-learn (`keras_ham.metrics.classification_metrics`).
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
from keras_ham.metadata import EVAL_COLUMNS, read_metadata, require_image_paths
from keras_ham.metrics import bootstrap_intervals, classification_metrics, format_metrics_table
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
    frame = read_metadata(csv_path, required=EVAL_COLUMNS)
    paths = require_image_paths(frame, csv_path, image_dirs)
    predictor = Predictor.from_file(model_path, batch_size=batch_size, tta=tta)
    y_true = frame["dx"].map(CLASS_TO_INDEX).to_numpy()
    out = ensure_output_dir(out_dir if out_dir is not None else default_output_dir(model_path, csv_path))
    data = HamDataset(paths, None, image_size=predictor.image_size, batch_size=batch_size)
    log(f"evaluating {model_path} on {len(frame)} images from {csv_path} at {predictor.image_size}px"
        f"{' with flip TTA' if tta else ''}")
    probabilities = predictor.predict_dataset(data)
    metrics = classification_metrics(y_true, probabilities)
    if bootstrap:
        lesions = frame["lesion_id"] if "lesion_id" in frame.columns else None
        groups = lesions.astype(str).to_numpy() if lesions is not None and lesions.notna().all() else None
        metrics["confidence_intervals"] = bootstrap_intervals(y_true, probabilities, groups, resamples=bootstrap)
    metrics.update(model=str(model_path), csv=str(csv_path), tta=tta, image_size=predictor.image_size)
    files = EvaluationFiles(out)
    write_json_atomic(files.metrics, metrics)
    write_csv_atomic(files.predictions, predictions_frame(frame["image_id"], y_true, probabilities))
    plot_confusion_matrix(metrics["confusion_matrix"], files.confusion_plot,
                          title=f"{Path(csv_path).name}: balanced accuracy {metrics['balanced_accuracy']:.3f}")
    log(format_metrics_table(metrics))
    log(f"wrote {files.metrics}, {files.predictions}, {files.confusion_plot}")
    return metrics
