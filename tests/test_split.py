"""Lesion-grouped split: no lesion in two splits, fractions, stratification, determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keras_ham.labels import CLASS_NAMES
from keras_ham.metadata import IMAGE_PART_DIRS, MetadataError, read_metadata
from keras_ham.split import (
    SPLIT_NAMES,
    SplitError,
    find_leakage,
    fold_plan,
    format_split_table,
    lesion_grouped_split,
    lesion_groups,
    read_pairs_csv,
    write_split_files,
)

#: Roughly HAM10000's class mix (akiec..vasc).
CLASS_SHARES = (0.033, 0.051, 0.11, 0.012, 0.11, 0.67, 0.014)


def make_metadata(n_lesions: int = 400, seed: int = 0, multi_image_share: float = 0.3) -> pd.DataFrame:
    """Synthetic HAM-like metadata: 1-4 images per lesion, one class per lesion."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASS_NAMES, size=n_lesions, p=np.array(CLASS_SHARES) / sum(CLASS_SHARES))
    rows = []
    for lesion, label in enumerate(labels):
        count = 1 + (int(rng.integers(1, 4)) if rng.random() < multi_image_share else 0)
        for _ in range(count):
            rows.append(
                {
                    "lesion_id": f"HAM_{lesion:07d}",
                    "image_id": f"ISIC_{len(rows):07d}",
                    "dx": str(label),
                    "dx_type": "histo",
                    "age": f"{float(rng.integers(20, 90))}",
                    "sex": "male",
                    "localization": "back",
                }
            )
    order = rng.permutation(len(rows))  # lesions' images are not adjacent in the real file
    return pd.DataFrame(rows).iloc[order].reset_index(drop=True)


def assert_partition(frame: pd.DataFrame, splits: dict[str, pd.DataFrame]) -> None:
    assert list(splits) == list(SPLIT_NAMES)
    ids = pd.concat([s["image_id"] for s in splits.values()])
    assert sorted(ids) == sorted(frame["image_id"])  # every image exactly once
    assert find_leakage(splits) == []
    lesion_sets = [set(s["lesion_id"]) for s in splits.values()]
    assert not (lesion_sets[0] & lesion_sets[1] or lesion_sets[0] & lesion_sets[2] or lesion_sets[1] & lesion_sets[2])


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_no_lesion_in_two_splits(seed):
    frame = make_metadata(seed=seed)
    assert_partition(frame, lesion_grouped_split(frame, seed=seed))


def test_fractions_are_roughly_right():
    frame = make_metadata(n_lesions=800)
    splits = lesion_grouped_split(frame, test_fraction=0.2, val_fraction=0.16)
    shares = {name: len(s) / len(frame) for name, s in splits.items()}
    assert shares["test"] == pytest.approx(0.20, abs=0.025)
    assert shares["val"] == pytest.approx(0.16, abs=0.025)
    assert shares["train"] == pytest.approx(0.64, abs=0.03)


def test_other_fractions_are_matched_too():
    frame = make_metadata(n_lesions=800)
    splits = lesion_grouped_split(frame, test_fraction=0.3, val_fraction=0.1)
    assert len(splits["test"]) / len(frame) == pytest.approx(0.3, abs=0.03)
    assert len(splits["val"]) / len(frame) == pytest.approx(0.1, abs=0.03)


def test_each_class_is_in_each_split_when_it_has_enough_lesions():
    frame = make_metadata(n_lesions=800)
    lesions_per_class = frame.drop_duplicates("lesion_id")["dx"].value_counts()
    splits = lesion_grouped_split(frame)
    for label, lesion_count in lesions_per_class.items():
        if lesion_count >= 10:
            for name, split in splits.items():
                assert (split["dx"] == label).any(), f"{label} ({lesion_count} lesions) missing from {name}"


def test_class_mix_of_each_split_follows_the_whole():
    frame = make_metadata(n_lesions=800)
    whole = frame["dx"].value_counts(normalize=True)
    for split in lesion_grouped_split(frame).values():
        mix = split["dx"].value_counts(normalize=True).reindex(whole.index, fill_value=0)
        assert np.abs(mix - whole).max() < 0.04


def test_keeps_columns_index_and_row_order_and_leaves_input_alone():
    frame = make_metadata(n_lesions=100)
    before = frame.copy()
    splits = lesion_grouped_split(frame)
    pd.testing.assert_frame_equal(frame, before)
    for split in splits.values():
        assert list(split.columns) == list(frame.columns)
        assert split.index.is_monotonic_increasing  # original order
        pd.testing.assert_frame_equal(split, frame.loc[split.index])


def test_same_seed_same_frames_other_seed_other_frames():
    frame = make_metadata()
    first, again = lesion_grouped_split(frame, seed=3), lesion_grouped_split(frame, seed=3)
    for name in SPLIT_NAMES:
        pd.testing.assert_frame_equal(first[name], again[name])
    other = lesion_grouped_split(frame, seed=4)
    assert set(other["test"]["image_id"]) != set(first["test"]["image_id"])


def pairs_across_splits(splits: dict[str, pd.DataFrame], count: int) -> list[tuple[str, str]]:
    """`count` (train image, test image) pairs of different lesions."""
    train, test = splits["train"]["image_id"].tolist(), splits["test"]["image_id"].tolist()
    return list(zip(train[:count], test[:count]))


def test_keep_together_merges_lesion_groups():
    frame = make_metadata()
    plain = lesion_grouped_split(frame, seed=5)
    pairs = pairs_across_splits(plain, 6)
    merged = lesion_grouped_split(frame, seed=5, keep_together=pairs)
    split_of = {image_id: name for name, s in merged.items() for image_id in s["image_id"]}
    lesion_of = dict(zip(frame["image_id"], frame["lesion_id"]))
    for a, b in pairs:
        assert split_of[a] == split_of[b]
        # ... and so do all other images of both lesions
        for image_id in frame["image_id"][frame["lesion_id"].isin([lesion_of[a], lesion_of[b]])]:
            assert split_of[image_id] == split_of[a]
    assert_partition(frame, merged)


def test_lesion_groups_union_is_transitive_and_order_free():
    frame = pd.DataFrame(
        {"lesion_id": ["L3", "L1", "L2", "L4"], "image_id": ["a", "b", "c", "d"], "dx": ["nv"] * 4}
    )
    groups = lesion_groups(frame, [("a", "c"), ("c", "b")])
    assert list(groups) == ["L1", "L1", "L1", "L4"]
    assert list(lesion_groups(frame, [("b", "c"), ("a", "b")])) == list(groups)
    assert list(lesion_groups(frame)) == ["L3", "L1", "L2", "L4"]


def test_keep_together_with_unknown_image_ids_is_an_error():
    frame = make_metadata(n_lesions=50)
    with pytest.raises(SplitError, match="ISIC_nope"):
        lesion_grouped_split(frame, keep_together=[("ISIC_0000000", "ISIC_nope")])


def test_too_few_lesions():
    frame = pd.DataFrame({"lesion_id": ["L1", "L1", "L2", "L3"], "image_id": list("abcd"), "dx": ["nv"] * 4})
    with pytest.raises(SplitError, match="Too few lesions"):
        lesion_grouped_split(frame)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 0.5, "val_fraction": 0.5}, "leave images for training"),
    ],
)
def test_bad_fractions(kwargs, match):
    with pytest.raises(SplitError, match=match):
        lesion_grouped_split(make_metadata(n_lesions=50), **kwargs)


def test_bad_frames():
    frame = make_metadata(n_lesions=50)
    with pytest.raises(SplitError, match="lesion_id"):
        lesion_grouped_split(frame.drop(columns="lesion_id"))
    with pytest.raises(SplitError, match="no rows"):
        lesion_grouped_split(frame.iloc[:0])
    with pytest.raises(SplitError, match="Duplicate image_id"):
        lesion_grouped_split(pd.concat([frame, frame.iloc[:1]]))
    assert issubclass(SplitError, ValueError)


@pytest.mark.parametrize(
    "fraction, plan", [(0.2, (5, 1)), (0.25, (4, 1)), (0.5, (2, 1)), (0.3, (10, 3)), (0.05, (20, 1)), (0.9, (10, 9))]
)
def test_fold_plan(fraction, plan):
    assert fold_plan(fraction) == plan


def test_find_leakage_names_lesions_and_images():
    train = pd.DataFrame({"lesion_id": ["L1", "L2"], "image_id": ["a", "b"], "dx": ["nv", "nv"]})
    val = pd.DataFrame({"lesion_id": ["L3"], "image_id": ["c"], "dx": ["nv"]})
    test = pd.DataFrame({"lesion_id": ["L2", "L4"], "image_id": ["d", "a"], "dx": ["nv", "mel"]})
    problems = find_leakage({"train": train, "val": val, "test": test})
    assert len(problems) == 2
    assert "lesion" in problems[0] and "L2" in problems[0] and "train and test" in problems[0]
    assert "image" in problems[1] and "a" in problems[1]
    assert find_leakage({"train": train, "val": val}) == []


def test_summary_table_counts():
    frame = make_metadata(n_lesions=100)
    splits = lesion_grouped_split(frame)
    table = format_split_table(splits)
    header, *rows = table.splitlines()
    assert header.split() == ["class", *SPLIT_NAMES, "all"]
    images = next(r for r in rows if r.startswith("images")).split()
    assert int(images[1]) == len(splits["train"]) and int(images[-2]) == len(frame)
    nv = next(r for r in rows if r.startswith("nv ")).split()
    assert int(nv[1]) == int((splits["train"]["dx"] == "nv").sum())


# --- files -------------------------------------------------------------------------------


def write_dataset(folder: Path, frame: pd.DataFrame, with_images: int | None = None) -> Path:
    """metadata CSV + empty placeholder image files for the first `with_images` rows
    (splitting only checks that files exist)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "HAM10000_metadata.csv"
    frame.to_csv(meta, index=False, lineterminator="\n")
    part = folder / IMAGE_PART_DIRS[0]
    part.mkdir(exist_ok=True)
    for image_id in frame["image_id"][: len(frame) if with_images is None else with_images]:
        (part / f"{image_id}.jpg").write_bytes(b"\xff\xd8")
    return meta


def test_written_files_are_byte_identical_for_the_same_seed(tmp_path):
    meta = write_dataset(tmp_path / "raw", make_metadata())
    first = write_split_files(meta, tmp_path / "a", seed=7, log=None)
    second = write_split_files(meta, tmp_path / "b", seed=7, log=None)
    other = write_split_files(meta, tmp_path / "c", seed=8, log=None)
    assert set(first) == set(SPLIT_NAMES)
    for name in SPLIT_NAMES:
        assert first[name] == tmp_path / "a" / f"{name}.csv"
        assert first[name].read_bytes() == second[name].read_bytes()
    assert first["test"].read_bytes() != other["test"].read_bytes()
    written = {name: read_metadata(path) for name, path in first.items()}
    assert list(written["train"].columns) == list(read_metadata(meta).columns)
    assert find_leakage(written) == []
    assert sum(len(f) for f in written.values()) == len(read_metadata(meta))
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_missing_images_warn_but_the_split_is_written(tmp_path):
    frame = make_metadata(n_lesions=100)
    meta = write_dataset(tmp_path / "raw", frame, with_images=len(frame) - 3)
    lines: list[str] = []
    paths = write_split_files(meta, tmp_path / "out", log=lines.append)
    warning = next(line for line in lines if line.startswith("WARNING"))
    assert "3 of" in warning
    for image_id in frame["image_id"][-3:]:
        assert image_id in warning
    assert sum(len(read_metadata(p)) for p in paths.values()) == len(frame)
    assert any("train" in line and "test" in line for line in lines)  # the summary table


def test_drop_missing_leaves_out_rows_without_images(tmp_path):
    frame = make_metadata(n_lesions=100)
    meta = write_dataset(tmp_path / "raw", frame, with_images=len(frame) - 3)
    lines: list[str] = []
    paths = write_split_files(meta, tmp_path / "out", drop_missing=True, log=lines.append)
    assert any(line.startswith("Dropped 3 of") for line in lines)
    kept = pd.concat([read_metadata(p) for p in paths.values()])
    assert len(kept) == len(frame) - 3
    assert not set(frame["image_id"][-3:]) & set(kept["image_id"])


def test_drop_missing_with_no_images_at_all(tmp_path):
    meta = write_dataset(tmp_path / "raw", make_metadata(n_lesions=50), with_images=0)
    with pytest.raises(SplitError, match="none of the .* images was found"):
        write_split_files(meta, tmp_path / "out", drop_missing=True, log=None)
    assert not (tmp_path / "out").exists()


def test_images_found_in_extra_folders(tmp_path):
    frame = make_metadata(n_lesions=30)
    meta = write_dataset(tmp_path / "meta_only", frame, with_images=0)
    write_dataset(tmp_path / "pictures", frame)  # images (and a copy of the CSV) elsewhere
    lines: list[str] = []
    write_split_files(meta, tmp_path / "out", image_dirs=[tmp_path / "pictures"], log=lines.append)
    assert not any(line.startswith("WARNING") and "not found" in line for line in lines)


def test_keep_together_csv(tmp_path):
    frame = make_metadata()
    meta = write_dataset(tmp_path / "raw", frame)
    plain = lesion_grouped_split(read_metadata(meta), seed=42)
    pairs = pairs_across_splits(plain, 4)
    pairs_csv = tmp_path / "pairs.csv"
    pd.DataFrame(
        [(a, b, "train", "test", 2) for a, b in pairs] + [("ISIC_gone", pairs[0][0], "val", "train", 0)],
        columns=["image_id_a", "image_id_b", "split_a", "split_b", "distance"],
    ).to_csv(pairs_csv, index=False)
    lines: list[str] = []
    paths = write_split_files(meta, tmp_path / "out", keep_together_csv=pairs_csv, log=lines.append)
    assert any("Keeping 4 near-duplicate pair(s)" in line and "1 pair(s)" in line for line in lines)
    split_of = {i: name for name, p in paths.items() for i in read_metadata(p)["image_id"]}
    assert all(split_of[a] == split_of[b] for a, b in pairs)


def test_read_pairs_csv_errors(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("image_id_a,image_id_b\n", encoding="utf-8")
    assert read_pairs_csv(path) == []
    path.write_text("a,b\nx,y\n", encoding="utf-8")
    with pytest.raises(SplitError, match="image_id_a, image_id_b"):
        read_pairs_csv(path)
    path.write_text("image_id_a,image_id_b\nx,y\nz,\n", encoding="utf-8")
    with pytest.raises(SplitError, match="line\\(s\\) 3"):
        read_pairs_csv(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(SplitError, match="empty"):
        read_pairs_csv(path)
    with pytest.raises(SplitError, match="not found"):
        read_pairs_csv(tmp_path / "absent.csv")


def test_bad_metadata_raises_metadata_error(tmp_path):
    meta = tmp_path / "meta.csv"
    meta.write_text("lesion_id,image_id,dx\nL1,a,cancer\n", encoding="utf-8")
    with pytest.raises(MetadataError, match="line 2"):
        write_split_files(meta, tmp_path / "out", log=None)


# --- real group structure ----------------------------------------------------------------


def test_real_ham10000_group_structure(real_data_dir):
    frame = read_metadata(real_data_dir / "HAM10000_metadata_full.csv")
    lesion_sizes = frame["lesion_id"].value_counts()
    assert (len(frame), len(lesion_sizes), int((lesion_sizes > 1).sum())) == (10015, 7470, 1956)
    splits = lesion_grouped_split(frame, seed=42)
    assert_partition(frame, splits)
    for name, expected in (("train", 0.64), ("val", 0.16), ("test", 0.20)):
        assert len(splits[name]) / len(frame) == pytest.approx(expected, abs=0.02)
    whole = frame["dx"].value_counts(normalize=True)
    for name, split in splits.items():
        mix = split["dx"].value_counts(normalize=True).reindex(whole.index, fill_value=0)
        assert np.abs(mix - whole).max() < 0.01, f"{name}: {mix.round(3).to_dict()}"


# --- script ------------------------------------------------------------------------------


def run_script(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/split.py", *map(str, args)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_script_warns_about_missing_images_and_writes(repo_root, tmp_path):
    frame = make_metadata(n_lesions=60)
    meta = write_dataset(tmp_path / "raw", frame, with_images=len(frame) - 2)
    result = run_script(repo_root, "--meta", meta, "--out", tmp_path / "out", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "WARNING: 2 of" in result.stdout
    assert all((tmp_path / "out" / f"{name}.csv").is_file() for name in SPLIT_NAMES)

    dropped = run_script(repo_root, "--meta", meta, "--out", tmp_path / "dropped", "--drop-missing")
    assert dropped.returncode == 0, dropped.stderr
    assert "Dropped 2 of" in dropped.stdout
    total = sum(len(read_metadata(tmp_path / "dropped" / f"{n}.csv")) for n in SPLIT_NAMES)
    assert total == len(frame) - 2


def test_script_reports_bad_input_without_traceback(repo_root, tmp_path):
    missing = run_script(repo_root, "--meta", tmp_path / "absent.csv", "--out", tmp_path / "out")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error:") and "absent.csv" in missing.stderr
    assert "Traceback" not in missing.stderr

    meta = write_dataset(tmp_path / "raw", make_metadata(n_lesions=30))
    bad_fraction = run_script(repo_root, "--meta", meta, "--out", tmp_path / "out", "--test-fraction", "0.97")
    assert bad_fraction.returncode == 2
    assert "test_fraction" in bad_fraction.stderr and "0.97" in bad_fraction.stderr
    assert "Traceback" not in bad_fraction.stderr
    assert not (tmp_path / "out").exists()
