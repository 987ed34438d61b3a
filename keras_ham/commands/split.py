"""Split HAM10000 metadata by lesion into train/val/test CSVs.

    python scripts/split.py --meta data/raw/HAM10000_metadata.csv --out data/processed --seed 42

Splitting needs only the metadata: images not found give a warning (or, with
--drop-missing, are left out). Same input and seed -> byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keras_ham.cli import script_main
from keras_ham.config import Config, add_config_arguments, load_config
from keras_ham.split import write_split_files

DEFAULT_META = "data/raw/HAM10000_metadata.csv"


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = argparse.ArgumentParser(
        description="Write lesion-grouped, class-stratified train.csv, val.csv and test.csv.",
        epilog="Flags given here win over --config/--set; config keys used: seed, test_fraction, "
        "val_fraction, image_dirs, train_csv (its folder is the default --out).",
    )
    parser.add_argument("--meta", default=DEFAULT_META, help=f"HAM10000 metadata CSV (default: {DEFAULT_META})")
    parser.add_argument("--out", help=f"folder for the split CSVs (default: {Path(defaults.train_csv).parent})")
    parser.add_argument("--seed", type=int, help=f"random seed (default: {defaults.seed})")
    parser.add_argument(
        "--test-fraction", type=float, help=f"share of images for test (default: {defaults.test_fraction})"
    )
    parser.add_argument(
        "--val-fraction", type=float, help=f"share of all images for validation (default: {defaults.val_fraction})"
    )
    parser.add_argument(
        "--images",
        nargs="+",
        action="extend",
        metavar="DIR",
        help="folders holding the images (and/or HAM10000_images_part_1/2); the CSV's folder is always "
        f"searched (default: {' '.join(defaults.image_dirs)})",
    )
    parser.add_argument("--drop-missing", action="store_true", help="leave out rows whose image file is not found")
    parser.add_argument(
        "--keep-together",
        metavar="PAIRS_CSV",
        help="CSV of image_id_a,image_id_b pairs to keep in one split (from inspect_splits.py --pairs-out)",
    )
    add_config_arguments(parser)
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(args.config, args.overrides)
    chosen = {
        key: value
        for key, value in (
            ("seed", args.seed),
            ("test_fraction", args.test_fraction),
            ("val_fraction", args.val_fraction),
            ("image_dirs", args.images),
        )
        if value is not None
    }
    config = config.replace(**chosen)  # validates ranges
    write_split_files(
        args.meta,
        args.out or Path(config.train_csv).parent,
        seed=config.seed,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        image_dirs=config.image_dirs,
        drop_missing=args.drop_missing,
        keep_together_csv=args.keep_together,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
