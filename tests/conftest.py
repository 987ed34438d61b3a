"""Shared test fixtures. Keras runs on the torch backend unless a test says otherwise."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

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


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small synthetic dataset in the Kaggle layout, split by lesion: (folder, split folder)."""
    from keras_ham.demo_data import make_demo_data
    from keras_ham.split import write_split_files

    root = tmp_path_factory.mktemp("tiny_demo")
    data = make_demo_data(root / "data", seed=3, num_lesions=70, min_lesions_per_class=8, image_size=(96, 72), log=None)
    write_split_files(data / "HAM10000_metadata.csv", root / "splits", seed=3, log=None)
    return data, root / "splits"


def tiny_config(tiny_demo, tmp_path, **overrides):
    """A config that trains in seconds on `tiny_demo`."""
    from keras_ham.config import load_config

    data, splits = tiny_demo
    values = {
        "model": "resnet18", "weights": None, "image_size": 32, "batch_size": 16, "max_epochs": 2,
        "lr": 1e-3, "batchnorm_momentum": 0.9, "export_onnx": False,  # tests that need the export turn it on
        "train_csv": str(splits / "train.csv"), "val_csv": str(splits / "val.csv"),
        "test_csv": str(splits / "test.csv"), "image_dirs": [str(data)],
        "cache_dir": str(tmp_path / "cache"), "out_dir": str(tmp_path / "runs"), "run_name": "tiny",
    }
    values.update(overrides)
    return load_config(overrides=values)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, repo_root):
    """configs/demo.yaml trained as shipped (data, cache and runs redirected to a temp folder).

    Shared by the tests that need a model that has really learned the demo data (Grad-CAM
    localisation, demo test metrics, the dashboard). Returns (run folder, config).
    """
    from keras_ham.config import load_config
    from keras_ham.train import train

    root = tmp_path_factory.mktemp("demo_run")
    config = load_config(
        repo_root / "configs" / "demo.yaml",
        {
            "demo_data": str(root / "data" / "demo"),
            "train_csv": str(root / "data" / "demo" / "processed" / "train.csv"),
            "val_csv": str(root / "data" / "demo" / "processed" / "val.csv"),
            "test_csv": str(root / "data" / "demo" / "processed" / "test.csv"),
            "image_dirs": [str(root / "data" / "demo")],
            "cache_dir": str(root / "cache"),
            "out_dir": str(root / "runs"),
        },
    )
    result = train(config, default_run_name="demo", log=lambda message: None, verbose=0)
    return result.run_dir, config


_LOAD_AND_PREDICT = """
import sys, json, numpy as np, keras
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
x = np.load(sys.argv[2])
print(json.dumps({"backend": keras.backend.backend(),
                  "p": np.asarray(keras.ops.convert_to_numpy(model(x, training=False))).tolist()}))
"""


def probabilities_on_tensorflow(model_path, images, tmp_path):
    """Load `model_path` in safe mode in a fresh TensorFlow-backend process; its probabilities."""
    import json
    import subprocess

    import numpy as np

    np.save(tmp_path / "x.npy", np.asarray(images, dtype="float32"))
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", _LOAD_AND_PREDICT, str(model_path), str(tmp_path / "x.npy")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "tensorflow"
    return np.array(result["p"])
