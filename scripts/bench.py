#!/usr/bin/env python
"""Benchmark keras-ham against torchvision, ONNX Runtime and TensorFlow: `python scripts/bench.py --help`.

The benchmark lives in benchmarks/bench.py, a folder of the repository rather than part of the
installed package; this runs it as the module `benchmarks.bench` with the repository root on
PYTHONPATH (the current folder stays where it is, so relative --out paths mean what they say).
"""

import os
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.bench", *sys.argv[1:]], env=env))
    except KeyboardInterrupt:  # the benchmark got the Ctrl-C too and reports it
        sys.exit(130)
