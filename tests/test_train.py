"""Training end to end on tiny synthetic data: run folder, resume after kill -9, errors."""

import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from keras_ham.config import Config, load_config
from keras_ham.labels import CLASS_NAMES
from keras_ham.machine import cpu_generation, cpu_model, cpu_vector_extensions, kernel_overrides
from keras_ham.train import TrainingError, learning_rate_at, resolve_run_dir, train


def quiet(_message):
    pass


def test_training_writes_a_complete_run_folder(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path)
    result = train(config, log=quiet, verbose=0)
    run = result.run_dir
    assert run == tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in run.iterdir()) == [
        "best.keras", "config.yaml", "history.csv", "labels.json", "ood_statistics.npz", "summary.json"
    ]  # the resume state is gone, no temporary files are left behind
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    for column in ("loss", "accuracy", "balanced_accuracy", "val_loss", "val_accuracy",
                   "val_balanced_accuracy", "learning_rate"):
        assert column in history.columns and history[column].notna().all()
    assert load_config(run / "config.yaml") == config
    assert json.loads((run / "labels.json").read_text())["class_names"] == list(CLASS_NAMES)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] in (1, 2) and summary["backend"] == "torch"
    assert summary["best_score"] == pytest.approx(history["val_balanced_accuracy"].max())
    assert summary["versions"]["keras"] == keras.__version__
    assert summary["processor"] == cpu_model() and summary["logical_cores"] >= 1
    assert summary["processor_generation"] == cpu_generation()
    assert summary["cpu_vector_extensions"] == cpu_vector_extensions() and summary["kernel_overrides"] == kernel_overrides()
    model = keras.saving.load_model(run / "best.keras", safe_mode=True)
    assert model.input_shape == (None, 32, 32, 3) and not model.compiled


def test_finished_run_is_never_overwritten(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path, max_epochs=1)
    first = train(config, log=quiet, verbose=0).run_dir
    before = (first / "best.keras").read_bytes()
    second = train(config, log=quiet, verbose=0).run_dir
    assert second == first.parent / "tiny-2"
    assert (first / "best.keras").read_bytes() == before


KILL_DURING_EPOCH = """
import os, signal
import keras
from keras_ham.config import load_config
from keras_ham.train import train

class KillDuringEpoch(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == {kill_epoch} and batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

train(load_config({config!r}), log=print, verbose=0, extra_callbacks=[KillDuringEpoch()])
"""


def test_resume_after_kill_9_continues_from_the_interrupted_epoch(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path, max_epochs=4, run_name="resumed")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config.to_yaml())
    code = KILL_DURING_EPOCH.format(kill_epoch=2, config=str(config_file))
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = tmp_path / "runs" / "resumed"
    state = json.loads((run / "state" / "state.json").read_text())
    assert state["epoch"] == 2  # epochs 1 and 2 finished, killed inside epoch 3
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2]
    assert not [p.name for p in run.rglob("*.tmp*")]

    messages = []
    result = train(config, log=messages.append, verbose=0)
    assert result.run_dir == run
    assert any("resuming" in m and "from epoch 3" in m for m in messages)
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] is True and summary["epochs_run"] == 4

    # The same run without interruption: the resumed one is not worse.
    straight = train(config.replace(run_name="straight"), log=quiet, verbose=0)
    assert result.best_score >= straight.best_score - 0.15
    np.testing.assert_allclose(history["learning_rate"],
                               pd.read_csv(straight.run_dir / "history.csv")["learning_rate"], rtol=1e-6)


def test_interrupted_run_with_a_different_config_is_refused(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path)
    run = tmp_path / "runs" / "tiny"
    (run / "state").mkdir(parents=True)
    (run / "config.yaml").write_text(config.replace(lr=0.5).to_yaml())
    (run / "state" / "state.json").write_text("{}")
    with pytest.raises(TrainingError, match=r"different config \(lr\).*run_name"):
        resolve_run_dir(config, "tiny", quiet)


def test_fine_tuning_schedule_freezes_then_unfreezes(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path, max_epochs=2, freeze_backbone_epochs=1, fine_tune_lr_factor=0.1,
                         lr_schedule="constant")
    messages = []
    result = train(config, log=messages.append, verbose=0)
    assert any("phase 'head'" in m for m in messages) and any("phase 'fine-tune'" in m for m in messages)
    history = pd.read_csv(result.run_dir / "history.csv")
    assert history["learning_rate"].tolist() == pytest.approx([1e-3, 1e-4])


def test_learning_rate_schedule_shapes():
    config = Config(lr=1.0, max_epochs=10, warmup_epochs=2, weights=None)
    rates = [learning_rate_at(e, config) for e in range(10)]
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))
    assert rates[-1] > 0
    assert learning_rate_at(5, Config(lr=0.5, lr_schedule="constant", weights=None)) == 0.5


def test_missing_split_csv_and_missing_images_are_clear_errors(tiny_demo, tmp_path):
    from keras_ham.metadata import MetadataError

    with pytest.raises(MetadataError, match="nope.csv: file not found"):
        train(tiny_config(tiny_demo, tmp_path, train_csv=str(tmp_path / "nope.csv")), log=quiet, verbose=0)
    with pytest.raises(MetadataError, match="not found"):
        train(tiny_config(tiny_demo, tmp_path, image_dirs=[str(tmp_path / "empty")]), log=quiet, verbose=0)
    assert not (tmp_path / "runs").exists()  # nothing was created for a run that could not start


def run_script(*args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd)


def test_train_script_rejects_bad_config_without_traceback(repo_root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet50\nlearning_rate: 0.1\n")
    out = run_script(str(repo_root / "scripts" / "train.py"), "--config", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert "Unknown config key(s): learning_rate" in out.stderr and "Traceback" not in out.stderr
    out = run_script(str(repo_root / "scripts" / "train.py"), "--config", str(bad), "--set", "lr=-1", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def _feed(callback, model, values, first_epoch=0):
    """Drive a monitoring callback through epochs with the given monitor values."""
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate(values, start=first_epoch):
        callback.on_epoch_end(epoch, {"val_score": value})
        if model.stop_training:
            return epoch
    return None


def _tiny_compiled_model():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="mse")
    return model


def test_early_stopping_counters_survive_a_resume():
    from keras_ham.train import ResumableEarlyStopping

    scores = [0.5, 0.4, 0.4, 0.4, 0.4, 0.4]

    def make(restored=None):
        return ResumableEarlyStopping(monitor="val_score", mode="max", patience=3, restored=restored)

    straight = _feed(make(), _tiny_compiled_model(), scores)
    assert straight == 3
    first = make()
    assert _feed(first, _tiny_compiled_model(), scores[:2]) is None
    saved = json.loads(json.dumps(first.counters()))  # as stored in state.json
    assert saved == {"wait": 1, "best": 0.5, "best_epoch": 0}
    assert _feed(make(saved), _tiny_compiled_model(), scores[2:], first_epoch=2) == straight
    # Without the counters the resumed run would have trained longer.
    assert _feed(make(), _tiny_compiled_model(), scores[2:], first_epoch=2) != straight


def test_plateau_counters_survive_a_resume():
    from keras_ham.train import ResumableReduceLROnPlateau

    scores = [0.5, 0.6, 0.6, 0.6, 0.6]

    def lr_after(callback, values, first_epoch=0, model=None):
        model = model or _tiny_compiled_model()
        _feed(callback, model, values, first_epoch)
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    def make(restored=None):
        return ResumableReduceLROnPlateau(monitor="val_score", mode="max", patience=2, factor=0.5,
                                          restored=restored)

    assert lr_after(make(), scores) == pytest.approx(5e-4)  # reduced once, at epoch 4
    first = make()
    lr_after(first, scores[:3])
    saved = json.loads(json.dumps(first.counters()))
    assert saved == {"wait": 1, "best": 0.6, "cooldown_counter": 0}
    assert lr_after(make(saved), scores[3:], first_epoch=3) == pytest.approx(5e-4)
    assert lr_after(make(), scores[3:], first_epoch=3) == pytest.approx(1e-3)


def test_resumed_training_restores_the_saved_counters(tiny_demo, tmp_path, monkeypatch):
    from keras_ham import train as train_module

    config = tiny_config(tiny_demo, tmp_path, max_epochs=3, lr_schedule="plateau", early_stopping_patience=5,
                         run_name="counters")

    class InterruptAfterSecondEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, log=quiet, verbose=0, extra_callbacks=[InterruptAfterSecondEpoch()])
    state = json.loads((tmp_path / "runs" / "counters" / "state" / "state.json").read_text())
    counters = state["callback_counters"]
    assert set(counters) == {"plateau", "early_stopping"} and state["epoch"] == 2
    assert counters["early_stopping"]["best"] == pytest.approx(state["best_score"])

    seen = {}
    for cls in (train_module.ResumableEarlyStopping, train_module.ResumableReduceLROnPlateau):
        def on_train_begin(self, logs=None, _original=cls.on_train_begin):
            _original(self, logs)
            seen[type(self).__name__] = self.counters()
        monkeypatch.setattr(cls, "on_train_begin", on_train_begin)

    messages = []
    result = train(config, log=messages.append, verbose=0)
    assert result.epochs_run == 3
    assert seen == {"ResumableEarlyStopping": counters["early_stopping"],
                    "ResumableReduceLROnPlateau": counters["plateau"]}
    resumed = [m for m in messages if m.startswith("resuming")]
    assert resumed and f"early_stopping waited {counters['early_stopping']['wait']} epoch(s)" in resumed[0]


def test_an_early_stop_is_recorded_in_the_summary(tiny_demo, tmp_path, monkeypatch):
    from keras_ham import train as train_module

    def stop_at_second_epoch(self, epoch, logs=None):  # stands in for "no improvement for N epochs"
        if epoch == 1:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    monkeypatch.setattr(train_module.ResumableEarlyStopping, "on_epoch_end", stop_at_second_epoch)
    config = tiny_config(tiny_demo, tmp_path, max_epochs=4, early_stopping_patience=2, run_name="stopped")
    result = train(config, log=quiet, verbose=0)
    assert result.epochs_run == 2
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["stopped_reason"] == "early stopping: val_balanced_accuracy did not improve for 2 epochs"
    assert not (result.run_dir / "state").exists()


def test_run_folder_choice_never_overwrites_results_and_reuses_unstarted_ones(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path)
    runs = tmp_path / "runs"
    (runs / "tiny").mkdir(parents=True)
    (runs / "tiny" / "config.yaml").write_text(config.replace(lr=0.5).to_yaml())  # failed before epoch 1
    (runs / "tiny" / "labels.json").write_text("{}")
    assert resolve_run_dir(config, "tiny", quiet) == (runs / "tiny", False)
    (runs / "tiny" / "best.keras").write_bytes(b"results of an earlier run")  # but no summary.json
    assert resolve_run_dir(config, "tiny", quiet) == (runs / "tiny-2", False)
    (runs / "tiny-2").write_text("a file")
    with pytest.raises(TrainingError, match="tiny-2 is a file; expected a run folder"):
        resolve_run_dir(config, "tiny", quiet)
    with pytest.raises(TrainingError, match="out_dir .* is a file"):
        resolve_run_dir(config.replace(out_dir=str(runs / "tiny-2")), "tiny", quiet)


def test_an_unreadable_resume_state_is_refused_before_anything_is_rewritten(tiny_demo, tmp_path):
    config = tiny_config(tiny_demo, tmp_path)
    run = tmp_path / "runs" / "tiny"
    (run / "state").mkdir(parents=True)
    (run / "config.yaml").write_text(config.to_yaml())
    (run / "state" / "state.json").write_text('{"epoch": 2, "hist')  # cut off
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(TrainingError, match=r"state.json is unreadable .*Delete .*state to start this run over"):
        train(config, log=quiet, verbose=0)
    assert (run / "config.yaml").read_bytes() == before
    (run / "config.yaml").write_text("- not\n- a mapping\n")
    with pytest.raises(TrainingError, match="config.yaml does not hold a config mapping"):
        resolve_run_dir(config, "tiny", quiet)
