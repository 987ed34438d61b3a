#!/usr/bin/env python
"""Download HAM10000 from Kaggle into data/raw (metadata CSV + both image folders). See keras_ham/commands/download_kaggle.py (installed as keras-ham-download-kaggle)."""

import sys

from keras_ham.commands.download_kaggle import main

if __name__ == "__main__":
    sys.exit(main())
