"""The one base class of the errors a user can fix.

Every error keras-ham raises on bad input (a config key, a CSV row, an image file, a model
file, an unavailable device) derives from `KerasHamError`, and its message already names the
file, row or value and what was expected. Scripts print such an error as one line and exit 2
(see `keras_ham.cli`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KerasHamError(Exception):
    """Bad input or environment, explained in the message."""
