#!/usr/bin/env python
"""Fit a temperature for a saved model on the validation split into a new .keras file. See keras_ham/commands/calibrate.py (installed as keras-ham-calibrate)."""

import sys

from keras_ham.commands.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
