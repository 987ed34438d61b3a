"""Synthetic demo data: Kaggle layout, class floor, repeated lesions, determinism, lesion boxes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from keras_ham.demo_data import (
    LESIONS_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    DemoDataError,
    allocate_lesions,
    make_demo_data,
)
from keras_ham.labels import CLASS_NAMES
from keras_ham.metadata import IMAGE_PART_DIRS, METADATA_COLUMNS, read_metadata, require_image_paths

TINY = dict(seed=7, num_lesions=14, min_lesions_per_class=2, image_size=(96, 72), log=None)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo") / "demo", **TINY)


@pytest.fixture(scope="module")
def tiny_frame(tiny_set) -> pd.DataFrame:
    return read_metadata(tiny_set / METADATA_FILE)


def test_kaggle_layout_and_columns(tiny_set, tiny_frame):
    assert tuple(pd.read_csv(tiny_set / METADATA_FILE, nrows=0).columns) == METADATA_COLUMNS
    assert all(re.fullmatch(r"HAM_\d{7}", v) for v in tiny_frame["lesion_id"])
    assert all(re.fullmatch(r"ISIC_\d{7}", v) for v in tiny_frame["image_id"])
    paths = require_image_paths(tiny_frame, tiny_set / METADATA_FILE)
    assert {p.parent.name for p in paths} == set(IMAGE_PART_DIRS)  # both parts used
    for path in paths:
        assert path.suffix == ".jpg" and path.stem in set(tiny_frame["image_id"])
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (96, 72) and image.mode == "RGB"
    # no image outside the metadata
    on_disk = {p.stem for part in IMAGE_PART_DIRS for p in (tiny_set / part).iterdir()}
    assert on_disk == set(tiny_frame["image_id"])


def test_part_folders_split_ids_like_kaggle(tiny_set, tiny_frame):
    numbers = {part: sorted(int(p.stem[5:]) for p in (tiny_set / part).glob("*.jpg")) for part in IMAGE_PART_DIRS}
    assert max(numbers[IMAGE_PART_DIRS[0]]) < min(numbers[IMAGE_PART_DIRS[1]])


def test_metadata_values_are_plausible(tiny_frame):
    assert set(tiny_frame["dx_type"]) <= {"histo", "follow_up", "consensus", "confocal"}
    assert set(tiny_frame["sex"]) <= {"male", "female", "unknown"}
    assert tiny_frame["localization"].str.len().min() > 0
    ages = tiny_frame["age"].astype(float)
    assert ages.between(0, 90).all() and (ages % 5 == 0).all()
    assert set(tiny_frame.loc[tiny_frame["dx"] == "mel", "dx_type"]) <= {"histo"}


def test_every_class_reaches_the_floor(tiny_frame):
    lesions = tiny_frame.drop_duplicates("lesion_id")["dx"].value_counts()
    assert set(lesions.index) == set(CLASS_NAMES)
    assert lesions.min() >= TINY["min_lesions_per_class"]
    assert lesions.sum() == TINY["num_lesions"]


def test_allocation_keeps_ham10000_proportions_above_the_floor():
    counts = allocate_lesions(520, 25)
    assert sum(counts.values()) == 520 and min(counts.values()) >= 25
    assert counts["nv"] == max(counts.values()) and counts["nv"] > 5 * counts["mel"]
    large = allocate_lesions(7470, 1)  # no floor binds: HAM10000's own shares
    assert large["nv"] / 7470 == pytest.approx(6705 / 10015, abs=0.001)
    assert large["df"] / 7470 == pytest.approx(115 / 10015, abs=0.001)
    with pytest.raises(DemoDataError, match="num_lesions must be >= 7 x 25 = 175"):
        allocate_lesions(100, 25)


def test_some_lesions_have_several_images_with_shared_metadata(tiny_frame):
    per_lesion = tiny_frame.groupby("lesion_id")
    sizes = per_lesion.size()
    assert (sizes >= 2).sum() == round(0.26 * TINY["num_lesions"])
    assert (sizes == 1).any()
    for column in ("dx", "dx_type", "age", "sex", "localization"):
        assert (per_lesion[column].nunique() == 1).all(), column


def test_rephotographed_lesion_is_similar_but_not_identical(tiny_set, tiny_frame):
    boxes = pd.read_csv(tiny_set / LESIONS_FILE).set_index("image_id")
    lesion = tiny_frame.groupby("lesion_id").filter(lambda rows: len(rows) >= 2)["lesion_id"].iloc[0]
    first, second = tiny_frame.loc[tiny_frame["lesion_id"] == lesion, "image_id"].iloc[:2]
    paths = {p.stem: p for p in require_image_paths(tiny_frame, tiny_set / METADATA_FILE)}
    assert paths[first].read_bytes() != paths[second].read_bytes()
    a, b = boxes.loc[first], boxes.loc[second]
    assert 0.6 < (b.rx * b.ry) / (a.rx * a.ry) < 1.6  # same lesion, small rescale/rotation
    assert abs(a.cx - b.cx) < 30 and abs(a.cy - b.cy) < 30  # small shift (96x72 image)


def test_lesion_boxes_lie_well_inside_the_image(tiny_set, tiny_frame):
    boxes = pd.read_csv(tiny_set / LESIONS_FILE)
    assert tuple(boxes.columns) == ("image_id", "cx", "cy", "rx", "ry")
    assert list(boxes["image_id"]) == list(tiny_frame["image_id"])
    width, height = TINY["image_size"]
    margin = 0.04 * min(width, height)
    assert (boxes["rx"] > 0.05 * height).all() and (boxes["ry"] > 0.05 * height).all()
    assert (boxes["cx"] - boxes["rx"] >= margin).all() and (boxes["cx"] + boxes["rx"] <= width - margin).all()
    assert (boxes["cy"] - boxes["ry"] >= margin).all() and (boxes["cy"] + boxes["ry"] <= height - margin).all()
    assert "cx" not in pd.read_csv(tiny_set / METADATA_FILE).columns


def test_same_seed_gives_identical_files_and_other_seed_differs(tiny_set, tmp_path):
    again = make_demo_data(tmp_path / "again", **TINY)
    assert _files(again) == _files(tiny_set)
    other = make_demo_data(tmp_path / "other", **{**TINY, "seed": 8})
    assert _files(other)[METADATA_FILE] != _files(tiny_set)[METADATA_FILE]


def test_complete_set_is_skipped_and_a_missing_image_is_rebuilt(tmp_path):
    out = make_demo_data(tmp_path / "demo", **TINY)
    before = _files(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    messages: list[str] = []
    make_demo_data(out, **{**TINY, "log": messages.append})
    assert "already complete" in messages[0]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == mtimes
    victim = next(out.rglob("*.jpg"))
    victim.unlink()
    make_demo_data(out, **TINY)
    assert _files(out) == before


def test_other_parameters_need_force_and_force_leaves_no_stale_image(tmp_path):
    out = make_demo_data(tmp_path / "demo", **TINY)
    bigger = {**TINY, "num_lesions": 21}
    with pytest.raises(DemoDataError, match="other parameters"):
        make_demo_data(out, **bigger)
    make_demo_data(out, **bigger, force=True)
    frame = read_metadata(out / METADATA_FILE)
    assert frame["lesion_id"].nunique() == 21
    assert json.loads((out / MANIFEST_FILE).read_text())["num_images"] == len(frame)
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    expected = sorted(str(p.relative_to(out)) for p in require_image_paths(frame, out / METADATA_FILE))
    assert on_disk == expected  # old ids gone, none left in the other part folder
    assert _files(out) == _files(make_demo_data(tmp_path / "fresh", **bigger))


def test_refuses_a_folder_with_real_metadata(tmp_path):
    (tmp_path / METADATA_FILE).write_text("lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\n")
    with pytest.raises(DemoDataError, match="not a demo set"):
        make_demo_data(tmp_path, **TINY, force=True)
    assert (tmp_path / METADATA_FILE).read_text() == "lesion_id,image_id,dx\nHAM_1,ISIC_1,nv\n"
    assert not any((tmp_path / part).exists() for part in IMAGE_PART_DIRS)


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(DemoDataError, match="num_lesions"):
        make_demo_data(tmp_path / "a", **{**TINY, "num_lesions": 13})
    with pytest.raises(DemoDataError, match="image_size"):
        make_demo_data(tmp_path / "b", **{**TINY, "image_size": (20, 72)})
    with pytest.raises(DemoDataError, match="min_lesions_per_class"):
        make_demo_data(tmp_path / "c", **{**TINY, "min_lesions_per_class": 0})


def test_classes_differ_in_colour(tiny_set, tiny_frame):
    """The mean colour inside the lesion separates e.g. dark melanoma from pale bcc."""
    boxes = pd.read_csv(tiny_set / LESIONS_FILE).set_index("image_id")
    paths = dict(zip(tiny_frame["image_id"], require_image_paths(tiny_frame, tiny_set / METADATA_FILE)))
    means: dict[str, list[float]] = {}
    for image_id, dx in zip(tiny_frame["image_id"], tiny_frame["dx"]):
        pixels = np.asarray(Image.open(paths[image_id]), dtype=float)
        box = boxes.loc[image_id]
        ys, xs = np.mgrid[: pixels.shape[0], : pixels.shape[1]]
        core = ((xs - box.cx) / box.rx) ** 2 + ((ys - box.cy) / box.ry) ** 2 < 0.3
        means.setdefault(dx, []).append(pixels[core].mean())
    assert max(means["mel"]) + 40 < min(means["bcc"])
    assert max(means["nv"]) + 20 < min(means["bkl"])


def _load_script(repo_root: Path):
    spec = importlib.util.spec_from_file_location("make_demo_data_script", repo_root / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_prints_counts_and_exits_2_on_bad_input(repo_root, tmp_path, capsys):
    script = _load_script(repo_root)
    out = tmp_path / "demo"
    assert script.main(["--out", str(out), "--num-lesions", "14", "--min-lesions-per-class", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: " in printed and "lesions have several images" in printed
    frame = read_metadata(out / METADATA_FILE)
    for name in CLASS_NAMES:
        count = int((frame["dx"] == name).sum())
        assert re.search(rf"^\s+{name}\s+{count}\s+\d+$", printed, re.MULTILINE), name
    assert script.main(["--out", str(tmp_path / "bad"), "--num-lesions", "5"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "num_lesions" in error and "Traceback" not in error
