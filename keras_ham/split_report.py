"""Check written split files before training: class mix, leakage, images on disk.

Unlike `write_split_files`, which needs only metadata, this treats a missing image as an
error: a split that cannot be trained on should fail here, not an hour into training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from keras_ham.metadata import MetadataError, candidate_image_dirs, locate_images, read_metadata
from keras_ham.near_duplicates import DEFAULT_THRESHOLD, cross_split_pairs, find_near_duplicates, write_pairs_csv
from keras_ham.split import SPLIT_NAMES, find_leakage, format_split_table


@dataclass
class SplitReport:
    """Outcome of `inspect_splits`: `problems` empty means the split is usable."""

    splits: dict[str, pd.DataFrame]
    problems: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    near_duplicates: pd.DataFrame | None = None


def read_splits(splits_dir: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Read splits_dir/{train,val,test}.csv; `MetadataError` names a missing or bad file."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise MetadataError(f"{splits_dir}: no such folder; create the split with scripts/split.py --out {splits_dir}.")
    absent = [f"{name}.csv" for name in SPLIT_NAMES if not (splits_dir / f"{name}.csv").is_file()]
    if absent:
        raise MetadataError(
            f"{splits_dir}: missing {', '.join(absent)}; create the split with scripts/split.py --out {splits_dir}."
        )
    return {name: read_metadata(splits_dir / f"{name}.csv") for name in SPLIT_NAMES}


def inspect_splits(
    splits_dir: str | os.PathLike,
    *,
    image_dirs: Sequence[str | os.PathLike] = (),
    near_duplicates: bool = False,
    threshold: int = DEFAULT_THRESHOLD,
    pairs_out: str | os.PathLike | None = None,
    workers: int | None = None,
    log: Callable[[str], None] | None = print,
) -> SplitReport:
    """Print the class table of each split, then check leakage and image files.

    Images are searched in `image_dirs`, the split folder and their HAM10000_images_part_1/2
    subfolders. With `near_duplicates`, images in different splits whose perceptual hashes
    differ in <= `threshold` bits are listed (`report.near_duplicates`); `pairs_out` gets
    every near-duplicate pair of different lesions as a `--keep-together` CSV. They are
    reported, not counted as problems, because phash also pairs some distinct lesions.
    Raises `MetadataError` for unreadable split files, `ImageError` for unreadable images.
    """
    say = log or (lambda message: None)
    splits_dir = Path(splits_dir)
    splits = read_splits(splits_dir)
    report = SplitReport(splits=splits)
    say(f"Splits in {splits_dir}:")
    say(format_split_table(splits))

    report.problems.extend(f"LEAK: {problem}" for problem in find_leakage(splits))

    folders = candidate_image_dirs(splits_dir / "train.csv", image_dirs)
    all_ids = pd.concat([frame["image_id"] for frame in splits.values()], ignore_index=True)
    located = locate_images(all_ids, folders)
    report.missing_images = [image_id for image_id, path in located.items() if path is None]
    if report.missing_images:
        searched = ", ".join(str(f) for f in folders if f.is_dir()) or "no existing folder"
        report.problems.append(
            f"MISSING: {len(report.missing_images)} of {len(located)} image file(s) not found "
            f"(first: {', '.join(report.missing_images[:5])}); searched {searched}. "
            "Pass the image folder with --images DIR."
        )

    if near_duplicates or pairs_out is not None:
        found = {image_id: path for image_id, path in located.items() if path is not None}
        pairs = find_near_duplicates(splits, found, threshold=threshold, workers=workers, log=say)
        report.near_duplicates = leaking = cross_split_pairs(pairs)
        say(f"{len(leaking)} near-duplicate pair(s) across splits (phash distance <= {threshold}):")
        for row in leaking.itertuples(index=False):
            say(f"  {row.image_id_a} ({row.split_a})  {row.image_id_b} ({row.split_b})  distance {row.distance}")
        if len(leaking):
            say(
                "  These may be one lesion under two lesion ids (or lookalikes): check them, then re-split with "
                "scripts/split.py --keep-together <file from --pairs-out>."
            )
        if pairs_out is not None:
            write_pairs_csv(pairs_out, pairs)
            say(
                f"Wrote {len(pairs)} near-duplicate pair(s) of different lesions to {pairs_out} "
                f"({len(leaking)} across splits, the rest within one split, kept so one re-split keeps all together)."
            )

    if report.problems:
        for problem in report.problems:
            say(problem)
    else:
        say("OK: no lesion or image in two splits, all image files found.")
    return report
