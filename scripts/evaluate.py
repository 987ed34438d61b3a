#!/usr/bin/env python
"""Evaluate a saved model on a labelled CSV (a split CSV or an ISIC 2018 Task 3 ground truth). See keras_ham/commands/evaluate.py (installed as keras-ham-evaluate)."""

import sys

from keras_ham.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
