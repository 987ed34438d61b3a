"""What the command-line scripts share: user errors as one line, exit codes, --device."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable

from keras_ham.device import DEVICE_NAMES
from keras_ham.errors import KerasHamError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DEVICE_CHOICES = DEVICE_NAMES


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = "auto", help: str | None = None) -> None:
    parser.add_argument("--device", default=default, choices=DEVICE_CHOICES,
                        help=help or "torch device (default: the best available: DirectML, CUDA, MPS, then CPU)")


def add_images_argument(parser: argparse.ArgumentParser) -> None:
    """--images DIR (repeatable): where the images of a CSV are, for the commands that read one."""
    parser.add_argument("--images", action="append", default=[], metavar="DIR",
                        help="folder holding the images (repeatable); the CSV's folder and the Kaggle "
                             "part_1/part_2 subfolders are searched too")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, received {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, received {value}")
    return value


def script_main(
    main: Callable[..., int] | None = None,
    *,
    interrupted: str = "interrupted",
):
    """Decorate a script's `main(argv) -> int`.

    A `KerasHamError`, an `OSError` (a file that cannot be read or written: the message
    names it) prints `error: <message>` to stderr and returns 2; the message
    already says what is wrong, so a traceback would only bury it. Ctrl-C prints
    `interrupted` and returns 130.
    """

    def decorate(function: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(function)
        def wrapper(*args, **kwargs) -> int:
            try:
                return function(*args, **kwargs)
            except (KerasHamError, OSError) as error:
                print(f"error: {error}", file=sys.stderr)
                return EXIT_USER_ERROR
            except KeyboardInterrupt:
                print(f"\n{interrupted}", file=sys.stderr)
                return EXIT_INTERRUPTED

        return wrapper

    return decorate(main) if main is not None else decorate
