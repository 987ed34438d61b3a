"""The command-line programs: one module per script, each with `main(argv) -> int`.

`scripts/<name>.py` (run from a clone) and the console commands `keras-ham-<name>` (installed
by `pip install .`, see pyproject.toml) both call these `main` functions. They parse arguments
and call one library function; the work lives in the library modules.
"""
