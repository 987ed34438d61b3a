#!/usr/bin/env python
"""Classify image files or folders with a saved model. See keras_ham/commands/predict.py (installed as keras-ham-predict)."""

import sys

from keras_ham.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
