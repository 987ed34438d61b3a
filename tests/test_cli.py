import argparse
import importlib
import inspect
import pkgutil

import pytest

import keras_ham
from keras_ham.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, add_device_argument, script_main
from keras_ham.errors import KerasHamError


def test_user_error_is_one_line_and_exit_2(capsys):
    @script_main
    def main(argv=None):
        raise KerasHamError("data/x.csv, row 3: dx 'foo' is not one of akiec, bcc, ...")

    assert main([]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == "error: data/x.csv, row 3: dx 'foo' is not one of akiec, bcc, ...\n"


def test_bugs_keep_their_traceback_and_success_passes_through():
    @script_main
    def failing(argv=None):
        raise ZeroDivisionError("a bug")

    @script_main(also=(OSError,))
    def ok(argv=None):
        return 0

    with pytest.raises(ZeroDivisionError):
        failing([])
    assert ok([]) == 0


def test_also_and_interrupted(capsys):
    @script_main(also=(OSError,), interrupted="interrupted: rerun to resume")
    def main(kind):
        raise {"os": PermissionError("out/: permission denied"), "ctrl-c": KeyboardInterrupt()}[kind]

    assert main("os") == EXIT_USER_ERROR
    assert "error: out/: permission denied" in capsys.readouterr().err
    assert main("ctrl-c") == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "interrupted: rerun to resume"


def test_every_library_error_is_a_user_error():
    """So every script reports it as one line (a new error class must derive from KerasHamError)."""
    found = []
    for module_info in pkgutil.iter_modules(keras_ham.__path__):
        module = importlib.import_module(f"keras_ham.{module_info.name}")
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, Exception) and name.endswith("Error")
                    and value.__module__ == module.__name__):
                found.append(value)
    assert len(found) >= 10
    assert [cls.__name__ for cls in found if not issubclass(cls, KerasHamError)] == []


def test_device_argument_choices():
    parser = argparse.ArgumentParser()
    add_device_argument(parser)
    assert parser.parse_args([]).device == "auto"
    assert parser.parse_args(["--device", "directml"]).device == "directml"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "tpu"])
