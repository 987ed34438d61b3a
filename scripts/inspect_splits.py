#!/usr/bin/env python
"""Check split CSVs before training: class table, lesion/image leakage, image files. See keras_ham/commands/inspect_splits.py (installed as keras-ham-inspect-splits)."""

import sys

from keras_ham.commands.inspect_splits import main

if __name__ == "__main__":
    sys.exit(main())
