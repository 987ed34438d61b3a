"""Check split CSVs before training: class table, lesion/image leakage, image files.

    python scripts/inspect_splits.py --splits data/processed --images data/raw [--near-duplicates]

Exit status: 0 clean, 1 a lesion or image is in two splits or an image file is missing,
2 unreadable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keras_ham.cli import script_main
from keras_ham.config import Config
from keras_ham.near_duplicates import DEFAULT_THRESHOLD, HASH_BITS
from keras_ham.split_report import inspect_splits


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        description="Print per-split class counts and check for leakage and missing images.",
        epilog="Exit status: 0 clean, 1 leakage or missing image files, 2 bad input.",
    )
    parser.add_argument(
        "--splits",
        default=str(Path(defaults.train_csv).parent),
        help=f"folder with train.csv, val.csv, test.csv (default: {Path(defaults.train_csv).parent})",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        action="extend",
        metavar="DIR",
        help="folders holding the images (and/or HAM10000_images_part_1/2); the split folder is always "
        f"searched (default: {' '.join(defaults.image_dirs)}, relative to the current folder)",
    )
    parser.add_argument(
        "--near-duplicates",
        action="store_true",
        help="also list images in different splits with near-identical perceptual hashes",
    )
    parser.add_argument(
        "--threshold",
        type=int,
        default=DEFAULT_THRESHOLD,
        help=f"largest phash Hamming distance (0-{HASH_BITS}) counted as near-duplicate (default: {DEFAULT_THRESHOLD})",
    )
    parser.add_argument(
        "--pairs-out",
        metavar="FILE",
        help="write the near-duplicate pairs as CSV for split.py --keep-together (implies --near-duplicates)",
    )
    parser.add_argument("--workers", type=int, help="threads for hashing (default: CPU count, at most 8)")
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.threshold <= HASH_BITS:
        parser.error(f"--threshold must be in [0, {HASH_BITS}], received {args.threshold}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, received {args.workers}")
    report = inspect_splits(
        args.splits,
        image_dirs=args.images if args.images is not None else Config().image_dirs,
        near_duplicates=args.near_duplicates,
        threshold=args.threshold,
        pairs_out=args.pairs_out,
        workers=args.workers,
    )
    if report.problems:
        print(f"error: the split in {args.splits} failed {len(report.problems)} check(s); see above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
