"""Write Grad-CAM overlays for lesion images and print the predicted class of each.

    python scripts/gradcam.py --model runs/x/best.keras img1.jpg img2.png --out gradcam/
    python scripts/gradcam.py --model best.keras img.jpg --out out/ --class mel --layer conv4_block6_out
    python scripts/gradcam.py --model best.keras --list-layers

Writes <out>/<image stem>_gradcam.png. Class names come from labels.json beside the model
when present, else keras_ham.labels.CLASS_NAMES.
"""

from __future__ import annotations

import argparse
import sys

from keras_ham.cli import add_device_argument, script_main
from keras_ham.labels import CLASS_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Grad-CAM overlays (<stem>_gradcam.png) for a trained keras-ham classifier.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (JPEG, PNG, TIFF, ...)")
    parser.add_argument("--model", required=True, help="saved .keras model (e.g. runs/<run>/best.keras)")
    parser.add_argument("--out", help="folder for the overlay PNGs (created if missing); required with images")
    parser.add_argument("--list-layers", action="store_true",
                        help="print the last feature map at each resolution (what --layer takes), deepest first, and exit")
    parser.add_argument(
        "--class",
        dest="target_class",
        metavar="CLASS",
        default=None,
        help=f"class to explain: a name ({', '.join(CLASS_NAMES)}) or an index; default: each image's predicted class",
    )
    parser.add_argument("--layer", default=None,
                        help="layer to explain (default: the last 4-D feature map, e.g. conv5_block3_out; "
                             "an earlier one gives a finer map, see --list-layers)")
    parser.add_argument("--alpha", type=float, default=0.4, help="heatmap opacity in [0, 1] (default 0.4)")
    parser.add_argument("--colormap", default="jet", help="matplotlib colormap (default jet)")
    add_device_argument(parser)
    return parser


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list_layers and (not args.images or not args.out):
        parser.error("give one or more IMAGE files and --out (or --list-layers)")
    from keras_ham.device import configure_device

    configure_device(args.device, log=None)  # before Keras is imported
    from keras_ham.gradcam import default_layer_name, layer_choices, write_overlays
    from keras_ham.model import load_classifier

    if args.list_layers:
        model = load_classifier(args.model)
        default = default_layer_name(model)
        for name, size in layer_choices(model, count=len(model.layers)):
            cells = "x".join("?" if n is None else str(n) for n in size)
            print(f"{name:<24} {cells:>7}{'  (default)' if name == default else ''}")
        return 0

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
