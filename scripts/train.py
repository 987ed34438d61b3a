#!/usr/bin/env python
"""Train a keras-ham classifier into runs/<name>/ (resumes an interrupted run). See keras_ham/commands/train.py (installed as keras-ham-train)."""

import sys

from keras_ham.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
