"""Atomic file writes: a reader never sees a half-written artifact."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from keras_ham.errors import KerasHamError


class OutputError(KerasHamError, OSError):
    """An output file cannot be written where it was asked for."""


def _cannot_write(path: Path, error: OSError) -> OutputError:
    if path.is_dir():
        reason = "a folder of that name exists"
    elif any(parent.exists() and not parent.is_dir() for parent in path.parents):
        reason = "part of the path is a file, not a folder"
    else:
        reason = error.strerror or str(error)
    return OutputError(f"cannot write {path}: {reason}.")


def _read_umask() -> int:
    """The process umask, read once at import (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create folder `path` if needed and check it is writable, so a long job fails at its
    start, not after the work, when its output cannot be saved."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot_write(path, error) from error
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {path}: permission denied.")
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """`ensure_output_dir` for the folder of output file `path`, which must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise _cannot_write(path, IsADirectoryError(path))
    ensure_output_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success.

    The temporary file lives in the same folder so the final `os.replace` is atomic
    on POSIX and Windows. On any exception the temporary file is removed and the old
    `path` (if any) is left untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise _cannot_write(path, IsADirectoryError(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep every suffix (".weights.h5", ".keras"): Keras checks them when saving.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                                        dir=path.parent)
    except OSError as error:
        raise _cannot_write(path, error) from error
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        try:
            os.replace(tmp, path)
        except OSError as error:
            raise _cannot_write(path, error) from error
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV (no index, '\\n' line endings) atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return Path(path)
