"""Lesion-grouped, class-stratified train/val/test split of HAM10000 metadata.

HAM10000 holds 10,015 images of 7,470 lesions; images of one lesion are near copies, so
a split by image puts the same lesion in training and test and inflates every score.
Here all images of a lesion (and of lesions merged as near-duplicates) land in exactly
one split, and each split keeps roughly the class mix of the whole.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from keras_ham.errors import KerasHamError
from keras_ham.io_utils import write_csv_atomic
from keras_ham.labels import CLASS_NAMES
from keras_ham.metadata import (
    SPLIT_COLUMNS,
    candidate_image_dirs,
    locate_images,
    read_metadata,
)

SPLIT_NAMES = ("train", "val", "test")
#: Columns of a near-duplicate pairs CSV (written by `inspect_splits --pairs-out`,
#: read by `split.py --keep-together`).
PAIR_COLUMNS = ("image_id_a", "image_id_b", "split_a", "split_b", "distance")
#: Most folds tried when matching a fraction; StratifiedGroupKFold's cost grows with it.
MAX_FOLDS = 10


class SplitError(KerasHamError, ValueError):
    """The metadata cannot be split as asked; the message says why and what to change."""


def fold_plan(fraction: float, max_folds: int = MAX_FOLDS) -> tuple[int, int]:
    """`(n_splits, folds_taken)` with `folds_taken / n_splits` closest to `fraction`.

    0.2 -> (5, 1), 0.25 -> (4, 1), 0.3 -> (10, 3), 0.6 -> (5, 3); ties go to fewer folds.
    Small shares get more folds than `max_folds` so that 0.05 -> (20, 1), not 0.1.
    """
    if not 0.0 < fraction < 1.0:
        raise SplitError(f"A split fraction must be in (0, 1), received {fraction!r}.")
    limit = max(max_folds, round(1.0 / min(fraction, 1.0 - fraction)))
    best = (2, 1)
    for n_splits in range(2, limit + 1):
        for taken in range(1, n_splits):
            if abs(taken / n_splits - fraction) < abs(best[1] / best[0] - fraction) - 1e-12:
                best = (n_splits, taken)
    return best


def lesion_groups(frame: pd.DataFrame, keep_together: Iterable[tuple[str, str]] | None = None) -> pd.Series:
    """Group label of each row: its lesion id, or, where `keep_together` pairs of image
    ids link lesions, the smallest lesion id of the linked set (union-find)."""
    lesion_of_image = dict(zip(frame["image_id"], frame["lesion_id"]))
    pairs = [(str(a), str(b)) for a, b in (keep_together or ())]
    unknown = sorted({i for pair in pairs for i in pair if i not in lesion_of_image})
    if unknown:
        raise SplitError(
            f"keep_together names {len(unknown)} image id(s) not in the metadata "
            f"(first: {', '.join(unknown[:5])})."
        )
    parent: dict[str, str] = {}

    def root(lesion: str) -> str:
        parent.setdefault(lesion, lesion)
        while parent[lesion] != lesion:
            parent[lesion] = parent[parent[lesion]]
            lesion = parent[lesion]
        return lesion

    for image_a, image_b in pairs:
        root_a, root_b = root(lesion_of_image[image_a]), root(lesion_of_image[image_b])
        if root_a != root_b:
            # The smaller id becomes the root, so the labels do not depend on pair order.
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return frame["lesion_id"].map(lambda lesion: root(lesion) if lesion in parent else lesion)


def _check_split_frame(frame: pd.DataFrame) -> None:
    missing = [column for column in SPLIT_COLUMNS if column not in frame.columns]
    if missing:
        raise SplitError(f"The metadata lacks column(s) {', '.join(missing)}; expected {', '.join(SPLIT_COLUMNS)}.")
    if frame.empty:
        raise SplitError("The metadata has no rows to split.")
    blank = frame[list(SPLIT_COLUMNS)].isna().any(axis=1) | (frame[list(SPLIT_COLUMNS)] == "").any(axis=1)
    if blank.any():
        raise SplitError(f"{int(blank.sum())} row(s) have an empty image_id, dx or lesion_id.")
    duplicated = frame["image_id"][frame["image_id"].duplicated()]
    if len(duplicated):
        raise SplitError(f"Duplicate image_id(s) {', '.join(sorted(set(duplicated))[:5])}: each image may appear once.")


def _take_folds(
    positions: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split `positions` into (taken, rest), `taken` ~ `fraction` of them, whole groups only."""
    n_splits, folds_taken = fold_plan(fraction)
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise SplitError(
            f"Too few lesions to hold out the {what} split: {n_groups} lesion group(s) left, "
            f"at least {n_splits} needed for a {fraction:.0%} share. Add data or change the fractions."
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    taken_mask = np.zeros(len(positions), dtype=bool)
    with warnings.catch_warnings():
        # Rare classes with fewer lesions than folds are expected (df, vasc in small sets);
        # `class_gaps` reports the consequence instead.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            folds = splitter.split(np.zeros(len(positions)), labels, groups)
            for _ in range(folds_taken):
                _, fold_indices = next(folds)
                taken_mask[fold_indices] = True
        except ValueError as error:
            raise SplitError(f"Cannot split off the {what} split: {error}") from None
    if taken_mask.all() or not taken_mask.any():
        raise SplitError(f"Too few lesions to hold out the {what} split: one side would be empty.")
    return positions[taken_mask], positions[~taken_mask]


def lesion_grouped_split(
    frame: pd.DataFrame,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.16,
    seed: int = 42,
    keep_together: Iterable[tuple[str, str]] | None = None,
) -> dict[str, pd.DataFrame]:
    """Split metadata rows into {"train", "val", "test"} with no lesion in two splits.

    `frame` needs columns image_id, dx, lesion_id (others are kept). Test takes about
    `test_fraction` of the images, val about `val_fraction` of the whole (taken from the
    rest), train the remainder; StratifiedGroupKFold (shuffled with `seed`) keeps each
    split's class mix close to the whole. `keep_together` pairs of image ids (suspected
    duplicates) merge their lesions first. Each split keeps the input's columns, index
    and row order; the input is not modified. Same input and seed -> identical frames.
    Raises `SplitError` for bad fractions, missing columns or too few lesions.
    """
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise SplitError(f"{name} must be a number in (0, 1), received {value!r}.")
    if test_fraction + val_fraction >= 1.0:
        raise SplitError(
            f"test_fraction + val_fraction must leave images for training, received {test_fraction} + {val_fraction}."
        )
    _check_split_frame(frame)
    groups = lesion_groups(frame, keep_together).to_numpy(dtype=object)
    labels = frame["dx"].to_numpy(dtype=object)
    positions = np.arange(len(frame))
    test_positions, rest = _take_folds(positions, labels, groups, test_fraction, seed, "test")
    val_share_of_rest = val_fraction / (1.0 - test_fraction)  # < 1 by the sum check above
    val_positions, train_positions = _take_folds(
        rest, labels[rest], groups[rest], val_share_of_rest, seed, "validation"
    )
    chosen = {"train": train_positions, "val": val_positions, "test": test_positions}
    return {name: frame.iloc[np.sort(chosen[name])] for name in SPLIT_NAMES}


def find_leakage(splits: Mapping[str, pd.DataFrame]) -> list[str]:
    """Human-readable problems: lesion ids or image ids found in more than one split.

    Checks the `lesion_id` and `image_id` columns where present; [] means no leakage.
    """
    problems: list[str] = []
    names = list(splits)
    for column, what in (("lesion_id", "lesion"), ("image_id", "image")):
        for position, first in enumerate(names):
            for second in names[position + 1 :]:
                if column not in splits[first].columns or column not in splits[second].columns:
                    continue
                shared = sorted(set(splits[first][column]) & set(splits[second][column]))
                if shared:
                    more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
                    problems.append(
                        f"{len(shared)} {what} id(s) in both {first} and {second}: {', '.join(shared[:5])}{more}"
                    )
    return problems


def class_gaps(splits: Mapping[str, pd.DataFrame]) -> list[str]:
    """Classes present in the data but absent from some split (too few lesions of them)."""
    present = set().union(*(set(frame["dx"]) for frame in splits.values()))
    gaps = []
    for name, frame in splits.items():
        absent = [label for label in CLASS_NAMES if label in present and label not in set(frame["dx"])]
        if absent:
            gaps.append(f"{name} has no images of class(es) {', '.join(absent)}")
    return gaps


def format_split_table(splits: Mapping[str, pd.DataFrame]) -> str:
    """A plain-text table: images per class and split, with the class share of each split."""
    names = list(splits)
    everything = pd.concat(list(splits.values()), ignore_index=True) if names else pd.DataFrame({"dx": []})
    columns = {**{name: splits[name] for name in names}, "all": everything}
    total = max(len(everything), 1)
    width = 16
    lines = ["class".ljust(8) + "".join(name.rjust(width) for name in columns)]
    for label in CLASS_NAMES:
        cells = []
        for frame in columns.values():
            count = int((frame["dx"] == label).sum())
            share = count / len(frame) if len(frame) else 0.0
            cells.append(f"{count:>7d} {share:>6.1%}".rjust(width))
        lines.append(label.ljust(8) + "".join(cells))
    lines.append(
        "images".ljust(8) + "".join(f"{len(f):>7d} {len(f) / total:>6.1%}".rjust(width) for f in columns.values())
    )
    if all("lesion_id" in frame.columns for frame in columns.values()):
        lines.append(
            "lesions".ljust(8)
            + "".join(f"{frame['lesion_id'].nunique():>7d}{'':7}".rjust(width) for frame in columns.values())
        )
    return "\n".join(line.rstrip() for line in lines)


def read_pairs_csv(csv_path: str | os.PathLike) -> list[tuple[str, str]]:
    """Image-id pairs to keep in one split, from a CSV with columns image_id_a, image_id_b
    (the near-duplicate file `inspect_splits.py --pairs-out` writes; other columns ignored)."""
    path = Path(csv_path)
    if not path.is_file():
        raise SplitError(f"{path}: keep-together file not found.")
    try:
        pairs = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise SplitError(f"{path}: the file is empty; expected columns image_id_a, image_id_b.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise SplitError(f"{path}: not a readable CSV ({error}).") from None
    pairs.columns = [str(c).strip() for c in pairs.columns]
    missing = [c for c in PAIR_COLUMNS[:2] if c not in pairs.columns]
    if missing:
        raise SplitError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(pairs.columns) or 'none'}."
        )
    a, b = pairs["image_id_a"].str.strip(), pairs["image_id_b"].str.strip()
    blank = pairs.index[(a == "") | (b == "")]
    if len(blank):
        lines = ", ".join(str(i + 2) for i in blank[:5])
        raise SplitError(f"{path}: empty image id at line(s) {lines}.")
    return list(zip(a, b))


def write_split_files(
    meta_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 42,
    test_fraction: float = 0.2,
    val_fraction: float = 0.16,
    image_dirs: Sequence[str | os.PathLike] = (),
    drop_missing: bool = False,
    keep_together_csv: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Path]:
    """Read `meta_csv`, split it by lesion and write out_dir/{train,val,test}.csv.

    Splitting needs only the metadata, so images not found (searched in `image_dirs`, the
    CSV's folder and their HAM10000_images_part_1/2 subfolders) only give a warning,
    unless `drop_missing` removes their rows first. Files are written atomically; the same
    input and seed give byte-identical files. `log` receives the progress and summary
    lines (None: silent). Returns {"train": path, "val": path, "test": path}.
    Raises `MetadataError` (bad CSV) or `SplitError` (cannot split).
    """
    say = log or (lambda message: None)
    meta_csv = Path(meta_csv)
    frame = read_metadata(meta_csv)
    folders = candidate_image_dirs(meta_csv, image_dirs)
    located = locate_images(frame["image_id"], folders)
    missing = [image_id for image_id, path in located.items() if path is None]
    if missing:
        searched = ", ".join(str(f) for f in folders if f.is_dir()) or "no existing folder"
        if drop_missing:
            if len(missing) == len(frame):
                raise SplitError(
                    f"{meta_csv}: none of the {len(frame)} images was found (searched {searched}); "
                    "nothing left after --drop-missing. Pass the image folder with --images DIR."
                )
            frame = frame[~frame["image_id"].isin(set(missing))].reset_index(drop=True)
            say(f"Dropped {len(missing)} of {len(missing) + len(frame)} rows whose image was not found "
                f"(first: {', '.join(missing[:5])}); {len(frame)} rows remain.")
        else:
            say(
                f"WARNING: {len(missing)} of {len(frame)} images not found (first: {', '.join(missing[:5])}); "
                f"searched {searched}. The split is written anyway (it needs only the metadata), but training "
                "and inspect_splits will fail on them: pass the image folder with --images DIR, "
                "or use --drop-missing to leave them out."
            )
    keep_together: list[tuple[str, str]] = []
    if keep_together_csv is not None:
        pairs = read_pairs_csv(keep_together_csv)
        known = set(frame["image_id"])
        keep_together = [(a, b) for a, b in pairs if a in known and b in known]
        ignored = len(pairs) - len(keep_together)
        say(
            f"Keeping {len(keep_together)} near-duplicate pair(s) from {keep_together_csv} in one split"
            + (f" ({ignored} pair(s) name images not in the metadata and are ignored)." if ignored else ".")
        )
    splits = lesion_grouped_split(
        frame, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed, keep_together=keep_together
    )
    leaks = find_leakage(splits)
    if leaks:  # pragma: no cover - lesion_grouped_split guarantees this
        raise SplitError("Internal error, split leaks: " + "; ".join(leaks))
    out_dir = Path(out_dir)
    paths = {name: write_csv_atomic(out_dir / f"{name}.csv", splits[name]) for name in SPLIT_NAMES}
    lesions = frame["lesion_id"].nunique()
    say(f"Split {len(frame)} images of {lesions} lesions from {meta_csv} (seed {seed}) into {out_dir}:")
    say(format_split_table(splits))
    for gap in class_gaps(splits):
        say(f"WARNING: {gap} (too few lesions of that class to stratify).")
    return paths


__all__ = [
    "PAIR_COLUMNS",
    "SPLIT_NAMES",
    "SplitError",
    "class_gaps",
    "find_leakage",
    "fold_plan",
    "format_split_table",
    "lesion_groups",
    "lesion_grouped_split",
    "read_pairs_csv",
    "write_split_files",
]
