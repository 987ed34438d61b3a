#!/usr/bin/env python
"""Split HAM10000 metadata by lesion into train/val/test CSVs. See keras_ham/commands/split.py (installed as keras-ham-split)."""

import sys

from keras_ham.commands.split import main

if __name__ == "__main__":
    sys.exit(main())
