"""Shared test fixtures. Keras runs on the torch backend unless a test says otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

#: Real HAM10000 subset laid out like the Kaggle download; absent on a fresh clone.
REAL_DATA_DIR = Path(os.environ.get("KERAS_HAM_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "ham10000-224"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA_DIR / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real HAM10000 data not found at {REAL_DATA_DIR}")
    return REAL_DATA_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
