"""What the dashboard decides and computes, kept apart from its widgets so it can be tested.

`dashboard/app.py` builds the Panel page; everything here is plain Python over numpy
arrays, bytes and paths:

- options and run discovery: which model to serve and which run folders exist;
- model choice validation: only run models under the runs folder, or the model the server
  was started with, can be picked from the page (never an arbitrary path);
- one loaded model per path per server process (`load_model_bundle`), shared by sessions;
- cards: one uploaded file -> an `ImageCard` (prediction + Grad-CAM) or an `ErrorCard`
  (a per-file message), and a per-session `SessionCards` list;
- the run report: training history, evaluation metrics, config and summary of a run.

Keras must be imported after `keras_ham.device.configure_device`, so the app imports this
module only after choosing the device.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from keras_ham.errors import KerasHamError
from keras_ham.calibration import ood_flags, stored_ood_threshold, threshold_sentence
from keras_ham.gradcam import GradCAM, GradCAMError, layer_choices, overlay
from keras_ham.images import IMAGE_EXTENSIONS, ImageError, load_image
from keras_ham.model import load_classifier, model_image_size, model_temperature
from keras_ham.predict import top_classes
from keras_ham.ood import FEATURE_SCORE, energy_record, feature_scorer_for_run
from keras_ham.runs import BEST_MODEL, EVALUATION_PREFIX, RunFolder, RunFolderError, read_labels

#: Largest upload accepted, in bytes (FilePond's "20MB" is 20,000,000 bytes too).
MAX_UPLOAD_BYTES = 20_000_000
#: File types offered in the upload dialog; any other content is rejected when decoded.
ACCEPTED_EXTENSIONS = IMAGE_EXTENSIONS
#: Longest side of the images shown on a card (the model sees its own input size).
DISPLAY_SIZE = 320
#: The model file a training run writes.
MODEL_FILE = BEST_MODEL
#: How to get a model when there is none.
DEMO_TRAIN_COMMAND = "python scripts/train.py --config configs/demo.yaml"
DEFAULT_THRESHOLD = 0.5
DEFAULT_OPACITY = 0.4
#: Cards open at the deepest Grad-CAM layer whose map has at least this many cells a side
#: (ResNet50's conv5 map at 224 px is 7x7), so a small-input model does not open on a 2x2 map.
MIN_DISPLAY_CAM_CELLS = 7
TOP_K = 3

HISTORY_PAIRS = (("loss", "val_loss"), ("accuracy", "val_accuracy"), ("balanced_accuracy", "val_balanced_accuracy"))


class ModelChoiceError(KerasHamError, ValueError):
    """A model path was asked for that the dashboard does not serve."""


# --------------------------------------------------------------------------- options, runs


@dataclass(frozen=True)
class DashboardOptions:
    """Where the dashboard looks: `model` is the start model (None: newest run model)."""

    runs_dir: Path
    model: Path | None = None


def parse_options(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> DashboardOptions:
    """`panel serve dashboard/app.py --args [--model PATH] [--runs DIR]`; the flags win over
    KERAS_HAM_MODEL / KERAS_HAM_RUNS; the runs folder defaults to `runs` in the cwd."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="panel serve dashboard/app.py --args", add_help=False)
    parser.add_argument("--model", default=environ.get("KERAS_HAM_MODEL") or None)
    parser.add_argument("--runs", default=environ.get("KERAS_HAM_RUNS") or "runs")
    args, _unknown = parser.parse_known_args(list(argv))
    return DashboardOptions(runs_dir=Path(args.runs), model=Path(args.model) if args.model else None)


@dataclass(frozen=True)
class RunInfo:
    """A run folder holding a model: runs/<name>/best.keras."""

    name: str
    run_dir: Path
    model_path: Path
    modified: float  # mtime of best.keras, seconds since the epoch

    @property
    def label(self) -> str:
        return f"{self.name}  ({time.strftime('%Y-%m-%d %H:%M', time.localtime(self.modified))})"


def discover_runs(runs_dir: str | os.PathLike) -> list[RunInfo]:
    """Run folders directly under `runs_dir` that hold a best.keras, newest model first.

    Folders without best.keras (a run still in its first epoch, an unrelated folder) are
    skipped; a missing `runs_dir` gives an empty list.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = []
    for run_dir in runs_dir.iterdir():
        model_path = RunFolder(run_dir).best_model
        if run_dir.is_dir() and model_path.is_file():
            runs.append(RunInfo(run_dir.name, run_dir, model_path, model_path.stat().st_mtime))
    return sorted(runs, key=lambda run: (-run.modified, run.name))


def start_model(options: DashboardOptions) -> Path | None:
    """The model given at start, else the newest run model, else None."""
    if options.model is not None:
        return options.model
    runs = discover_runs(options.runs_dir)
    return runs[0].model_path if runs else None


def model_choices(runs_dir: str | os.PathLike, start: Path | None) -> dict[str, str]:
    """Select options {label: path} for the page: the start model, then every run model."""
    choices: dict[str, str] = {}
    runs = discover_runs(runs_dir)
    start_resolved = start.resolve() if start is not None else None
    if start is not None and not any(run.model_path.resolve() == start_resolved for run in runs):
        choices[f"start model: {start}"] = str(start)
    for run in runs:
        choices[run.label] = str(run.model_path)
    return choices


def validate_model_choice(path: str | os.PathLike, runs_dir: str | os.PathLike, start: Path | None) -> Path:
    """Return `path` if the page may load it, else raise ModelChoiceError.

    Allowed: the start model, or `<runs_dir>/<run>/best.keras` of an existing run. Paths are
    resolved first, so `..` and symbolic links cannot reach outside the runs folder.
    """
    if not str(path).strip():
        raise ModelChoiceError("no model selected.")
    requested = Path(path).resolve()
    if start is not None and requested == Path(start).resolve():
        return Path(start)
    runs_root = Path(runs_dir).resolve()
    if requested.parent.parent != runs_root or requested.name != MODEL_FILE:
        raise ModelChoiceError(
            f"{path}: not served; choose the start model or a run model <runs>/<run>/{MODEL_FILE} under {runs_dir}."
        )
    if not requested.is_file():
        raise ModelChoiceError(f"{path}: model file not found.")
    return requested


# --------------------------------------------------------------------------- shared models


def display_layer(choices: Sequence[tuple[str, tuple]]) -> str | None:
    """The layer cards open at: the deepest of `choices` (as from `layer_choices`) with at
    least MIN_DISPLAY_CAM_CELLS cells a side, else the finest offered; None without choices."""
    for name, size in choices:
        if any(cells is None for cells in size) or min(size) >= MIN_DISPLAY_CAM_CELLS:
            return name
    return choices[-1][0] if choices else None


class ModelBundle:
    """A loaded classifier with its Grad-CAM and class texts; one per path.

    Sessions share it, so every call into the model holds `lock` (Panel may run callbacks
    on several threads, and a CPU is not faster for running two forward passes at once).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        model = load_classifier(self.path)
        #: [(layer name, (h, w))], deepest first: the layers a card may explain at.
        self.layer_choices = layer_choices(model)
        self.gradcam = GradCAM(model, layer_name=display_layer(self.layer_choices))  # cards open at this layer
        self._gradcams = {self.gradcam.layer_name: self.gradcam}
        self.image_size = model_image_size(model)
        # A bad labels.json raises LabelsError naming the file: the page shows it instead of the model.
        folder = RunFolder.of_model(self.path)
        labels = read_labels(folder.labels, self.gradcam.num_classes)
        self.class_names = labels.class_names
        self.full_names, self.descriptions = labels.full_names, labels.descriptions
        #: T built into the model by temperature scaling; None: raw softmax probabilities.
        self.temperature = model_temperature(model)
        self.training_data = training_data(folder.path)
        #: The run's out-of-distribution threshold record (summary.json "ood"), or None.
        self.ood = stored_ood_threshold(folder.summary)  # no training code imported here
        #: Scores an upload with the run's feature statistics (keras_ham.ood); None: energy only.
        self.feature_ood = None
        try:
            self.feature_ood = feature_scorer_for_run(model, self.ood, folder.ood_statistics)
        except RunFolderError as error:  # damaged statistics file: say so, fall back to the energy flag
            warnings.warn(str(error), stacklevel=2)
        if self.feature_ood is None:
            self.ood = energy_record(self.ood)  # a feature record without its statistics file: energy
        #: Why training did not apply its fitted temperature (summary.json), or None.
        self.calibration_skipped = calibration_skipped(folder.summary) if self.temperature is None else None
        self.lock = threading.Lock()
        # One pass on a blank image while loading, so the first user's upload does not also
        # pay torch's one-off start-up cost (about a second for a ResNet50 on a CPU).
        self.gradcam.cam(np.zeros((1, self.image_size, self.image_size, 3), dtype=np.float32))

    def ood_score(self, model_input: np.ndarray, logits: np.ndarray | None) -> tuple[float | None, bool]:
        """(score, above the run's validation threshold?) for one (S, S, 3) image: the
        feature-statistics distance (one extra pass through the stem), or for older runs the
        energy of its logits; (None, False) when the run stores no threshold."""
        if self.feature_ood is not None:
            with self.lock:
                scores = self.feature_ood.scores(np.asarray(model_input, dtype=np.float32)[None])
            return float(scores[0]), bool(self.feature_ood.flags(scores)[0])
        if self.ood is None or logits is None:
            return None, False
        scores, flagged = ood_flags(np.asarray(logits)[None], self.ood)
        return float(scores[0]), bool(flagged[0])

    def predict_and_explain(self, model_input: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(S, S, 3) uint8 -> probabilities (num_classes,) and the predicted class's Grad-CAM (S, S).

        One forward pass gives both: Grad-CAM runs the same model graph with training=False,
        so its probabilities equal a `keras_ham.predict.Predictor`'s (asserted in the tests)
        at half the cost of running both, which matters for a ResNet50 on a CPU.
        """
        probabilities, heatmap, _logits = self.predict_explain_logits(model_input)
        return probabilities, heatmap

    def predict_explain_logits(self, model_input: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`predict_and_explain` plus the image's logits (num_classes,) from the same pass."""
        with self.lock:
            result = self.gradcam.cam(model_input[None])
        logits = None if result.logits is None else result.logits[0]
        return result.probabilities[0], result.heatmaps[0], logits

    @property
    def default_layer(self) -> str:
        return self.gradcam.layer_name

    def heatmap(self, model_input: np.ndarray, class_index: int, layer: str | None = None) -> np.ndarray:
        """(S, S, 3) uint8 -> (S, S) float32 Grad-CAM in [0, 1] for `class_index` at `layer`
        (one of `layer_choices`; None: the default layer)."""
        layer = layer or self.default_layer
        with self.lock:
            if layer not in self._gradcams:
                offered = [name for name, _size in self.layer_choices]
                if layer not in offered:
                    raise GradCAMError(f"layer {layer!r} is not offered for this model; choose one of {', '.join(offered)}.")
                self._gradcams[layer] = GradCAM(self.gradcam.model, layer_name=layer)
            return self._gradcams[layer].cam(model_input[None], class_index=int(class_index)).heatmaps[0]


def ood_score_name(record: Mapping) -> str:
    """What the stored out-of-distribution score is, in words for the page."""
    if record.get("score") == FEATURE_SCORE:
        return f"distance of its {record.get('layer')} feature statistics"
    return "energy score"


@dataclass(frozen=True)
class TrainingData:
    """Where a model's training images came from, as its run folder says.

    kind: "demo" (synthetic demo images: its predictions mean nothing for real lesions),
    "split" (the split CSVs named in config.yaml) or "unknown" (no readable config.yaml)."""

    kind: str
    text: str

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"


DEMO_NOTICE = ("DEMO MODEL: trained on synthetic demo images, not on real skin lesions. "
               "This prediction means nothing for a real lesion.")


def training_data(run_dir: str | os.PathLike) -> TrainingData:
    """Read the run's config.yaml (and summary.json for counts): synthetic demo data or a split."""
    import yaml

    folder = RunFolder(run_dir)
    try:
        config = yaml.safe_load(folder.config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict):
        return TrainingData("unknown", f"training data unknown: no readable {folder.config.name} in {folder.path}.")
    summary = {}
    try:
        summary = json.loads(folder.summary.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    count = summary.get("train_images") if isinstance(summary, dict) else None
    images = f"{count} images from " if isinstance(count, int) else ""
    if config.get("demo_data"):
        return TrainingData("demo", f"trained on synthetic demo images ({images}{config.get('train_csv')}, "
                                    f"generated by keras-ham), not on real lesions.")
    return TrainingData("split", f"trained on {images}{config.get('train_csv')} "
                                 f"(image folders: {', '.join(map(str, config.get('image_dirs') or [])) or 'unknown'}).")


def calibration_skipped(summary_path: str | os.PathLike) -> str | None:
    """The reason summary.json gives for a temperature fitted but not applied, or None."""
    try:
        summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    record = summary.get("calibration") if isinstance(summary, dict) else None
    reason = record.get("skipped") if isinstance(record, dict) else None
    return reason if isinstance(reason, str) and reason else None


def threshold_text(model_path: str | os.PathLike, threshold: float, temperature: float | None = None) -> str:
    """What the confidence threshold means on the run's stored evaluation (eval_test first),
    in words; says so when there is none or it was made with a different temperature."""
    model_path = Path(model_path)
    metrics_path = RunFolder.of_model(model_path).find_evaluation()
    if metrics_path is None:
        return (f"No stored evaluation for this model yet, so what {float(threshold):.2f} buys is unknown; run "
                f"python scripts/evaluate.py --model {model_path} --csv <test split>.")
    problems: list[str] = []
    metrics = _read_json(metrics_path, problems) or {}
    stored = metrics.get("risk_coverage")
    split = metrics_path.parent.name.removeprefix(EVALUATION_PREFIX)
    if not isinstance(stored, dict):
        return f"{metrics_path} has no risk-coverage numbers (evaluated by an older version); evaluate again."
    sentence = threshold_sentence(stored, threshold, split)
    if sentence is None:
        return f"{metrics_path} stores no numbers for a threshold of {float(threshold):.2f}."
    sentence = sentence[0].upper() + sentence[1:]
    evaluated_temperature = (metrics.get("calibration") or {}).get("temperature")
    if not _same_temperature(evaluated_temperature, temperature):
        sentence += (" (Evaluated with a different temperature than the loaded model's: evaluate again for "
                     "the current numbers.)")
    return sentence


def _same_temperature(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-6)


_BUNDLES: dict[Path, ModelBundle] = {}
_BUNDLE_LOCKS: dict[Path, threading.Lock] = {}
_BUNDLES_LOCK = threading.Lock()


def load_model_bundle(path: str | os.PathLike) -> ModelBundle:
    """The shared bundle for `path`, loaded once per process even when sessions race.

    Raises ModelError (bad file) or GradCAMError (labels.json does not fit the model).
    """
    key = Path(path).resolve()
    with _BUNDLES_LOCK:
        if key in _BUNDLES:
            return _BUNDLES[key]
        path_lock = _BUNDLE_LOCKS.setdefault(key, threading.Lock())
    with path_lock:  # a second session asking for the same file waits for the first load
        with _BUNDLES_LOCK:
            if key in _BUNDLES:
                return _BUNDLES[key]
        bundle = ModelBundle(path)
        with _BUNDLES_LOCK:
            _BUNDLES[key] = bundle
        return bundle


def cached_model_paths() -> list[Path]:
    with _BUNDLES_LOCK:
        return list(_BUNDLES)


def clear_model_cache() -> None:
    """Forget every loaded model (tests; a long-running server never needs it)."""
    with _BUNDLES_LOCK:
        _BUNDLES.clear()
        _BUNDLE_LOCKS.clear()


# --------------------------------------------------------------------------- cards


@dataclass
class ImageCard:
    """One classified upload.

    image:         (H, W, 3) uint8, the upload scaled to at most DISPLAY_SIZE per side.
    model_input:   (S, S, 3) uint8, what the model saw (resized like `load_image`).
    probabilities: (num_classes,) float32 summing to 1.
    heatmaps:      Grad-CAMs computed so far, by (layer name, class index), each (S, S) in [0, 1].
    """

    card_id: int
    filename: str
    image: np.ndarray
    model_input: np.ndarray
    probabilities: np.ndarray
    bundle: ModelBundle
    heatmaps: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    #: Out-of-distribution score of the image (`ood_score_name`) and whether it is above the
    #: run's validation threshold.
    ood_score: float | None = None
    unfamiliar: bool = False

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    @property
    def predicted_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def predicted_name(self) -> str:
        return self.class_names[self.predicted_index]

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.predicted_index])

    def is_uncertain(self, threshold: float) -> bool:
        """True when the top probability is below `threshold` (0..1); compared at 1e-6 so a
        float32 0.35 is not "below" a 0.35 threshold."""
        return round(self.confidence, 6) < round(float(threshold), 6)

    def top(self, k: int = TOP_K) -> list[tuple[str, float]]:
        return top_classes(self.probabilities[None], k, self.class_names)[0]

    def heatmap_key(self, class_index: int | None = None, layer: str | None = None) -> tuple[str, int]:
        index = self.predicted_index if class_index is None else int(class_index)
        if not 0 <= index < len(self.class_names):
            raise GradCAMError(f"class index {index} is out of range 0..{len(self.class_names) - 1}.")
        return (layer or self.bundle.default_layer, index)

    def heatmap(self, class_index: int | None = None, layer: str | None = None) -> np.ndarray:
        """Grad-CAM for `class_index` (None: the predicted class) at `layer` (None: the
        default layer), computed once per (layer, class)."""
        key = self.heatmap_key(class_index, layer)
        if key not in self.heatmaps:
            self.heatmaps[key] = self.bundle.heatmap(self.model_input, key[1], key[0])
        return self.heatmaps[key]

    def overlay(self, class_index: int | None = None, opacity: float = DEFAULT_OPACITY,
                layer: str | None = None) -> np.ndarray:
        """(H, W, 3) uint8: the display image blended with the class's Grad-CAM at `layer`."""
        return overlay(self.image, self.heatmap(class_index, layer), alpha=float(opacity))


@dataclass(frozen=True)
class ErrorCard:
    """An upload that could not be classified, and why (one line naming the file)."""

    card_id: int
    filename: str
    message: str


Card = ImageCard | ErrorCard


def _mode_note(data: bytes) -> tuple[str, ...]:
    """Say when an upload was converted (grayscale, RGBA, CMYK, 16-bit...) to 8-bit RGB."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = image.mode
    except Exception:  # noqa: BLE001 - load_image already decoded it; this note is optional
        return ()
    if mode == "RGB":
        return ()
    described = {
        "L": "grayscale", "LA": "grayscale with alpha", "RGBA": "RGBA", "P": "palette", "PA": "palette with alpha",
        "CMYK": "CMYK", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I;16L": "16-bit grayscale",
        "I": "32-bit integer", "F": "32-bit float", "1": "1-bit", "YCbCr": "YCbCr",
    }.get(mode, mode)
    return (f"converted from {described} to 8-bit RGB",)


def check_upload(filename: str, data: bytes | str | None, max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    """The upload's bytes, or ImageError naming the file when it is empty or too large.

    Text (a str, as some Panel upload widgets hand over text/* files) is encoded back, and
    then fails to decode as an image with a clear message.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not data:
        raise ImageError(f"{filename}: the file is empty (0 bytes).")
    if len(data) > max_bytes:
        raise ImageError(too_large_message(filename, len(data), max_bytes))
    return bytes(data)


def too_large_message(filename: str, size: int, max_bytes: int = MAX_UPLOAD_BYTES) -> str:
    """The message for a file over the upload limit (the browser refuses it before sending)."""
    return f"{filename}: {size / 1e6:.1f} MB is larger than the {max_bytes / 1e6:.0f} MB upload limit."


def display_image(image: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 scaled down (aspect ratio kept) so its longest side is <= size."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    if scale >= 1:
        return image
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0))


def model_input_from(image: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8, resized exactly as `load_image(path, S)` does."""
    if image.shape[:2] == (image_size, image_size):
        return image
    resized = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def analyze_upload(
    filename: str, data: bytes | str | None, bundle: ModelBundle, *, card_id: int, max_bytes: int = MAX_UPLOAD_BYTES
) -> Card:
    """Classify one uploaded file and compute the Grad-CAM of its predicted class.

    Bad input (empty, too large, not an image, corrupt, too many pixels) gives an ErrorCard
    whose message names the file; this never raises for what a user can upload.
    """
    try:
        raw = check_upload(filename, data, max_bytes)
        image = load_image(raw, name=filename)
        model_input = model_input_from(image, bundle.image_size)
        probabilities, heatmap, logits = bundle.predict_explain_logits(model_input)
        ood_score, unfamiliar = bundle.ood_score(model_input, logits)
        card = ImageCard(
            card_id=card_id,
            filename=filename,
            image=display_image(image),
            model_input=model_input,
            probabilities=probabilities,
            bundle=bundle,
            notes=_mode_note(raw),
            ood_score=ood_score,
            unfamiliar=unfamiliar,
        )
        card.heatmaps[card.heatmap_key()] = heatmap  # the predicted class's Grad-CAM comes with every card
        return card
    except KerasHamError as error:  # unreadable image, model without a feature map, ...
        return ErrorCard(card_id, filename, str(error))


class SessionCards:
    """The cards of one browser session, in upload order. Never shared between sessions."""

    def __init__(self) -> None:
        self._cards: list[Card] = []
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, card: Card) -> Card:
        self._cards.append(card)
        return card

    def remove(self, card_id: int) -> bool:
        """Drop one card; False when there is none with that id (already removed)."""
        before = len(self._cards)
        self._cards = [card for card in self._cards if card.card_id != card_id]
        return len(self._cards) < before

    def clear(self) -> None:
        self._cards.clear()

    @property
    def cards(self) -> tuple[Card, ...]:
        return tuple(self._cards)

    def __len__(self) -> int:
        return len(self._cards)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes for an image pane."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --------------------------------------------------------------------------- run report


@dataclass
class RunReport:
    """What a run folder tells about its training and evaluation; missing parts are None
    and `problems` says in words which files were missing or unreadable."""

    name: str
    run_dir: Path
    history: "object | None" = None  # pandas.DataFrame with the history.csv columns
    summary: dict | None = None
    config_text: str | None = None
    evaluation_name: str | None = None
    metrics: dict | None = None
    problems: list[str] = field(default_factory=list)


def find_evaluation(run_dir: str | os.PathLike) -> Path | None:
    """eval_test/metrics.json if present, else the first other eval_*/metrics.json by name."""
    return RunFolder(run_dir).find_evaluation()


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{path}: unreadable JSON ({error}).")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a JSON object, found {type(data).__name__}.")
        return None
    return data


def load_run_report(run_dir: str | os.PathLike) -> RunReport:
    """Read history.csv, summary.json, config.yaml and the evaluation of one run folder."""
    import pandas as pd

    folder = RunFolder(run_dir)
    report = RunReport(name=folder.name, run_dir=folder.path)
    history_path = folder.history
    if history_path.is_file():
        try:
            history = pd.read_csv(history_path)
        except (OSError, ValueError, pd.errors.ParserError) as error:
            report.problems.append(f"{history_path}: unreadable CSV ({error}).")
        else:
            if "epoch" not in history.columns:
                report.problems.append(f"{history_path}: no 'epoch' column (columns: {', '.join(history.columns)}).")
            else:
                report.history = history
    else:
        report.problems.append(f"{history_path}: not found.")
    if folder.summary.is_file():
        report.summary = _read_json(folder.summary, report.problems)
    else:
        report.problems.append(f"{folder.summary}: not found (training may still be running).")
    if folder.config.is_file():
        try:
            report.config_text = folder.config.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            report.problems.append(f"{folder.config}: unreadable ({error}).")
    else:
        report.problems.append(f"{folder.config}: not found.")
    metrics_path = folder.find_evaluation()
    if metrics_path is None:
        report.problems.append(
            f"{folder.path}: no evaluation yet; run python scripts/evaluate.py --model {folder.best_model} ..."
        )
    else:
        report.evaluation_name = metrics_path.parent.name
        report.metrics = _read_json(metrics_path, report.problems)
    return report


def history_series(history, metric: str) -> list[tuple[str, list[float], list[float]]]:
    """[(column, epochs, values)] for `metric` and `val_<metric>` present in a history frame;
    non-finite values are dropped so a NaN epoch does not break a line plot."""
    series = []
    for column in (metric, f"val_{metric}"):
        if history is None or column not in history.columns:
            continue
        epochs, values = [], []
        for epoch, value in zip(history["epoch"], history[column]):
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                epochs.append(float(epoch))
                values.append(number)
        series.append((column, epochs, values))
    return series


def row_normalised(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    """A confusion matrix as shares of each true class (rows sum to 1; empty rows stay 0)."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
