#!/usr/bin/env python
"""Train a keras-ham classifier into runs/<name>/ (resumes an interrupted run).

Examples:
  python scripts/train.py --config configs/demo.yaml
  python scripts/train.py --config configs/resnet50.yaml --set max_epochs=3 --set weights=null
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from keras_ham.config import ConfigError, add_config_arguments, load_config  # noqa: E402
from keras_ham.device import DeviceError, configure_device  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config="configs/resnet50.yaml")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps", "directml"],
                        help="torch device (overrides the config's 'device')")
    parser.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    parser.add_argument("--evaluate", action="store_true",
                        help="when training ends, evaluate best.keras on the config's test_csv")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
        config = load_config(args.config, overrides)
        device = configure_device(config.device)  # before Keras is imported
    except (ConfigError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from keras_ham.images import ImageError
    from keras_ham.metadata import MetadataError
    from keras_ham.model import ModelError
    from keras_ham.train import TrainingError, train

    try:
        result = train(config, default_run_name=Path(args.config).stem if args.config else None,
                       device=device, verbose=2 if args.quiet else "auto")
    except (ConfigError, MetadataError, ImageError, ModelError, TrainingError, DeviceError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last finished epoch", file=sys.stderr)
        return 130
    print(f"done: {result.run_dir / 'best.keras'}")
    if args.evaluate:
        from keras_ham.evaluate import evaluate

        try:
            evaluate(result.run_dir / "best.keras", config.test_csv, image_dirs=config.image_dirs,
                     batch_size=config.batch_size)
        except (MetadataError, ImageError, ModelError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
