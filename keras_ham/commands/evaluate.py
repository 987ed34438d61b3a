"""Evaluate a saved model on a labelled CSV: columns image_id and dx (a split CSV), or the
ISIC 2018 Task 3 ground truth (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC one-hot; told by the header).

Writes metrics.json, predictions.csv, confusion_matrix.png, reliability_diagram.png and
risk_coverage.png to --out (default: <model folder>/eval_<csv name>/) and prints a per-class
table, the calibration metrics and the risk-coverage table.

Example:
  python scripts/evaluate.py --model runs/demo/best.keras --csv data/demo/processed/test.csv
  python scripts/evaluate.py --model runs/resnet50/best.keras \
      --csv ISIC2018_Task3_Test_GroundTruth.csv --images ISIC2018_Task3_Test_Input
"""

from __future__ import annotations

import argparse
import sys

from keras_ham.cli import add_device_argument, add_images_argument, non_negative_int, positive_int, script_main
from keras_ham.device import configure_device


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file written by scripts/train.py")
    parser.add_argument("--csv", required=True, help="CSV with image_id and dx columns (e.g. a test split), or an ISIC 2018 "
                                                     "Task 3 ground-truth CSV (image + one-hot class columns)")
    add_images_argument(parser)
    parser.add_argument("--out", help="output folder (default: <model folder>/eval_<csv name>)")
    parser.add_argument("--tta", action="store_true", help="average predictions over flips")
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                        help="bootstrap resamples for 95%% intervals of accuracy, balanced accuracy and macro F1; "
                             "whole lesions are resampled when the CSV has lesion_id (default 1000; 0: off)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    configure_device(args.device)  # before Keras is imported
    from keras_ham.evaluate import evaluate

    evaluate(args.model, args.csv, image_dirs=args.images, out_dir=args.out, tta=args.tta, bootstrap=args.bootstrap,
             batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
