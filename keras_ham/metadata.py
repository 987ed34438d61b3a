"""Read and validate HAM10000 metadata, and find each image on disk.

Splitting needs only the metadata; training, evaluation and `inspect_splits` need the
images too and treat a missing one as an error (`require_image_paths`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from keras_ham.errors import KerasHamError
from keras_ham.images import IMAGE_EXTENSIONS  # noqa: F401 - the one list of image file types
from keras_ham.labels import CLASS_NAMES

METADATA_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
SPLIT_COLUMNS = ("image_id", "dx", "lesion_id")
EVAL_COLUMNS = ("image_id", "dx")
IMAGE_PART_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")


class MetadataError(KerasHamError, ValueError):
    """A metadata or split CSV is unusable; the message names the file and rows."""


def _rows(frame_index: Iterable[int], limit: int = 5) -> str:
    """CSV line numbers (header is line 1) of the first few offending rows."""
    lines = [int(i) + 2 for i in frame_index]
    shown = ", ".join(str(n) for n in lines[:limit])
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"line{'s' if len(lines) > 1 else ''} {shown}{more}"


def _read_string_csv(path: Path, empty_message: str) -> "pd.DataFrame":
    """Every cell as a string, header names stripped; a missing, empty or unreadable file or a
    repeated column is a MetadataError naming `path` (`empty_message` says what was expected)."""
    if not path.is_file():
        raise MetadataError(f"{path}: file not found.")
    if path.stat().st_size == 0:
        raise MetadataError(f"{path}: {empty_message}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise MetadataError(f"{path}: not a readable CSV ({error}).") from None
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{path}: {empty_message}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    repeated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if repeated:
        raise MetadataError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the header.")
    return frame


def read_metadata(csv_path: str | os.PathLike, required: Sequence[str] = SPLIT_COLUMNS) -> pd.DataFrame:
    """Load a metadata or split CSV, checking columns, labels and duplicate image ids.

    All columns are kept (as strings, so a round trip through `write_csv_atomic` keeps
    the file byte for byte). Raises `MetadataError` naming the file and the CSV lines.
    """
    path = Path(csv_path)
    frame = _read_string_csv(path, f"the file is empty; expected a CSV with columns {', '.join(required)}.")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MetadataError(
            f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(frame.columns) or 'none'}."
        )
    if frame.empty:
        raise MetadataError(f"{path}: the CSV has a header but no rows.")
    for column in required:
        frame[column] = frame[column].str.strip()
        blank = frame.index[frame[column] == ""]
        if len(blank):
            raise MetadataError(f"{path}: empty '{column}' at {_rows(blank)}.")
    bad = frame.index[~frame["dx"].isin(CLASS_NAMES)]
    if len(bad):
        values = sorted(set(frame.loc[bad, "dx"]))[:5]
        raise MetadataError(
            f"{path}: unknown label(s) {', '.join(map(repr, values))} in column 'dx' at {_rows(bad)}; "
            f"expected one of {', '.join(CLASS_NAMES)}."
        )
    duplicated = frame.index[frame["image_id"].duplicated(keep=False)]
    if len(duplicated):
        ids = sorted(set(frame.loc[duplicated, "image_id"]))[:5]
        raise MetadataError(f"{path}: duplicate image_id(s) {', '.join(ids)} at {_rows(duplicated)}.")
    return frame.reset_index(drop=True)


def candidate_image_dirs(csv_path: str | os.PathLike | None, extra_dirs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Folders searched for images: each given folder, the CSV's folder, and their
    `HAM10000_images_part_1/2` subfolders (the Kaggle layout), in that order."""
    roots = [Path(d) for d in extra_dirs]
    if csv_path is not None:
        roots.append(Path(csv_path).parent)
    ordered: list[Path] = []
    for root in roots:
        for folder in (root, *(root / part for part in IMAGE_PART_DIRS)):
            if folder not in ordered:
                ordered.append(folder)
    return ordered


def index_images(folders: Iterable[Path]) -> dict[str, Path]:
    """Map image id (file stem) -> path for image files in `folders`; earlier folders win."""
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() in IMAGE_EXTENSIONS and stem not in found and entry.is_file():
                    found[stem] = Path(entry.path)
    return found


def locate_images(image_ids: Iterable[str], folders: Iterable[Path]) -> dict[str, Path | None]:
    """Path of each image id, or None where no file was found."""
    index = index_images(folders)
    return {image_id: index.get(image_id) for image_id in image_ids}


def require_image_paths(
    frame: pd.DataFrame, csv_path: str | os.PathLike | None, extra_dirs: Iterable[str | os.PathLike] = ()
) -> list[Path]:
    """Paths of all images in `frame`, in row order; `MetadataError` if any is missing."""
    folders = candidate_image_dirs(csv_path, extra_dirs)
    located = locate_images(frame["image_id"], folders)
    missing = [image_id for image_id, path in located.items() if path is None]
    if missing:
        where = ", ".join(str(f) for f in folders if f.is_dir()) or "no existing folder"
        source = f"{csv_path}: " if csv_path is not None else ""
        raise MetadataError(
            f"{source}{len(missing)} of {len(frame)} image(s) not found (first: {', '.join(missing[:5])}); "
            f"searched {where}. Pass the image folder with --images / image_dirs."
        )
    return [located[image_id] for image_id in frame["image_id"]]


# --------------------------------------------------------------------------- ISIC 2018 Task 3

#: Columns of the ISIC 2018 Task 3 ground-truth CSVs: `image`, then one-hot class columns.
ISIC2018_IMAGE_COLUMN = "image"
ISIC2018_CLASS_COLUMNS = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def is_isic2018_header(columns: Sequence[str]) -> bool:
    """True for a header in the ISIC 2018 Task 3 style (`image` and upper-case class columns)."""
    names = {str(c).strip() for c in columns}
    return ISIC2018_IMAGE_COLUMN in names or bool(names & set(ISIC2018_CLASS_COLUMNS))


def read_isic2018_ground_truth(csv_path: str | os.PathLike) -> pd.DataFrame:
    """An ISIC 2018 Task 3 ground-truth CSV (`image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`, one-hot)
    as a frame with `image_id` and `dx` (lower-case class names), like an evaluation CSV.

    Every row must hold exactly one 1 and six 0s (written 1/0 or 1.0/0.0); duplicate image
    ids, unknown or missing columns are errors naming the file and CSV lines.
    """
    path = Path(csv_path)
    frame = _read_string_csv(path, "the file is empty.")
    expected = (ISIC2018_IMAGE_COLUMN, *ISIC2018_CLASS_COLUMNS)
    missing = [c for c in expected if c not in frame.columns]
    unknown = [c for c in frame.columns if c not in expected]
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            problems.append(f"unknown column(s) {', '.join(unknown)}")
        raise MetadataError(f"{path}: read as an ISIC 2018 Task 3 ground-truth CSV (header has "
                            f"'{ISIC2018_IMAGE_COLUMN}' or class columns), but it has {' and '.join(problems)}; "
                            f"expected exactly {','.join(expected)}.")
    if frame.empty:
        raise MetadataError(f"{path}: the CSV has a header but no rows.")
    ids = frame[ISIC2018_IMAGE_COLUMN].str.strip()
    blank = frame.index[ids == ""]
    if len(blank):
        raise MetadataError(f"{path}: empty '{ISIC2018_IMAGE_COLUMN}' at {_rows(blank)}.")
    values = frame[list(ISIC2018_CLASS_COLUMNS)].apply(lambda column: pd.to_numeric(column.str.strip(), errors="coerce"))
    binary = values.isin([0, 1]).all(axis=1)
    not_one_hot = frame.index[~binary | (values.where(binary, 0).sum(axis=1) != 1)]
    if len(not_one_hot):
        first = not_one_hot[0]
        shown = ",".join(frame.loc[first, list(ISIC2018_CLASS_COLUMNS)])
        raise MetadataError(f"{path}: rows that are not one-hot at {_rows(not_one_hot)} (first: {shown!r}); "
                            f"each row needs exactly one 1 and six 0s in {','.join(ISIC2018_CLASS_COLUMNS)}.")
    duplicated = frame.index[ids.duplicated(keep=False)]
    if len(duplicated):
        shown_ids = sorted(set(ids[duplicated]))[:5]
        raise MetadataError(f"{path}: duplicate image id(s) {', '.join(shown_ids)} at {_rows(duplicated)}.")
    dx = values.to_numpy().argmax(axis=1)
    return pd.DataFrame({"image_id": ids.to_numpy(),
                         "dx": [ISIC2018_CLASS_COLUMNS[i].lower() for i in dx]})


def read_labelled_csv(csv_path: str | os.PathLike) -> pd.DataFrame:
    """An evaluation CSV: `image_id,dx` (a split or metadata CSV), or the ISIC 2018 Task 3
    one-hot ground truth, told apart by the header."""
    path = Path(csv_path)
    try:
        header = pd.read_csv(path, nrows=0).columns if path.is_file() and path.stat().st_size else []
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError):
        header = []
    if "dx" not in {str(c).strip() for c in header} and is_isic2018_header(header):
        return read_isic2018_ground_truth(path)
    return read_metadata(path, required=EVAL_COLUMNS)
