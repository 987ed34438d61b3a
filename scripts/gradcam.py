#!/usr/bin/env python
"""Write Grad-CAM overlays for lesion images and print the predicted class of each. See keras_ham/commands/gradcam.py (installed as keras-ham-gradcam)."""

import sys

from keras_ham.commands.gradcam import main

if __name__ == "__main__":
    sys.exit(main())
