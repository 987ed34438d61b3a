"""Train a classifier into a run folder, resumably.

A run folder `runs/<name>/` is the contract with every later stage; its layout and formats
(best.keras, history.csv, config.yaml, labels.json, summary.json, state/) are defined in
`keras_ham.runs`.

Every file is written atomically. If the process dies (even `kill -9`), running the same
command again finds `state/` and continues from the last finished epoch.

Call `keras_ham.device.configure_device()` before importing this module.

Under torchrun the same function trains data-parallel (keras_ham.distributed): every rank
trains on its shard of each batch, rank 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import yaml

from keras_ham import __version__, distributed
from keras_ham.calibration import fit_on_validation
from keras_ham.config import Config
from keras_ham.dataset import class_weights, dataset_from_split_csv
from keras_ham.device import DeviceChoice, keras_without_tensorflow, make_optimizer, set_random_seed
from keras_ham.errors import KerasHamError
from keras_ham.io_utils import atomic_path, write_csv_atomic, write_json_atomic, write_text_atomic
from keras_ham.internals import keras_torch_conv_kernels_channels_last, keras_torch_fast_path
from keras_ham.labels import CLASS_NAMES, NUM_CLASSES
from keras_ham.machine import cpu_generation, cpu_model, cpu_vector_extensions, kernel_overrides, package_versions
from keras_ham.metrics import BalancedAccuracy, SparseCrossentropyWithSmoothing
from keras_ham.model import build_model, set_backbone_trainable
from keras_ham.runs import (  # noqa: F401 - the layout names stay importable from here for other code
    BEST_MODEL,
    CONFIG,
    HISTORY,
    LABELS,
    STATE_DIR,
    STATE_FILE,
    SUMMARY,
    ResumeState,
    RunFolder,
    RunFolderError,
    default_labels,
)

Log = Callable[[str], None]

class TrainingError(KerasHamError, RuntimeError):
    """Training cannot start or continue as asked."""


# --------------------------------------------------------------------------- run folder


def _comparable(config: Config) -> dict:
    """Config fields that must match to resume (loader and device settings may change)."""
    ignored = {"workers", "use_multiprocessing", "max_queue_size", "device", "run_name", "out_dir", "calibrate"}
    return {key: value for key, value in config.to_dict().items() if key not in ignored}


def resolve_run_dir(config: Config, default_name: str, log: Log = print) -> tuple[Path, bool]:
    """Return (run folder, resuming?).

    An interrupted run (it has a resume state) with the same config is resumed; a folder
    that never finished an epoch is reused; anything holding results (a summary, a model or
    a history) is never overwritten: the new run gets the next free `<name>-<k>` folder.
    """
    name = config.run_name or default_name
    root = Path(config.out_dir)
    if root.exists() and not root.is_dir():
        raise TrainingError(f"out_dir {root} is a file; expected a folder for the run folders.")
    candidate, k = root / name, 1
    while True:
        if candidate.exists() and not candidate.is_dir():
            raise TrainingError(f"{candidate} is a file; expected a run folder. Move it or use --set run_name=NEW_NAME.")
        if not candidate.exists() or not any(candidate.iterdir()):
            return candidate, False
        folder = RunFolder(candidate)
        if folder.state_file.exists() and not folder.summary.exists():
            differing = _differing_keys(folder.config, config)
            if differing:
                raise TrainingError(
                    f"{candidate} holds an interrupted run with a different config "
                    f"({', '.join(differing)}). Resume it with the same config, or start a new run "
                    "with --set run_name=NEW_NAME."
                )
            return candidate, True
        if not any(item.exists() for item in (folder.summary, folder.best_model, folder.history)):
            log(f"{candidate} holds no finished epoch of an earlier run; reusing it.")
            return candidate, False
        k += 1
        candidate = root / f"{name}-{k}"
        if k == 2:
            log(f"{root / name} holds a finished run; this run goes to a new folder.")


def _differing_keys(saved_config: Path, config: Config) -> list[str]:
    """Config keys (those that matter for resuming) where the run folder's config differs."""
    try:
        saved = yaml.safe_load(saved_config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TrainingError(f"{saved_config} is unreadable ({error}); the interrupted run in "
                            f"{saved_config.parent} cannot be checked. Start a new run with --set run_name=NEW_NAME.") from error
    if not isinstance(saved, dict):
        raise TrainingError(f"{saved_config} does not hold a config mapping; the interrupted run in "
                            f"{saved_config.parent} cannot be checked. Start a new run with --set run_name=NEW_NAME.")
    current = _comparable(config)
    return sorted(key for key in current if saved.get(key) != current[key])


# --------------------------------------------------------------------------- schedule


def learning_rate_at(epoch: int, config: Config) -> float:
    """Per-epoch learning rate: warm-up, then cosine decay to 1 % of the base rate.

    The fine-tuning phase (after `freeze_backbone_epochs`) scales it by
    `fine_tune_lr_factor`. Per-epoch (not per-step) keeps resume exact and stateless.
    """
    base = config.lr
    if config.freeze_backbone_epochs and epoch >= config.freeze_backbone_epochs:
        base *= config.fine_tune_lr_factor
    if config.lr_schedule != "cosine":
        return base
    if epoch < config.warmup_epochs:
        return base * (epoch + 1) / (config.warmup_epochs + 1)
    span = max(1, config.max_epochs - config.warmup_epochs)
    progress = min(1.0, (epoch - config.warmup_epochs) / span)
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- callbacks


def _monitor_mode(monitor: str) -> str:
    return "min" if monitor.endswith("loss") else "max"


class _ResumableCounters:
    """Mixin for a monitoring callback: its patience counters travel in the run state, so a
    resumed run stops, or lowers the learning rate, on the same epoch as an uninterrupted one."""

    COUNTERS: tuple[str, ...] = ("wait", "best")

    def __init__(self, *args, restored: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._restored = dict(restored or {})

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # resets the counters
        for key, value in self._restored.items():
            if key in self.COUNTERS:
                setattr(self, key, value)
        self._restored = {}

    def counters(self) -> dict:
        values = {key: getattr(self, key) for key in self.COUNTERS}
        return {key: value if value is None else (float(value) if key == "best" else int(value))
                for key, value in values.items()}


class ResumableEarlyStopping(_ResumableCounters, keras.callbacks.EarlyStopping):
    COUNTERS = ("wait", "best", "best_epoch")


class ResumableReduceLROnPlateau(_ResumableCounters, keras.callbacks.ReduceLROnPlateau):
    COUNTERS = ("wait", "best", "cooldown_counter")


class RunCheckpoint(keras.callbacks.Callback):
    """After each epoch: best model, history, resume checkpoint; all atomic.

    The resume checkpoint is written before the state file that points to it, so a kill
    at any moment leaves either the previous consistent state or the new one.
    """

    def __init__(self, run_dir: Path, config: Config, export_model: keras.Model, state: ResumeState, log: Log,
                 writes: bool = True):
        super().__init__()
        #: False on ranks other than 0: they keep the same state in memory but write nothing.
        self.writes = writes
        self.run_dir = run_dir
        self.config = config
        self.export_model = export_model
        self.state = state
        self.log = log
        self.mode = _monitor_mode(config.monitor)
        self.epoch_started = 0.0
        #: name -> callback whose patience counters are saved with the state (set per phase).
        self.counter_callbacks: dict[str, _ResumableCounters] = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.perf_counter()

    def _improved(self, value: float) -> bool:
        best = self.state.best_score
        if best is None:
            return True
        return value < best if self.mode == "min" else value > best

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        values = [v for v in logs.values() if isinstance(v, (int, float))]
        if any(not math.isfinite(float(v)) for v in values):
            self.state.stopped_reason = f"non-finite values in epoch {epoch + 1}; nothing of it was saved"
            self.log(f"epoch {epoch + 1}: {self.state.stopped_reason}")
            return
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        seconds = time.perf_counter() - self.epoch_started
        row = {"epoch": epoch + 1, "learning_rate": learning_rate, "seconds": round(seconds, 3)}
        row.update({key: float(value) for key, value in logs.items() if key != "learning_rate"})
        self.state.history.append(row)
        monitored = logs.get(self.config.monitor)
        if monitored is None:
            raise TrainingError(
                f"monitor={self.config.monitor!r} is not among the epoch's metrics: {', '.join(sorted(logs))}."
            )
        if self._improved(float(monitored)):
            if self.writes:
                self.export_model.set_weights(self.model.get_weights())
                with atomic_path(RunFolder(self.run_dir).best_model) as tmp, keras_without_tensorflow():
                    self.export_model.save(tmp)
            self.state.best_score, self.state.best_epoch = float(monitored), epoch + 1
            self.log(f"epoch {epoch + 1}: {self.config.monitor} improved to {float(monitored):.4f}; saved {BEST_MODEL}")
        self.state.callback_counters = {name: cb.counters() for name, cb in self.counter_callbacks.items()}
        early_stopping = self.counter_callbacks.get("early_stopping")
        if early_stopping is not None and self.model.stop_training and early_stopping.stopped_epoch == epoch:
            self.state.stopped_reason = (f"early stopping: {self.config.monitor} did not improve for "
                                            f"{self.config.early_stopping_patience} epochs")
        self._save_state(epoch + 1)

    def _save_state(self, next_epoch: int) -> None:
        if not self.writes:
            self.state.epoch = next_epoch
            return
        folder = RunFolder(self.run_dir)
        state_dir = folder.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = state_dir / f"epoch-{next_epoch:04d}.weights.h5"
        with atomic_path(checkpoint) as tmp:
            self.model.save_weights(tmp)
        previous = self.state.checkpoint
        self.state.epoch, self.state.checkpoint = next_epoch, checkpoint.name
        write_json_atomic(folder.state_file, self.state.to_json())
        write_history(folder.history, self.state.history)
        if previous and previous != checkpoint.name:
            (state_dir / previous).unlink(missing_ok=True)


def write_history(path: Path, history: Sequence[dict]) -> None:
    import pandas as pd

    write_csv_atomic(path, pd.DataFrame(list(history)))


# --------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_epoch: int | None
    best_score: float | None
    epochs_run: int
    summary: dict


def _compile(model: keras.Model, config: Config, learning_rate: float, device: DeviceChoice | None,
             context: distributed.Context) -> None:
    model.compile(
        optimizer=context.averaging_optimizer(make_optimizer(learning_rate, config.weight_decay, device)),
        loss=SparseCrossentropyWithSmoothing(NUM_CLASSES, config.label_smoothing),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"), BalancedAccuracy(NUM_CLASSES)],
    )
    # Built now rather than at the first step, so its slots get the kernels' layout too.
    model.optimizer.build(model.trainable_variables)
    keras_torch_conv_kernels_channels_last(model)


def _phases(config: Config) -> list[tuple[str, int, int]]:
    """(name, first epoch, end epoch) of each training phase."""
    frozen = min(config.freeze_backbone_epochs, config.max_epochs)
    if frozen == 0:
        return [("full", 0, config.max_epochs)]
    phases = [("head", 0, frozen)]
    if frozen < config.max_epochs:
        phases.append(("fine-tune", frozen, config.max_epochs))
    return phases


def export_best_model(folder: RunFolder, log: Log = print) -> dict:
    """best.keras -> best.onnx, which evaluate and predict then run with ONNX Runtime (README
    "Performance" has the measured reason). A failure is reported, never fatal: the trained
    model is already saved, and scripts/export.py can retry."""
    from keras_ham.export import export_model_file

    started = time.perf_counter()
    try:
        path = export_model_file(folder.best_model, folder.onnx_model)
    except Exception as error:  # noqa: BLE001 - any failure leaves the run usable through Keras
        message = f"{type(error).__name__}: {error}"
        log(f"WARNING: ONNX export of {folder.best_model} failed ({message}); evaluate and predict will run "
            f"the model through Keras. Retry: python scripts/export.py --model {folder.best_model}")
        return {"written": False, "error": message[:500]}
    seconds = time.perf_counter() - started
    log(f"exported {path} in {seconds:.1f} s (evaluate and predict run it with ONNX Runtime)")
    return {"written": True, "file": path.name, "seconds": round(seconds, 1)}


def prepare_demo_data(config: Config, log: Log = print) -> None:
    """Create the synthetic demo data and its split when `config.demo_data` names a folder
    and they are missing, so one command trains on a fresh clone."""
    if not config.demo_data:
        return
    from keras_ham.demo_data import make_demo_data
    from keras_ham.split import write_split_files

    demo_dir = Path(config.demo_data)
    metadata = demo_dir / "HAM10000_metadata.csv"
    make_demo_data(demo_dir, seed=config.seed, log=log)  # skips quickly when already complete
    split_csvs = [Path(config.train_csv), Path(config.val_csv), Path(config.test_csv)]
    if not all(p.exists() for p in split_csvs):
        out = split_csvs[0].parent
        if any(p.parent != out for p in split_csvs):
            raise TrainingError("demo_data needs train_csv, val_csv and test_csv in one folder.")
        log(f"splitting {metadata} into {out}")
        write_split_files(
            metadata,
            out,
            seed=config.seed,
            test_fraction=config.test_fraction,
            val_fraction=config.val_fraction,
            image_dirs=config.image_dirs,
            log=log,
        )


def _read_state(state_file: Path) -> ResumeState:
    try:
        return ResumeState.read(state_file)
    except RunFolderError as error:
        raise TrainingError(f"{error}. Delete {state_file.parent} to start this run over, or start a new run "
                            "with --set run_name=NEW_NAME.") from error


def train(
    config: Config,
    *,
    default_run_name: str | None = None,
    device: DeviceChoice | None = None,
    log: Log = print,
    verbose: int | str = "auto",
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Train `config` into a run folder (resuming an interrupted one) and return it."""
    started = time.perf_counter()
    context = distributed.context(device.kind if device else "cpu")  # world size 1 without torchrun
    log = context.main_log(log)
    verbose = verbose if context.is_main else 0
    set_random_seed(config.seed + context.rank)  # weights come from rank 0; augmentation differs per rank
    context.main_first(lambda: prepare_demo_data(config, log))
    shard = {"rank": context.rank, "world_size": context.world_size}
    val_data = context.main_first(lambda: dataset_from_split_csv(config.val_csv, config, training=False, **shard))
    train_data = context.main_first(lambda: dataset_from_split_csv(config.train_csv, config, training=True, **shard))
    log(f"train: {len(train_data.labels)} images, val: {len(val_data.labels)} images, image size {config.image_size}")
    weights = class_weights(train_data.labels, NUM_CLASSES) if config.use_class_weights else None
    if weights:
        log("class weights: " + ", ".join(f"{CLASS_NAMES[i]} {w:.2f}" for i, w in weights.items()))
        train_data.class_weight = np.array([weights[i] for i in range(NUM_CLASSES)], dtype=np.float32)

    state = ResumeState()
    if context.is_main:
        run_dir, resuming = resolve_run_dir(config, default_run_name or config.model, log)
        folder = RunFolder(run_dir)
        if resuming:  # read before anything in the folder is rewritten
            state = _read_state(folder.state_file)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder.config, config.to_yaml())
        write_json_atomic(folder.labels, default_labels().to_json())
    run_dir, resuming, state = context.broadcast_object((run_dir, resuming, state) if context.is_main else None)
    folder = RunFolder(run_dir)
    if resuming:
        counters = "".join(f"; {name} waited {c['wait']} epoch(s)" for name, c in state.callback_counters.items())
        log(f"resuming {run_dir} from epoch {state.epoch + 1} (best so far: {state.best_score}{counters})")

    model = build_model(config)
    export_model = build_model(config.replace(weights=None))
    checkpoint_cb = RunCheckpoint(run_dir, config, export_model, state, log, writes=context.is_main)
    first_cb, last_cb = context.callbacks(val_data)  # whole-set validation; ranks stop together
    fit_seconds = 0.0
    images_seen = 0
    for phase, first_epoch, end_epoch in _phases(config):
        if state.epoch >= end_epoch or state.stopped_reason:
            continue
        if phase != "full":
            set_backbone_trainable(model, phase == "fine-tune")
            log(f"phase '{phase}': epochs {first_epoch + 1}-{end_epoch}, backbone {'trainable' if phase == 'fine-tune' else 'frozen'}")
        checkpoint = state.checkpoint
        if checkpoint and state.epoch == first_epoch:
            if context.is_main:
                model.load_weights(folder.state_dir / checkpoint)  # a new phase starts a new optimizer
            checkpoint = None
        _compile(model, config, learning_rate_at(first_epoch, config), device, context)
        if checkpoint and context.is_main:
            model.load_weights(folder.state_dir / checkpoint)
        context.broadcast_training_state(model)  # rank 0's weights and optimizer state everywhere
        # Keras calls the dataset's on_epoch_end once before the first epoch, so pin the
        # shuffle order to the absolute epoch: a resumed run sees the same orders.
        pin_epoch = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: setattr(train_data, "epoch", epoch))
        # Counters carry over only inside a phase: each phase starts fresh ones, resumed or not.
        restored = state.callback_counters if state.epoch > first_epoch else {}
        checkpoint_cb.counter_callbacks = {}
        if config.lr_schedule == "plateau":
            schedule = checkpoint_cb.counter_callbacks["plateau"] = ResumableReduceLROnPlateau(
                monitor=config.monitor, factor=0.5, patience=2, mode=_monitor_mode(config.monitor), verbose=1,
                restored=restored.get("plateau"))
        else:
            schedule = keras.callbacks.LearningRateScheduler(lambda epoch, _lr: learning_rate_at(epoch, config))
        callbacks = [first_cb, schedule, pin_epoch, keras.callbacks.TerminateOnNaN()]
        if config.early_stopping_patience:
            callbacks.append(ResumableEarlyStopping(
                monitor=config.monitor, mode=_monitor_mode(config.monitor), patience=config.early_stopping_patience,
                verbose=1, restored=restored.get("early_stopping")))
            checkpoint_cb.counter_callbacks["early_stopping"] = callbacks[-1]
        callbacks.append(checkpoint_cb)  # last of ours: it saves the counters the others just updated
        callbacks.extend(extra_callbacks)
        callbacks.append(last_cb)
        first = state.epoch
        fit_started = time.perf_counter()
        with keras_torch_fast_path():  # the same model, fewer copies per layer on torch (README "Performance")
            model.fit(
                train_data,  # batches carry the class weights (and each rank's loss scale)
                epochs=end_epoch,
                initial_epoch=first,
                shuffle=False,  # the dataset shuffles itself, seeded per epoch
                callbacks=callbacks,
                verbose=verbose,
            )
        fit_seconds += time.perf_counter() - fit_started
        images_seen += (state.epoch - first) * len(train_data.labels)
        if model.stop_training:
            break

    if state.best_epoch is None:
        raise TrainingError(
            f"training produced no usable epoch ({state.stopped_reason or 'unknown reason'}); "
            f"{folder.best_model} was not written."
        )
    summary = {
        "keras_ham_version": __version__,
        "run_dir": str(run_dir),
        "backend": keras.backend.backend(),
        "device": device.torch_device if device else "default",
        "device_reason": device.reason if device else None,
        "platform": platform.platform(),
        "processor": cpu_model(),
        "processor_generation": cpu_generation(),
        "cpu_vector_extensions": cpu_vector_extensions(),  # which kernels ran: results differ between sets
        "kernel_overrides": kernel_overrides(),
        "logical_cores": os.cpu_count(),
        "monitor": config.monitor,
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "epochs_run": len(state.history),
        "stopped_reason": state.stopped_reason,
        "train_images": len(train_data.labels),
        "val_images": len(val_data.labels),
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "world_size": context.world_size,
        "distributed_backend": context.backend,
        "seconds_total_this_process": round(time.perf_counter() - started, 2),
        "seconds_fit_this_process": round(fit_seconds, 2),
        "train_images_per_second_this_process": round(images_seen / fit_seconds, 2) if fit_seconds and images_seen else None,
        "seconds_per_epoch": [row["seconds"] for row in state.history],
        "resumed": resuming,
        "versions": package_versions(),
    }
    if context.is_main:  # the whole validation split (val_data is this rank's shard under torchrun)
        full_val = val_data if context.world_size == 1 else dataset_from_split_csv(config.val_csv, config, training=False)
        statistics_train = dataset_from_split_csv(config.train_csv, config, training=False)  # unshuffled, whole
        summary.update(fit_on_validation(run_dir, config, full_val, log, statistics_train))  # T and the OOD flag
        if config.export_onnx:  # last: the export must be of the final (calibrated) best.keras
            summary["onnx_export"] = export_best_model(folder, log)
        write_json_atomic(folder.summary, summary)
        shutil.rmtree(folder.state_dir, ignore_errors=True)
    distributed.close()
    log(f"best {config.monitor} {state.best_score:.4f} at epoch {state.best_epoch}; run folder {run_dir}")
    return TrainResult(run_dir, state.best_epoch, state.best_score, len(state.history), summary)
