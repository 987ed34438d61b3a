#!/usr/bin/env python
"""Write synthetic demo data in the Kaggle HAM10000 layout, so everything runs without a download. See keras_ham/commands/make_demo_data.py (installed as keras-ham-make-demo-data)."""

import sys

from keras_ham.commands.make_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
