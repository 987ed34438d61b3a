"""Data-parallel training under torchrun (gloo, 2 processes on the CPU): equivalence with one
process, shards, whole-set validation, one writer, resume after kill -9, failure of one rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from keras_ham.distributed import (Placement, batches_per_epoch, collective_timeout, placement_from_environment,
                                   shard_of_batch)

WORKER = Path(__file__).with_name("_distributed_worker.py")
#: Upper bound on one torchrun job of these tests (two processes importing Keras on 2 busy cores).
JOB_TIMEOUT = 400


def _gloo_available() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")


def torchrun(*args, cwd, timeout=JOB_TIMEOUT, nproc=2):
    """Run `torchrun --standalone --nproc_per_node 2 <args>`; kill its whole process group if it
    outlives `timeout`. Returns (exit code, combined output, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(WORKER.parents[1]), "OMP_NUM_THREADS": "1",
           "KERAS_HAM_COLLECTIVE_TIMEOUT": "120", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max_restarts=0", *map(str, args)]
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"torchrun job did not end within {timeout} s:\n{output[-3000:]}")
    finally:
        try:  # nothing of the job may outlive the test
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return process.returncode, output, time.monotonic() - started


# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("count", [1, 3, 37, 40])
@pytest.mark.parametrize("batch_size", [1, 4, 5])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_of_an_epoch_are_disjoint_and_cover_it(count, batch_size, world_size):
    order = np.random.default_rng([7, 2]).permutation(count)
    steps = batches_per_epoch(count, batch_size, world_size)
    seen = []
    for k in range(steps):  # every rank has the same number of steps
        global_batch = order[k * batch_size * world_size:(k + 1) * batch_size * world_size]
        parts = [shard_of_batch(order, k, batch_size, r, world_size) for r in range(world_size)]
        real = [indices[scale > 0] for indices, scale in parts]
        # rank by rank, the shards are the global batch in order: disjoint, union = the batch
        np.testing.assert_array_equal(np.concatenate(real), global_batch)
        for (indices, scale), mine in zip(parts, real):
            assert 1 <= len(indices) <= batch_size
            if len(mine):  # scale W*b_r/b: the mean over ranks of the ranks' mean losses is the batch mean
                np.testing.assert_allclose(scale, world_size * len(mine) / len(global_batch))
            else:  # a rank left without images trains on one padding image with weight 0
                assert len(indices) == 1 and scale[0] == 0
        seen.extend(np.concatenate(real))
    assert sorted(seen) == list(range(count))


def test_sharded_datasets_follow_the_single_process_order_reproducibly():
    from keras_ham.dataset import HamDataset

    paths = [f"image-{i}.jpg" for i in range(23)]
    labels = np.arange(23) % 7

    def dataset(rank, world_size, batch_size, epoch, seed=5):
        data = HamDataset(paths, labels, image_size=32, batch_size=batch_size, shuffle=True, seed=seed,
                          rank=rank, world_size=world_size, class_weight={0: 2.0})
        data.epoch = epoch
        return data

    for epoch in (0, 3):
        single = dataset(0, 1, 8, epoch)
        ranks = [dataset(r, 2, 4, epoch) for r in range(2)]
        assert len(single) == len(ranks[0]) == len(ranks[1]) == 3
        for k in range(len(single)):
            np.testing.assert_array_equal(np.concatenate([d.batch_indices(k) for d in ranks]), single.batch_indices(k))
            weights = [d.batch_weights(k) for d in ranks]
            counts = [len(d.batch_indices(k)) for d in ranks]  # sum_r mean_r(w) equals W * mean(w) of the batch
            np.testing.assert_allclose(sum(w.sum() / c for w, c in zip(weights, counts)) / 2,
                                       single.batch_weights(k).mean(), rtol=1e-6)
        np.testing.assert_array_equal(dataset(1, 2, 4, epoch).batch_indices(0), ranks[1].batch_indices(0))
    assert not np.array_equal(dataset(0, 2, 4, 0).batch_indices(0), dataset(0, 2, 4, 1).batch_indices(0))
    assert not np.array_equal(dataset(0, 2, 4, 0).batch_indices(0), dataset(0, 2, 4, 0, seed=6).batch_indices(0))


def test_placement_and_timeout_come_from_the_environment():
    from keras_ham.distributed import DistributedError

    assert placement_from_environment({}) == Placement(0, 1, 0)
    assert placement_from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Placement(3, 4, 1)
    with pytest.raises(DistributedError, match="RANK=4, WORLD_SIZE=4"):
        placement_from_environment({"RANK": "4", "WORLD_SIZE": "4"})
    assert collective_timeout({"KERAS_HAM_COLLECTIVE_TIMEOUT": "90"}).total_seconds() == 90
    with pytest.raises(DistributedError, match="KERAS_HAM_COLLECTIVE_TIMEOUT='soon'"):
        collective_timeout({"KERAS_HAM_COLLECTIVE_TIMEOUT": "soon"})


# --------------------------------------------------------------------------- torchrun jobs


@needs_gloo
@pytest.mark.slow  # a torchrun job: two processes import Keras and train
def test_one_step_on_two_processes_equals_one_process_with_twice_the_batch(tmp_path, repo_root):
    """SGD (an update proportional to the gradient, unlike Adam's first step) with class weights,
    on a full global batch (4 + 4 images) and a partial one (3 + 4)."""
    import _distributed_worker as worker
    from keras_ham import distributed

    code, output, _ = torchrun(WORKER, "step", tmp_path / "step.npz", cwd=repo_root)
    assert code == 0, output[-3000:]
    two_processes = np.load(tmp_path / "step.npz")
    single = distributed.context("cpu")
    assert not single.distributed
    for variant in ("plain", "bn_frozen"):
        for count, _batch_size in worker.STEP_CASES:
            before = worker.tiny_model(variant).get_weights()
            after = worker.one_step(variant, count, count, single)  # one process, batch of all `count`
            assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 0.1  # the step moved the weights
            for i, expected in enumerate(after):
                np.testing.assert_allclose(two_processes[f"{variant}-{count}-{i}"], expected, rtol=0, atol=1e-5,
                                           err_msg=f"{variant}, {count} images, weight {i}")


@needs_gloo
@pytest.mark.slow  # a torchrun job: two processes import Keras and train
def test_two_process_run_has_one_writer_whole_set_validation_and_a_single_process_folder(tiny_demo, tmp_path,
                                                                                        repo_root):
    import keras
    from sklearn.metrics import balanced_accuracy_score

    from keras_ham.dataset import dataset_from_split_csv
    from keras_ham.train import train

    config = tiny_config(tiny_demo, tmp_path, batch_size=8, run_name="ddp")
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(config.to_yaml())
    code, output, _ = torchrun(WORKER, "train", config_file, "--audit", tmp_path / "audit", cwd=repo_root)
    assert code == 0, output[-3000:]
    run = tmp_path / "runs" / "ddp"

    # exactly one process wrote the run folder
    writes = [json.loads((tmp_path / f"audit-{rank}.json").read_text()) for rank in (0, 1)]
    assert writes[1] == [] and any("best.keras" in entry for entry in writes[0])

    # the validation balanced accuracy recorded is the whole set's, for best.keras's weights
    history = pd.read_csv(run / "history.csv")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_backend"] == "gloo"
    best_row = history[history["epoch"] == summary["best_epoch"]].iloc[0]
    val = dataset_from_split_csv(config.val_csv, config, training=False)
    model = keras.saving.load_model(run / "best.keras")
    predicted = model.predict(val, verbose=0).argmax(axis=1)
    assert best_row["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(val.labels, predicted), abs=1e-9)
    assert best_row["val_accuracy"] == pytest.approx(np.mean(predicted == val.labels), abs=1e-9)

    # the same folder, in shape, as a single-process run
    single = train(config.replace(run_name="single", max_epochs=1), log=lambda _m: None, verbose=0).run_dir
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
    assert list(history.columns) == list(pd.read_csv(single / "history.csv").columns)
    assert history["epoch"].tolist() == [1, 2]
    single_summary = json.loads((single / "summary.json").read_text())
    assert set(summary) == set(single_summary) and single_summary["world_size"] == 1


@needs_gloo
@pytest.mark.slow  # a torchrun job: two processes import Keras and train
def test_kill_9_of_both_ranks_then_the_same_command_resumes_on_both(tiny_demo, tmp_path, repo_root):
    # head phase (frozen backbone) for 2 epochs, then fine-tuning: the kill inside epoch 2 resumes
    # mid-phase (weights and optimizer state), and the resumed job changes phase
    config = tiny_config(tiny_demo, tmp_path, batch_size=8, max_epochs=3, freeze_backbone_epochs=2,
                         run_name="killed")
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(config.to_yaml())
    code, output, _ = torchrun(WORKER, "train", config_file, "--kill-epoch", 1, cwd=repo_root)
    assert code != 0 and "SIGKILL" in output, output[-3000:]
    run = tmp_path / "runs" / "killed"
    assert json.loads((run / "state" / "state.json").read_text())["epoch"] == 1  # killed inside epoch 2

    code, output, _ = torchrun(WORKER, "train", config_file, cwd=repo_root)
    assert code == 0, output[-3000:]
    assert "rank 0 starts at epoch 2" in output and "rank 1 starts at epoch 2" in output
    assert "resuming" in output and "from epoch 2" in output
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["resumed"] is True
    assert not (run / "state").exists()


@needs_gloo
@pytest.mark.slow  # a torchrun job: two processes import Keras and train
def test_one_rank_raising_ends_the_whole_job_with_its_error(tiny_demo, tmp_path, repo_root):
    config = tiny_config(tiny_demo, tmp_path, batch_size=8, max_epochs=3, run_name="failing")
    config_file = tmp_path / "failing.yaml"
    config_file.write_text(config.to_yaml())
    code, output, seconds = torchrun(WORKER, "train", config_file, "--raise-rank", 1, cwd=repo_root, timeout=300)
    assert code != 0
    assert "RuntimeError: injected failure on rank 1" in output
    assert "ChildFailedError" in output  # torchrun ended the job (rank 0 was waiting in an all-reduce)
    assert not (tmp_path / "runs" / "failing" / "summary.json").exists()


@needs_gloo
@pytest.mark.slow  # a torchrun job: two processes import Keras and train
def test_a_stop_asked_by_one_rank_stops_all_ranks_at_the_same_step(tiny_demo, tmp_path, repo_root):
    """TerminateOnNaN stops the rank that saw the NaN; the others must stop too, not wait in the
    next all-reduce until the collective timeout (120 s here)."""
    config = tiny_config(tiny_demo, tmp_path, batch_size=8, max_epochs=3, run_name="stopped")
    config_file = tmp_path / "stopped.yaml"
    config_file.write_text(config.to_yaml())
    code, output, seconds = torchrun(WORKER, "train", config_file, "--stop-rank", 1, cwd=repo_root, timeout=300)
    assert code == 0, output[-3000:]
    assert "Timeout" not in output and "timed out" not in output
    assert pd.read_csv(tmp_path / "runs" / "stopped" / "history.csv")["epoch"].tolist() == [1]
