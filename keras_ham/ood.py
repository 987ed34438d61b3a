"""Out-of-distribution flag: is an image unlike the images the model was trained on?

The score is computed from the model itself, on an early feature map (the backbone's
`ood_layer`, `pool1_pool` for the ResNets): for each channel the mean and the standard
deviation of its activations over the image's positions (first- and second-order "style"
statistics, cf. Sastry & Oore 2020), then the squared Mahalanobis distance of that (2C,)
vector to a Gaussian fitted on the TRAINING split (mean, and scikit-learn's Ledoit-Wolf
shrunk covariance: 2C = 128 dimensions from a few hundred images needs the shrinkage). The
threshold is set on the VALIDATION split so that `false_alarm_rate` of its images exceed it.

Why this layer and not the logits: measured on tiny ResNet-18 models (benchmarks/ood_scores.py,
README section 5), the energy of the logits and the Mahalanobis distance of the penultimate
features separate the synthetic demo images from real HAM10000 images badly (64 px: AUROC
0.72-0.84 for the real model on demo images, 0.59-0.74 for the demo model on real ones), while
the channel statistics of `pool1_pool` do so in both directions (0.905-0.951 and 0.988-0.991
over seeds 0-1 and torch threads 1-2). A late layer is trained to ignore what makes an image look unlike a lesion
photograph; the stem still sees it.

Stored per run: `RunFolder.ood_statistics` (the mean, the precision matrix and the layer, an
.npz written atomically) and summary.json["ood"] (name, definition, layer, threshold,
false-alarm rate; the energy record of older runs nested under "energy").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

#: Name of the score in summary.json / metrics.json.
FEATURE_SCORE = "feature_statistics"
FEATURE_DEFINITION = ("squared Mahalanobis distance of the per-channel mean and standard deviation of the "
                      "{layer} activations to a Gaussian of the training split (Ledoit-Wolf covariance)")
#: Share of validation (in-distribution) images the flag may raise.
OOD_FALSE_ALARM_RATE = 0.05


def channel_statistics_model(model, layer_name: str):
    """A sub-model of `model` (sharing its layers and weights): raw images -> (N, 2C), the
    mean of each channel of `layer_name`'s (N, H, W, C) output over positions, then each
    channel's standard deviation (population, computed as the root of the mean squared
    deviation: Keras's E[x^2] - E[x]^2 can go negative in float32)."""
    import keras

    from keras_ham.model import ModelError, classifier_input

    try:
        features = model.get_layer(layer_name).output
    except ValueError:
        raise ModelError(f"{model.name}: no layer {layer_name!r} to compute the out-of-distribution score on.") from None
    if len(features.shape) != 4:
        raise ModelError(f"{model.name}: layer {layer_name!r} gives {features.shape}, expected (N, H, W, C).")
    mean = keras.ops.mean(features, axis=(1, 2), keepdims=True)
    std = keras.ops.sqrt(keras.ops.mean(keras.ops.square(features - mean), axis=(1, 2)))
    statistics = keras.ops.concatenate([keras.ops.squeeze(mean, axis=(1, 2)), std], axis=-1)
    return keras.Model(classifier_input(model), statistics, name=f"{model.name}_{layer_name}_statistics")


def ood_layer_of(model) -> str | None:
    """The layer the backbone registry names for the score, when `model` has it (None: a
    model not built by keras_ham.model, or a backbone without an `ood_layer`)."""
    from keras_ham.backbones import backbone_for_model_name

    backbone = backbone_for_model_name(model.name)
    layer = backbone.ood_layer if backbone is not None else None
    return layer if layer is not None and layer in {l.name for l in model.layers} else None


@dataclass(frozen=True)
class FeatureGaussian:
    """The in-distribution statistics: (D,) mean and (D, D) precision of the feature vectors."""

    layer: str
    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, features, layer: str) -> "FeatureGaussian":
        """Mean and inverse Ledoit-Wolf covariance of (N, D) features (N >= 2)."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"need (N >= 2, D) features to fit a Gaussian, received {features.shape}.")
        estimator = LedoitWolf().fit(features)
        return cls(layer, estimator.location_, estimator.precision_)

    def distance(self, features) -> np.ndarray:
        """(N,) squared Mahalanobis distances of (N, D) features: higher = less familiar."""
        centred = np.asarray(features, dtype=np.float64) - self.mean
        if centred.ndim != 2 or centred.shape[1] != len(self.mean):
            raise ValueError(f"expected (N, {len(self.mean)}) features, received {centred.shape}.")
        return np.einsum("nd,de,ne->n", centred, self.precision, centred)

    def save(self, path: str | Path) -> Path:
        """Write an .npz atomically (a reader never sees half a file)."""
        from keras_ham.io_utils import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, layer=np.array(self.layer), mean=self.mean, precision=self.precision)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureGaussian":
        from keras_ham.runs import RunFolderError

        try:
            with np.load(path, allow_pickle=False) as data:
                gaussian = cls(str(data["layer"]), np.asarray(data["mean"], np.float64),
                               np.asarray(data["precision"], np.float64))
        except (OSError, KeyError, ValueError) as error:
            raise RunFolderError(f"{path}: unreadable out-of-distribution statistics ({error}).") from error
        if gaussian.precision.shape != (len(gaussian.mean), len(gaussian.mean)):
            raise RunFolderError(f"{path}: precision {gaussian.precision.shape} does not fit mean {gaussian.mean.shape}.")
        return gaussian


def feature_statistics(model, layer_name: str, batches: Iterable, *, batch_size: int = 32) -> np.ndarray:
    """(N, 2C) channel statistics of `layer_name` for a PyDataset-like iterable (through the
    Predictor, so the fast torch path is used)."""
    from keras_ham.predict import Predictor

    submodel = channel_statistics_model(model, layer_name)
    return Predictor(submodel, batch_size=batch_size).predict_dataset(batches).astype(np.float64)


def validation_threshold(scores, false_alarm_rate: float = OOD_FALSE_ALARM_RATE) -> float:
    """The smallest stored score that flags at most `false_alarm_rate` of `scores`."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise ValueError("cannot set an out-of-distribution threshold on no images.")
    return float(np.quantile(scores, 1.0 - false_alarm_rate, method="higher"))


def fit_feature_ood(model, layer_name: str, train_batches, val_batches, *, batch_size: int = 32,
                    false_alarm_rate: float = OOD_FALSE_ALARM_RATE, train_source: str | None = None,
                    val_source: str | None = None) -> tuple[FeatureGaussian, dict]:
    """Fit the Gaussian on the training split's statistics and the threshold on the
    validation split's distances. Returns (the statistics, the summary.json record)."""
    train_features = feature_statistics(model, layer_name, train_batches, batch_size=batch_size)
    gaussian = FeatureGaussian.fit(train_features, layer_name)
    scores = gaussian.distance(feature_statistics(model, layer_name, val_batches, batch_size=batch_size))
    threshold = validation_threshold(scores, false_alarm_rate)
    record = {"score": FEATURE_SCORE, "definition": FEATURE_DEFINITION.format(layer=layer_name), "layer": layer_name,
              "threshold": threshold, "false_alarm_rate": false_alarm_rate,
              "flagged_on_fit": float(np.mean(scores > threshold)), "fitted_on": val_source,
              "num_images": int(len(scores)), "statistics_fitted_on": train_source,
              "num_statistics_images": int(len(train_features))}
    return gaussian, record


class FeatureOODScorer:
    """Scores raw images with a run's stored statistics: one forward through the stem per batch."""

    def __init__(self, model, gaussian: FeatureGaussian, record: dict, *, batch_size: int = 32):
        from keras_ham.predict import Predictor

        self.gaussian, self.record = gaussian, record
        self.threshold = float(record["threshold"])
        self._predictor = Predictor(channel_statistics_model(model, gaussian.layer), batch_size=batch_size)

    def scores(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) 0..255 images -> (N,) distances."""
        return self.gaussian.distance(self._predictor.predict(images).astype(np.float64))

    def dataset_scores(self, batches) -> np.ndarray:
        return self.gaussian.distance(self._predictor.predict_dataset(batches).astype(np.float64))

    def flags(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold


def feature_scorer_for_run(model, record: dict | None, statistics_path: str | Path, *,
                           batch_size: int = 32) -> FeatureOODScorer | None:
    """The scorer of a run whose summary's "ood" record is the feature score and whose
    statistics file exists; None otherwise (older runs: energy only)."""
    if not record or record.get("score") != FEATURE_SCORE or not Path(statistics_path).is_file():
        return None
    gaussian = FeatureGaussian.load(statistics_path)
    return FeatureOODScorer(model, gaussian, record, batch_size=batch_size)


def energy_record(record: dict | None) -> dict | None:
    """The energy threshold record inside a run's "ood" record: nested under "energy" in runs
    with the feature score, the record itself in older runs (energy only); None: neither."""
    if not isinstance(record, dict):
        return None
    if record.get("score") == "energy":
        return record
    nested = record.get("energy")
    return nested if isinstance(nested, dict) and isinstance(nested.get("threshold"), (int, float)) else None
