"""inspect_splits: class table, leakage and missing-image checks, near-duplicate search."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from keras_ham import near_duplicates
from keras_ham.metadata import IMAGE_PART_DIRS, MetadataError
from keras_ham.near_duplicates import (
    DEFAULT_THRESHOLD,
    cross_split_pairs,
    find_near_duplicates,
    hash_images,
    image_phash,
    near_duplicate_pairs,
)
from keras_ham.split import PAIR_COLUMNS, SPLIT_NAMES, find_leakage, read_pairs_csv, write_split_files
from keras_ham.split_report import inspect_splits, read_splits

LABELS = ("nv", "mel", "bkl", "bcc")


def pattern_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture: distinct seeds give phashes ~32 bits apart."""
    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)


def make_dataset(root: Path, n_lesions: int = 40) -> pd.DataFrame:
    """Metadata + 64x64 PNGs in the Kaggle layout; lesions 0-9 have two images."""
    rows = []
    for lesion in range(n_lesions):
        for _ in range(2 if lesion < 10 else 1):
            image_id = f"ISIC_{len(rows):04d}"
            rows.append({"lesion_id": f"HAM_{lesion:04d}", "image_id": image_id, "dx": LABELS[lesion % 4]})
    frame = pd.DataFrame(rows)
    part = root / IMAGE_PART_DIRS[0]
    part.mkdir(parents=True)
    for index, image_id in enumerate(frame["image_id"]):
        pattern_image(index).save(part / f"{image_id}.png")
    frame.to_csv(root / "HAM10000_metadata.csv", index=False)
    return frame


@pytest.fixture
def split_dataset(tmp_path) -> tuple[Path, Path, pd.DataFrame]:
    """(raw folder, splits folder, metadata) with a clean lesion-grouped split."""
    raw, splits = tmp_path / "raw", tmp_path / "processed"
    frame = make_dataset(raw)
    write_split_files(raw / "HAM10000_metadata.csv", splits, seed=1, log=None)
    return raw, splits, frame


def run_script(repo_root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/inspect_splits.py", *map(str, args)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def move_one_row(splits_dir: Path, source: str, target: str, *, same_lesion: bool) -> str:
    """Copy a row of `source` into `target`: a lesion leak, or (same_lesion=False) the same
    image id under a fresh lesion id. Returns the image id."""
    frames = read_splits(splits_dir)
    row = frames[source].iloc[[0]].copy()
    if not same_lesion:
        row["lesion_id"] = "HAM_fresh"
    pd.concat([frames[target], row]).to_csv(splits_dir / f"{target}.csv", index=False)
    return row["image_id"].iloc[0]


# --- library -----------------------------------------------------------------------------


def test_clean_split_has_no_problems(split_dataset):
    raw, splits_dir, frame = split_dataset
    lines: list[str] = []
    report = inspect_splits(splits_dir, image_dirs=[raw], log=lines.append)
    assert report.problems == [] and report.missing_images == []
    assert sum(len(f) for f in report.splits.values()) == len(frame)
    assert any(line.startswith("OK") for line in lines)
    table = "\n".join(lines)
    assert "train" in table and "%" in table


def test_lesion_in_two_splits_is_a_problem(split_dataset):
    raw, splits_dir, _ = split_dataset
    move_one_row(splits_dir, "train", "test", same_lesion=True)
    report = inspect_splits(splits_dir, image_dirs=[raw], log=None)
    assert any(p.startswith("LEAK") and "lesion" in p and "train and test" in p for p in report.problems)


def test_missing_image_files_are_errors_naming_ids(split_dataset):
    raw, splits_dir, frame = split_dataset
    gone = frame["image_id"].iloc[5]
    (raw / IMAGE_PART_DIRS[0] / f"{gone}.png").unlink()
    report = inspect_splits(splits_dir, image_dirs=[raw], log=None)
    assert report.missing_images == [gone]
    assert any(p.startswith("MISSING: 1 of") and gone in p and "--images" in p for p in report.problems)


def test_images_not_found_without_the_image_folder(split_dataset):
    _, splits_dir, frame = split_dataset
    report = inspect_splits(splits_dir, image_dirs=[], log=None)
    assert len(report.missing_images) == len(frame)


def test_missing_split_file(split_dataset):
    _, splits_dir, _ = split_dataset
    (splits_dir / "val.csv").unlink()
    with pytest.raises(MetadataError, match="val.csv"):
        inspect_splits(splits_dir, log=None)


def test_hashes_survive_reencoding_and_separate_distinct_images(tmp_path):
    original = pattern_image(7)
    original.save(tmp_path / "a.png")
    original.resize((48, 48)).save(tmp_path / "copy.jpg", quality=80)
    pattern_image(8).save(tmp_path / "other.png")
    hashes = hash_images([tmp_path / "a.png", tmp_path / "copy.jpg", tmp_path / "other.png"], workers=2)
    assert hashes.dtype == np.uint64
    assert hashes[0] == image_phash(tmp_path / "a.png")
    i, j, d = near_duplicate_pairs(hashes, DEFAULT_THRESHOLD)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1)]
    assert int(d[0]) <= DEFAULT_THRESHOLD


def test_pairs_match_brute_force_across_blocks():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    hashes[50] = hashes[10] ^ np.uint64(0b101)  # 2 bits apart
    hashes[299] = hashes[0]  # identical
    hashes[120] = hashes[7] ^ np.uint64(0xFF)  # 8 bits apart: above the threshold
    expected = {
        (a, b, bin(int(hashes[a]) ^ int(hashes[b])).count("1"))
        for a in range(300)
        for b in range(a + 1, 300)
        if bin(int(hashes[a]) ^ int(hashes[b])).count("1") <= 4
    }
    assert {(10, 50, 2), (0, 299, 0)} <= expected
    for block_elements in (1, 1000, 10**7):  # one row per block ... everything at once
        i, j, d = near_duplicate_pairs(hashes, 4, block_elements=block_elements)
        assert set(zip(i.tolist(), j.tolist(), d.tolist())) == expected
    assert len(near_duplicate_pairs(hashes[:0], 4)[0]) == 0


@pytest.mark.parametrize("threshold", [-1, 65, 2.5, True])
def test_threshold_must_be_a_bit_count(threshold):
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pairs(np.zeros(3, dtype=np.uint64), threshold)


def test_duplicate_under_another_lesion_in_another_split_is_found(split_dataset):
    raw, splits_dir, _ = split_dataset
    splits = read_splits(splits_dir)
    source_id = splits["train"]["image_id"].iloc[0]
    # The same photo, re-encoded smaller, filed under a new image id and a new lesion in test.
    copy_id = "ISIC_9999"
    part = raw / IMAGE_PART_DIRS[0]
    Image.open(part / f"{source_id}.png").resize((56, 56)).save(part / f"{copy_id}.jpg", quality=85)
    test = pd.concat([splits["test"], pd.DataFrame([{"lesion_id": "HAM_9999", "image_id": copy_id, "dx": "nv"}])])
    test.to_csv(splits_dir / "test.csv", index=False)

    pairs_out = splits_dir / "pairs.csv"
    report = inspect_splits(splits_dir, image_dirs=[raw], near_duplicates=True, pairs_out=pairs_out, log=None)
    assert report.problems == []  # near-duplicates are reported, not failures
    leaking = report.near_duplicates
    assert list(leaking.columns) == list(PAIR_COLUMNS)
    assert len(leaking) == 1  # distinct pictures are never paired
    row = leaking.iloc[0]
    assert {row.image_id_a, row.image_id_b} == {source_id, copy_id}
    assert {row.split_a, row.split_b} == {"train", "test"}
    assert row.distance <= DEFAULT_THRESHOLD

    # The CSV is exactly what split.py --keep-together reads; re-splitting keeps the pair together.
    assert pd.read_csv(pairs_out).columns.tolist() == list(PAIR_COLUMNS)
    assert read_pairs_csv(pairs_out) == [(row.image_id_a, row.image_id_b)]
    meta = splits_dir / "all.csv"
    pd.concat(list(read_splits(splits_dir).values())).to_csv(meta, index=False)
    again = splits_dir / "again"
    resplit = write_split_files(meta, again, seed=1, keep_together_csv=pairs_out, log=None)
    split_of = {i: n for n, p in resplit.items() for i in pd.read_csv(p)["image_id"]}
    assert split_of[source_id] == split_of[copy_id]
    assert inspect_splits(again, image_dirs=[raw], near_duplicates=True, log=None).near_duplicates.empty


def test_pairs_within_one_split_are_kept_for_keep_together_but_not_reported(tmp_path):
    for name in ("a", "b", "c"):
        pattern_image(1).save(tmp_path / f"{name}.png")
    splits = {
        "train": pd.DataFrame({"image_id": ["a", "b"], "lesion_id": ["L1", "L2"]}),
        "test": pd.DataFrame({"image_id": ["c"], "lesion_id": ["L3"]}),
    }
    paths = {name: tmp_path / f"{name}.png" for name in "abc"}
    def ids(pairs: pd.DataFrame) -> list[tuple[str, str]]:
        return list(zip(pairs["image_id_a"], pairs["image_id_b"]))

    pairs = find_near_duplicates(splits, paths, threshold=0)
    assert ids(pairs) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert ids(cross_split_pairs(pairs)) == [("a", "c"), ("b", "c")]
    # images of one lesion in one split are normal and left out
    splits["train"]["lesion_id"] = ["L1", "L1"]
    assert ids(find_near_duplicates(splits, paths, threshold=0)) == [("a", "c"), ("b", "c")]


def test_hashing_reports_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(near_duplicates, "PROGRESS_MIN_IMAGES", 3)
    paths = []
    for index in range(20):
        pattern_image(index, size=32).save(path := tmp_path / f"{index}.png")
        paths.append(path)
    lines: list[str] = []
    hashes = hash_images(paths, workers=2, log=lines.append)
    assert len(lines) >= 10 and lines[-1].strip().startswith("hashed 20/20")
    assert len(set(hashes.tolist())) == 20
    assert hashes[3] == image_phash(paths[3])  # results stay in input order


# --- script ------------------------------------------------------------------------------


def test_script_exit_codes(repo_root, split_dataset):
    raw, splits_dir, frame = split_dataset
    clean = run_script(repo_root, "--splits", splits_dir, "--images", raw)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "OK" in clean.stdout and "nv" in clean.stdout

    # An image listed twice (same image id in two splits, under a new lesion id).
    image_id = move_one_row(splits_dir, "val", "train", same_lesion=False)
    assert find_leakage(read_splits(splits_dir))  # an image leak, not a lesion leak
    leak = run_script(repo_root, "--splits", splits_dir, "--images", raw)
    assert leak.returncode == 1
    assert "LEAK" in leak.stdout and image_id in leak.stdout
    assert "error:" in leak.stderr


def test_script_missing_images_and_bad_input(repo_root, split_dataset, tmp_path):
    raw, splits_dir, frame = split_dataset
    (raw / IMAGE_PART_DIRS[0] / f"{frame['image_id'].iloc[0]}.png").unlink()
    missing = run_script(repo_root, "--splits", splits_dir, "--images", raw)
    assert missing.returncode == 1
    assert "MISSING: 1 of" in missing.stdout and frame["image_id"].iloc[0] in missing.stdout

    absent = run_script(repo_root, "--splits", tmp_path / "nowhere")
    assert absent.returncode == 2
    assert absent.stderr.startswith("error:") and "Traceback" not in absent.stderr

    bad_threshold = run_script(repo_root, "--splits", splits_dir, "--threshold", "99")
    assert bad_threshold.returncode == 2 and "--threshold" in bad_threshold.stderr


def test_script_writes_pairs_csv(repo_root, split_dataset):
    raw, splits_dir, _ = split_dataset
    pairs_out = splits_dir / "pairs.csv"
    result = run_script(repo_root, "--splits", splits_dir, "--images", raw, "--pairs-out", pairs_out, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "0 near-duplicate pair(s) across splits" in result.stdout
    assert pairs_out.read_text(encoding="utf-8") == ",".join(PAIR_COLUMNS) + "\n"
    assert set(SPLIT_NAMES) <= {p.stem for p in splits_dir.iterdir()}
