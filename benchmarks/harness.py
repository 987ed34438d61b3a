"""Benchmarks: is Keras 3 on torch as fast here as plain PyTorch, and where does time go?

Sections (each a list of interleaved, repeated measurements; medians reported):

    train      model.fit on torch, run as keras_ham.train runs it (inside
               keras_ham.internals.keras_torch_fast_path), vs torchvision.models.resnet50 in
               both memory formats and a plain torch loop over the SAME Keras model, with
               torch.optim.AdamW, the same smoothed cross-entropy, batches and data, one step
               of each after every fit step; and model.fit on TensorFlow. images/s, warm-up
               excluded.
    inference  keras_ham.predict.Predictor vs plain torch (the Keras model called under
               torch.inference_mode()); Keras model.predict and TensorFlow for context.
               Batch images/s and single-image latency p50/p95.
    loader     HamDataset batches: decoding JPEGs, building the uint8 cache, reading it.
    gradcam    GradCAM.cam on one image vs one forward+backward pass to all parameters.
    memory     peak RSS while training (sampled per phase) and of each worker process.
    breakdown  (not in the default set) why Keras on torch is slower than its own ops:
               Keras call, Keras call without its conv layout copies, with the whole torch
               fast path (no copies, fused BatchNorm); and a training step of each: Keras's
               own layers, without the copies, and with the fast path.

Every backend runs in its own worker process (`python -m benchmarks.harness --worker PARAMS
OUT`, with KERAS_BACKEND set), so TensorFlow and torch never share threads or memory.
Inside a worker, the things compared run interleaved (A, B, A, B, ...) and ratios are the
medians of per-pair ratios, which cancels most of the drift of a shared, loaded machine;
each comes with a 95 % interval from the spread of its pairs, and a target inside that
interval is reported as undecided by the run. The load average is recorded before and after
each worker.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from keras_ham.errors import KerasHamError
from keras_ham.io_utils import write_json_atomic
from keras_ham.machine import (cpu_generation, cpu_model, cpu_vector_extensions, kernel_overrides, load_average,
                               package_version)

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "inference", "loader", "gradcam", "memory")
EXTRA_SECTIONS = ("breakdown",)
BACKENDS = ("torch", "tensorflow")
#: Real HAM10000 subset used when present (as tests/conftest.py finds it).
DEFAULT_REAL_DATA = Path(os.environ.get("KERAS_HAM_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "ham10000-224"))
#: Size of generated JPEGs when no real data is found: the Kaggle download's 600x450.
GENERATED_IMAGE_SIZE = (600, 450)

#: Maintained inference engines compared with the Predictor (torch, CPU).
ENGINES = ("onnxruntime", "torch_compile")

#: At most this many images are read for training measurements; longer runs read them round and
#: round (timing needs steps, not distinct images: the real subset has 5,984, and 100 pairs at
#: batch 32 with settling steps read 6,560 batches' worth). Fewer images also build the cache sooner.
TRAIN_IMAGE_POOL = 2048

#: The torchvision anchor's memory formats (torch.channels_last / torch.contiguous_format).
TORCHVISION_FORMATS = ("nchw", "channels_last")

#: Memory workers: each trains ONE thing in a fresh process, so its peak RSS is its own.
MEMORY_CONTENDERS = ("keras_fit_torch", *(f"torchvision_{f}" for f in TORCHVISION_FORMATS))

#: Targets from the project brief: (json path, comparison, threshold).
TARGETS = {
    "train.keras_vs_torchvision_ratio": (">=", 0.95),
    "inference.predictor_vs_torchvision_ratio": (">=", 1.0),
    "memory.train_peak_rss_vs_torchvision_ratio": ("<=", 1.2),
    "train.keras_vs_torch_ratio": (">=", 0.95),
    "inference.keras_vs_torch_ratio": (">=", 0.95),
    "loader.cached_vs_train_ratio": (">=", 10.0),
    "gradcam.vs_forward_backward_ratio": ("<=", 1.5),
}


class BenchError(KerasHamError, RuntimeError):
    """The benchmark cannot run as asked (bad option, missing data, a worker failed)."""


@dataclass(frozen=True)
class BenchOptions:
    """What to measure. `steps` measured steps per repeat; `repeats` interleaved repeats per
    worker; `rounds` runs of every worker (torch, tensorflow, torch, ...) for cross-backend
    ratios. `data_dir` None: the real subset if present, else generated JPEGs."""

    image_size: int = 128
    batch_size: int = 32
    steps: int = 5
    warmup_steps: int = 2
    #: Untimed steps each contender runs before each of its timed ones (see `_timed_fit`).
    settle_steps: int = 1
    repeats: int = 3
    rounds: int = 1
    model: str = "resnet50"
    sections: tuple[str, ...] = SECTIONS
    backends: tuple[str, ...] = BACKENDS
    latency_runs: int = 20
    loader_images: int = 256
    data_dir: str | None = None
    generated_data: bool = False
    device: str = "cpu"
    threads: int | None = None
    engines: tuple[str, ...] = ENGINES
    #: Train with `model.jit_compile = True` (torch.compile on torch, XLA on TensorFlow).
    jit_compile: bool = False
    quick: bool = False

    def __post_init__(self) -> None:
        _validate_options(self)


#: `--quick`: tiny sizes for a smoke test of the whole benchmark (numbers mean little).
QUICK_OPTIONS = {
    "image_size": 32,
    "batch_size": 4,
    "steps": 2,
    "warmup_steps": 1,
    "repeats": 2,
    "model": "resnet18",
    "latency_runs": 5,
    "loader_images": 16,
    "engines": ("onnxruntime",),  # torch.compile takes minutes on a small CPU even for tiny models
}


def make_options(*, quick: bool = False, **overrides) -> BenchOptions:
    """Options from the defaults (or the quick preset), then non-None `overrides`."""
    values = dict(QUICK_OPTIONS) if quick else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    return BenchOptions(quick=quick, **values)


def parse_list(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); BenchError naming the unknown items and the allowed ones."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise BenchError(f"{what} {text!r}: expected a comma-separated list of {', '.join(allowed)}.")
    return tuple(dict.fromkeys(items))


def _validate_options(options: BenchOptions) -> None:
    checks = {
        "image_size": (32, 1024),
        "batch_size": (1, 4096),
        "steps": (1, 100000),
        "warmup_steps": (1, 1000),
        "settle_steps": (0, 100),
        "repeats": (1, 1000),
        "rounds": (1, 100),
        "latency_runs": (2, 100000),
        "loader_images": (1, 1000000),
    }
    for name, (low, high) in checks.items():
        value = getattr(options, name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise BenchError(f"{name}: expected an integer in [{low}, {high}], received {value!r}.")
    if options.model not in ("resnet50", "resnet18"):
        raise BenchError(f"model: expected resnet50 or resnet18, received {options.model!r}.")
    unknown = [s for s in options.sections if s not in SECTIONS + EXTRA_SECTIONS]
    if unknown or not options.sections:
        raise BenchError(f"sections {list(options.sections)}: expected some of {', '.join(SECTIONS + EXTRA_SECTIONS)}.")
    if not options.backends or any(b not in BACKENDS for b in options.backends) or "torch" not in options.backends:
        raise BenchError(f"backends {list(options.backends)}: expected torch, optionally with tensorflow.")
    if any(engine not in ENGINES for engine in options.engines):
        raise BenchError(f"engines {list(options.engines)}: expected some of {', '.join(ENGINES)} (or none).")
    if options.threads is not None and not (isinstance(options.threads, int) and options.threads >= 1):
        raise BenchError(f"threads: expected an integer >= 1, received {options.threads!r}.")
    if options.device not in ("auto", "cpu", "cuda", "mps", "directml"):
        raise BenchError(f"device: expected auto, cpu, cuda, mps or directml, received {options.device!r}.")


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation as numpy's default."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def pair_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """numerator / denominator of each pair measured back to back."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("paired ratios need two equally long, non-empty sequences.")
    return [a / b for a, b in zip(numerators, denominators)]


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of per-pair ratios: robust to load that changes between pairs."""
    return median(pair_ratios(numerators, denominators))


#: Confidence level of the intervals reported beside the paired ratios.
CONFIDENCE = 0.95


def paired_ratio_interval(numerators: Sequence[float], denominators: Sequence[float],
                          confidence: float = CONFIDENCE) -> list[float] | None:
    """A distribution-free confidence interval of the median per-pair ratio (order statistics
    of the ratios, scipy's `quantile_test`), or None where there are too few pairs for one
    (fewer than 6 at 95 %).

    It measures the noise between the pairs of one run only; a VM's slower hour moves whole
    runs, so a ratio near its target needs several runs as well (README "Performance")."""
    from scipy.stats import quantile_test

    ratios = np.asarray(pair_ratios(numerators, denominators), dtype=np.float64)
    # the interval of the median (p=0.5) does not depend on the hypothesised value q
    interval = quantile_test(ratios, p=0.5).confidence_interval(confidence)
    low, high = float(interval.low), float(interval.high)
    return [low, high] if np.isfinite(low) and np.isfinite(high) else None


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU, cores, memory and library versions, without importing torch, Keras or TF."""
    import psutil

    return {
        "cpu_model": cpu_model(),
        "cpu_generation": cpu_generation(),
        "cpu_vector_extensions": cpu_vector_extensions(),
        "kernel_overrides": kernel_overrides(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": package_version("torch"),
            "keras": package_version("keras"),
            "tensorflow": package_version("tensorflow", "tensorflow-cpu"),
            "numpy": package_version("numpy"),
            "pillow": package_version("pillow"),
        },
        "load_average": load_average(),
    }


# --------------------------------------------------------------------------- data


def _generated_images(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` smooth random RGB JPEGs of the Kaggle size (600x450), so decoding costs what
    real photographs cost (white noise would compress and decode very differently)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = GENERATED_IMAGE_SIZE
    paths = []
    for index in range(count):
        coarse = rng.uniform(40, 230, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        path = out_dir / f"BENCH_{index:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def prepare_images(options: BenchOptions, work_dir: Path, count: int) -> dict:
    """{'source', 'dir', 'paths', 'labels'}: the first `count` real images, or generated ones."""
    from keras_ham.labels import CLASS_TO_INDEX, NUM_CLASSES

    data_dir = None if options.generated_data else Path(options.data_dir) if options.data_dir else DEFAULT_REAL_DATA
    metadata = None if data_dir is None else data_dir / "HAM10000_metadata.csv"
    if options.data_dir and not options.generated_data and not metadata.is_file():
        raise BenchError(f"{metadata}: not found; --data-dir must hold HAM10000_metadata.csv and the image folders.")
    if metadata is not None and metadata.is_file():
        from keras_ham.metadata import EVAL_COLUMNS, read_metadata, require_image_paths

        frame = read_metadata(metadata, required=EVAL_COLUMNS).head(count)
        if len(frame) < count:
            raise BenchError(f"{metadata}: {len(frame)} images, the benchmark needs {count}.")
        paths = require_image_paths(frame, metadata)
        labels = [CLASS_TO_INDEX[dx] for dx in frame["dx"]]
        return {"source": "real", "dir": str(data_dir), "paths": [str(p) for p in paths], "labels": labels}
    paths = _generated_images(work_dir / "images", count)
    labels = [index % NUM_CLASSES for index in range(count)]
    return {"source": "generated", "dir": str(work_dir / "images"), "paths": [str(p) for p in paths], "labels": labels}


# --------------------------------------------------------------------------- orchestration


def _worker_tasks(options: BenchOptions, backend: str) -> list[str]:
    """Tasks of one backend's worker, training first (its peak RSS is then the training peak).
    Grad-CAM, the loader and the breakdown are measured on torch only. `memory` alone runs
    only the isolated memory workers (the ratio comes from them), not the training worker."""
    wanted = set(options.sections)
    tasks = ["train"] if "train" in wanted else []
    extra = ("inference", "gradcam", "loader", "breakdown") if backend == "torch" else ("inference",)
    return tasks + [task for task in extra if task in wanted]


def _run_worker(params: dict, backend: str, work_dir: Path, tag: str, log: Callable[[str], None]) -> dict:
    params_path = work_dir / f"params-{tag}.json"
    out_path = work_dir / f"result-{tag}.json"
    write_json_atomic(params_path, params)
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=python_path)
    if params["options"]["threads"]:
        env["OMP_NUM_THREADS"] = str(params["options"]["threads"])
    log(f"[{tag}] {backend} worker: {', '.join(params['tasks'])} (load {load_average()})")
    started = time.perf_counter()
    stderr_path = work_dir / f"stderr-{tag}.txt"
    command = [sys.executable, "-m", "benchmarks.harness", "--worker", str(params_path), str(out_path)]
    with open(stderr_path, "w", encoding="utf-8") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            for line in process.stdout:  # the worker's progress lines, shown as they come
                log(f"[{tag}] {line.rstrip()}")
            returncode = process.wait()
        except BaseException:  # Ctrl-C: do not leave the worker running
            process.kill()
            process.wait()
            raise
    if returncode != 0 or not out_path.is_file():
        text = stderr_path.read_text(encoding="utf-8", errors="replace").strip()
        tail = "\n".join(text.splitlines()[-15:])
        raise BenchError(f"{backend} worker ({', '.join(params['tasks'])}) failed with exit code {returncode}:\n{tail}")
    result = json.loads(out_path.read_text(encoding="utf-8"))
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    log(f"[{tag}] done in {result['wall_seconds']} s")
    return result


def run_benchmarks(options: BenchOptions, out_path: str | os.PathLike | None = None, *,
                   log: Callable[[str], None] = print, argv: Sequence[str] | None = None) -> dict:
    """Run every selected section in worker processes; return (and write to `out_path`,
    atomically) the results document described in the module docstring."""
    backends = [b for b in options.backends if b == "torch" or importlib.util.find_spec(b) is not None]
    skipped = [b for b in options.backends if b not in backends]
    started = time.perf_counter()
    machine = machine_info()
    log(f"machine: {_cpu_name(machine)}, {machine['logical_cores']} cores, load {machine['load_average']}")
    work_dir = Path(tempfile.mkdtemp(prefix="keras-ham-bench-"))
    try:
        train_images = min(options.batch_size * train_steps_needed(options),
                           max(TRAIN_IMAGE_POOL, options.batch_size))
        count = max(train_images, options.loader_images, options.batch_size)
        data = prepare_images(options, work_dir, count)
        log(f"data: {len(data['paths'])} {data['source']} images from {data['dir']}")
        shared = {
            "options": dataclasses.asdict(options),
            "paths": data["paths"],
            "labels": data["labels"],
            "train_images": train_images,
            "cache_dir": str(work_dir / "cache"),
            "work_dir": str(work_dir),
        }
        workers: list[dict] = []
        for round_index in range(options.rounds):
            for backend in backends:
                tasks = _worker_tasks(options, backend)
                if tasks:
                    tag = f"{backend}-{round_index + 1}"
                    result = _run_worker({**shared, "tasks": tasks}, backend, work_dir, tag, log)
                    workers.append({"backend": backend, "round": round_index + 1, **result})
            if "memory" in options.sections:
                for contender in MEMORY_CONTENDERS:
                    if contender.startswith("torchvision_") and importlib.util.find_spec("torchvision") is None:
                        continue
                    tag = f"memory-{contender}-{round_index + 1}"
                    result = _run_worker({**shared, "tasks": [f"memory_{contender}"]}, "torch", work_dir, tag, log)
                    workers.append({"backend": "torch", "round": round_index + 1, "memory_worker": contender, **result})
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    results = summarize(options, machine, data, workers)
    results["skipped_backends"] = skipped
    results["load_average_end"] = load_average()
    results["command"] = list(argv) if argv is not None else None
    results["seconds_total"] = round(time.perf_counter() - started, 1)
    if out_path is not None:
        write_json_atomic(out_path, results)
    return results


# --------------------------------------------------------------------------- summary


def _collect(workers: list[dict], backend: str, section: str) -> list[dict]:
    return [w["tasks"][section] for w in workers if w["backend"] == backend and section in w.get("tasks", {})]


def _ips(batch_size: int, seconds: Sequence[float]) -> float:
    return batch_size / median(seconds)


def summarize(options: BenchOptions, machine: dict, data: dict, workers: list[dict]) -> dict:
    """The results document from the workers' raw timings (pure: no measuring here)."""
    batch = options.batch_size
    results: dict = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "options": dataclasses.asdict(options),
        "machine": machine,
        "data": {"source": data["source"], "dir": data["dir"], "images": len(data["paths"])},
        "workers": [
            {key: w.get(key) for key in ("backend", "round", "tasks_run", "wall_seconds", "load_before", "load_after",
                                         "runtime", "peak_rss_mb_process", "memory_worker")}
            for w in workers
        ],
    }
    torch_train = _collect(workers, "torch", "train")
    tf_train = _collect(workers, "tensorflow", "train")
    if "train" in options.sections and torch_train:
        steps = lambda name: [s for t in torch_train for s in t.get(f"{name}_seconds_per_step", [])]  # noqa: E731
        fit, loop = steps("fit"), steps("loop")
        fit_repeat = [s for t in torch_train for s in t["fit_repeat_seconds_per_step"]]
        loop_repeat = [s for t in torch_train for s in t["loop_repeat_seconds_per_step"]]
        train = {
            "images_per_second": {"keras_fit_torch": _ips(batch, fit), "torch_loop": _ips(batch, loop)},
            # images/s ratio = inverse ratio of the step times, pair by pair
            "keras_vs_torch_ratio": paired_ratio(loop, fit),
            "keras_vs_torch_ratio_interval": paired_ratio_interval(loop, fit),
            "keras_vs_torch_ratio_per_repeat": [round(b / a, 4) for a, b in zip(fit_repeat, loop_repeat)],
        }
        anchors = {f: steps(f"torchvision_{f}") for f in TORCHVISION_FORMATS if steps(f"torchvision_{f}")}
        if anchors:
            _against_torchvision(train, anchors, fit, batch, "keras_vs_torchvision_ratio")
            for memory_format, values in anchors.items():
                train[f"keras_vs_torchvision_{memory_format}_ratio"] = paired_ratio(values, fit)
        warmup = [s for t in torch_train for s in t.get("warmup_fit_seconds_per_step", [])]
        train["cpu_seconds_per_wall_second"] = torch_train[0].get("cpu_seconds_per_wall_second")
        train.update({
            "measured_steps_each": len(fit),
            "batch_size": batch,
            "warmup_fit_seconds_per_step": warmup,
            "keras_torch_jit_compile": torch_train[0].get("jit_compile"),
            "keras_torch_fast_path": ("keras_ham.internals.keras_torch_fast_path (conv inputs as views, one shared "
                                      "per input, fused BatchNorm, freeing graph walk calling plain layers directly, "
                                      "in-place bias add, ReLU and residual Add, a conv bias left to its batch "
                                      "norm, a ReLU's zero padding left to its max pool, grid_sample augmentation, "
                                      "AdamW tensor by tensor in cache-sized pieces) with channels_last-stored "
                                      "kernels"),
            "notes": "images/s from the median step time (data loading included) after warm-up, all in ONE fit "
                     "call. After every fit step (inside fit's batch-end callback) one step each of the plain "
                     "torch loop over the same Keras model and of torchvision's model in NCHW and channels_last "
                     "runs, so they alternate step by step; ratios are medians of the per-step pairs. "
                     "keras_vs_torchvision_ratio is against the faster torchvision format (torchvision_format). "
                     "*_interval: a 95 % distribution-free interval of that median (the noise between this "
                     "run's pairs; not the drift between runs).",
        })
        if tf_train:
            tf_steps = [s for t in tf_train for s in t["fit_seconds_per_step"]]
            train["images_per_second"]["keras_fit_tensorflow"] = _ips(batch, tf_steps)
            train["keras_torch_vs_tensorflow_ratio"] = train["images_per_second"]["keras_fit_torch"] / _ips(batch, tf_steps)
            train["tensorflow_jit_compile"] = tf_train[0].get("jit_compile")
        results["train"] = train
    if "inference" in options.sections:
        results["inference"] = _summarize_inference(workers, batch)
    torch_loader = _collect(workers, "torch", "loader")
    if torch_loader:
        loader = {
            "images_per_second": {
                "uncached": median([t["uncached_images_per_second"] for t in torch_loader]),
                "cache_build": median([t["cache_build_images_per_second"] for t in torch_loader]),
                "cached": median([ips for t in torch_loader for ips in t["cached_images_per_second"]]),
            },
            "images": torch_loader[0]["images"],
            "batch_size": batch,
            "cache_build_threads": torch_loader[0]["cache_build_threads"],
        }
        train_ips = results.get("train", {}).get("images_per_second", {}).get("keras_fit_torch")
        loader["cached_vs_train_ratio"] = loader["images_per_second"]["cached"] / train_ips if train_ips else None
        loader["uncached_vs_train_ratio"] = loader["images_per_second"]["uncached"] / train_ips if train_ips else None
        results["loader"] = loader
    torch_gradcam = _collect(workers, "torch", "gradcam")
    if torch_gradcam:
        cam = [s for t in torch_gradcam for s in t["gradcam_seconds"]]
        full = [s for t in torch_gradcam for s in t["forward_backward_seconds"]]
        forward = [s for t in torch_gradcam for s in t["forward_seconds"]]
        results["gradcam"] = {
            "seconds": {"gradcam": median(cam), "forward_backward": median(full), "forward": median(forward)},
            "vs_forward_backward_ratio": paired_ratio(cam, full),
            "vs_forward_backward_ratio_interval": paired_ratio_interval(cam, full),
            "layer": torch_gradcam[0]["layer"],
            "runs": len(cam),
        }
    if "memory" in options.sections and (torch_train or tf_train or any(w.get("memory_worker") for w in workers)):
        memory: dict = {"peak_rss_mb": {}, "rss_before_training_mb": {}}
        for backend, trains in (("torch", torch_train), ("tensorflow", tf_train)):
            for t in trains:
                for phase, value in t["peak_rss_mb"].items():
                    key = f"{backend}_{phase}"
                    memory["peak_rss_mb"][key] = max(memory["peak_rss_mb"].get(key, 0.0), value)
                memory["rss_before_training_mb"][backend] = t["rss_before_training_mb"]
                key = f"{backend}_process_after_training"
                memory["peak_rss_mb"][key] = max(memory["peak_rss_mb"].get(key, 0.0), t["ru_maxrss_mb"])
        isolated = {}
        for w in workers:
            if w.get("memory_worker") and "memory" in w.get("tasks", {}):
                task = w["tasks"]["memory"]
                isolated[task["contender"]] = max(isolated.get(task["contender"], 0.0), task["ru_maxrss_mb"])
                memory.setdefault("isolated_workers", {})[task["contender"]] = {
                    key: task.get(key) for key in ("steps", "rss_before_training_mb", "peak_rss_mb", "keras_imported")}
        if isolated:
            memory["train_peak_rss_mb_isolated"] = isolated
            anchor = results.get("train", {}).get("torchvision_format", "channels_last")
            anchor_key = f"torchvision_{anchor}" if f"torchvision_{anchor}" in isolated else None
            anchor_key = anchor_key or next((k for k in isolated if k.startswith("torchvision_")), None)
            if anchor_key and "keras_fit_torch" in isolated:
                memory["torchvision_format"] = anchor_key.removeprefix("torchvision_")
                memory["train_peak_rss_vs_torchvision_ratio"] = isolated["keras_fit_torch"] / isolated[anchor_key]
        memory["notes"] = ("peak_rss_mb: sampled every 10 ms per phase inside the interleaved training worker (phases "
                           "share one process, so later phases include earlier allocations); "
                           "train_peak_rss_mb_isolated: ru_maxrss of a fresh process that trains only that "
                           "contender (1 + warm-up + steps steps; the torchvision one never imports Keras); the "
                           "ratio is against the torchvision format that trained faster.")
        results["memory"] = memory
    torch_breakdown = _collect(workers, "torch", "breakdown")
    if torch_breakdown:
        results["breakdown"] = _summarize_breakdown(torch_breakdown, batch)
    results["targets"] = check_targets(results)
    return results


def _against_torchvision(section: dict, anchors: dict[str, list[float]], ours: Sequence[float], batch: int,
                         ratio_name: str) -> None:
    """Into `section`: torchvision's images/s per memory format, the faster format, and
    `ratio_name` = ours / the faster format, from per-step pairs (> 1: ours is faster)."""
    for memory_format, values in anchors.items():
        section["images_per_second"][f"torchvision_{memory_format}"] = _ips(batch, values)
    faster = min(anchors, key=lambda f: median(anchors[f]))
    section["torchvision_format"] = faster
    section[ratio_name] = paired_ratio(anchors[faster], ours)
    section[f"{ratio_name}_interval"] = paired_ratio_interval(anchors[faster], ours)
    section[f"{ratio_name}_per_pair"] = [round(ratio, 4) for ratio in pair_ratios(anchors[faster], ours)]


def _summarize_inference(workers: list[dict], batch: int) -> dict:
    torch_runs = _collect(workers, "torch", "inference")
    tf_runs = _collect(workers, "tensorflow", "inference")
    inference: dict = {"images_per_second": {}, "latency_ms": {}, "batch_size": batch}
    if not torch_runs:
        return inference
    names = {"predictor": "predictor_torch", "predictor_keras_path": "predictor_torch_keras_path",
             "torch_plain": "torch_plain", "keras_predict": "keras_predict_torch"}
    for key, label in names.items():
        inference["images_per_second"][label] = _ips(batch, [s for t in torch_runs for s in t["batch_seconds"][key]])
    for key in ("predictor", "torch_plain", "keras_predict"):
        values = [s for t in torch_runs for s in t["latency_seconds"][key]]
        inference["latency_ms"][names[key]] = {"p50": 1000 * percentile(values, 50), "p95": 1000 * percentile(values, 95)}
    predictor = [s for t in torch_runs for s in t["batch_seconds"]["predictor"]]
    plain = [s for t in torch_runs for s in t["batch_seconds"]["torch_plain"]]
    keras_path = [s for t in torch_runs for s in t["batch_seconds"]["predictor_keras_path"]]
    # images/s ratio = inverse time ratio
    inference["keras_vs_torch_ratio"] = paired_ratio(plain, predictor)
    inference["keras_vs_torch_ratio_interval"] = paired_ratio_interval(plain, predictor)
    inference["keras_path_vs_torch_ratio"] = paired_ratio(plain, keras_path)
    single_predictor = [s for t in torch_runs for s in t["latency_seconds"]["predictor"]]
    single_plain = [s for t in torch_runs for s in t["latency_seconds"]["torch_plain"]]
    inference["single_image_keras_vs_torch_ratio"] = paired_ratio(single_plain, single_predictor)
    seconds = lambda key: [s for t in torch_runs for s in t["batch_seconds"].get(key, [])]  # noqa: E731
    anchors = {f: seconds(f"torchvision_{f}") for f in TORCHVISION_FORMATS if seconds(f"torchvision_{f}")}
    if anchors:
        _against_torchvision(inference, anchors, predictor, batch, "predictor_vs_torchvision_ratio")
    engines: dict = {"images_per_second": {}, "vs_predictor_ratio": {}}
    for engine in ENGINES:
        if seconds(engine):
            engines["images_per_second"][engine] = _ips(batch, seconds(engine))
            # > 1: the engine is faster than the Predictor (which runs the ONNX export, as after training)
            engines["vs_predictor_ratio"][engine] = paired_ratio(predictor, seconds(engine))
            values = [s for t in torch_runs for s in t["latency_seconds"].get(engine, [])]
            if values:
                inference["latency_ms"][engine] = {"p50": 1000 * percentile(values, 50),
                                                   "p95": 1000 * percentile(values, 95)}
    for key, value in torch_runs[0].get("engines", {}).items():
        if key != "warmup_seconds":
            engines[key] = value
    engines["warmup_seconds"] = torch_runs[0].get("engines", {}).get("warmup_seconds")
    inference["engines"] = engines
    inference["fast_path"] = all(t["fast_path"] for t in torch_runs)
    inference["predictor_engine"] = torch_runs[0].get("predictor_engine")
    inference["predictor_build_seconds"] = median([t["predictor_build_seconds"] for t in torch_runs])
    inference["fast_path_max_abs_difference"] = max(t["max_abs_difference"] for t in torch_runs)
    if tf_runs:
        inference["images_per_second"]["predictor_tensorflow"] = _ips(
            batch, [s for t in tf_runs for s in t["batch_seconds"]["predictor"]])
        inference["images_per_second"]["keras_predict_tensorflow"] = _ips(
            batch, [s for t in tf_runs for s in t["batch_seconds"]["keras_predict"]])
        values = [s for t in tf_runs for s in t["latency_seconds"]["predictor"]]
        inference["latency_ms"]["predictor_tensorflow"] = {"p50": 1000 * percentile(values, 50),
                                                           "p95": 1000 * percentile(values, 95)}
        inference["predictor_torch_vs_tensorflow_ratio"] = (
            inference["images_per_second"]["predictor_torch"] / inference["images_per_second"]["predictor_tensorflow"])
    inference["notes"] = ("keras_vs_torch_ratio: Predictor (the project's path) / plain torch calling the same Keras "
                          "model under inference_mode, median of back-to-back pairs; >1 means faster than plain torch. "
                          "predictor_vs_torchvision_ratio: Predictor / torchvision's model (eval, inference_mode, "
                          "normalization included) in its faster memory format. engines.vs_predictor_ratio: "
                          "each engine / the Predictor, which runs the ONNX export as evaluate does after training "
                          "(predictor_engine); predictor_keras_path: the Predictor without the export "
                          "(Keras on its torch fast path).")
    return inference


def _summarize_breakdown(runs: list[dict], batch: int) -> dict:
    keys = runs[0]["batch_seconds"].keys()
    out = {"inference_images_per_second": {k: _ips(batch, [s for r in runs for s in r["batch_seconds"][k]]) for k in keys}}
    if "train_step_seconds" in runs[0]:
        keys = runs[0]["train_step_seconds"].keys()
        out["train_images_per_second"] = {k: _ips(batch, [s for r in runs for s in r["train_step_seconds"][k]]) for k in keys}
    out["profile_top_ops"] = runs[0].get("profile_top_ops")
    return out


def _lookup(results: dict, dotted: str):
    value = results
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def check_targets(results: dict) -> dict:
    """{ratio path: {'value', 'target', 'met', 'interval', 'decided'}} for the ratios that were
    measured. `interval`: the ratio's confidence interval where it is a median of pairs (else
    None); `decided`: False when the target lies inside it, so this run's own noise could
    turn the verdict (None without an interval)."""
    checked = {}
    for path, (comparison, threshold) in TARGETS.items():
        value = _lookup(results, path)
        if value is None:
            continue
        met = value >= threshold if comparison == ">=" else value <= threshold
        interval = _lookup(results, f"{path}_interval")
        decided = None if interval is None else not (interval[0] <= threshold <= interval[1])
        checked[path] = {"value": value, "target": f"{comparison} {threshold}", "met": bool(met),
                         "interval": interval, "decided": decided}
    return checked


def _target_line(path: str, check: dict) -> str:
    verdict = "met" if check["met"] else "MISSED"
    interval = check.get("interval")
    if interval is None:
        return f"target {path} {check['target']}: {_fmt(check['value'])} -> {verdict}"
    noise = "" if check["decided"] else ", but the target is inside this run's interval: run it again"
    return (f"target {path} {check['target']}: {_fmt(check['value'])} "
            f"({round(100 * CONFIDENCE)} % interval {interval[0]:.3f}-{interval[1]:.3f}) -> {verdict}{noise}")


# --------------------------------------------------------------------------- table


def _cpu_name(machine: dict) -> str:
    generation = machine.get("cpu_generation")
    return f"{machine['cpu_model']} ({generation})" if generation else machine["cpu_model"]


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{text}{unit}"
    return f"{value}{unit}"


def format_table(results: dict) -> str:
    """A plain-text table of the headline numbers, ratios and targets."""
    options, machine = results["options"], results["machine"]
    lines = [
        f"keras-ham benchmark: {options['model']} {options['image_size']}px, batch {options['batch_size']}, "
        f"{options['steps']} steps x {options['repeats']} repeats x {options['rounds']} round(s)"
        + (" [quick]" if options.get("quick") else ""),
        f"machine: {_cpu_name(machine)}, {machine['logical_cores']} logical cores; torch "
        f"{machine['versions']['torch']}, keras {machine['versions']['keras']}, tensorflow "
        f"{machine['versions']['tensorflow']}; data: {results['data']['source']}",
        "load average (1/5/15 min) before -> after each worker: "
        + "; ".join(f"{w['backend']}#{w['round']} {w['load_before']} -> {w['load_after']}" for w in results["workers"]),
    ]
    threads = [f"{w['backend']} threads {w['runtime'].get('threads')}" for w in results["workers"] if w.get("runtime")]
    if threads:
        lines.append("; ".join(dict.fromkeys(threads)))
    extensions = machine.get("cpu_vector_extensions")
    if extensions or machine.get("kernel_overrides"):
        overrides = " ".join(f"{name}={value}" for name, value in machine.get("kernel_overrides", {}).items())
        lines.append(f"CPU vector extensions: {', '.join(extensions) or 'none reported'}"
                     + (f"; kernels limited by {overrides} (not this CPU's own speed)" if overrides else ""))
    rows: list[tuple[str, str, str]] = []

    def add(section: str, name: str, value: str) -> None:
        rows.append((section, name, value))

    train = results.get("train")
    if train:
        for name, value in train["images_per_second"].items():
            add("train", name, _fmt(value, " img/s"))
        add("train", "keras fit / torch loop", _fmt(train["keras_vs_torch_ratio"], "x"))
        for name, share in (train.get("cpu_seconds_per_wall_second") or {}).items():
            add("train", f"CPU s per wall s: {name}", _fmt(share))
        if "keras_vs_torchvision_ratio" in train:
            add("train", f"keras fit / torchvision {train['torchvision_format']}",
                _fmt(train["keras_vs_torchvision_ratio"], "x"))
        if "keras_torch_vs_tensorflow_ratio" in train:
            add("train", "keras torch / keras tensorflow", _fmt(train["keras_torch_vs_tensorflow_ratio"], "x"))
    inference = results.get("inference")
    if inference and inference.get("images_per_second"):
        for name, value in inference["images_per_second"].items():
            add("inference", name, _fmt(value, " img/s"))
        for name, value in inference["latency_ms"].items():
            add("inference", f"{name} 1 image", f"p50 {_fmt(value['p50'], ' ms')}, p95 {_fmt(value['p95'], ' ms')}")
        add("inference", "Predictor / plain torch", _fmt(inference.get("keras_vs_torch_ratio"), "x"))
        if "predictor_vs_torchvision_ratio" in inference:
            add("inference", f"Predictor / torchvision {inference['torchvision_format']}",
                _fmt(inference["predictor_vs_torchvision_ratio"], "x"))
        for name, value in inference.get("engines", {}).get("images_per_second", {}).items():
            add("inference", f"engine {name}", _fmt(value, " img/s"))
            add("inference", f"engine {name} / Predictor", _fmt(inference["engines"]["vs_predictor_ratio"][name], "x"))
        for key in ("onnxruntime_error", "torch_compile_error"):
            if key in inference.get("engines", {}):
                add("inference", key.replace("_", " "), str(inference["engines"][key])[:80])
        add("inference", "Predictor without export (Keras) / plain torch", _fmt(inference.get("keras_path_vs_torch_ratio"), "x"))
        if "predictor_torch_vs_tensorflow_ratio" in inference:
            add("inference", "Predictor torch / tensorflow", _fmt(inference["predictor_torch_vs_tensorflow_ratio"], "x"))
    loader = results.get("loader")
    if loader:
        for name, value in loader["images_per_second"].items():
            add("loader", name, _fmt(value, " img/s"))
        add("loader", "cached / training", _fmt(loader["cached_vs_train_ratio"], "x"))
    gradcam = results.get("gradcam")
    if gradcam:
        for name, value in gradcam["seconds"].items():
            add("gradcam", f"{name} (1 image)", _fmt(1000 * value, " ms"))
        add("gradcam", "gradcam / forward+backward", _fmt(gradcam["vs_forward_backward_ratio"], "x"))
    memory = results.get("memory")
    if memory:
        for name, value in memory["peak_rss_mb"].items():
            add("memory", f"peak RSS {name}", _fmt(value, " MB"))
        for name, value in memory.get("train_peak_rss_mb_isolated", {}).items():
            add("memory", f"peak RSS training alone: {name}", _fmt(value, " MB"))
        if "train_peak_rss_vs_torchvision_ratio" in memory:
            add("memory", f"keras / torchvision {memory['torchvision_format']} peak RSS",
                _fmt(memory["train_peak_rss_vs_torchvision_ratio"], "x"))
    breakdown = results.get("breakdown")
    if breakdown:
        for group in ("inference_images_per_second", "train_images_per_second"):
            for name, value in breakdown.get(group, {}).items():
                add("breakdown", f"{group.split('_')[0]}: {name}", _fmt(value, " img/s"))
    width = max((len(r[1]) for r in rows), default=10)
    lines.append("")
    lines.append(f"{'section':<10} {'measurement':<{width}} value")
    lines.append(f"{'-' * 10} {'-' * width} {'-' * 24}")
    lines += [f"{section:<10} {name:<{width}} {value}" for section, name, value in rows]
    if results.get("targets"):
        lines.append("")
        for path, check in results["targets"].items():
            lines.append(_target_line(path, check))
    if results.get("skipped_backends"):
        lines.append(f"skipped (not installed): {', '.join(results['skipped_backends'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- worker side
#
# Everything below runs in a worker process, whose KERAS_BACKEND the parent set; Keras is
# imported only here, after the device and thread settings.


class RssSampler:
    """Peak resident memory per phase, sampled every `interval` s on a daemon thread."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self.phase = "setup"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.rss_mb()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ru_maxrss_mb() -> float:
    """This process's peak RSS so far (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if sys.platform == "darwin" else value / 1024


def torch_smoothed_crossentropy(probabilities, labels, label_smoothing: float, num_classes: int):
    """Plain-torch twin of keras_ham.metrics.SparseCrossentropyWithSmoothing on probabilities:
    mean over the batch of -sum(smoothed one-hot * log(clip(p, 1e-7, 1 - 1e-7)))."""
    import torch
    import torch.nn.functional as F

    target = F.one_hot(labels.long(), num_classes).to(probabilities.dtype)
    target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
    return -(target * torch.log(probabilities.clamp(1e-7, 1.0 - 1e-7))).sum(dim=-1).mean()


def _bench_config(options: dict):
    from keras_ham.config import load_config

    return load_config(overrides={
        "model": options["model"], "image_size": options["image_size"], "batch_size": options["batch_size"],
        "weights": None, "seed": 0,
    })


def _dataset(params: dict, count: int, *, cache_dir: str | None, shuffle: bool = True):
    from keras_ham.dataset import HamDataset

    options = params["options"]
    return HamDataset(params["paths"][:count], np.asarray(params["labels"][:count], dtype=np.int32),
                      image_size=options["image_size"], batch_size=options["batch_size"], shuffle=shuffle,
                      seed=0, cache_dir=cache_dir)


def _timed_fit(model, dataset, steps: int, between: Callable[[], dict[str, float]] | None = None,
               settle: int = 0) -> tuple[list[float], dict[str, list[float]]]:
    """Run ONE `model.fit` of 1 + `steps` x (1 + `settle`) steps; return (seconds of its `steps`
    timed steps, {name: seconds per step} of what `between` ran).

    The first step (iterator start-up) is not timed. With `between`, it runs after every timed
    fit step, inside fit's batch-end callback, and returns the durations of the things it ran:
    fit and the others then take turns (A, B, C, A, B, C), so a change in machine load hits
    all of them. In each turn a contender first runs `settle` untimed steps: the first step
    after another model's is not one a user ever runs, and it is slower (ResNet50, 128 px,
    batch 32, 2-core AMD EPYC family 26: keras-ham's step took 1,035 ms right after a
    torchvision step and 976 ms right after its own; torchvision's 921 and 942 ms), which
    strict alternation charged to fit alone, since it always follows torchvision (`between`
    runs its contenders the same way, and `_interleaved` its functions). A timed fit step runs
    from the end of the previous step to the end of its own batch, so it includes fetching its
    batch, the train step and Keras's bookkeeping. One fit call for the whole measurement: fit
    is not re-entered between repeats (each entry rebuilds the epoch iterator and callbacks,
    and its first step is a start-up step).
    """
    import keras

    fit_seconds: list[float] = []
    other_seconds: dict[str, list[float]] = {}
    resumed = [0.0, 0.0]  # wall clock, process CPU time

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            now, cpu = time.perf_counter(), time.process_time()
            if batch > 0 and (batch - 1) % (1 + settle) == settle:
                fit_seconds.append(now - resumed[0])
                other_seconds.setdefault("fit_cpu", []).append(cpu - resumed[1])
                if between is not None:
                    for name, seconds in between().items():
                        other_seconds.setdefault(name, []).append(seconds)
            resumed[0], resumed[1] = time.perf_counter(), time.process_time()

    from keras_ham.internals import keras_torch_fast_path

    batches = 1 + steps * (1 + settle)
    if len(dataset) < batches:
        dataset = _cycled(dataset, batches)
    with keras_torch_fast_path():  # as keras_ham.train runs fit
        model.fit(dataset, epochs=1, steps_per_epoch=batches, verbose=0, callbacks=[StepTimer()])
    if len(fit_seconds) != steps:
        raise BenchError(f"model.fit ran {len(fit_seconds)} of {steps} timed steps: "
                         f"the dataset has only {len(dataset)} batches.")
    return fit_seconds, other_seconds


def _cycled(dataset, batches: int):
    """`dataset` read round and round as a PyDataset of `batches` batches (see TRAIN_IMAGE_POOL)."""
    import keras

    class Cycled(keras.utils.PyDataset):
        def __len__(self):
            return batches

        def __getitem__(self, index):
            return dataset[index % len(dataset)]

    return Cycled()


def train_steps_needed(options) -> int:
    """Batches one training measurement reads: the untimed first step, then warm-up and measured
    steps, each after its settling steps."""
    get = options.get if isinstance(options, dict) else lambda key: getattr(options, key)
    return 1 + (get("warmup_steps") + get("steps") * get("repeats")) * (1 + get("settle_steps"))


def _train_task(params: dict, choice, sampler: RssSampler, backend: str) -> dict:
    import keras

    from keras_ham.model import build_model

    options = params["options"]
    steps, repeats, warmup = options["steps"], options["repeats"], options["warmup_steps"]
    config = _bench_config(options)
    dataset = _dataset(params, params["train_images"], cache_dir=params["cache_dir"])
    model = build_model(config)
    _compile_as_training(model, config, choice, options.get("jit_compile", False))
    result: dict = {"rss_before_training_mb": sampler.rss_mb()}
    contenders: dict[str, Callable[[], None]] = {}
    if backend == "torch":
        contenders["loop"] = _TorchLoop(model, dataset, config).step
        if _torchvision_available():
            for memory_format in TORCHVISION_FORMATS:
                contenders[f"torchvision_{memory_format}"] = _TorchvisionLoop(options, dataset, config, memory_format).step

    settle = options["settle_steps"] if contenders else 0  # fit alone always follows itself

    def between() -> dict[str, float]:
        seconds = {}
        for name, step in contenders.items():
            sampler.phase = name
            seconds[name], seconds[f"{name}_cpu"] = _settled_call(step, settle)
        sampler.phase = "fit"
        return seconds

    sampler.phase = "fit"
    print(f"  train: 1 + {warmup} warm-up + {steps} x {repeats} measured steps of fit"
          + (f" and {', '.join(contenders)}" if contenders else "")
          + (f", each after {settle} untimed settling step(s)" if settle else ""), flush=True)
    fit_all, others_all = _timed_fit(model, dataset, warmup + steps * repeats, between if contenders else None,
                                     settle=settle)
    fit_steps = fit_all[warmup:]
    others = {name: values[warmup:] for name, values in others_all.items() if not name.endswith("_cpu")}
    # CPU seconds this process got per wall second of a step, over the measured steps: with
    # T threads an idle machine gives about T; much less means others were using the CPU.
    cpu = {name.removesuffix("_cpu"): values[warmup:] for name, values in others_all.items() if name.endswith("_cpu")}
    walls = {"fit": fit_steps, **others}
    result["cpu_seconds_per_wall_second"] = {name: round(sum(cpu[name]) / sum(walls[name]), 3)
                                             for name in cpu if name in walls and sum(walls[name]) > 0}
    chunks = lambda values: [median(values[i * steps:(i + 1) * steps]) for i in range(repeats)]  # noqa: E731
    sampler.phase = "after"
    result.update({
        "fit_seconds_per_step": fit_steps,
        "fit_repeat_seconds_per_step": chunks(fit_steps),
        "peak_rss_mb": {k: round(v, 1) for k, v in sampler.peaks.items() if k in ("fit", *contenders)},
        "ru_maxrss_mb": round(ru_maxrss_mb(), 1),
        "jit_compile": getattr(model, "jit_compile", None),
        "warmup_fit_seconds_per_step": fit_all[:warmup],
    })
    for name, values in others.items():
        result[f"{name}_seconds_per_step"] = values
        result[f"{name}_repeat_seconds_per_step"] = chunks(values)
    del model, contenders
    keras.backend.clear_session()
    return result


def _compile_as_training(model, config, choice, jit_compile: bool = False) -> None:
    """The exact optimizer, loss and metrics of training, in a single process (world size 1);
    `jit_compile` is the lever `--jit-compile` measures (training itself does not set it)."""
    from keras_ham import distributed
    from keras_ham.train import _compile

    _compile(model, config, config.lr, choice, distributed.context(getattr(choice, "kind", "cpu") or "cpu"))
    if jit_compile:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras's own warning; ours names the layers
            model.jit_compile = True
        if not model.jit_compile:  # Keras refuses when any layer has supports_jit=False
            refusing = [layer.name for layer in model.layers if not getattr(layer, "supports_jit", True)]
            print(f"  jit_compile refused by Keras (supports_jit=False: {', '.join(refusing)}); measuring eager",
                  flush=True)


def _torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class _TorchLoop:
    """The plain PyTorch training loop over the Keras model (an nn.Module on torch)."""

    def __init__(self, model, dataset, config):
        import torch

        from keras_ham.labels import NUM_CLASSES
        from keras_ham.device import model_device

        self.model, self.dataset, self.config, self.num_classes = model, dataset, config, NUM_CLASSES
        self.device = model_device(model)
        parameters = [p for p in model.parameters() if p.requires_grad]
        # Keras's AdamW: epsilon 1e-7, decoupled decay variable -= lr * wd * variable, like torch's.
        self.optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, eps=1e-7)
        self.index = 0

    def step(self) -> None:
        import torch

        images, labels = self.dataset[self.index % len(self.dataset)]
        self.index += 1
        probabilities = self.model(torch.from_numpy(images).to(self.device), training=True)
        loss = torch_smoothed_crossentropy(probabilities, torch.from_numpy(labels).to(self.device),
                                           self.config.label_smoothing, self.num_classes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


#: torchvision's ImageNet normalization, applied to 0..255 RGB inside the step (as keras-ham's
#: model preprocesses inside the model).
_TORCHVISION_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_TORCHVISION_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class _TorchvisionLoop:
    """The anchor: `torchvision.models.<model>(num_classes=7)` trained by a plain PyTorch loop
    with the same AdamW settings, smoothed cross-entropy, images and batch size as keras-ham,
    in NCHW (`contiguous_format`) or `channels_last`. `batches` is anything indexable giving
    (images NHWC float32 0..255, labels) - the same HamDataset as fit, or preloaded arrays."""

    def __init__(self, options: dict, batches, config, memory_format: str, device: str | None = None):
        import torch
        import torchvision

        from keras_ham.labels import NUM_CLASSES

        if memory_format not in TORCHVISION_FORMATS:
            raise BenchError(f"memory format {memory_format!r}: expected one of {TORCHVISION_FORMATS}.")
        self.format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
        self.device = torch.device(device or os.environ.get("KERAS_TORCH_DEVICE") or "cpu")
        torch.manual_seed(0)
        model = getattr(torchvision.models, options["model"])(weights=None, num_classes=NUM_CLASSES)
        self.model = model.to(self.device, memory_format=self.format).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           eps=1e-7)
        self.mean = torch.tensor(_TORCHVISION_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(_TORCHVISION_STD, device=self.device).view(1, 3, 1, 1)
        self.batches, self.config, self.num_classes = batches, config, NUM_CLASSES
        self.index = 0

    def step(self) -> None:
        import torch

        images, labels = self.batches[self.index % len(self.batches)]
        self.index += 1
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2)
        x = ((x - self.mean) / self.std).contiguous(memory_format=self.format)
        probabilities = torch.softmax(self.model(x), dim=-1)
        loss = torch_smoothed_crossentropy(probabilities, torch.from_numpy(labels).to(self.device),
                                           self.config.label_smoothing, self.num_classes)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def _memory_task(params: dict, choice, sampler: RssSampler, contender: str) -> dict:
    """Peak RSS of training `contender` alone: 1 + warm-up + `steps` steps in this process.

    The torchvision worker never imports Keras (a plain-PyTorch user would not): it decodes its
    batches with keras_ham.images (Pillow) into arrays, as large as the cached batches fit reads.
    """
    options = params["options"]
    # the peak comes with the first optimizer steps (its state is created there): 2 measured steps
    count = train_steps_needed({**options, "steps": min(options["steps"], 2), "repeats": 1})
    config = _bench_config(options)
    before = sampler.rss_mb()
    if contender == "keras_fit_torch":
        from keras_ham.model import build_model

        dataset = _dataset(params, params["train_images"], cache_dir=params["cache_dir"])
        model = build_model(config)
        _compile_as_training(model, config, choice, options.get("jit_compile", False))
        before = sampler.rss_mb()
        sampler.phase = "train"
        from keras_ham.internals import keras_torch_fast_path

        with keras_torch_fast_path():  # as keras_ham.train runs fit
            model.fit(dataset, epochs=1, steps_per_epoch=count, verbose=0)
    elif contender.startswith("torchvision_"):
        from keras_ham.images import load_image

        size, batch = options["image_size"], options["batch_size"]
        batches = []
        for index in range(min(count, params["train_images"] // batch)):
            chunk = slice(index * batch, (index + 1) * batch)
            images = np.stack([load_image(p, size) for p in params["paths"][chunk]]).astype(np.float32)
            batches.append((images, np.asarray(params["labels"][chunk], dtype=np.int32)))
        loop = _TorchvisionLoop(options, batches, config, contender.removeprefix("torchvision_"),
                                device=getattr(choice, "torch_device", None))
        before = sampler.rss_mb()
        sampler.phase = "train"
        for _ in range(count):
            loop.step()
    else:
        raise BenchError(f"unknown memory contender {contender!r}")
    sampler.phase = "after"
    return {"contender": contender, "steps": count, "rss_before_training_mb": round(before, 1),
            "peak_rss_mb": round(sampler.peaks.get("train", 0.0), 1), "ru_maxrss_mb": round(ru_maxrss_mb(), 1),
            "keras_imported": "keras" in sys.modules}


def _images(params: dict, count: int) -> np.ndarray:
    """(count, S, S, 3) float32 batch of the benchmark images via the cached dataset."""
    dataset = _dataset(params, max(count, 1), cache_dir=params["cache_dir"], shuffle=False)
    batches = [dataset[i][0] for i in range(len(dataset))]
    return np.concatenate(batches)[:count]


def _inference_task(params: dict, backend: str) -> dict:
    import keras

    from keras_ham.model import build_model
    from keras_ham.predict import Predictor
    from keras_ham.device import model_device

    options = params["options"]
    batch_size, runs = options["batch_size"], options["steps"] * options["repeats"]
    model = build_model(_bench_config(options))
    _randomize_batchnorm(model)
    batch = _images(params, batch_size)
    single = batch[:1]
    export_info: dict = {}
    onnx_path = _export_as_training_does(model, params, backend, export_info)
    started = time.perf_counter()
    predictor = Predictor(model, batch_size=batch_size, onnx_path=onnx_path)
    build_seconds = time.perf_counter() - started
    functions: dict[str, Callable] = {
        "predictor": predictor.predict,
        "keras_predict": lambda x: model.predict(x, batch_size=batch_size, verbose=0),
    }
    if backend == "torch":
        import torch

        device = model_device(model)

        def torch_plain(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x).to(device), training=False).cpu().numpy()

        functions["torch_plain"] = torch_plain
        functions["predictor_keras_path"] = Predictor(model, batch_size=batch_size, fast_path=False).predict
        if _torchvision_available():
            for memory_format in TORCHVISION_FORMATS:
                functions[f"torchvision_{memory_format}"] = _torchvision_inference(options, memory_format, device)
    engines_info: dict = dict(export_info)
    if backend == "torch":
        functions.update(_inference_engines(model, options, params, engines_info, onnx_path))
    for name, function in functions.items():
        started = time.perf_counter()
        for _ in range(options["warmup_steps"]):
            function(batch)
            function(single)
        engines_info.setdefault("warmup_seconds", {})[name] = round(time.perf_counter() - started, 2)
    batch_seconds = _interleaved(functions, batch, runs, options["settle_steps"])
    latency_functions = {k: v for k, v in functions.items() if k != "predictor_keras_path"}
    latency_seconds = _interleaved(latency_functions, single, options["latency_runs"], options["settle_steps"])
    expected = model.predict(batch, verbose=0)
    difference = float(np.max(np.abs(functions["predictor"](batch) - expected)))
    for engine in ("onnxruntime", "torch_compile"):
        if engine in functions:
            engines_info[f"{engine}_max_abs_difference"] = float(np.max(np.abs(functions[engine](batch) - expected)))
    result = {
        "batch_seconds": batch_seconds,
        "latency_seconds": latency_seconds,
        "fast_path": bool(getattr(predictor, "fast_path", False)),
        "predictor_engine": predictor.engine,
        "predictor_build_seconds": build_seconds,
        "max_abs_difference": difference,
        "engines": engines_info,
    }
    del model
    keras.backend.clear_session()
    return result


def _torchvision_inference(options: dict, memory_format: str, device) -> Callable:
    """torchvision's model in eval mode under inference_mode, normalization included (the
    Keras model preprocesses inside itself too); returns probabilities as numpy."""
    import torch
    import torchvision

    from keras_ham.labels import NUM_CLASSES

    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    model = getattr(torchvision.models, options["model"])(weights=None, num_classes=NUM_CLASSES)
    model = model.to(device, memory_format=layout).eval()
    mean = torch.tensor(_TORCHVISION_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_TORCHVISION_STD, device=device).view(1, 3, 1, 1)

    def run(x):
        with torch.inference_mode():
            tensor = torch.from_numpy(x).to(device).permute(0, 3, 1, 2)
            tensor = ((tensor - mean) / std).contiguous(memory_format=layout)
            return torch.softmax(model(tensor), dim=-1).cpu().numpy()

    return run


def _export_as_training_does(model, params: dict, backend: str, info: dict) -> Path | None:
    """The ONNX export training writes beside best.keras (config `export_onnx`), so the
    Predictor runs the engine a user gets; None (and the reason in `info`) when it cannot."""
    if backend != "torch" or importlib.util.find_spec("onnxruntime") is None:
        info["onnx_export_error"] = "torch backend with onnxruntime installed only"
        return None
    from keras_ham.export import export_onnx

    path = Path(params["work_dir"]) / f"bench-{os.getpid()}.onnx"
    started = time.perf_counter()
    try:
        export_onnx(model, path)  # includes its own check against Keras
    except Exception as error:  # noqa: BLE001 - reported; the Predictor then runs Keras
        info["onnx_export_error"] = f"{type(error).__name__}: {error}"[:500]
        return None
    info["onnx_export_seconds"] = round(time.perf_counter() - started, 1)
    return path


def _inference_engines(model, options: dict, params: dict, info: dict,
                       onnx_path: Path | None = None) -> dict[str, Callable]:
    """{engine: function(images) -> probabilities} for the engines asked for that work here;
    set-up seconds and failures go into `info` (a failure is a result, not a crash)."""
    import torch

    from keras_ham.device import model_device

    functions: dict[str, Callable] = {}
    device = model_device(model)
    wanted = options.get("engines", ENGINES)
    if "onnxruntime" in wanted:
        if device is not None and device.type != "cpu":
            info["onnxruntime_error"] = f"measured on the CPU only (model on {device})"
        elif onnx_path is None:
            info["onnxruntime_error"] = info.get("onnx_export_error", "no ONNX export")
        else:
            try:
                import onnxruntime

                session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
                info["onnxruntime_version"] = onnxruntime.__version__
                functions["onnxruntime"] = lambda x: session.run(None, {"image": x})[0]
            except Exception as error:  # noqa: BLE001 - reported, the others still run
                info["onnxruntime_error"] = f"{type(error).__name__}: {error}"[:500]
    if "torch_compile" in wanted:
        try:
            compiled = torch.compile(model)
            probe = torch.from_numpy(_images(params, options["batch_size"])).to(device)
            started = time.perf_counter()
            with torch.inference_mode():
                compiled(probe, training=False)
            info["torch_compile_first_call_seconds"] = round(time.perf_counter() - started, 1)

            def run_compiled(x):
                with torch.inference_mode():
                    return compiled(torch.from_numpy(x).to(device), training=False).cpu().numpy()

            functions["torch_compile"] = run_compiled
        except Exception as error:  # noqa: BLE001
            info["torch_compile_error"] = f"{type(error).__name__}: {error}"[:500]
    return functions


def _randomize_batchnorm(model) -> None:
    """Give BatchNorm non-trivial statistics, as a trained model has (weights=None leaves
    mean 0 / variance 1, under which folding mistakes would go unnoticed)."""
    import keras

    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))


def _settled_call(function: Callable[[], object], settle: int) -> tuple[float, float]:
    """Call `function` `settle` untimed times, then once more: (wall seconds, CPU seconds) of
    that last call. The first call after another model's is slower (see `_timed_fit`)."""
    for _ in range(settle):
        function()
    started, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - started, time.process_time() - cpu


def _interleaved(functions: dict[str, Callable], argument, runs: int, settle: int = 0) -> dict[str, list[float]]:
    """Call every function on `argument`, round-robin, `runs` timed times each, each timed call
    after `settle` untimed ones (`_settled_call`); seconds per timed call."""
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            seconds[name].append(_settled_call(functools.partial(function, argument), settle)[0])
    return seconds


def _gradcam_task(params: dict) -> dict:
    import keras
    import torch

    from keras_ham.gradcam import GradCAM
    from keras_ham.model import build_model
    from keras_ham.device import model_device

    options = params["options"]
    model = build_model(_bench_config(options))
    image = _images(params, 1)
    gradcam = GradCAM(model)
    tensor = torch.from_numpy(image).to(model_device(model))

    def forward_backward(_):
        model.zero_grad(set_to_none=True)
        probabilities = model(tensor, training=False)
        probabilities.max(dim=1).values.sum().backward()  # to every trainable parameter

    def forward(_):
        with torch.no_grad():
            model(tensor, training=False)

    functions = {"gradcam": lambda x: gradcam.cam(x), "forward_backward": forward_backward, "forward": forward}
    for function in functions.values():
        for _ in range(options["warmup_steps"]):
            function(image)
    seconds = _interleaved(functions, image, options["latency_runs"], options["settle_steps"])
    model.zero_grad(set_to_none=True)
    result = {"gradcam_seconds": seconds["gradcam"], "forward_backward_seconds": seconds["forward_backward"],
              "forward_seconds": seconds["forward"], "layer": gradcam.layer_name}
    del model, gradcam
    keras.backend.clear_session()
    return result


def _loader_task(params: dict) -> dict:
    from keras_ham.dataset import build_cache

    options = params["options"]
    count = options["loader_images"]
    uncached = _dataset(params, count, cache_dir=None)
    started = time.perf_counter()
    for index in range(len(uncached)):
        uncached[index]
    uncached_ips = count / (time.perf_counter() - started)
    fresh_cache = Path(params["work_dir"]) / f"loader-cache-{os.getpid()}"
    threads = min(8, os.cpu_count() or 1)
    started = time.perf_counter()
    build_cache(uncached.paths, options["image_size"], fresh_cache, threads=threads)
    build_ips = count / (time.perf_counter() - started)
    cached = _dataset(params, count, cache_dir=str(fresh_cache))
    passes = []
    for _ in range(max(3, options["repeats"])):
        started = time.perf_counter()
        for index in range(len(cached)):
            cached[index]
        passes.append(count / (time.perf_counter() - started))
        cached.on_epoch_end()  # a new shuffle order each pass, as in training
    shutil.rmtree(fresh_cache, ignore_errors=True)
    return {"images": count, "uncached_images_per_second": uncached_ips, "cache_build_images_per_second": build_ips,
            "cached_images_per_second": passes, "cache_build_threads": threads}


def _breakdown_task(params: dict) -> dict:
    """Where Keras-on-torch time goes (diagnosis only: patches Keras inside this worker)."""
    import keras
    import torch

    from keras_ham.internals import keras_torch_conv_inputs_as_views, keras_torch_fast_path
    from keras_ham.model import build_model
    from keras_ham.device import model_device

    options = params["options"]
    model = build_model(_bench_config(options))
    _randomize_batchnorm(model)
    batch = torch.from_numpy(_images(params, options["batch_size"])).to(model_device(model))

    def patched(function, context=keras_torch_conv_inputs_as_views):
        def run(x):
            with context():
                return function(x)
        return run

    keras_call = lambda x: model(x, training=False)  # noqa: E731
    functions = {
        "keras_call": keras_call,
        "keras_call_without_layout_copies": patched(keras_call),
        "keras_call_fast_path": patched(keras_call, keras_torch_fast_path),
    }
    runs = options["steps"] * options["repeats"]
    with torch.inference_mode():
        for function in functions.values():
            function(batch)
        batch_seconds = _interleaved(functions, batch, runs, options["settle_steps"])
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            keras_call(batch)
    total = sum(event.self_cpu_time_total for event in profiler.key_averages())
    top = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    profile_top = {event.key: round(event.self_cpu_time_total / total, 3) for event in top}

    config = _bench_config(options)
    dataset = _dataset(params, params["train_images"], cache_dir=params["cache_dir"])
    loop = _TorchLoop(model, dataset, config)
    step_functions = {"torch_loop": lambda _: loop.step(), "torch_loop_without_layout_copies": patched(lambda _: loop.step()),
                      "torch_loop_fast_path": patched(lambda _: loop.step(), keras_torch_fast_path)}
    for function in step_functions.values():
        function(None)
    train_seconds = _interleaved(step_functions, None, options["steps"], options["settle_steps"])
    del model
    keras.backend.clear_session()
    return {"batch_seconds": batch_seconds, "train_step_seconds": train_seconds, "profile_top_ops": profile_top}


def _runtime_info(backend: str, choice) -> dict:
    info: dict = {"backend": backend, "device": getattr(choice, "torch_device", None)}
    if backend == "torch":
        import torch

        info.update({"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                     "mkldnn": torch.backends.mkldnn.is_available(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    else:
        import tensorflow as tf

        info.update({"threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
                     "interop_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default"})
    return info


def run_worker(params_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """Worker entry: run `params['tasks']` on this process's KERAS_BACKEND; write the raw timings."""
    params = json.loads(Path(params_path).read_text(encoding="utf-8"))
    options = params["options"]
    backend = os.environ.get("KERAS_BACKEND", "torch")
    load_before = load_average()
    from keras_ham.device import configure_device

    choice = configure_device(options["device"], log=None)
    if options["threads"]:
        if backend == "torch":
            import torch

            torch.set_num_threads(options["threads"])
        else:
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(options["threads"])
    tasks: dict = {}
    with RssSampler() as sampler:
        for task in params["tasks"]:
            print(f"{task} (load {load_average()})", flush=True)
            if task == "train":
                tasks["train"] = _train_task(params, choice, sampler, backend)
            elif task == "inference":
                tasks["inference"] = _inference_task(params, backend)
            elif task == "gradcam":
                tasks["gradcam"] = _gradcam_task(params)
            elif task == "loader":
                tasks["loader"] = _loader_task(params)
            elif task == "breakdown":
                tasks["breakdown"] = _breakdown_task(params)
            elif task.startswith("memory_"):
                tasks["memory"] = _memory_task(params, choice, sampler, task.removeprefix("memory_"))
            else:
                raise BenchError(f"unknown worker task {task!r}")
    result = {
        "tasks": tasks,
        "tasks_run": list(params["tasks"]),
        "load_before": load_before,
        "load_after": load_average(),
        "runtime": _runtime_info(backend, choice),
        "peak_rss_mb_process": round(ru_maxrss_mb(), 1),
    }
    write_json_atomic(out_path, result)
    return result


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        print("usage: python -m benchmarks.harness --worker PARAMS.json OUT.json (run by scripts/bench.py)", file=sys.stderr)
        sys.exit(2)
    run_worker(sys.argv[2], sys.argv[3])
