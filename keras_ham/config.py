"""Run configuration: one frozen dataclass, loaded from YAML and validated once.

YAML files list only what differs from the defaults below. Every script that takes
`--config` also takes repeated `--set key=value` overrides, parsed with YAML rules
(`--set weights=null`, `--set lr=1e-3`, `--set image_dirs=[a,b]`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from keras_ham.backbones import MODEL_NAMES
from keras_ham.device import DEVICE_NAMES
from keras_ham.errors import KerasHamError


class ConfigError(KerasHamError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range.

    `keys` names the config keys whose values are at fault (empty when none is), so the
    message can point at where a bad value came from: the YAML file or a --set override.
    """

    def __init__(self, message: str, *, keys: Iterable[str] = ()):
        super().__init__(message)
        self.keys = tuple(keys)


def _key_error(name: str, problem: str) -> ConfigError:
    return ConfigError(f"Config key '{name}': {problem}", keys=(name,))


@dataclass(frozen=True)
class Config:
    # Reproducibility
    seed: int = 42
    # Model
    model: str = "resnet50"
    weights: str | None = "imagenet"
    image_size: int = 224
    dropout: float = 0.3
    batchnorm_momentum: float | None = None
    # Optimisation
    batch_size: int = 32
    max_epochs: int = 15
    lr: float = 3e-4
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    use_class_weights: bool = True
    lr_schedule: str = "cosine"
    warmup_epochs: int = 0
    freeze_backbone_epochs: int = 0
    fine_tune_lr_factor: float = 0.1
    monitor: str = "val_balanced_accuracy"
    early_stopping_patience: int = 0
    calibrate: bool = True
    export_onnx: bool = True
    # Augmentation (training only, inside the model)
    augment_flip: bool = True
    augment_rotation: float = 0.1
    augment_zoom: float = 0.0
    augment_contrast: float = 0.0
    # Data
    train_csv: str = "data/processed/train.csv"
    val_csv: str = "data/processed/val.csv"
    test_csv: str = "data/processed/test.csv"
    image_dirs: tuple[str, ...] = ("data/raw",)
    cache_dir: str | None = "data/cache"
    test_fraction: float = 0.2
    val_fraction: float = 0.16
    demo_data: str | None = None
    # Loader
    workers: int = 1
    use_multiprocessing: bool = False
    max_queue_size: int = 10
    # Runtime
    device: str = "auto"
    out_dir: str = "runs"
    run_name: str | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "Config":
        return load_config_dict({**self.to_dict(), **changes})


MODELS = MODEL_NAMES
LR_SCHEDULES = ("cosine", "plateau", "constant")
MONITORS = ("val_balanced_accuracy", "val_accuracy", "val_loss")
DEVICES = DEVICE_NAMES

FIELD_HELP = {
    "seed": "random seed for splitting, shuffling, augmentation and weights",
    "model": f"backbone: one of {', '.join(MODELS)}",
    "weights": "'imagenet' (downloaded by keras.applications), null (random init) or a path to a weights file",
    "image_size": "square input size in pixels",
    "dropout": "dropout rate before the classifier",
    "batchnorm_momentum": "momentum of BatchNorm moving statistics (null: Keras's 0.99; ~0.9 for short runs from scratch)",
    "batch_size": "images per batch",
    "max_epochs": "number of training epochs",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "label_smoothing": "cross-entropy label smoothing",
    "use_class_weights": "weight the loss by inverse class frequency of the training split",
    "lr_schedule": f"one of {', '.join(LR_SCHEDULES)}",
    "warmup_epochs": "epochs of linear learning-rate warm-up (cosine schedule)",
    "freeze_backbone_epochs": "train only the head for this many epochs, then fine-tune everything",
    "fine_tune_lr_factor": "learning-rate multiplier once the backbone is unfrozen",
    "monitor": f"metric that picks best.keras: one of {', '.join(MONITORS)}",
    "early_stopping_patience": "stop after this many epochs without improvement (0: off)",
    "calibrate": "after training, fit one temperature on the validation split (minimum NLL) and build it into "
                 "best.keras (false: off)",
    "export_onnx": "after training (and calibration), export best.keras to best.onnx beside it: evaluate, "
                   "predict and the Predictor then run ONNX Runtime (false: off)",
    "augment_flip": "random horizontal and vertical flips",
    "augment_rotation": "random rotation, as a fraction of a full turn (0: off)",
    "augment_zoom": "random zoom fraction (0: off)",
    "augment_contrast": "random contrast factor (0: off)",
    "train_csv": "training split CSV",
    "val_csv": "validation split CSV",
    "test_csv": "test split CSV",
    "image_dirs": "folders searched for <image_id>.jpg (and their HAM10000_images_part_1/2 subfolders)",
    "cache_dir": "folder for decoded uint8 image caches (null: no cache)",
    "test_fraction": "share of all images in the test split (whole lesions, class-stratified)",
    "val_fraction": "share of all images in the validation split (whole lesions, class-stratified)",
    "demo_data": "folder of synthetic demo data to create and split when missing (null: off)",
    "workers": "PyDataset workers",
    "use_multiprocessing": "PyDataset workers as processes instead of threads",
    "max_queue_size": "PyDataset prefetch queue length",
    "device": f"torch device: one of {', '.join(DEVICES)} (auto picks the best available)",
    "out_dir": "folder that holds run folders",
    "run_name": "run folder name under out_dir (null: the config file's name, else the model name)",
}

_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    # name: (low, high, description); bounds inclusive unless noted in description
    "image_size": (32, 1024, "an integer in [32, 1024]"),
    "batch_size": (1, 4096, "an integer in [1, 4096]"),
    "max_epochs": (1, 10000, "an integer in [1, 10000]"),
    "warmup_epochs": (0, 10000, "an integer >= 0"),
    "freeze_backbone_epochs": (0, 10000, "an integer >= 0"),
    "early_stopping_patience": (0, 10000, "an integer >= 0"),
    "workers": (1, 256, "an integer in [1, 256]"),
    "max_queue_size": (1, 1000, "an integer in [1, 1000]"),
    "weight_decay": (0.0, 1.0, "a number in [0, 1]"),
    "label_smoothing": (0.0, 0.999, "a number in [0, 1)"),
    "dropout": (0.0, 0.999, "a number in [0, 1)"),
    "augment_rotation": (0.0, 0.5, "a number in [0, 0.5]"),
    "augment_zoom": (0.0, 0.9, "a number in [0, 0.9]"),
    "augment_contrast": (0.0, 1.0, "a number in [0, 1]"),
    "fine_tune_lr_factor": (1e-6, 10.0, "a number in (0, 10]"),
    "test_fraction": (0.01, 0.9, "a number in [0.01, 0.9]"),
    "val_fraction": (0.01, 0.9, "a number in [0.01, 0.9]"),
}


def valid_keys() -> list[str]:
    return [f.name for f in fields(Config)]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is tuple:
        return "a list of strings"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming key, value and expectation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                pass
        raise _key_error(name, f"expected {_type_name(tp)}, received {value!r}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
            raise _key_error(name, f"expected a list of non-empty strings, received {value!r}.")
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _key_error(name, f"expected true or false, received {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _key_error(name, f"expected an integer, received {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _key_error(name, f"expected a number, received {value!r}.")
    if tp is str:
        if isinstance(value, str) and value != "":
            return value
        raise _key_error(name, f"expected a non-empty string, received {value!r}.")
    raise _key_error(name, f"unsupported type {tp!r}.")  # pragma: no cover


def _check_choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise _key_error(name, f"expected one of {', '.join(choices)}, received {value!r}.")


def _validate(config: Config) -> None:
    for name, (low, high, text) in _RANGES.items():
        value = getattr(config, name)
        # Written as "not inside" so NaN (which compares False to everything) is rejected.
        if not ((low is None or value >= low) and (high is None or value <= high)):
            raise _key_error(name, f"expected {text}, received {value!r}.")
    if config.batchnorm_momentum is not None and not 0.0 <= config.batchnorm_momentum < 1.0:
        raise _key_error("batchnorm_momentum",
                         f"expected null or a number in [0, 1), received {config.batchnorm_momentum!r}.")
    if not config.lr > 0 or config.lr > 10:
        raise _key_error("lr", f"expected a number in (0, 10], received {config.lr!r}.")
    if config.test_fraction + config.val_fraction >= 0.95:
        raise ConfigError(
            "Config keys 'test_fraction' + 'val_fraction' must leave at least 5 % for training, "
            f"received {config.test_fraction} + {config.val_fraction}.",
            keys=("test_fraction", "val_fraction"),
        )
    _check_choice("model", config.model, MODELS)
    _check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    _check_choice("monitor", config.monitor, MONITORS)
    _check_choice("device", config.device, DEVICES)
    if not config.image_dirs:
        raise _key_error("image_dirs", "expected at least one folder, received [].")


def load_config_dict(data: Mapping[str, Any]) -> Config:
    """Build a Config from a plain mapping, rejecting unknown keys and bad values."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"A config must be a mapping of key: value, received {type(data).__name__}.")
    known = {f.name: f for f in fields(Config)}
    not_text = [key for key in data if not isinstance(key, str)]
    if not_text:
        raise ConfigError(f"Config keys must be names, received {', '.join(map(repr, not_text))}. "
                          f"Valid keys: {', '.join(known)}.")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s): {', '.join(map(str, unknown))}. Valid keys: {', '.join(known)}."
        )
    hints = typing.get_type_hints(Config)
    values = {name: _coerce(name, value, hints[name]) for name, value in data.items()}
    return Config(**values)


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Parse `key=value` strings; values use YAML syntax (`null`, `true`, `[a, b]`, `1e-3`)."""
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"Override {item!r}: expected key=value, for example --set max_epochs=3.")
        try:
            parsed[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"Override {item!r}: value is not valid YAML ({error}).") from error
    return parsed


def load_config(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> Config:
    """Load defaults, then the YAML file at `path` (if any), then `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"Config file {path} is a folder; expected a YAML file such as configs/demo.yaml.")
        if not path.is_file():
            raise ConfigError(f"Config file not found: {path} (relative paths start in the current folder, "
                              f"{Path.cwd()}).")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"Config file {path} is not UTF-8 text ({error.reason} at byte {error.start}).") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"Config file {path} is not valid YAML: {error}") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"Config file {path}: expected a mapping of key: value at top level.")
        data.update(loaded)
    from_file = set(data)
    overridden = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    data.update(overridden)
    try:
        return load_config_dict(data)
    except ConfigError as error:
        # Name where the bad value came from: an override, else the file.
        culprit = next((key for key in error.keys if key in overridden), None)
        if culprit is not None and not isinstance(overrides, Mapping):
            raise ConfigError(f"--set {culprit}: {error}") from None
        if path is not None and (culprit is None or culprit in from_file):
            raise ConfigError(f"{path}: {error}") from None
        raise


def add_config_arguments(parser, default_config: str | None = None) -> None:
    """Add the shared `--config` and `--set` options to an argparse parser."""
    parser.add_argument(
        "--config", default=default_config, help="YAML config file (keys not given keep their defaults)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, YAML syntax; repeatable (e.g. --set max_epochs=3 --set weights=null)",
    )


def config_reference_markdown() -> str:
    """The README's config table, generated so it cannot drift from the dataclass."""
    hints = typing.get_type_hints(Config)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields(Config):
        default = f.default
        if isinstance(default, tuple):
            default = list(default)
        shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
        if shown.endswith("\n..."):
            shown = shown[:-4].strip()
        shown = shown.removesuffix("...").strip()
        rows.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{shown}` | {FIELD_HELP[f.name]} |")
    return "\n".join(rows)

