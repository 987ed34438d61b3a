"""Fit a temperature for an existing model on a labelled CSV (normally the validation split)
and write the calibrated model to a NEW .keras file; the original is never overwritten.

The temperature T is built into the model (logits / T before the softmax), so the new file
loads in safe mode on any backend, gives calibrated probabilities and the same predicted
classes. Training does this itself when `calibrate: true` (the default). A temperature at
an end of its search interval (the validation NLL has no interior minimum, e.g. the model
makes no error on the split) is refused, exit status 2, unless --allow-bound.

Example:
  python scripts/calibrate.py --model runs/demo/best.keras --csv data/demo/processed/val.csv
"""

from __future__ import annotations

import argparse
import sys

from keras_ham.cli import add_device_argument, add_images_argument, positive_int, script_main
from keras_ham.device import configure_device


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file written by scripts/train.py")
    parser.add_argument("--csv", required=True, help="CSV with image_id and dx columns (the validation split; "
                                                     "never the test split you will report)")
    add_images_argument(parser)
    parser.add_argument("--out", help="new .keras file to write (default: <model>_calibrated.keras beside it); "
                                      "an existing file is refused")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    parser.add_argument("--allow-bound", action="store_true",
                        help="write the model even when T ends at a bound of its search interval (the NLL has no "
                             "interior minimum, e.g. a validation split without errors); refused by default")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    configure_device(args.device)  # before Keras is imported
    from keras_ham.calibration import calibrate_file

    calibrate_file(args.model, args.csv, image_dirs=args.images, out_path=args.out, batch_size=args.batch_size,
                   allow_bound=args.allow_bound)
    return 0


if __name__ == "__main__":
    sys.exit(main())
