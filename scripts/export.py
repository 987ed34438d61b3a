#!/usr/bin/env python
"""Export a saved classifier for deployment (ONNX). See keras_ham/commands/export.py (installed as keras-ham-export)."""

import sys

from keras_ham.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
