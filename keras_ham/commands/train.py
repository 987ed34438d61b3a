"""Train a keras-ham classifier into runs/<name>/ (resumes an interrupted run).

Examples:
  python scripts/train.py --config configs/demo.yaml
  python scripts/train.py --config configs/resnet50.yaml --set max_epochs=3 --set weights=null
  torchrun --nproc_per_node 2 scripts/train.py --config configs/demo.yaml   (data-parallel, see README)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keras_ham.cli import add_device_argument, script_main
from keras_ham.config import add_config_arguments, load_config
from keras_ham.device import configure_device
from keras_ham.distributed import is_main_process
from keras_ham.runs import RunFolder


@script_main(interrupted="interrupted: run the same command again to resume from the last finished epoch")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default_config="configs/resnet50.yaml")
    add_device_argument(parser, default=None, help="torch device (overrides the config's 'device')")
    parser.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    parser.add_argument("--evaluate", action="store_true",
                        help="when training ends, evaluate best.keras on the config's test_csv")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    config = load_config(args.config, overrides)
    device = configure_device(config.device)  # before Keras is imported
    from keras_ham.train import train

    result = train(config, default_run_name=Path(args.config).stem if args.config else None,
                   device=device, verbose=2 if args.quiet else "auto")
    if not is_main_process():  # under torchrun, rank 0 reports and evaluates
        return 0
    model_path = RunFolder(result.run_dir).best_model
    print(f"done: {model_path}")
    if args.evaluate:
        from keras_ham.evaluate import evaluate

        evaluate(model_path, config.test_csv, image_dirs=config.image_dirs,
                 batch_size=config.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
