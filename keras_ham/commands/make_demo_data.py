"""Write synthetic demo data in the Kaggle HAM10000 layout, so everything runs without a download.

    python scripts/make_demo_data.py --out data/demo --seed 42

Then split it like the real data: python scripts/split.py --meta data/demo/HAM10000_metadata.csv
Same seed and options -> byte-identical files; an existing complete set is kept unless --force.
"""

from __future__ import annotations

import argparse
import sys

from keras_ham.demo_data import (
    DEFAULT_NUM_LESIONS,
    LESIONS_FILE,
    METADATA_FILE,
    MIN_LESIONS_PER_CLASS,
    make_demo_data,
)
from keras_ham.cli import script_main
from keras_ham.labels import CLASS_NAMES
from keras_ham.metadata import read_metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a synthetic HAM10000-shaped dataset: HAM10000_metadata.csv, "
        "HAM10000_images_part_1/2/<image_id>.jpg (600x450) and demo_lesions.csv (lesion centre and radii).",
    )
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    parser.add_argument(
        "--num-lesions",
        type=int,
        default=DEFAULT_NUM_LESIONS,
        help=f"number of lesions; ~1.34 images each (default: {DEFAULT_NUM_LESIONS}, about 700 images)",
    )
    parser.add_argument(
        "--min-lesions-per-class",
        type=int,
        default=MIN_LESIONS_PER_CLASS,
        help="floor on lesions per class, so a lesion-grouped split has every class "
        f"(default: {MIN_LESIONS_PER_CLASS})",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds a complete demo set")
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out_dir = make_demo_data(
        args.out,
        seed=args.seed,
        num_lesions=args.num_lesions,
        min_lesions_per_class=args.min_lesions_per_class,
        force=args.force,
    )
    frame = read_metadata(out_dir / METADATA_FILE)
    images = frame["dx"].value_counts()
    lesions = frame.drop_duplicates("lesion_id")["dx"].value_counts()
    print(f"{out_dir}: {len(frame)} images of {frame['lesion_id'].nunique()} lesions")
    print(f"  {'class':<6} {'images':>6} {'lesions':>7}")
    for name in CLASS_NAMES:
        print(f"  {name:<6} {images.get(name, 0):>6} {lesions.get(name, 0):>7}")
    multi = int((frame.groupby("lesion_id").size() > 1).sum())
    print(f"  {multi} lesions have several images; lesion boxes in {out_dir / LESIONS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
