"""The run folder: its layout and file formats, in one place for the writer and every reader.

    runs/<name>/
      best.keras       best model so far by `config.monitor` (uncompiled, portable)
      history.csv      one row per finished epoch
      config.yaml      the resolved config
      labels.json      class order, full names, descriptions
      summary.json     device, backend, durations, best epoch and score, versions, "ood" record
      ood_statistics.npz  the out-of-distribution score's training-split Gaussian (keras_ham.ood)
      state/           resume checkpoint (removed when training finishes)
        state.json       the `ResumeState`, pointing to the checkpoint beside it
      eval_<csv stem>/ metrics.json, predictions.csv, confusion_matrix.png, reliability_diagram.png,
                       risk_coverage.png (keras_ham.evaluate)

Training (`keras_ham.train`) and evaluation write these files; Grad-CAM, the dashboard and
the scripts read them. All of them take the names and paths from here, so a change to the
layout is made once and the tests of the readers consume what the real writer produced.
No Keras import: the dashboard and the scripts use this module before choosing a device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from keras_ham.errors import KerasHamError
from keras_ham.labels import CLASS_DESCRIPTIONS, CLASS_FULL_NAMES, CLASS_NAMES

BEST_MODEL = "best.keras"
HISTORY = "history.csv"
CONFIG = "config.yaml"
LABELS = "labels.json"
SUMMARY = "summary.json"
OOD_STATISTICS = "ood_statistics.npz"
STATE_DIR = "state"
STATE_FILE = "state.json"
EVALUATION_PREFIX = "eval_"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_PLOT = "confusion_matrix.png"
RELIABILITY_PLOT = "reliability_diagram.png"
RISK_COVERAGE_PLOT = "risk_coverage.png"
#: The evaluation the dashboard shows first (`scripts/train.py --evaluate` writes it).
PREFERRED_EVALUATION = f"{EVALUATION_PREFIX}test"
#: Files that mark a folder as a run folder even before it holds a model.
RUN_FILES = (HISTORY, CONFIG, SUMMARY, LABELS)


class RunFolderError(KerasHamError, ValueError):
    """A file of a run folder is unreadable or not in the format training writes."""


class LabelsError(RunFolderError):
    """labels.json is unreadable, malformed, or does not fit the model."""


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder; nothing is read or created by building one."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of_model(cls, model_path: str | os.PathLike) -> "RunFolder":
        """The run folder a model file sits in (any model: labels.json is looked up beside it)."""
        return cls(Path(model_path).parent)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def best_model(self) -> Path:
        return self.path / BEST_MODEL

    @property
    def onnx_model(self) -> Path:
        """The ONNX export of best.keras (config `export_onnx`, scripts/export.py)."""
        return self.best_model.with_suffix(".onnx")

    @property
    def history(self) -> Path:
        return self.path / HISTORY

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def labels(self) -> Path:
        return self.path / LABELS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def ood_statistics(self) -> Path:
        """The out-of-distribution score's fitted statistics (keras_ham.ood.FeatureGaussian)."""
        return self.path / OOD_STATISTICS

    @property
    def state_dir(self) -> Path:
        return self.path / STATE_DIR

    @property
    def state_file(self) -> Path:
        return self.path / STATE_DIR / STATE_FILE

    def evaluation_dir(self, csv_path: str | os.PathLike) -> Path:
        """`eval_<csv stem>/`: evaluations live beside the model they judge."""
        return self.path / f"{EVALUATION_PREFIX}{Path(csv_path).stem}"

    def find_evaluation(self) -> Path | None:
        """eval_test/metrics.json if present, else the first other eval_*/metrics.json by name."""
        preferred = self.path / PREFERRED_EVALUATION / METRICS_FILE
        if preferred.is_file():
            return preferred
        others = sorted(p for p in self.path.glob(f"{EVALUATION_PREFIX}*/{METRICS_FILE}") if p.is_file())
        return others[0] if others else None


@dataclass(frozen=True)
class EvaluationFiles:
    """The files one evaluation writes into its folder."""

    folder: Path

    @property
    def metrics(self) -> Path:
        return Path(self.folder) / METRICS_FILE

    @property
    def predictions(self) -> Path:
        return Path(self.folder) / PREDICTIONS_FILE

    @property
    def confusion_plot(self) -> Path:
        return Path(self.folder) / CONFUSION_PLOT

    @property
    def reliability_plot(self) -> Path:
        return Path(self.folder) / RELIABILITY_PLOT

    @property
    def risk_coverage_plot(self) -> Path:
        return Path(self.folder) / RISK_COVERAGE_PLOT


# --------------------------------------------------------------------------- labels.json


@dataclass(frozen=True)
class Labels:
    """Class order with each class's full name and one-line description."""

    class_names: tuple[str, ...]
    full_names: dict[str, str]
    descriptions: dict[str, str]

    def to_json(self) -> dict:
        return {
            "class_names": list(self.class_names),
            "full_names": dict(self.full_names),
            "descriptions": dict(self.descriptions),
        }


def default_labels() -> Labels:
    """The seven HAM10000 classes of keras_ham.labels: what training writes."""
    return Labels(tuple(CLASS_NAMES), dict(CLASS_FULL_NAMES), dict(CLASS_DESCRIPTIONS))


def read_labels(path: str | os.PathLike, num_classes: int | None = None) -> Labels:
    """Read labels.json; without the file, `default_labels()`.

    Accepted: a JSON list of class names, or an object with a "class_names" list and optional
    "full_names" / "descriptions" objects (texts missing there come from keras_ham.labels, or
    are the class name / empty). One policy for every reader: a file that is unreadable or in
    another format raises `LabelsError` naming it, as does a class count other than
    `num_classes` (when given); nothing is silently ignored.
    """
    path = Path(path)
    if not path.is_file():
        labels, source = default_labels(), "keras_ham.labels.CLASS_NAMES"
    else:
        labels, source = _parse_labels(path), str(path)
    if num_classes is not None and len(labels.class_names) != num_classes:
        raise LabelsError(f"{source}: {len(labels.class_names)} class names, but the model has {num_classes} outputs.")
    return labels


def _parse_labels(path: Path) -> Labels:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabelsError(f"{path}: cannot read the class names ({error}).") from error
    names = data.get("class_names") if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise LabelsError(f"{path}: expected a JSON list of class names or {{\"class_names\": [...]}}.")
    texts = {}
    for key, defaults in (("full_names", CLASS_FULL_NAMES), ("descriptions", CLASS_DESCRIPTIONS)):
        given = (data.get(key) if isinstance(data, dict) else None) or {}
        if not isinstance(given, dict):
            raise LabelsError(f"{path}: \"{key}\" must be an object mapping class names to texts, "
                              f"found {type(given).__name__}.")
        merged = {**defaults, **{str(k): str(v) for k, v in given.items()}}
        fallback = (lambda name: name) if key == "full_names" else (lambda name: "")
        texts[key] = {name: merged.get(name, fallback(name)) for name in names}
    return Labels(tuple(names), texts["full_names"], texts["descriptions"])


# --------------------------------------------------------------------------- state/state.json


@dataclass
class ResumeState:
    """What training needs to continue an interrupted run, saved after every epoch.

    epoch:             epochs finished (the next one to run, counted from 0)
    history:           one dict per finished epoch (the rows of history.csv)
    best_score:        best value of `config.monitor` so far (None before the first epoch)
    best_epoch:        its epoch, counted from 1
    checkpoint:        the weights file in state/ (model and optimizer) after `epoch`
    stopped_reason:    why training stopped early (early stopping, non-finite values)
    callback_counters: patience counters of the monitoring callbacks, by callback name
    """

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    checkpoint: str | None = None
    stopped_reason: str | None = None
    callback_counters: dict[str, dict] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "ResumeState":
        """Validate a decoded state.json; RunFolderError says which field is wrong."""
        if not isinstance(data, Mapping):
            raise RunFolderError(f"not a resume state (a {type(data).__name__}, expected an object)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RunFolderError(f"not a resume state (unknown field(s) {', '.join(unknown)})")
        checks = {
            "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "history": lambda v: isinstance(v, list) and all(isinstance(row, dict) for row in v),
            "best_score": lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
            "best_epoch": lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)),
            "checkpoint": lambda v: v is None or isinstance(v, str),
            "stopped_reason": lambda v: v is None or isinstance(v, str),
            "callback_counters": lambda v: isinstance(v, dict) and all(isinstance(c, dict) for c in v.values()),
        }
        if "epoch" not in data:
            raise RunFolderError("not a resume state (no 'epoch')")
        for name, check in checks.items():
            if name in data and not check(data[name]):
                raise RunFolderError(f"not a resume state ({name}={data[name]!r})")
        return cls(**dict(data))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ResumeState":
        """Read state.json; RunFolderError naming the file when it is unreadable or invalid."""
        path = Path(path)
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RunFolderError) as error:
            raise RunFolderError(f"{path} is unreadable ({error})") from error
