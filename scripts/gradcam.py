"""Write Grad-CAM overlays for lesion images and print the predicted class of each.

    python scripts/gradcam.py --model runs/x/best.keras img1.jpg img2.png --out gradcam/
    python scripts/gradcam.py --model best.keras img.jpg --out out/ --class mel --layer conv4_block6_out

Writes <out>/<image stem>_gradcam.png. Class names come from labels.json beside the model
when present, else keras_ham.labels.CLASS_NAMES.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keras_ham.cli import add_device_argument, script_main  # noqa: E402
from keras_ham.labels import CLASS_NAMES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Grad-CAM overlays (<stem>_gradcam.png) for a trained keras-ham classifier.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, TIFF, ...)")
    parser.add_argument("--model", required=True, help="saved .keras model (e.g. runs/<run>/best.keras)")
    parser.add_argument("--out", required=True, help="folder for the overlay PNGs (created if missing)")
    parser.add_argument(
        "--class",
        dest="target_class",
        metavar="CLASS",
        default=None,
        help=f"class to explain: a name ({', '.join(CLASS_NAMES)}) or an index; default: each image's predicted class",
    )
    parser.add_argument("--layer", default=None, help="layer to explain (default: the last 4-D feature map, conv5_block3_out)")
    parser.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity in [0, 1] (default 0.4)")
    parser.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    add_device_argument(parser)
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from keras_ham.device import configure_device

    configure_device(args.device, log=None)  # before Keras is imported
    from keras_ham.gradcam import write_overlays

    def report(record) -> None:
        line = f"{record.image_path}: predicted {record.predicted} (p={record.predicted_probability:.3f})"
        if record.explained != record.predicted:
            line += f", explained {record.explained} (p={record.explained_probability:.3f})"
        print(f"{line} -> {record.overlay_path}", flush=True)

    write_overlays(
        args.model,
        args.images,
        args.out,
        target_class=args.target_class,
        layer_name=args.layer,
        alpha=args.alpha,
        colormap=args.colormap,
        progress=report,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
