"""Classify image files or folders with a saved model.

Prints the top classes with probabilities per image; --csv also writes them all.

Example:
  python scripts/predict.py --model runs/demo/best.keras data/demo/HAM10000_images_part_1 --csv preds.csv
"""

from __future__ import annotations

import argparse
import sys

from keras_ham.cli import add_device_argument, positive_int, script_main
from keras_ham.device import configure_device


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file written by scripts/train.py")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--csv", help="write image, predicted class and all probabilities to this CSV")
    parser.add_argument("--top", type=positive_int, default=3,
                        help="how many classes to print per image (default 3; at most the 7 classes)")
    parser.add_argument("--tta", action="store_true", help="average predictions over flips")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    configure_device(args.device, log=None)  # before Keras is imported
    import pandas as pd

    from keras_ham.io_utils import check_output_file, write_csv_atomic
    from keras_ham.labels import CLASS_NAMES
    from keras_ham.predict import Predictor, expand_image_paths, predict_files, top_classes

    if args.csv:
        check_output_file(args.csv)  # fail now, not after classifying every image
    paths = expand_image_paths(args.paths)
    predictor = Predictor.from_file(args.model, batch_size=args.batch_size, tta=args.tta)
    probabilities = predict_files(predictor, paths)
    for path, ranked in zip(paths, top_classes(probabilities, k=max(1, min(args.top, len(CLASS_NAMES))))):
        shown = "  ".join(f"{name} {probability:.3f}" for name, probability in ranked)
        print(f"{path}: {shown}")
    if args.csv:
        frame = pd.DataFrame({"path": [str(p) for p in paths],
                              "predicted": [CLASS_NAMES[i] for i in probabilities.argmax(axis=1)]})
        for index, name in enumerate(CLASS_NAMES):
            frame[f"p_{name}"] = probabilities[:, index].round(6)
        write_csv_atomic(args.csv, frame)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
