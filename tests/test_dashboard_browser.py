"""The dashboard in a real browser: `panel serve dashboard/app.py` driven by headless Chromium.

Uses a tiny ResNet-18 (64 px, trained for 2 epochs on a tiny synthetic set) unless KERAS_HAM_BROWSER_MODEL names another
.keras file (e.g. a ResNet50 at 224 px to measure the upload-to-Grad-CAM time). Prints the
time from choosing the file to the prediction and Grad-CAM being shown. Set
KERAS_HAM_SCREENSHOT=path.png to keep the screenshots (the run tab goes to path_run.png).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.dashboard_load import panel_server
from conftest import REAL_DATA_DIR
from keras_ham.labels import CLASS_NAMES
from keras_ham.calibration import threshold_sentence

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found (Debian: apt-get install chromium)"),
]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--disable-quic"]
REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 180
RESULT_TIMEOUT_MS = 120_000


def lesion_jpeg(path: Path) -> Path:
    """A 600x450 JPEG (HAM10000's size): a real lesion when the shared data is present, else drawn."""
    images = sorted((REAL_DATA_DIR / "HAM10000_images_part_1").glob("*.jpg"))[:1]
    if images:
        image = Image.open(images[0]).convert("RGB").resize((600, 450), Image.Resampling.BILINEAR)
    else:
        yy, xx = np.mgrid[0:450, 0:600]
        lesion = np.exp(-(((xx - 310) / 140.0) ** 2 + ((yy - 215) / 110.0) ** 2))[..., None]
        skin, brown = np.array([226, 182, 160.0]), np.array([92, 52, 38.0])
        noise = np.random.default_rng(0).normal(0, 6, (450, 600, 3))
        image = Image.fromarray(np.clip(skin * (1 - lesion) + brown * lesion + noise, 0, 255).astype(np.uint8))
    image.save(path, format="JPEG", quality=92)
    return path


@pytest.fixture(scope="module")
def served_model(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    """(model to serve, runs folder): a tiny 64 px ResNet-18 trained for 2 epochs and evaluated on
    the tiny demo's test split by the real writers, so the run tab has a history and intervals
    and the page a threshold sentence."""
    from conftest import tiny_config
    from keras_ham.device import DeviceChoice
    from keras_ham.evaluate import evaluate
    from keras_ham.train import train

    root = tmp_path_factory.mktemp("browser")
    config = tiny_config(tiny_demo, root, run_name="tiny-resnet18", image_size=64)
    result = train(config, device=DeviceChoice("cpu", "cpu", "test"), log=lambda message: None, verbose=0)
    evaluate(result.run_dir / "best.keras", config.test_csv, image_dirs=config.image_dirs, bootstrap=100,
             log=lambda message: None)
    chosen = os.environ.get("KERAS_HAM_BROWSER_MODEL")
    return (Path(chosen) if chosen else result.run_dir / "best.keras"), result.run_dir.parent


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    model, runs = served_model
    log_path = tmp_path_factory.mktemp("server") / "panel.log"
    with panel_server(model, runs, log_path, start_timeout=SERVER_START_TIMEOUT_S) as running:
        yield running.url, log_path


@pytest.fixture(scope="module")
def chromium_browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1440, "height": 1150})
    page.set_default_timeout(RESULT_TIMEOUT_MS)
    page.outside_requests = []  # anything not served by the dashboard itself (fonts, CDNs, ...)
    host = urllib.parse.urlsplit(url).hostname

    def note(request):
        parts = urllib.parse.urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname != host:
            page.outside_requests.append(request.url)

    page.on("request", note)
    page.goto(url, wait_until="domcontentloaded")
    page.locator(".kh-upload input[type=file]").wait_for(state="attached")
    return page


def keep_screenshot(path: Path, suffix: str = "") -> None:
    target = os.environ.get("KERAS_HAM_SCREENSHOT")
    if target:
        target = Path(target)
        target = target.with_name(f"{target.stem}{suffix}{target.suffix or '.png'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def test_upload_predict_explain_and_bad_file_in_chromium(server, served_model, chromium_browser, tmp_path):
    url, log_path = server
    image = lesion_jpeg(tmp_path / "lesion_600x450.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG " * 20)

    page = open_page(chromium_browser, url)
    other = None
    try:
        assert "not a medical device" in page.locator(".kh-banner .kh-disclaimer").inner_text()
        upload = page.locator(".kh-upload input[type=file]")
        started = time.perf_counter()
        upload.set_input_files(str(image))
        page.locator(".kh-pending, .kh-card").first.wait_for(state="attached")  # the server has the file
        received = time.perf_counter() - started
        card = page.locator(".kh-card").first
        card.locator(".kh-gradcam img").wait_for(state="visible")
        predicted_class = card.locator(".kh-prediction .kh-class")
        predicted_class.wait_for(state="visible")
        elapsed = time.perf_counter() - started
        shown = predicted_class.inner_text().strip()
        assert shown in CLASS_NAMES, shown
        # The probabilities shown (one decimal each) add up to 100 % within rounding.
        shown_percent = [float(text.replace("\u00a0", " ").rstrip("% ").strip())
                         for text in card.locator(".kh-bars tr td:nth-child(3)").all_inner_texts()]
        assert len(shown_percent) == len(CLASS_NAMES)
        assert abs(sum(shown_percent) - 100.0) <= 0.05 * len(CLASS_NAMES) + 1e-9, shown_percent
        model, runs = served_model
        summary = json.loads((model.parent / "summary.json").read_text(encoding="utf-8"))
        calibrated = bool((summary.get("calibration") or {}).get("applied"))
        note = card.locator(".kh-calibration").inner_text()
        assert ("not calibrated" in note) != calibrated, note
        # The threshold sentence is the stored evaluation's numbers at the default 0.50.
        stored = json.loads((model.parent / "eval_test" / "metrics.json").read_text(encoding="utf-8"))
        expected = threshold_sentence(stored["risk_coverage"], 0.5, "test")
        sentence = page.locator(".kh-threshold-sentence").inner_text().replace("\u00a0", " ")
        assert sentence == (expected[0].upper() + expected[1:]).replace("\u00a0", " "), sentence
        print(f"\nupload -> prediction + Grad-CAM shown: {elapsed:.2f} s (server had the file after {received:.2f} s; "
              f"{image.name}, model {os.environ.get('KERAS_HAM_BROWSER_MODEL') or 'tiny resnet18 64 px'})")

        # Explain another class: the caption follows the choice once the new cam is drawn.
        other_class = next(name for name in CLASS_NAMES if name != shown)
        select = card.locator(".kh-class-select select")
        label = next(option for option in select.locator("option").all_inner_texts() if option.startswith(other_class))
        select.select_option(label=label)
        card.locator(".kh-caption b").filter(has_text=other_class).wait_for(state="visible")  # "Grad-CAM: <class>"
        assert card.locator(".kh-gradcam img").is_visible()

        # Explain at another layer: the caption names it once that map is drawn.
        layers = card.locator(".kh-layer-select select")
        options = layers.locator("option").all_inner_texts()
        assert len(options) == 3 and sum("(default)" in option for option in options) == 1, options
        other_layer = next(option for option in options if "(default)" not in option)
        layers.select_option(label=other_layer)
        # (the caption is redrawn with the overlay, i.e. only once the new map exists)
        card.locator(".kh-caption").filter(has_text=f"at {other_layer.split(' ')[0]}").wait_for(state="visible")

        page.locator(".kh-upload input[type=file]").set_input_files(str(corrupt))
        error = page.locator(".kh-error .kh-error-msg")
        error.wait_for(state="visible")
        assert "corrupt.jpg" in error.inner_text()

        # Over the upload limit (and over Bokeh's 20 MB websocket message limit): refused with
        # a message while the session stays connected.
        huge = tmp_path / "huge.jpg"
        huge.write_bytes(b"\xff\xd8\xff" + os.urandom(21_000_000))
        page.locator(".kh-upload input[type=file]").set_input_files(str(huge))
        page.locator(".kh-error .kh-error-msg").filter(has_text="huge.jpg").wait_for(state="visible")
        assert "upload limit" in page.locator(".kh-error .kh-error-msg").filter(has_text="huge.jpg").inner_text()
        assert page.locator(".kh-card").count() == 1  # the good card stays

        # A second session opened meanwhile sees none of the first one's cards, and its own
        # upload does not appear in the first.
        other = open_page(chromium_browser, url)
        assert other.locator(".kh-card").count() == 0 and other.locator(".kh-error-card").count() == 0
        other.locator(".kh-upload input[type=file]").set_input_files(str(corrupt))
        other.locator(".kh-error .kh-error-msg").first.wait_for(state="visible")
        assert other.locator(".kh-card").count() == 0 and other.locator(".kh-error-card").count() == 1
        assert page.locator(".kh-card").count() == 1 and page.locator(".kh-error-card").count() == 2

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        keep_screenshot(shot)
        page.get_by_text("Training run", exact=True).click()
        page.locator(".bk-Canvas, canvas").first.wait_for(state="visible")
        low, high = stored["confidence_intervals"]["balanced_accuracy"]
        page.locator(".kh-ci").filter(has_text=f"95% CI {low:.3f}–{high:.3f}").wait_for(state="visible")
        page.wait_for_timeout(500)
        run_shot = tmp_path / "dashboard_run.png"
        page.screenshot(path=str(run_shot), full_page=True)
        keep_screenshot(run_shot, "_run")
        assert shot.stat().st_size > 10_000
        # Everything the page used came from the dashboard server: no third party learns of a visit.
        assert page.outside_requests == []
    except Exception:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        page.close()
        if other is not None:
            other.close()
