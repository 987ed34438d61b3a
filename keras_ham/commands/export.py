"""Export a saved classifier for deployment (ONNX: float32, any batch size).

The exported graph takes float32 RGB images 0..255, shape (N, S, S, 3) at the model's size S,
and returns the 7 class probabilities: all preprocessing is inside it. The file is checked
against the Keras model with ONNX Runtime (when installed) before it is written.

Example:
  keras-ham-export --model runs/demo/best.keras --format onnx      # -> runs/demo/best.onnx
"""

from __future__ import annotations

import argparse
import sys

from keras_ham.cli import script_main
from keras_ham.device import configure_device


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras file written by scripts/train.py")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default onnx)")
    parser.add_argument("--out", help="output file (default: beside the model, e.g. best.keras -> best.onnx)")
    args = parser.parse_args(argv)
    configure_device("cpu", log=None)  # before Keras is imported: export on the CPU
    from keras_ham.export import export_model_file

    path = export_model_file(args.model, args.out, export_format=args.format)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
