"""keras-ham: HAM10000 skin-lesion classification with Keras 3, explained with Grad-CAM.

Importing the package is cheap and does not import Keras: call
`keras_ham.device.configure_device()` first when the torch device matters.
"""

__version__ = "0.1.0"
