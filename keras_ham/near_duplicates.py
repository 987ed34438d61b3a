"""Find near-identical images that sit in different splits under different lesion ids.

HAM10000 holds some lesions twice under different lesion ids (missed duplicates, reported
in Sci Data 2025); grouping by lesion id cannot keep those together. A 64-bit perceptual
hash (imagehash.phash: DCT of a 32x32 grayscale copy) survives re-encoding and resizing,
so copies of one photo differ in 0-4 bits while most unrelated images differ in 10-40.
The pairs found here go back into `split.py --keep-together`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from keras_ham.images import load_image
from keras_ham.io_utils import write_csv_atomic
from keras_ham.split import PAIR_COLUMNS

#: Hamming distance (of 64 bits) at or below which two images are reported as candidate
#: copies. phash sets exactly 32 bits (median split), so distances are even: 3 acts like 2.
#: Measured on 300 real HAM10000 images: JPEG q=60, rescaling and +10 % brightness moved
#: 97 % of hashes by <= 2 bits and all by <= 4. Among the 5,984 distinct lesions of the
#: real subset, 5 pairs lie at <= 2 and 75 at <= 4 (small dark spot on plain skin looks
#: alike at 32x32): false matches that only merge a few groups (largest: 15 images) when
#: fed back through --keep-together, while a missed copy is leakage. Hence 4.
DEFAULT_THRESHOLD = 4
HASH_BITS = 64
#: Log hashing progress (every 10 %) for at least this many images.
PROGRESS_MIN_IMAGES = 500


def image_phash(path: str | os.PathLike) -> np.uint64:
    """64-bit perceptual hash of the image at `path`, decoded like training decodes it."""
    import imagehash  # imports scipy; only this tool needs it
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(load_image(path)), hash_size=8).hash  # (8, 8) bool
    return np.packbits(bits.reshape(-1)).view(">u8")[0].astype(np.uint64)


def hash_images(
    paths: Sequence[str | os.PathLike],
    *,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Perceptual hashes of `paths` as a `(N,)` uint64 array, in the order given.

    Decoding runs in a thread pool (Pillow releases the GIL while decoding); `log` gets a
    progress line every 10 % for large sets. Raises `keras_ham.images.ImageError` naming
    the first unreadable file.
    """
    hashes = np.zeros(len(paths), dtype=np.uint64)
    if not len(paths):
        return hashes
    workers = workers or min(8, os.cpu_count() or 1)
    report_every = max(1, len(paths) // 10) if log and len(paths) >= PROGRESS_MIN_IMAGES else 0
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(image_phash, path): index for index, path in enumerate(paths)}
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                hashes[futures[future]] = future.result()
                if report_every and (done % report_every == 0 or done == len(paths)):
                    log(f"  hashed {done}/{len(paths)} images ({time.monotonic() - started:.1f} s)")
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return hashes


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 element (uint8), with a fallback for numpy < 2.0."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)  # pragma: no cover
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1, dtype=np.uint8)  # pragma: no cover


def near_duplicate_pairs(
    hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD, *, block_elements: int = 4_000_000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs `i < j` with Hamming distance <= `threshold`, as arrays `(i, j, distance)`.

    Compares every pair with XOR + popcount on uint64 in row blocks of about
    `block_elements` pairs (32 MB), so 10,015 images (50 M pairs) take well under a second.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not 0 <= threshold <= HASH_BITS:
        raise ValueError(f"threshold must be an integer in [0, {HASH_BITS}], received {threshold!r}.")
    hashes = np.asarray(hashes, dtype=np.uint64).reshape(-1)
    count = len(hashes)
    rows = max(1, block_elements // max(count, 1))
    found_i, found_j, found_d = [], [], []
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        distances = _popcount(hashes[start:stop, None] ^ hashes[None, start:])  # (rows, count - start)
        local_i, local_j = np.nonzero(distances <= threshold)
        upper = local_j > local_i  # column c is image start + c; keep j > i only
        local_i, local_j = local_i[upper], local_j[upper]
        found_i.append(local_i + start)
        found_j.append(local_j + start)
        found_d.append(distances[local_i, local_j])
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.uint8)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def find_near_duplicates(
    splits: Mapping[str, pd.DataFrame],
    image_paths: Mapping[str, str | os.PathLike],
    *,
    threshold: int = DEFAULT_THRESHOLD,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Near-duplicate image pairs of different lesions, or in different splits.

    `splits` maps split name -> frame with image_id (and lesion_id) columns; `image_paths`
    maps image id -> file (ids without a path are skipped). Pairs of one lesion within one
    split are normal and left out. Pairs within one split are kept too, so a single
    `--keep-together` re-split keeps every pair together (select `split_a != split_b` for
    the ones that leak now). Returns columns image_id_a, image_id_b, split_a, split_b,
    distance (image_id_a < image_id_b), sorted by distance then ids.
    """
    ids, split_of, lesion_of = [], [], []
    for name, frame in splits.items():
        lesions = frame["lesion_id"] if "lesion_id" in frame.columns else frame["image_id"]
        for image_id, lesion_id in zip(frame["image_id"], lesions):
            if image_id in image_paths:
                ids.append(image_id)
                split_of.append(name)
                lesion_of.append(lesion_id)
    if log:
        log(f"Hashing {len(ids)} images (phash, {HASH_BITS} bits)...")
    hashes = hash_images([image_paths[i] for i in ids], workers=workers, log=log)
    first, second, distance = near_duplicate_pairs(hashes, threshold)
    rows = []
    for i, j, d in zip(first.tolist(), second.tolist(), distance.tolist()):
        if split_of[i] == split_of[j] and lesion_of[i] == lesion_of[j]:
            continue
        if ids[j] < ids[i]:
            i, j = j, i
        rows.append((ids[i], ids[j], split_of[i], split_of[j], int(d)))
    pairs = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    pairs["distance"] = pairs["distance"].astype(int)
    return pairs.sort_values(["distance", "image_id_a", "image_id_b"], kind="stable").reset_index(drop=True)


def cross_split_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    """The rows of a pairs frame whose two images sit in different splits."""
    return pairs[pairs["split_a"] != pairs["split_b"]].reset_index(drop=True)


def write_pairs_csv(path: str | os.PathLike, pairs: pd.DataFrame) -> Path:
    """Write near-duplicate pairs (columns `PAIR_COLUMNS`) atomically; header only if none."""
    return write_csv_atomic(path, pairs.loc[:, list(PAIR_COLUMNS)])
