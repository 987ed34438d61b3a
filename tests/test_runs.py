"""The run-folder contract (keras_ham.runs): paths, labels.json and the resume state."""

from __future__ import annotations

import json

import pytest

from keras_ham.labels import CLASS_DESCRIPTIONS, CLASS_FULL_NAMES, CLASS_NAMES
from keras_ham.runs import (
    LabelsError,
    ResumeState,
    RunFolder,
    RunFolderError,
    default_labels,
    read_labels,
)


def test_paths_keep_the_file_names_users_and_other_code_read(tmp_path):
    folder = RunFolder(tmp_path / "demo")
    assert folder == RunFolder.of_model(tmp_path / "demo" / "best.keras") and folder.name == "demo"
    relative = {name: getattr(folder, name).relative_to(folder.path).as_posix()
                for name in ("best_model", "history", "config", "labels", "summary", "state_dir", "state_file")}
    assert relative == {"best_model": "best.keras", "history": "history.csv", "config": "config.yaml",
                        "labels": "labels.json", "summary": "summary.json", "state_dir": "state",
                        "state_file": "state/state.json"}
    assert folder.evaluation_dir("data/processed/test.csv") == folder.path / "eval_test"


def test_find_evaluation_prefers_eval_test(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.find_evaluation() is None
    (tmp_path / "eval_val").mkdir()
    (tmp_path / "eval_val" / "metrics.json").write_text("{}")
    assert folder.find_evaluation() == tmp_path / "eval_val" / "metrics.json"
    (tmp_path / "eval_test").mkdir()
    (tmp_path / "eval_test" / "metrics.json").write_text("{}")
    assert folder.find_evaluation() == tmp_path / "eval_test" / "metrics.json"


def test_read_labels_round_trip_defaults_and_list_form(tmp_path):
    path = tmp_path / "labels.json"
    assert read_labels(path) == default_labels()  # no file: keras_ham.labels
    path.write_text(json.dumps(default_labels().to_json()))
    labels = read_labels(path, num_classes=7)
    assert labels.class_names == CLASS_NAMES and labels.full_names == CLASS_FULL_NAMES
    assert labels.descriptions == CLASS_DESCRIPTIONS
    path.write_text(json.dumps(["mel", "other"]))
    labels = read_labels(path, num_classes=2)
    assert labels.full_names == {"mel": CLASS_FULL_NAMES["mel"], "other": "other"}
    assert labels.descriptions["other"] == ""


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read the class names"),
    ('{"class_names": "mel"}', "expected a JSON list of class names"),
    ('[1, 2]', "expected a JSON list of class names"),
    ('{"class_names": ["a"], "descriptions": "x"}', '"descriptions" must be an object'),
])
def test_a_bad_labels_json_raises_labels_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(LabelsError, match=message) as caught:
        read_labels(path)
    assert str(path) in str(caught.value)


def test_labels_must_fit_the_model(tmp_path):
    with pytest.raises(LabelsError, match="CLASS_NAMES: 7 class names, but the model has 4 outputs"):
        read_labels(tmp_path / "labels.json", num_classes=4)


def test_resume_state_round_trips_through_json(tmp_path):
    state = ResumeState(epoch=2, history=[{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}], best_score=0.4,
                        best_epoch=2, checkpoint="epoch-0002.weights.h5",
                        callback_counters={"plateau": {"wait": 0, "best": 0.4, "cooldown_counter": 0}})
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state.to_json()))
    assert ResumeState.read(path) == state
    # the fields of state.json stay those earlier versions wrote (and read)
    assert set(state.to_json()) == {"epoch", "history", "best_score", "best_epoch", "checkpoint",
                                    "stopped_reason", "callback_counters"}
    older = {"epoch": 1, "history": [], "best_score": None, "best_epoch": None, "checkpoint": None}
    assert ResumeState.from_json(older) == ResumeState(epoch=1)


@pytest.mark.parametrize("data, message", [
    ([], "expected an object"),
    ({}, "no 'epoch'"),
    ({"epoch": "2"}, "epoch='2'"),
    ({"epoch": -1}, "epoch=-1"),
    ({"epoch": 1, "history": {}}, "history="),
    ({"epoch": 1, "best_score": "high"}, "best_score='high'"),
    ({"epoch": 1, "surprise": 1}, "unknown field"),
])
def test_an_invalid_resume_state_is_refused(tmp_path, data, message):
    with pytest.raises(RunFolderError, match=message):
        ResumeState.from_json(data)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RunFolderError, match="state.json is unreadable"):
        ResumeState.read(path)
