"""Data-parallel training with torch.distributed, launched by torchrun; a no-op without it.

Everything distributed lives here: rank, world size and local rank read from the torchrun
environment (RANK, WORLD_SIZE, LOCAL_RANK), the process group (NCCL on CUDA, gloo on the CPU or
wherever NCCL is missing, with a timeout so a dead peer ends the job), the broadcast of weights
and optimizer variables from rank 0, gradient averaging, the shard of each batch a rank trains
on, and the whole-set validation metrics. Without torchrun, `context()` has world size 1 and
every method returns at once, so a single-process run takes the same code path unchanged.

Why an all-reduce inside Keras's train step, not `torch.nn.parallel.DistributedDataParallel`:
Keras 3.15's torch `fit` calls the model itself (`self(x)`), never a wrapper, so a DDP wrapper
would not see the forward pass; Keras's own DDP support in `fit` is not in a released version.
`fit` on torch calls `optimizer.apply(grads, variables)` exactly once per step, after
`loss.backward()` (keras/src/backend/torch/trainer.py, `train_step`), so `averaging_optimizer`
gives the optimizer a subclass whose `apply` first all-reduces the gradients (bucketed, one
flat buffer per ~25 MiB, asynchronous per bucket) and divides by the world size; every rank
then makes the same update from the same weights. Unlike DDP it does not overlap the
communication with the backward pass (unmeasured on GPUs: no GPU in the task that built this).

Data: epoch e's order is the single-process one, `default_rng([seed, e]).permutation(N)`;
global batch k is `order[k*W*B:(k+1)*W*B]` and rank r trains on `[r*B:(r+1)*B]` of it
(`shard_of_batch`), so W ranks x batch B see exactly the images of 1 rank x batch W*B in every
step, and every rank has the same number of steps. The last, partial global batch is split
evenly (sizes differ by at most one); a rank left without an image (fewer than W images in
that batch) gets one padding image with weight 0. Each image's loss weight is its class weight
times W*b_r/b (b_r: this rank's images in the step, b: the step's images over all ranks), which
undoes Keras's division by the local batch size (`sum_over_batch_size`), so the averaged
gradient equals the single-process gradient of that batch exactly, partial batches included.

Validation: each rank predicts its shard; the loss sum, image count, hits and per-class counts
are summed over ranks, so val_loss, val_accuracy and val_balanced_accuracy are those of the
whole set and identical on every rank (best.keras, early stopping and the plateau schedule
decide alike). Training metrics (loss, accuracy, balanced_accuracy) are summed the same way at
the end of each epoch (Keras metric states are sums and counts).

BatchNorm: statistics are per rank during a step (no SyncBatchNorm); the moving mean and
variance are averaged over ranks at the end of every epoch, before validation and saving. With
equal shards the averaged moving mean is exactly what one process would have; the averaged
variance lacks the spread between rank means (small at the per-GPU batch sizes of 16-64
images this project uses). Random augmentation and dropout are seeded `seed + rank` so the
ranks do not repeat each other's draws.

Only rank 0 writes (run folder, logs, progress bar). On resume rank 0 reads the state and the
checkpoint and broadcasts the state, weights and optimizer variables; other ranks never read
the run folder, so several machines need no shared file system for it (each machine needs the
data and, if set, builds its own image cache).

Collective timeout: `KERAS_HAM_COLLECTIVE_TIMEOUT` seconds (default 1800: it must outlast the
longest single-rank pause, such as building the image cache on first use).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Callable, Sequence

import numpy as np

from keras_ham.errors import KerasHamError

#: Environment variable with the collective timeout in seconds.
TIMEOUT_ENV = "KERAS_HAM_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_SECONDS = 1800
#: Gradient bucket size for the all-reduce (DistributedDataParallel's default).
BUCKET_BYTES = 25 * 2**20


class DistributedError(KerasHamError, RuntimeError):
    """The torchrun environment is inconsistent or the process group cannot start."""


# --------------------------------------------------------------------------- environment (pure)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process sits in the job: global rank, world size, rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def placement_from_environment(environ=None) -> Placement:
    """Rank, world size and local rank as torchrun sets them; (0, 1, 0) without torchrun."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return Placement()
    try:
        world_size = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise DistributedError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({error}).") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, "
                               f"LOCAL_RANK={local_rank}.")
    return Placement(rank, world_size, local_rank)


def is_main_process() -> bool:
    """True on rank 0 and without torchrun: the process that prints and writes."""
    return placement_from_environment().is_main


def per_process_device(torch_device: str, kind: str) -> str:
    """The torch device of this rank: its LOCAL_RANK GPU under torchrun on CUDA, else unchanged."""
    place = placement_from_environment()
    if not place.distributed or kind != "cuda" or ":" in torch_device:
        return torch_device
    import torch

    count = torch.cuda.device_count()
    if place.local_rank >= count:
        raise DistributedError(f"LOCAL_RANK {place.local_rank} has no GPU: this machine has {count}. "
                               f"Start at most {count} processes per node (--nproc_per_node).")
    return f"cuda:{place.local_rank}"


def collective_timeout(environ=None) -> datetime.timedelta:
    environ = os.environ if environ is None else environ
    raw = environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds.")
    return datetime.timedelta(seconds=seconds)


# --------------------------------------------------------------------------- data shards (pure)


def shard_of_batch(order: np.ndarray, index: int, batch_size: int, rank: int = 0,
                   world_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(indices, loss scale) of rank `rank`'s part of global batch `index` of `order`.

    Global batch k is `order[k*W*B:(k+1)*W*B]`; a full one gives rank r `[r*B:(r+1)*B]`, the
    last partial one is split evenly. A rank left empty gets `order[0]` with scale 0. The
    scale, W*b_r/b, makes the average over ranks of each rank's mean loss equal the mean loss
    over the whole global batch (see the module docstring). With W=1: the plain batch, scale 1.
    """
    global_size = batch_size * world_size
    batch = np.asarray(order)[index * global_size:(index + 1) * global_size]
    count = len(batch)
    if count == 0:
        raise IndexError(f"batch {index} is past the end of {len(order)} items.")
    if count == global_size:
        mine = batch[rank * batch_size:(rank + 1) * batch_size]
    else:
        mine = batch[count * rank // world_size:count * (rank + 1) // world_size]
    if len(mine) == 0:
        return np.asarray(order)[:1], np.zeros(1, dtype=np.float32)
    return mine, np.full(len(mine), world_size * len(mine) / count, dtype=np.float32)


def batches_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    """Steps per epoch, the same on every rank."""
    return -(-num_items // (batch_size * world_size))


# --------------------------------------------------------------------------- process group


class Context:
    """This process's part in the job. With world size 1 every collective returns at once."""

    def __init__(self, place: Placement, backend: str | None = None):
        self.place = place
        self.backend = backend

    rank = property(lambda self: self.place.rank)
    world_size = property(lambda self: self.place.world_size)
    local_rank = property(lambda self: self.place.local_rank)
    is_main = property(lambda self: self.place.is_main)
    distributed = property(lambda self: self.place.distributed)

    # ----------------------------------------------------------------- small helpers

    def main_log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` on rank 0, a no-op elsewhere."""
        return log if self.is_main else (lambda _message: None)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def main_first(self, work: Callable[[], object]):
        """Run `work` on rank 0 first, then on each machine's local rank 0, then on the rest:
        data preparation and cache building happen once per file system, never concurrently."""
        if not self.distributed:
            return work()
        stage = 0 if self.is_main else (1 if self.local_rank == 0 else 2)
        result = None
        for current in range(3):
            if current == stage:
                result = work()
            self.barrier()
        return result

    def broadcast_object(self, value):
        """Rank 0's `value` (picklable) on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks of a float64 array."""
        values = np.asarray(values, dtype=np.float64)
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(values.copy()).to(self._comm_device())
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any."""
        if not self.distributed:
            return bool(flag)
        return bool(self.all_reduce_sum(np.array([float(flag)]))[0] > 0)

    def _comm_device(self):
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # ----------------------------------------------------------------- tensors and models

    def _for_backend(self, tensor):
        """`tensor`, or a CPU copy of it where gloo cannot reach its device (MPS, DirectML)."""
        if self.backend == "gloo" and tensor.device.type not in ("cpu", "cuda"):
            return tensor.cpu()
        return tensor

    def _all_reduce_tensors(self, tensors: Sequence, average: bool = False) -> None:
        """Sum (or average) `tensors` over ranks in place, one flat buffer per dtype and bucket."""
        import torch
        import torch.distributed as dist

        pending = []
        for bucket in _buckets(tensors):
            flat = self._for_backend(torch.cat([t.reshape(-1) for t in bucket]))
            pending.append((bucket, flat, dist.all_reduce(flat, async_op=True)))
        for bucket, flat, work in pending:
            work.wait()
            if average:
                flat.div_(self.world_size)
            offset = 0
            for tensor in bucket:
                tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def average_gradients(self, grads: Sequence) -> None:
        """Average the (non-None) gradient tensors over ranks, in place."""
        if not self.distributed:
            return
        import torch

        with torch.no_grad():
            self._all_reduce_tensors([g for g in grads if g is not None], average=True)

    def _variables_op(self, variables, operation: str) -> None:
        import torch
        import torch.distributed as dist

        if not variables:
            return
        with torch.no_grad():
            values = [v.value.detach().clone() for v in variables]
            if operation == "broadcast":
                for bucket in _buckets(values):
                    flat = self._for_backend(torch.cat([t.reshape(-1) for t in bucket]))
                    dist.broadcast(flat, src=0)
                    offset = 0
                    for tensor in bucket:
                        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
                        offset += tensor.numel()
            else:
                self._all_reduce_tensors(values, average=True)
            for variable, value in zip(variables, values):
                variable.assign(value)

    def broadcast_training_state(self, model) -> None:
        """Give every rank rank 0's weights (float model variables) and optimizer variables.

        Builds the optimizer first so that its slots exist everywhere. Integer variables of the
        model (the seed states of augmentation and dropout) stay per rank on purpose.
        """
        if not self.distributed:
            return
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        variables = [v for v in model.variables if _is_float(v)]
        if model.optimizer is not None:
            variables += list(model.optimizer.variables)
        self._variables_op(variables, "broadcast")

    def average_moving_statistics(self, model) -> None:
        """Average the float non-trainable variables (BatchNorm moving mean and variance; frozen
        weights are equal everywhere and stay so) over ranks."""
        if self.distributed:
            self._variables_op([v for v in model.non_trainable_variables if _is_float(v)], "average")

    def reduce_metric_states(self, model) -> None:
        """Sum the state variables of the model's metrics over ranks (they are sums and counts)."""
        if self.distributed:
            variables = [v for metric in model.metrics for v in metric.variables]
            import torch

            with torch.no_grad():
                values = [v.value.detach().clone() for v in variables]
                self._all_reduce_tensors(values)
                for variable, value in zip(variables, values):
                    variable.assign(value)

    # ----------------------------------------------------------------- Keras pieces

    def averaging_optimizer(self, optimizer):
        """`optimizer` unchanged with world size 1; else the same optimizer (class and config)
        whose `apply` averages the gradients over ranks first."""
        if not self.distributed:
            return optimizer
        base = type(optimizer)
        context = self

        class GradientAveraging(base):
            def apply(self, grads, trainable_variables=None):
                context.average_gradients(grads)
                return super().apply(grads, trainable_variables)

        GradientAveraging.__name__ = GradientAveraging.__qualname__ = f"GradientAveraging{base.__name__}"
        return GradientAveraging.from_config(optimizer.get_config())

    def callbacks(self, val_data, *, log_prefix: str = "val_"):
        """(first, last): the epoch-end callback (moving statistics, training metrics, whole-set
        validation) to put before every other, and the per-step stop agreement to put after."""
        epoch_end, stop_together = _callback_classes()
        return epoch_end(self, val_data, log_prefix), stop_together(self)


def _is_float(variable) -> bool:
    return variable.value.is_floating_point()


def _buckets(tensors: Sequence):
    """Consecutive groups of same-dtype, same-device tensors of about BUCKET_BYTES."""
    bucket, size = [], 0
    for tensor in tensors:
        if bucket and (tensor.dtype != bucket[0].dtype or tensor.device != bucket[0].device
                       or size + tensor.numel() * tensor.element_size() > BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
    if bucket:
        yield bucket


_CONTEXT: Context | None = None


def context(device_kind: str = "cpu") -> Context:
    """This process's Context; under torchrun the first call starts the process group
    (NCCL when `device_kind` is cuda and NCCL is available, else gloo) and later calls return it."""
    global _CONTEXT
    place = placement_from_environment()
    if not place.distributed:
        return Context(place)
    if _CONTEXT is not None:
        return _CONTEXT
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun.")
    backend = "nccl" if device_kind == "cuda" and dist.is_nccl_available() else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise DistributedError("torch.distributed has neither NCCL for this device nor gloo.")
    if backend == "nccl":
        import torch

        torch.cuda.set_device(place.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=collective_timeout())
    _CONTEXT = Context(place, backend)
    return _CONTEXT


def close() -> None:
    """End the process group started by `context` (after a finished run)."""
    global _CONTEXT
    if _CONTEXT is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _CONTEXT = None


# --------------------------------------------------------------------------- callbacks


def _callback_classes():
    """The two callbacks, defined on first use: this module is imported before Keras is."""
    import keras

    class EpochEnd(keras.callbacks.Callback):
        """At the end of every epoch: average moving statistics, sum training metrics over ranks,
        and validate on the whole validation set (each rank its shard).

        Writes val_loss, val_accuracy and val_balanced_accuracy into the epoch's logs, which Keras
        passes on to the later callbacks (early stopping, plateau schedule, checkpoint, history).
        """

        def __init__(self, context: Context, val_data, prefix: str):
            super().__init__()
            self.context = context
            self.val_data = val_data
            self.prefix = prefix

        def on_epoch_end(self, epoch, logs=None):
            if logs is None:
                return
            self.context.average_moving_statistics(self.model)
            if self.context.distributed:
                self.context.reduce_metric_states(self.model)
                logs.update({key: float(value) for key, value in self.model.get_metrics_result().items()})
            logs.update({self.prefix + key: value for key, value in
                         validation_metrics(self.model, self.val_data, self.context).items()})

    class StopTogether(keras.callbacks.Callback):
        """After every step: if any rank wants to stop (TerminateOnNaN), all stop at that step, so
        none is left waiting in the next all-reduce."""

        def __init__(self, context: Context):
            super().__init__()
            self.context = context

        def on_train_batch_end(self, batch, logs=None):
            if self.context.distributed:
                self.model.stop_training = self.context.any(self.model.stop_training)

    return EpochEnd, StopTogether


def validation_counts(model, data, num_classes: int) -> np.ndarray:
    """[loss sum, images, hits, true counts (C), hits per class (C)] over this rank's shard."""
    import keras

    probabilities = model.predict(data, verbose=0)
    labels = np.concatenate([data.labels[data.batch_indices(k)] for k in range(len(data))])
    weights = np.concatenate([data.batch_weights(k) for k in range(len(data))]) > 0
    probabilities, labels = probabilities[weights], labels[weights]
    losses = keras.ops.convert_to_numpy(model.loss.call(keras.ops.convert_to_tensor(labels),
                                                        keras.ops.convert_to_tensor(probabilities)))
    hits = probabilities.argmax(axis=1) == labels
    true_counts = np.bincount(labels, minlength=num_classes)
    hit_counts = np.bincount(labels[hits], minlength=num_classes)
    return np.concatenate([[np.sum(losses, dtype=np.float64), len(labels), hits.sum()], true_counts, hit_counts])


def validation_metrics(model, data, context: Context) -> dict[str, float]:
    """loss, accuracy and balanced_accuracy of `model` over the whole validation set."""
    num_classes = int(model.output_shape[-1])
    counts = context.all_reduce_sum(validation_counts(model, data, num_classes))
    loss_sum, images, hits = counts[:3]
    true_counts, hit_counts = counts[3:3 + num_classes], counts[3 + num_classes:]
    present = true_counts > 0
    return {
        "loss": float(loss_sum / images),
        "accuracy": float(hits / images),
        "balanced_accuracy": float(np.mean(hit_counts[present] / true_counts[present])),
    }
