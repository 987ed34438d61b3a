"""Same seed, same machine, same torch thread count: the same training, to the last bit.

Two trainings of the tiny demo run in separate processes with the thread count pinned
(`OMP_NUM_THREADS`); their history.csv (all but the timing column) and best.keras weights must
be identical. Across thread counts or CPU models the kernels differ and the last digits drift
(README "Reproducibility"), so this test compares runs of one thread count on one machine only.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

TRAIN_ONCE = """
import json
from pathlib import Path
import torch
from conftest import tiny_config
from keras_ham.train import train
torch_threads = torch.get_num_threads()
result = train(tiny_config((Path({data!r}), Path({splits!r})), Path({out!r}), max_epochs=2), log=lambda m: None, verbose=0)
print(json.dumps({{"run": str(result.run_dir), "threads": torch_threads}}))
"""


def train_in_subprocess(tiny_demo, out, threads: int, repo_root) -> tuple[pd.DataFrame, list[np.ndarray], int]:
    import pathlib

    data, splits = tiny_demo
    code = TRAIN_ONCE.format(data=str(data), splits=str(splits), out=str(out))
    env = {**os.environ, "KERAS_BACKEND": "torch", "OMP_NUM_THREADS": str(threads), "TF_CPP_MIN_LOG_LEVEL": "3"}
    # run in tests/ so that `conftest` imports (keras_ham is installed: pip install -e .)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=repo_root / "tests")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    run = pathlib.Path(report["run"])
    history = pd.read_csv(run / "history.csv").drop(columns=["seconds"])  # wall time differs, by nature
    import keras

    weights = keras.saving.load_model(run / "best.keras", safe_mode=True).get_weights()
    return history, weights, report["threads"]


def test_same_seed_and_thread_count_give_identical_history_and_weights(tiny_demo, tmp_path, repo_root):
    history_a, weights_a, threads_a = train_in_subprocess(tiny_demo, tmp_path / "a", 1, repo_root)
    history_b, weights_b, threads_b = train_in_subprocess(tiny_demo, tmp_path / "b", 1, repo_root)
    assert threads_a == threads_b == 1  # OMP_NUM_THREADS did pin torch's thread count
    pd.testing.assert_frame_equal(history_a, history_b, check_exact=True)
    assert len(weights_a) == len(weights_b)
    assert all(np.array_equal(a, b) for a, b in zip(weights_a, weights_b))
    # The control: the runs did train (the weights moved away from a fresh build), so
    # equality is not the trivial equality of two untouched models.
    assert history_a["loss"].nunique() == len(history_a)
