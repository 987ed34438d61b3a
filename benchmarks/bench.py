#!/usr/bin/env python
"""Benchmark keras-ham: Keras on torch against plain PyTorch (and TensorFlow) on this machine.

Measures training throughput (keras-ham's model in Keras fit against torchvision's ResNet in a
plain PyTorch loop, NCHW and channels_last, and a plain torch loop over the same Keras model),
inference (the project's Predictor against torchvision, plain torch, ONNX Runtime on the
exported file, torch.compile and Keras predict), the data loader, Grad-CAM and peak training
memory (each contender alone in its own process). Prints a table and writes JSON (see README
"Performance").

Examples:
  python scripts/bench.py                                   # ResNet50, 128 px, batch 32
  python scripts/bench.py --quick                           # seconds-long smoke run
  python scripts/bench.py --only inference,breakdown --image-size 224 --batch-size 16
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.harness import (  # the harness does not import Keras
    BACKENDS,
    ENGINES,
    EXTRA_SECTIONS,
    SECTIONS,
    format_table,
    make_options,
    parse_list,
    run_benchmarks,
)
from keras_ham.backbones import MODEL_NAMES
from keras_ham.cli import script_main


@script_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, help="square input size in pixels (default 128; quick 32)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 32; quick 4)")
    parser.add_argument("--steps", type=int, help="measured steps/batches per repeat (default 5; quick 2)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps before measuring (default 2; quick 1)")
    parser.add_argument("--settle-steps", type=int,
                        help="untimed steps each contender runs before each timed one, so none is timed right "
                             "after another model's step (default 1; 0: strict alternation)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats inside each worker (default 3; quick 2)")
    parser.add_argument("--rounds", type=int, help="runs of every worker, alternating backends (default 1)")
    parser.add_argument("--model", choices=MODEL_NAMES, help="backbone (default resnet50; quick resnet18)")
    parser.add_argument("--latency-runs", type=int, help="single-image / Grad-CAM runs (default 20; quick 5)")
    parser.add_argument("--loader-images", type=int, help="images read by the loader benchmark (default 256; quick 16)")
    parser.add_argument("--only", help=f"comma-separated sections: {', '.join(SECTIONS + EXTRA_SECTIONS)} "
                                       f"(default: {','.join(SECTIONS)})")
    parser.add_argument("--backends", help=f"comma-separated: {', '.join(BACKENDS)} (default both; tensorflow is "
                                           "skipped when not installed)")
    parser.add_argument("--data-dir", help="HAM10000 folder (metadata CSV + image folders); default: "
                                           "../shared/data/ham10000-224 when present, else generated JPEGs")
    parser.add_argument("--generated-data", action="store_true", help="use generated 600x450 JPEGs even if real data exists")
    parser.add_argument("--threads", type=int, help="torch / TensorFlow intra-op threads (default: library default)")
    parser.add_argument("--jit-compile", action="store_true",
                        help="train with model.jit_compile=True (torch.compile on torch; its compile time is in the warm-up)")
    parser.add_argument("--engines", help=f"inference engines compared with the Predictor: comma-separated "
                                          f"{', '.join(ENGINES)}, or none (default: all; quick: onnxruntime)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), auto, cuda, mps, directml")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: checks the benchmark runs")
    parser.add_argument("--out", default="bench/out/results.json", help="JSON output (default bench/out/results.json)")
    args = parser.parse_args(argv)
    options = make_options(
        quick=args.quick,
        image_size=args.image_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        settle_steps=args.settle_steps,
        repeats=args.repeats,
        rounds=args.rounds,
        model=args.model,
        latency_runs=args.latency_runs,
        loader_images=args.loader_images,
        sections=parse_list(args.only, SECTIONS + EXTRA_SECTIONS, "--only") if args.only else None,
        backends=parse_list(args.backends, BACKENDS, "--backends") if args.backends else None,
        data_dir=args.data_dir,
        generated_data=args.generated_data,
        threads=args.threads,
        jit_compile=args.jit_compile or None,
        device=args.device,
        engines=None if args.engines is None else () if args.engines == "none" else parse_list(args.engines, ENGINES, "--engines"),
    )
    results = run_benchmarks(options, args.out, log=lambda message: print(message, flush=True),
                             argv=sys.argv if argv is None else ["scripts/bench.py", *argv])
    print()
    print(format_table(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
