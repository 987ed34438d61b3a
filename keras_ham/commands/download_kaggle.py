"""Download HAM10000 from Kaggle into data/raw (metadata CSV + both image folders).

    python scripts/download_kaggle.py --out data/raw            # needs Kaggle credentials
    python scripts/download_kaggle.py --setup                   # save credentials first

Skips the download when --out already holds the complete dataset (use --force to repeat).
"""

from __future__ import annotations

import argparse
import sys

from keras_ham.config import Config
from keras_ham.download import (
    DEFAULT_DATASET,
    download_dataset,
    setup_kaggle_credentials,
)
from keras_ham.cli import script_main


def build_parser() -> argparse.ArgumentParser:
    default_out = Config().image_dirs[0]
    parser = argparse.ArgumentParser(
        description="Download the HAM10000 dataset from Kaggle and check its layout.",
        epilog="Credentials: ~/.kaggle/kaggle.json (or $KAGGLE_CONFIG_DIR/kaggle.json), or the environment "
        "variables KAGGLE_USERNAME and KAGGLE_KEY; --setup writes kaggle.json for you.",
    )
    parser.add_argument(
        "--dataset", default=DEFAULT_DATASET, help=f"Kaggle dataset owner/name (default: {DEFAULT_DATASET})"
    )
    parser.add_argument("--out", default=default_out, help=f"target folder (default: {default_out})")
    parser.add_argument("--force", action="store_true", help="download again even if --out is complete")
    parser.add_argument(
        "--setup",
        action="store_true",
        help="ask for your Kaggle username and API key, save them as kaggle.json (mode 600), then download",
    )
    parser.add_argument("--quiet", action="store_true", help="no download progress bar")
    return parser


@script_main(interrupted="error: interrupted; nothing was changed in the target folder.")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.setup:
        setup_kaggle_credentials()
    download_dataset(args.dataset, args.out, force=args.force, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
