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

    @script_main
    def ok(argv=None):
        return 0

    with pytest.raises(ZeroDivisionError):
        failing([])
    assert ok([]) == 0


def test_os_error_and_interrupted(capsys):
    @script_main(interrupted="interrupted: rerun to resume")
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


def test_os_errors_are_user_errors_and_integer_options_are_checked(capsys):
    from keras_ham.cli import non_negative_int, positive_int

    @script_main
    def main(argv=None):
        open("/nonexistent-folder/x.csv", encoding="utf-8")

    assert main([]) == EXIT_USER_ERROR
    assert "No such file or directory: '/nonexistent-folder/x.csv'" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--bootstrap", type=non_negative_int, default=1000)
    assert parser.parse_args(["--bootstrap", "0"]).bootstrap == 0
    for bad in (["--batch-size", "0"], ["--batch-size", "-1"], ["--batch-size", "x"], ["--bootstrap", "-5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "expected an integer >= 0, received -5" in capsys.readouterr().err


def test_atomic_writes_name_the_output_that_cannot_be_written(tmp_path):
    from keras_ham.io_utils import OutputError, write_text_atomic

    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(OutputError, match=r"cannot write .*folder.csv: a folder of that name exists"):
        write_text_atomic(tmp_path / "folder.csv", "x")
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(OutputError, match=r"cannot write .*afile/out.csv: part of the path is a file"):
        write_text_atomic(tmp_path / "afile" / "out.csv", "x")
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.csv"]  # no temp files left


def test_output_locations_are_checked_before_the_work(tmp_path):
    from keras_ham.io_utils import OutputError, check_output_file, ensure_output_dir

    assert ensure_output_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="part of the path is a file"):
        ensure_output_dir(tmp_path / "file" / "sub")
    with pytest.raises(OutputError, match="a folder of that name exists"):
        check_output_file(tmp_path / "a")
    assert check_output_file(tmp_path / "c" / "p.csv") == tmp_path / "c" / "p.csv" and (tmp_path / "c").is_dir()


def test_every_console_command_has_its_script_and_a_script_main(repo_root):
    """pyproject.toml's console commands and scripts/<name>.py call the same main(argv)."""
    import ast
    import tomllib

    commands = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    assert commands
    for command, target in commands.items():
        module_name, function = target.split(":")
        main = getattr(importlib.import_module(module_name), function)
        assert hasattr(main, "__wrapped__"), f"{target} is not decorated with keras_ham.cli.script_main"
        name = module_name.rsplit(".", 1)[1]
        assert command == "keras-ham-" + name.replace("_", "-")
        script = ast.parse((repo_root / "scripts" / f"{name}.py").read_text())
        imports = [node for node in script.body if isinstance(node, ast.ImportFrom)]
        assert any(node.module == module_name and [a.name for a in node.names] == ["main"] for node in imports), name
