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


def read_metadata(csv_path: str | os.PathLike, required: Sequence[str] = SPLIT_COLUMNS) -> pd.DataFrame:
    """Load a metadata or split CSV, checking columns, labels and duplicate image ids.

    All columns are kept (as strings, so a round trip through `write_csv_atomic` keeps
    the file byte for byte). Raises `MetadataError` naming the file and the CSV lines.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise MetadataError(f"{path}: file not found.")
    if path.stat().st_size == 0:
        raise MetadataError(f"{path}: the file is empty; expected a CSV with columns {', '.join(required)}.")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise MetadataError(f"{path}: not a readable CSV ({error}).") from None
    except pd.errors.EmptyDataError:
        raise MetadataError(f"{path}: the file is empty; expected a CSV with columns {', '.join(required)}.") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    repeated = sorted({c for c in frame.columns if list(frame.columns).count(c) > 1})
    if repeated:
        raise MetadataError(f"{path}: column(s) {', '.join(repeated)} appear more than once in the header.")
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
