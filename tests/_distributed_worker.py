"""One rank of a torchrun job started by tests/test_distributed.py.

    torchrun ... tests/_distributed_worker.py step OUT.npz
        one optimizer step of tiny models on fixed images; rank 0 saves the weights
    torchrun ... tests/_distributed_worker.py train CONFIG.yaml [--kill-epoch E] [--raise-rank R]
                                              [--stop-rank R] [--audit PREFIX]
        keras_ham.train.train(CONFIG); kill -9 of every rank during epoch E (0-based), an
        exception on rank R in the first epoch, or rank R alone asking to stop training after
        its second step (as TerminateOnNaN does); --audit records every file this rank writes,
        renames, creates or removes under the config's out_dir into PREFIX-<rank>.json
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import sys
from pathlib import Path

from keras_ham.device import configure_device  # tests/test_distributed.py puts the repository on PYTHONPATH

CLASS_WEIGHT = {0: 0.5, 1: 2.0, 2: 1.0, 3: 3.0, 4: 1.5, 5: 0.7, 6: 1.2}
#: (images in the global batch, per-process batch B): a full batch and a partial one split 3 + 4.
STEP_CASES = ((8, 4), (7, 4))


def tiny_model(variant: str):
    """A small conv net; `bn_frozen` adds a BatchNormalization in inference mode (trainable=False)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    if variant == "bn_frozen":
        norm = keras.layers.BatchNormalization(trainable=False)
        x = norm(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(7, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    if variant == "bn_frozen":  # statistics that are not the identity, so a mismatch would show
        norm.moving_mean.assign(keras.ops.full((4,), 0.3))
        norm.moving_variance.assign(keras.ops.full((4,), 2.0))
    return model


def step_data(count: int):
    import numpy as np

    rng = np.random.default_rng(11)
    return rng.normal(size=(count, 8, 8, 3)).astype("float32") * 50, rng.integers(0, 7, size=count).astype("int32")


def one_step(variant: str, count: int, batch_size: int, context):
    """Weights after one `fit` step on this rank's shard of `count` fixed images (with class weights)."""
    import keras
    import numpy as np

    from keras_ham.distributed import shard_of_batch
    from keras_ham.metrics import SparseCrossentropyWithSmoothing

    model = tiny_model(variant)
    model.compile(optimizer=context.averaging_optimizer(keras.optimizers.SGD(learning_rate=0.5)),
                  loss=SparseCrossentropyWithSmoothing(7, 0.1))
    context.broadcast_training_state(model)
    images, labels = step_data(count)
    indices, scale = shard_of_batch(np.arange(count), 0, batch_size, context.rank, context.world_size)
    weights = scale * np.array([CLASS_WEIGHT[int(label)] for label in labels[indices]], dtype="float32")
    model.fit(images[indices], labels[indices], sample_weight=weights, batch_size=len(indices), epochs=1,
              shuffle=False, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


def run_steps(out: str) -> None:
    import numpy as np

    from keras_ham import distributed

    context = distributed.context("cpu")
    arrays = {}
    for variant in ("plain", "bn_frozen"):
        for count, batch_size in STEP_CASES:
            for i, weight in enumerate(one_step(variant, count, batch_size, context)):
                arrays[f"{variant}-{count}-{i}"] = weight
    if context.is_main:
        np.savez(out, **arrays)
    distributed.close()


def audit_writes(out_dir: str, prefix: str, rank: int) -> None:
    root = os.path.realpath(out_dir)
    written: list[str] = []

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fsdecode(os.fspath(path))).startswith(root)
        except TypeError:
            return False

    def hook(event, args):
        if event == "open" and inside(args[0]):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (not mode and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                written.append(f"open {args[0]}")
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "tempfile.mkstemp") \
                and args and inside(args[0]):
            written.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    atexit.register(lambda: Path(f"{prefix}-{rank}.json").write_text(json.dumps(written)))


def run_training(args) -> None:
    import keras

    from keras_ham.config import load_config
    from keras_ham.train import train

    config = load_config(args.config)
    rank = int(os.environ["RANK"])
    if args.audit:
        audit_writes(config.out_dir, args.audit, rank)

    class Inject(keras.callbacks.Callback):
        first = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if self.first is None:
                self.first = epoch
                print(f"rank {rank} starts at epoch {epoch + 1}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            if batch == 1 and self.epoch == args.kill_epoch:
                os.kill(os.getpid(), signal.SIGKILL)
            if batch == 1 and self.epoch == 0 and rank == args.raise_rank:
                raise RuntimeError(f"injected failure on rank {rank}")
            if batch == 1 and self.epoch == 0 and rank == args.stop_rank:  # as TerminateOnNaN does
                self.model.stop_training = True

    train(config, log=print, verbose=0, extra_callbacks=[Inject()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("step", "train"))
    parser.add_argument("path")
    parser.add_argument("--kill-epoch", type=int, default=-1)
    parser.add_argument("--raise-rank", type=int, default=-1)
    parser.add_argument("--stop-rank", type=int, default=-1)
    parser.add_argument("--audit")
    args = parser.parse_args()
    configure_device("cpu", log=None)
    if args.mode == "step":
        run_steps(args.path)
    else:
        args.config = args.path
        run_training(args)


if __name__ == "__main__":
    main()
