"""Dashboard logic (keras_ham.dashboard_logic) and the app's per-session page, without a server."""

from __future__ import annotations

import html
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keras_ham.gradcam import GradCAM, GradCAMError
from keras_ham import dashboard_logic as logic
from keras_ham.labels import CLASS_DESCRIPTIONS, CLASS_FULL_NAMES, CLASS_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_tiny_run(runs_dir: Path, name: str = "x", *, overrides: dict | None = None) -> Path:
    """A run folder holding only a tiny untrained model (resnet18, 32 px unless overridden), for
    tests that need a servable model rather than a run report; returns its best.keras.
    (Run reports are tested on what the real training writes: `train_and_evaluate_tiny_run`.)"""
    from keras_ham.config import load_config
    from keras_ham.model import build_model
    from keras_ham.runs import RunFolder

    config = load_config(overrides={"weights": None, "image_size": 32, "model": "resnet18", **(overrides or {})})
    folder = RunFolder(runs_dir / name)
    folder.path.mkdir(parents=True, exist_ok=True)
    build_model(config).save(folder.best_model)
    return folder.best_model


def write_run_config(model_path: Path, overrides: dict | None = None) -> None:
    """config.yaml beside a `write_tiny_run` model, as training writes it (the same overrides)."""
    from keras_ham.config import load_config
    from keras_ham.runs import RunFolder

    config = load_config(overrides={"weights": None, "image_size": 32, "model": "resnet18", **(overrides or {})})
    RunFolder.of_model(model_path).config.write_text(config.to_yaml(), encoding="utf-8")


def train_and_evaluate_tiny_run(tiny_demo, root: Path, name: str = "x") -> tuple[Path, dict]:
    """What `scripts/train.py --evaluate` writes, from the real writers: a tiny 2-epoch training
    into <root>/runs/<name>/ and its evaluation on the test split (eval_test/). Returns the run
    folder and the evaluation's metrics."""
    from conftest import tiny_config
    from keras_ham.device import DeviceChoice
    from keras_ham.evaluate import evaluate
    from keras_ham.train import train

    config = tiny_config(tiny_demo, root, run_name=name, max_epochs=2)
    result = train(config, device=DeviceChoice("cpu", "cpu", "test"), log=lambda message: None, verbose=0)
    metrics = evaluate(result.run_dir / "best.keras", config.test_csv, image_dirs=config.image_dirs,
                       bootstrap=100, log=lambda message: None)
    return result.run_dir, metrics


def image_bytes(mode: str = "RGB", size=(60, 45), fmt: str = "PNG", seed: int = 0) -> bytes:
    """A random image of `mode`, encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        channels = {"L": None, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
        shape = (height, width) if channels is None else (height, width, channels)
        image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def trained_run(tiny_demo, tmp_path_factory) -> tuple[Path, dict]:
    return train_and_evaluate_tiny_run(tiny_demo, tmp_path_factory.mktemp("dash"))


@pytest.fixture(scope="module")
def tiny_runs(trained_run) -> Path:
    """The runs folder holding run "x", as training and evaluation wrote it."""
    return trained_run[0].parent


@pytest.fixture(scope="module")
def bundle(tiny_runs):
    logic.clear_model_cache()
    return logic.load_model_bundle(tiny_runs / "x" / "best.keras")


def load_app_module():
    """dashboard/app.py as a module (not run by `panel serve`, so nothing is served)."""
    spec = importlib.util.spec_from_file_location("keras_ham_dashboard_app", REPO_ROOT / "dashboard" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app_module():
    return load_app_module()


# --------------------------------------------------------------------------- options, runs


def test_parse_options_flags_override_environment(tmp_path):
    env = {"KERAS_HAM_MODEL": "env/best.keras", "KERAS_HAM_RUNS": "env_runs"}
    assert logic.parse_options([], env) == logic.DashboardOptions(Path("env_runs"), Path("env/best.keras"))
    options = logic.parse_options(["--model", "m.keras", "--runs", str(tmp_path)], env)
    assert options == logic.DashboardOptions(tmp_path, Path("m.keras"))
    assert logic.parse_options([], {}) == logic.DashboardOptions(Path("runs"), None)


def test_discover_runs_newest_first_and_skips_runs_without_model(tmp_path):
    runs = tmp_path / "runs"
    for name, age in (("old", 300), ("new", 10), ("middle", 100)):
        (runs / name).mkdir(parents=True)
        (runs / name / "best.keras").write_bytes(b"model")
        stamp = time.time() - age
        os.utime(runs / name / "best.keras", (stamp, stamp))
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "history.csv").write_text("epoch\n1\n")
    (runs / "stray.keras").write_bytes(b"not a run folder")
    assert [run.name for run in logic.discover_runs(runs)] == ["new", "middle", "old"]
    assert logic.start_model(logic.DashboardOptions(runs)) == runs / "new" / "best.keras"
    given = tmp_path / "elsewhere.keras"
    assert logic.start_model(logic.DashboardOptions(runs, given)) == given
    assert logic.discover_runs(tmp_path / "missing") == []
    assert logic.start_model(logic.DashboardOptions(tmp_path / "missing")) is None


def test_model_choice_accepts_run_models_and_start_model_only(tmp_path):
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "best.keras").write_bytes(b"model")
    (runs / "a" / "other.keras").write_bytes(b"model")
    start = tmp_path / "given" / "model.keras"
    start.parent.mkdir()
    start.write_bytes(b"model")
    outside = tmp_path / "secret.keras"
    outside.write_bytes(b"model")

    assert logic.validate_model_choice(runs / "a" / "best.keras", runs, start) == (runs / "a" / "best.keras").resolve()
    assert logic.validate_model_choice(str(start), runs, start) == start
    for bad in (outside, runs / "a" / "other.keras", runs / "a" / ".." / ".." / "secret.keras", "/etc/passwd",
                runs / "missing" / "best.keras", ""):
        with pytest.raises(logic.ModelChoiceError):
            logic.validate_model_choice(bad, runs, start)
    link_dir = runs / "link"
    link_dir.mkdir()
    (link_dir / "best.keras").symlink_to(outside)  # a link out of the runs folder is not a run model
    with pytest.raises(logic.ModelChoiceError, match="not served"):
        logic.validate_model_choice(link_dir / "best.keras", runs, start)

    choices = logic.model_choices(runs, start)
    assert list(choices.values())[0] == str(start)
    assert str(runs / "a" / "best.keras") in choices.values()
    assert all("other.keras" not in path for path in choices.values())


def test_model_is_loaded_once_per_process(tiny_runs, bundle):
    again = logic.load_model_bundle(tiny_runs / "x" / ".." / "x" / "best.keras")
    assert again is bundle
    assert (tiny_runs / "x" / "best.keras").resolve() in logic.cached_model_paths()


def test_broken_model_file_raises_model_error(tmp_path):
    from keras_ham.model import ModelError

    (tmp_path / "best.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="best.keras"):
        logic.load_model_bundle(tmp_path / "best.keras")


# --------------------------------------------------------------------------- cards


def test_card_from_upload_predicts_and_explains(bundle):
    card = logic.analyze_upload("lesion.png", image_bytes(size=(600, 450)), bundle, card_id=7)
    assert isinstance(card, logic.ImageCard), getattr(card, "message", "")
    assert card.card_id == 7 and card.filename == "lesion.png"
    assert card.model_input.shape == (32, 32, 3)
    assert card.image.shape == (240, 320, 3)  # scaled for display, aspect ratio kept
    assert card.probabilities.shape == (7,)
    np.testing.assert_allclose(card.probabilities.sum(), 1.0, rtol=1e-5)
    # the same path as Predictor on the file decoded by load_image
    from keras_ham.images import load_image

    from keras_ham.predict import Predictor

    predictor = Predictor(bundle.gradcam.model, batch_size=1)
    expected = predictor.predict(load_image(image_bytes(size=(600, 450)), 32)[None].astype(np.float32))[0]
    np.testing.assert_allclose(card.probabilities, expected, rtol=1e-5, atol=1e-6)
    assert card.predicted_name == CLASS_NAMES[int(np.argmax(expected))]
    # the predicted class's cam at the default layer comes with the card
    assert list(card.heatmaps) == [(bundle.default_layer, card.predicted_index)]
    heatmap = card.heatmaps[(bundle.default_layer, card.predicted_index)]
    assert heatmap.shape == (32, 32) and heatmap.min() >= 0.0 and heatmap.max() <= 1.0
    direct = bundle.gradcam.cam(card.model_input[None], class_index=card.predicted_index).heatmaps[0]
    np.testing.assert_allclose(heatmap, direct, atol=1e-6)


def test_explaining_another_class_computes_once_and_opacity_only_reblends(bundle):
    card = logic.analyze_upload("a.png", image_bytes(seed=3), bundle, card_id=1)
    other = (card.predicted_index + 1) % 7
    calls = []
    original = card.bundle.heatmap

    class CountingBundle:
        def __getattr__(self, name):
            return getattr(bundle, name)

        def heatmap(self, model_input, class_index, layer=None):
            calls.append(class_index)
            return original(model_input, class_index, layer)

    card.bundle = CountingBundle()
    expected = bundle.gradcam.cam(card.model_input[None], class_index=other).heatmaps[0]
    np.testing.assert_allclose(card.heatmap(other), expected, atol=1e-6)
    first = card.overlay(other, 0.2)
    second = card.overlay(other, 0.9)
    assert calls == [other]  # cached: changing the opacity never calls the model
    assert first.shape == second.shape == card.image.shape and first.dtype == np.uint8
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(card.overlay(other, 0.0), card.image)
    with pytest.raises(Exception, match="out of range"):
        card.heatmap(7)


def test_cards_open_at_the_deepest_layer_with_enough_cells():
    at_224 = [("conv5_block3_out", (7, 7)), ("conv4_block6_out", (14, 14)), ("conv3_block4_out", (28, 28))]
    at_64 = [("conv5_block2_out", (2, 2)), ("conv4_block2_out", (4, 4)), ("conv3_block2_out", (8, 8))]
    at_32 = [("conv5_block2_out", (1, 1)), ("conv4_block2_out", (2, 2)), ("conv3_block2_out", (4, 4))]
    assert logic.display_layer(at_224) == "conv5_block3_out"  # the usual Grad-CAM layer
    assert logic.display_layer(at_64) == "conv3_block2_out"
    assert logic.display_layer(at_32) == "conv3_block2_out"  # none is big enough: the finest offered
    assert logic.display_layer([("features", (None, None))]) == "features"
    assert logic.display_layer([]) is None


def test_explaining_at_another_layer(bundle):
    """The card offers the deepest three resolutions and opens at the display layer."""
    choices = bundle.layer_choices
    assert bundle.default_layer == bundle.gradcam.layer_name == logic.display_layer(choices)
    sizes = [size for _name, size in choices]
    assert len(choices) == 3 and sizes == sorted(sizes)  # deepest (smallest) first
    card = logic.analyze_upload("a.png", image_bytes(seed=4), bundle, card_id=1)
    earlier, (h, w) = next(choice for choice in choices if choice[0] != bundle.default_layer)
    heatmap = card.heatmap(None, earlier)
    expected = GradCAM(bundle.gradcam.model, layer_name=earlier).cam(card.model_input[None], class_index=card.predicted_index)
    assert expected.feature_cams.shape[1:] == (h, w)
    np.testing.assert_allclose(heatmap, expected.heatmaps[0], atol=1e-6)
    assert (earlier, card.predicted_index) in card.heatmaps and len(card.heatmaps) == 2
    assert card.overlay(None, 0.5, earlier).shape == card.image.shape
    with pytest.raises(GradCAMError, match="not offered"):
        card.heatmap(None, "probabilities")


def test_uncertainty_threshold_and_top_alternatives(bundle):
    card = logic.analyze_upload("a.png", image_bytes(seed=5), bundle, card_id=1)
    card.probabilities = np.array([0.04, 0.12, 0.3, 0.05, 0.35, 0.1, 0.04], dtype=np.float32)
    assert card.predicted_name == "mel" and card.confidence == pytest.approx(0.35)
    assert card.is_uncertain(0.5)
    assert not card.is_uncertain(0.35)
    assert not card.is_uncertain(0.3)
    assert [name for name, _ in card.top(3)] == ["mel", "bkl", "bcc"]
    assert card.top(3)[0] == ("mel", pytest.approx(0.35))


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("empty.jpg", b"", "empty"),
        ("notes.jpg", b"these are my notes, not a picture\n" * 10, "not an image"),
        ("notes.txt", "text handed over as str", "not an image"),
        ("cut-header.jpg", image_bytes(fmt="JPEG", size=(200, 150))[:400], "corrupt or truncated"),
        ("truncated.jpg", image_bytes(fmt="JPEG", size=(200, 150))[:5000], "corrupt or truncated"),
        ("huge.png", b"\x89PNG" + b"0" * (logic.MAX_UPLOAD_BYTES + 1), "upload limit"),
    ],
)
def test_bad_files_give_a_message_card_naming_the_file(bundle, name, data, message):
    card = logic.analyze_upload(name, data, bundle, card_id=3)
    assert isinstance(card, logic.ErrorCard)
    assert card.card_id == 3 and card.filename == name
    assert name in card.message and message in card.message


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels (a decompression bomb)."""
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR data starts at byte 16
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # CRC over "IHDR" + data
    return bytes(raw)


def test_decompression_bomb_is_refused_before_decoding(bundle):
    card = logic.analyze_upload("bomb.png", png_with_size(100_000, 100_000), bundle, card_id=2)
    assert isinstance(card, logic.ErrorCard)
    assert "bomb.png" in card.message and ("pixels" in card.message or "decompression" in card.message)


@pytest.mark.parametrize(
    "mode, fmt, note",
    [("L", "PNG", "grayscale"), ("RGBA", "PNG", "RGBA"), ("CMYK", "JPEG", "CMYK"), ("I;16", "PNG", "16-bit")],
)
def test_other_colour_modes_are_converted(bundle, mode, fmt, note):
    data = image_bytes(mode, fmt=fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith(mode[:1])
    card = logic.analyze_upload(f"image.{fmt.lower()}", data, bundle, card_id=1)
    assert isinstance(card, logic.ImageCard), getattr(card, "message", "")
    assert card.image.shape == (45, 60, 3) and card.image.dtype == np.uint8
    assert any(note in text for text in card.notes)
    plain = logic.analyze_upload("rgb.png", image_bytes("RGB"), bundle, card_id=2)
    assert plain.notes == ()


def test_session_cards_add_remove_clear():
    cards = logic.SessionCards()
    first = cards.add(logic.ErrorCard(cards.next_id(), "a.jpg", "a.jpg: bad"))
    second = cards.add(logic.ErrorCard(cards.next_id(), "b.jpg", "b.jpg: bad"))
    assert first.card_id != second.card_id
    assert cards.remove(first.card_id) and not cards.remove(first.card_id)
    assert [card.filename for card in cards.cards] == ["b.jpg"]
    cards.clear()
    assert len(cards) == 0
    assert cards.add(logic.ErrorCard(cards.next_id(), "c.jpg", "")).card_id == 3  # ids are never reused


# --------------------------------------------------------------------------- run report


def test_run_report_reads_history_metrics_config_and_summary(trained_run):
    """The report of what the real train() and evaluate() wrote: the consumer and the producers
    of the run folder cannot drift apart without this failing."""
    run, metrics = trained_run
    report = logic.load_run_report(run)
    assert report.problems == []
    assert list(report.history["epoch"]) == [1, 2]
    for pair in logic.HISTORY_PAIRS:  # every curve the run tab draws has both lines with both epochs
        series = logic.history_series(report.history, pair[0])
        assert [column for column, _, _ in series] == list(pair)
        assert all(epochs == [1.0, 2.0] for _, epochs, _ in series)
    assert report.evaluation_name == "eval_test"
    assert report.metrics["balanced_accuracy"] == pytest.approx(metrics["balanced_accuracy"])
    assert "image_size: 32" in report.config_text
    assert report.summary["device"] == "cpu" and report.summary["best_epoch"] in (1, 2)
    present = [row for row in report.metrics["confusion_matrix"] if sum(row) > 0]
    np.testing.assert_allclose(logic.row_normalised(present).sum(axis=1), 1.0)
    assert report.metrics["class_names"] == list(CLASS_NAMES)
    assert set(report.metrics["confidence_intervals"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "level"}


def test_model_bundle_reads_the_labels_training_wrote(bundle):
    assert bundle.class_names == CLASS_NAMES
    assert bundle.full_names == CLASS_FULL_NAMES and bundle.descriptions == CLASS_DESCRIPTIONS


def test_a_bad_labels_json_is_refused_naming_the_file(app_module, tiny_runs, tmp_path):
    import shutil

    from keras_ham.runs import LabelsError

    run = tmp_path / "runs" / "bad"
    shutil.copytree(tiny_runs / "x", run)
    (run / "labels.json").write_text('{"class_names": ["a", "b"]}')
    with pytest.raises(LabelsError, match=r"labels.json: 2 class names, but the model has 7 outputs"):
        logic.ModelBundle(run / "best.keras")
    (run / "labels.json").write_text('{"class_names": ' + json.dumps(list(CLASS_NAMES)) + ', "full_names": [1]}')
    with pytest.raises(LabelsError, match=r"labels.json: \"full_names\" must be an object"):
        logic.ModelBundle(run / "best.keras")
    session = app_module.create_app(logic.DashboardOptions(tmp_path / "runs", run / "best.keras"))
    assert session.bundle is None and "labels.json" in session.empty_note.object  # the page says which file


def test_run_report_prefers_eval_test_and_reports_missing_files(tmp_path):
    run = tmp_path / "r"
    (run / "eval_val").mkdir(parents=True)
    (run / "eval_val" / "metrics.json").write_text('{"accuracy": 0.1}')
    assert logic.find_evaluation(run) == run / "eval_val" / "metrics.json"
    (run / "eval_test").mkdir()
    (run / "eval_test" / "metrics.json").write_text('{"accuracy": 0.9}')
    assert logic.find_evaluation(run) == run / "eval_test" / "metrics.json"
    (run / "summary.json").write_text("{broken")
    (run / "history.csv").write_text("epoch,loss\n1,nan\n2,0.5\n")
    report = logic.load_run_report(run)
    assert report.metrics == {"accuracy": 0.9} and report.summary is None
    assert any("summary.json" in problem and "unreadable" in problem for problem in report.problems)
    assert any("config.yaml" in problem for problem in report.problems)
    assert logic.history_series(report.history, "loss") == [("loss", [2.0], [0.5])]  # NaN dropped


# --------------------------------------------------------------------------- the app's page


def test_app_layout_with_model_and_two_independent_sessions(app_module, tiny_runs, bundle):
    options = logic.DashboardOptions(tiny_runs, tiny_runs / "x" / "best.keras")
    first, second = app_module.create_app(options), app_module.create_app(options)
    assert first.bundle is bundle and second.bundle is bundle  # one model shared by sessions
    assert first.template is not second.template and first.cards is not second.cards
    assert not first.upload.disabled and first.model_select.value == str(tiny_runs / "x" / "best.keras")
    assert "torch" in first.model_info.object and first.device.torch_device in first.model_info.object

    card = first.add_upload("mine.png", image_bytes(seed=1))
    bad = first.add_upload("broken.jpg", b"\xff\xd8\xff garbage")
    assert isinstance(card, logic.ImageCard) and isinstance(bad, logic.ErrorCard)
    assert len(first.cards) == 2 and len(first.grid.objects) == 2
    assert len(second.cards) == 0 and len(second.grid.objects) == 0  # the other session sees nothing
    second.add_upload("theirs.png", image_bytes(seed=2))
    first.remove(bad.card_id)
    assert [c.filename for c in first.cards.cards] == ["mine.png"]
    assert [c.filename for c in second.cards.cards] == ["theirs.png"]

    view = first.card_views[card.card_id]
    first.threshold.value = 1.0  # everything is uncertain at 100 %
    assert "uncertain" in view.prediction.object and "Top 3" in view.prediction.object
    first.threshold.value = 0.0
    assert "uncertain" not in view.prediction.object
    assert "At 0.00, 100\u00a0% of test images" in first.threshold_text.object
    assert logic.DEMO_NOTICE not in view.prediction.object  # a split-trained model: no demo notice
    assert html.escape(app_module.calibration_note(bundle)) in view.prediction.object
    before = view.gradcam.object
    view.opacity.value = 0.9
    assert view.gradcam.object != before
    first.clear()
    assert len(first.cards) == 0 and first.grid.objects == [] and len(second.cards) == 1

    assert first.run_select.value == str(tiny_runs / "x")
    report = first.run_tab.objects[1].objects[0]
    text = " ".join(str(getattr(pane, "object", "")) for pane in report.select(app_module.pn.pane.HTML))
    assert "balanced accuracy" in text and "image_size: 32" in text and "val_balanced_accuracy" in text


def test_app_layout_without_model_explains_how_to_train(app_module, tmp_path):
    session = app_module.create_app(logic.DashboardOptions(tmp_path / "runs"))
    assert session.bundle is None and session.upload.disabled and session.model_select.disabled
    assert logic.DEMO_TRAIN_COMMAND in session.empty_note.object
    assert "No trained model" in session.empty_note.object
    card = session.add_upload("a.png", image_bytes())
    assert isinstance(card, logic.ErrorCard) and "no model" in card.message
    assert logic.DEMO_TRAIN_COMMAND in session.run_tab.objects[0].object


def test_app_layout_with_broken_start_model_says_why(app_module, tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"nope")
    session = app_module.create_app(logic.DashboardOptions(tmp_path / "runs", broken))
    assert session.bundle is None
    assert "broken.keras" in session.empty_note.object and logic.DEMO_TRAIN_COMMAND in session.empty_note.object


def test_app_switches_to_another_run_model_for_new_uploads(app_module, tiny_runs, tmp_path):
    import asyncio
    import shutil

    runs = tmp_path / "runs"
    for name in ("a", "b"):
        shutil.copytree(tiny_runs / "x", runs / name)
    session = app_module.create_app(logic.DashboardOptions(runs))
    newest = logic.discover_runs(runs)[0]
    assert session.bundle.path.resolve() == newest.model_path.resolve()  # the newest run model by default
    first = session.add_upload("before.png", image_bytes(seed=4))
    other = next(run for run in logic.discover_runs(runs) if run.name != newest.name)
    assert str(other.model_path) in session.model_select.options.values()

    class Event:
        new = str(other.model_path)

    asyncio.run(session._on_model(Event()))
    assert session.bundle.path.resolve() == other.model_path.resolve() and not session.model_message.visible
    assert other.name in session.model_info.object
    second = session.add_upload("after.png", image_bytes(seed=4))
    assert second.bundle is session.bundle and first.bundle is not session.bundle  # old cards keep their model


def test_app_rejects_a_model_path_sent_from_the_page(app_module, tiny_runs, tmp_path):
    import asyncio

    session = app_module.create_app(logic.DashboardOptions(tiny_runs, tiny_runs / "x" / "best.keras"))
    outside = tmp_path / "evil.keras"
    outside.write_bytes(b"x")

    class Event:
        new = str(outside)

    asyncio.run(session._on_model(Event()))
    assert session.model_message.visible and "not served" in session.model_message.object
    assert session.bundle.path == tiny_runs / "x" / "best.keras"


def test_app_chooses_the_device_first_and_never_imports_training_code(tmp_path):
    import subprocess

    code = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('app', {str(REPO_ROOT / 'dashboard' / 'app.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(os.environ.get('KERAS_TORCH_DEVICE'), module.DEVICE.torch_device,\n"
        "      [m for m in ('keras_ham.train', 'keras_ham.dataset', 'keras_ham.evaluate') if m in sys.modules])\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    env.pop("KERAS_TORCH_DEVICE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    exported, chosen, imported = result.stdout.strip().splitlines()[-1].split(" ", 2)
    assert exported == chosen != "None"  # configure_device ran and exported its choice for Keras
    assert imported == "[]"


def test_upload_widget_reassembles_chunks_and_refuses_oversized_files(app_module, tiny_runs, bundle):
    session = app_module.create_app(logic.DashboardOptions(tiny_runs, tiny_runs / "x" / "best.keras"))
    upload = session.upload
    data = image_bytes(size=(300, 200), fmt="PNG", seed=9)
    step = len(data) // 3 + 1
    chunks = [data[i: i + step] for i in range(0, len(data), step)]
    for index, chunk in enumerate(chunks):  # what the browser sends for one file
        upload._handle_msg({"kind": "chunk", "id": "1", "name": "chunked.png", "size": len(data),
                            "index": index, "total": len(chunks), "data": chunk})
    assert [card.filename for card in session.cards.cards] == ["chunked.png"]
    card = session.cards.cards[0]
    assert isinstance(card, logic.ImageCard) and card.image.shape == (200, 300, 3)
    direct = logic.analyze_upload("same.png", data, bundle, card_id=99)
    np.testing.assert_allclose(card.probabilities, direct.probabilities, atol=1e-6)  # bytes arrived intact

    upload._handle_msg({"kind": "refused", "id": "2", "name": "huge.jpg", "size": 25_000_000})
    upload.max_bytes = 1000  # a client that ignores the limit is stopped on the server
    for index in range(3):
        upload._handle_msg({"kind": "chunk", "id": "3", "name": "sneaky.jpg", "size": 10,
                            "index": index, "total": 3, "data": b"x" * 600})
    errors = [card for card in session.cards.cards if isinstance(card, logic.ErrorCard)]
    assert [card.filename for card in errors] == ["huge.jpg", "sneaky.jpg"]
    assert "25.0 MB" in errors[0].message and "upload limit" in errors[1].message
    assert len(session.grid.objects) == 3 and upload._parts == {}


def test_training_data_says_demo_or_split(trained_run, tmp_path):
    demo = write_tiny_run(tmp_path / "runs", "demo")
    write_run_config(demo, {"demo_data": "data/demo", "train_csv": "data/demo/processed/train.csv"})
    demo_data = logic.training_data(demo.parent)
    assert demo_data.is_demo and "synthetic demo images" in demo_data.text
    run_dir, _metrics = trained_run  # what training wrote: a split, with its image count from summary.json
    real_data = logic.training_data(run_dir)
    train_images = json.loads((run_dir / "summary.json").read_text())["train_images"]
    assert real_data.kind == "split" and f"{train_images} images from" in real_data.text
    assert "train.csv" in real_data.text
    bare = write_tiny_run(tmp_path / "runs", "bare")  # no config.yaml
    assert logic.training_data(bare.parent).kind == "unknown"


def test_threshold_text_comes_from_the_stored_evaluation(trained_run, bundle, tmp_path):
    from keras_ham.calibration import threshold_sentence

    run_dir, metrics = trained_run
    model = run_dir / "best.keras"
    stored = json.loads((run_dir / "eval_test" / "metrics.json").read_text())["risk_coverage"]
    assert stored == json.loads(json.dumps(metrics["risk_coverage"]))
    # The highest stored threshold at which some test images are still confident (0.00 keeps all).
    threshold = max(row["threshold"] for row in stored["thresholds"] if row["kept"])
    text = logic.threshold_text(model, threshold, bundle.temperature)
    expected = threshold_sentence(stored, threshold, "test")
    assert text == expected[0].upper() + expected[1:]
    assert "of test images" in text and "balanced accuracy is" in text
    if threshold < 1.0:  # above it, none is confident, and the sentence says so
        assert "none of the" in logic.threshold_text(model, round(threshold + 0.05, 2), bundle.temperature)
    other = 1.5 if bundle.temperature is None else bundle.temperature * 2
    assert "different temperature" in logic.threshold_text(model, threshold, temperature=other)
    assert "no numbers for a threshold of 0.61" in logic.threshold_text(model, 0.61, bundle.temperature)
    bare = write_tiny_run(tmp_path / "runs", "bare")
    assert "No stored evaluation" in logic.threshold_text(bare, 0.5)


def test_calibration_note_says_why_a_fitted_temperature_was_not_applied(app_module, bundle, tmp_path):
    from keras_ham.calibration import SKIPPED_AT_BOUND
    from keras_ham.runs import RunFolder

    # The trained run: what its summary.json says (a tiny 2-epoch model's fit may well be skipped).
    stored = json.loads(RunFolder.of_model(bundle.path).summary.read_text())["calibration"]
    assert bundle.calibration_skipped == (None if stored["applied"] else stored["skipped"])
    assert ("was skipped" in app_module.calibration_note(bundle)) == (not stored["applied"])
    model = write_tiny_run(tmp_path / "runs", "skipped")
    # The record keras_ham.calibration.fit_on_validation returns for summary.json (see test_temperature.py).
    RunFolder.of_model(model).summary.write_text(json.dumps(
        {"calibration": {"applied": False, "temperature": None, "skipped": SKIPPED_AT_BOUND["low"]}}))
    skipped = logic.ModelBundle(model)
    assert skipped.temperature is None and skipped.calibration_skipped == SKIPPED_AT_BOUND["low"]
    note = app_module.calibration_note(skipped)
    assert "not calibrated: temperature scaling was skipped" in note and "separable" in note


def test_app_marks_every_prediction_of_a_demo_model(app_module, tmp_path):
    demo = write_tiny_run(tmp_path / "runs", "demo")
    write_run_config(demo, {"demo_data": "data/demo"})
    session = app_module.create_app(logic.DashboardOptions(tmp_path / "runs", demo))
    assert "kh-demo" in session.model_info.object and "synthetic demo images" in session.model_info.object
    assert session.bundle.ood is None and "No out-of-distribution threshold" in session.model_info.object
    session.add_upload("real_lesion.png", image_bytes(seed=3))
    view = next(iter(session.card_views.values()))
    assert logic.DEMO_NOTICE in view.prediction.object
    assert view.card.ood_score is None and not view.card.unfamiliar  # no threshold stored: no flag
    # With a stored threshold an image scoring above it is flagged on its card.
    session.bundle.ood = {"score": "energy", "threshold": -1e9, "false_alarm_rate": 0.05}
    flagged = session.add_upload("odd.png", image_bytes(seed=3))
    assert flagged.unfamiliar and np.isfinite(flagged.ood_score)
    assert "Do not trust this prediction" in session.card_views[flagged.card_id].prediction.object


def test_card_flags_an_upload_by_the_runs_feature_statistics(app_module, bundle):
    """The trained run stores the feature-statistics score (keras_ham.ood): a card's score is the
    distance of its image's stem statistics, one extra pass; above the threshold the card says so."""
    from keras_ham.ood import FEATURE_SCORE

    assert bundle.ood["score"] == FEATURE_SCORE and bundle.feature_ood is not None
    card = logic.analyze_upload("lesion.png", image_bytes(seed=4), bundle, card_id=1)
    expected = bundle.feature_ood.scores(card.model_input.astype(np.float32)[None])[0]
    assert card.ood_score == pytest.approx(expected, rel=1e-6)
    assert card.unfamiliar == (expected > bundle.ood["threshold"])
    original = bundle.feature_ood.threshold
    try:
        bundle.feature_ood.threshold = -1.0  # every distance is above it
        flagged = logic.analyze_upload("odd.png", image_bytes(seed=4), bundle, card_id=2)
    finally:
        bundle.feature_ood.threshold = original
    assert flagged.unfamiliar
    shown = app_module.prediction_html(flagged, 0.5)
    assert "pool1_pool feature statistics" in shown and "Do not trust this prediction" in shown


def test_a_damaged_ood_statistics_file_falls_back_to_the_energy_flag(bundle, tmp_path):
    import shutil

    from keras_ham.runs import RunFolder

    folder = RunFolder(tmp_path / "copy")
    shutil.copytree(RunFolder.of_model(bundle.path).path, folder.path)
    folder.ood_statistics.write_bytes(b"cut off")
    with pytest.warns(UserWarning, match="ood_statistics.npz"):
        damaged = logic.ModelBundle(folder.best_model)
    assert damaged.feature_ood is None and damaged.ood["score"] == "energy"
    card = logic.analyze_upload("lesion.png", image_bytes(seed=4), damaged, card_id=1)
    assert card.ood_score is not None and np.isfinite(card.ood_score)  # the energy of its logits
