"""Benchmarks: is Keras 3 on torch as fast here as plain PyTorch, and where does time go?

Sections (each a list of interleaved, repeated measurements; medians reported):

    train      model.fit on torch vs a plain torch loop over the SAME Keras model (a torch
               nn.Module) with torch.optim.AdamW, the same smoothed cross-entropy, batches
               and data; and model.fit on TensorFlow. images/s, warm-up excluded.
    inference  keras_ham.predict.Predictor vs plain torch (the Keras model called under
               torch.inference_mode()); Keras model.predict and TensorFlow for context.
               Batch images/s and single-image latency p50/p95.
    loader     HamDataset batches: decoding JPEGs, building the uint8 cache, reading it.
    gradcam    GradCAM.cam on one image vs one forward+backward pass to all parameters.
    memory     peak RSS while training (sampled per phase) and of each worker process.
    breakdown  (not in the default set) why Keras on torch is slower than its own ops:
               Keras call, Keras call without its conv layout copies, the torch graph
               without and with BatchNorm folding, and a training step without the copies.

Every backend runs in its own worker process (`python -m keras_ham.bench --worker PARAMS
OUT`, with KERAS_BACKEND set), so TensorFlow and torch never share threads or memory.
Inside a worker, the things compared run interleaved (A, B, A, B, ...) and ratios are the
medians of per-pair ratios, which cancels most of the drift of a shared, loaded machine;
the load average is recorded before and after each worker.
"""

from __future__ import annotations

import dataclasses
import datetime
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
from keras_ham.machine import cpu_model, load_average, package_version

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "inference", "loader", "gradcam", "memory")
EXTRA_SECTIONS = ("breakdown",)
BACKENDS = ("torch", "tensorflow")
#: Real HAM10000 subset used when present (as tests/conftest.py finds it).
DEFAULT_REAL_DATA = Path(os.environ.get("KERAS_HAM_REAL_DATA", REPO_ROOT.parent / "shared" / "data" / "ham10000-224"))
#: Size of generated JPEGs when no real data is found: the Kaggle download's 600x450.
GENERATED_IMAGE_SIZE = (600, 450)

#: Targets from the project brief: (json path, comparison, threshold).
TARGETS = {
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


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Median of per-pair ratios: robust to load that changes between pairs."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("paired_ratio needs two equally long, non-empty sequences.")
    return median([a / b for a, b in zip(numerators, denominators)])


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    """CPU, cores, memory and library versions, without importing torch, Keras or TF."""
    import psutil

    return {
        "cpu_model": cpu_model(),
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
    Grad-CAM, the loader and the breakdown are measured on torch only."""
    wanted = set(options.sections)
    tasks = ["train"] if wanted & {"train", "memory"} else []
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
    command = [sys.executable, "-m", "keras_ham.bench", "--worker", str(params_path), str(out_path)]
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
    log(f"machine: {machine['cpu_model']}, {machine['logical_cores']} cores, load {machine['load_average']}")
    work_dir = Path(tempfile.mkdtemp(prefix="keras-ham-bench-"))
    try:
        train_images = options.batch_size * (max(options.steps, options.warmup_steps) + 1)
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
                                         "runtime", "peak_rss_mb_process")}
            for w in workers
        ],
    }
    torch_train = _collect(workers, "torch", "train")
    tf_train = _collect(workers, "tensorflow", "train")
    if "train" in options.sections and torch_train:
        fit = [s for t in torch_train for s in t["fit_seconds_per_step"]]
        loop = [s for t in torch_train for s in t["loop_seconds_per_step"]]
        fit_repeat = [s for t in torch_train for s in t["fit_repeat_seconds_per_step"]]
        loop_repeat = [s for t in torch_train for s in t["loop_repeat_seconds_per_step"]]
        train = {
            "images_per_second": {"keras_fit_torch": _ips(batch, fit), "torch_loop": _ips(batch, loop)},
            # images/s ratio = inverse ratio of the step times, pair by pair
            "keras_vs_torch_ratio": paired_ratio(loop, fit),
            "keras_vs_torch_ratio_per_repeat": [round(b / a, 4) for a, b in zip(fit_repeat, loop_repeat)],
            "measured_steps_each": len(fit),
            "batch_size": batch,
            "notes": "images/s from the median step time (data loading included) after warm-up. A plain-loop step "
                     "runs after every fit step (inside fit's batch-end callback), so the two alternate step by "
                     "step; the ratio is the median of the per-step pairs.",
        }
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
            "layer": torch_gradcam[0]["layer"],
            "runs": len(cam),
        }
    if "memory" in options.sections and (torch_train or tf_train):
        memory: dict = {"peak_rss_mb": {}, "rss_before_training_mb": {}}
        for backend, trains in (("torch", torch_train), ("tensorflow", tf_train)):
            for t in trains:
                for phase, value in t["peak_rss_mb"].items():
                    key = f"{backend}_{phase}"
                    memory["peak_rss_mb"][key] = max(memory["peak_rss_mb"].get(key, 0.0), value)
                memory["rss_before_training_mb"][backend] = t["rss_before_training_mb"]
                key = f"{backend}_process_after_training"
                memory["peak_rss_mb"][key] = max(memory["peak_rss_mb"].get(key, 0.0), t["ru_maxrss_mb"])
        memory["notes"] = "peak RSS sampled every 10 ms per phase; *_process_after_training is ru_maxrss right after training"
        results["memory"] = memory
    torch_breakdown = _collect(workers, "torch", "breakdown")
    if torch_breakdown:
        results["breakdown"] = _summarize_breakdown(torch_breakdown, batch)
    results["targets"] = check_targets(results)
    return results


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
    inference["keras_path_vs_torch_ratio"] = paired_ratio(plain, keras_path)
    single_predictor = [s for t in torch_runs for s in t["latency_seconds"]["predictor"]]
    single_plain = [s for t in torch_runs for s in t["latency_seconds"]["torch_plain"]]
    inference["single_image_keras_vs_torch_ratio"] = paired_ratio(single_plain, single_predictor)
    inference["fast_path"] = all(t["fast_path"] for t in torch_runs)
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
                          "model under inference_mode, median of back-to-back pairs; >1 means faster than plain torch.")
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
    """{ratio path: {'value', 'target', 'met'}} for the ratios that were measured."""
    checked = {}
    for path, (comparison, threshold) in TARGETS.items():
        value = _lookup(results, path)
        if value is None:
            continue
        met = value >= threshold if comparison == ">=" else value <= threshold
        checked[path] = {"value": value, "target": f"{comparison} {threshold}", "met": bool(met)}
    return checked


# --------------------------------------------------------------------------- table


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
        f"machine: {machine['cpu_model']}, {machine['logical_cores']} logical cores; torch "
        f"{machine['versions']['torch']}, keras {machine['versions']['keras']}, tensorflow "
        f"{machine['versions']['tensorflow']}; data: {results['data']['source']}",
        "load average (1/5/15 min) before -> after each worker: "
        + "; ".join(f"{w['backend']}#{w['round']} {w['load_before']} -> {w['load_after']}" for w in results["workers"]),
    ]
    threads = [f"{w['backend']} threads {w['runtime'].get('threads')}" for w in results["workers"] if w.get("runtime")]
    if threads:
        lines.append("; ".join(dict.fromkeys(threads)))
    rows: list[tuple[str, str, str]] = []

    def add(section: str, name: str, value: str) -> None:
        rows.append((section, name, value))

    train = results.get("train")
    if train:
        for name, value in train["images_per_second"].items():
            add("train", name, _fmt(value, " img/s"))
        add("train", "keras fit / torch loop", _fmt(train["keras_vs_torch_ratio"], "x"))
        if "keras_torch_vs_tensorflow_ratio" in train:
            add("train", "keras torch / keras tensorflow", _fmt(train["keras_torch_vs_tensorflow_ratio"], "x"))
    inference = results.get("inference")
    if inference and inference.get("images_per_second"):
        for name, value in inference["images_per_second"].items():
            add("inference", name, _fmt(value, " img/s"))
        for name, value in inference["latency_ms"].items():
            add("inference", f"{name} 1 image", f"p50 {_fmt(value['p50'], ' ms')}, p95 {_fmt(value['p95'], ' ms')}")
        add("inference", "Predictor / plain torch", _fmt(inference.get("keras_vs_torch_ratio"), "x"))
        add("inference", "Keras call / plain torch (old path)", _fmt(inference.get("keras_path_vs_torch_ratio"), "x"))
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
            lines.append(f"target {path} {check['target']}: {_fmt(check['value'])} -> {'met' if check['met'] else 'MISSED'}")
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


def _timed_fit(model, dataset, steps: int, between: Callable[[], float] | None = None) -> tuple[list[float], list[float]]:
    """Run `model.fit` for 1 + `steps` steps; return (fit seconds per step, `between` results).

    The first step (iterator start-up) is not timed. With `between`, it runs after every fit
    step, inside fit's batch-end callback, and returns its own duration: fit and the other
    thing then alternate step by step (A, B, A, B), so a change in machine load hits both.
    A fit step is timed from the end of the previous `between` (or step) to the end of its
    own batch, so it includes fetching its batch, the train step and Keras's bookkeeping.
    """
    import keras

    fit_seconds: list[float] = []
    other_seconds: list[float] = []
    resumed = [0.0]

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            if batch > 0:
                fit_seconds.append(now - resumed[0])
                if between is not None:
                    other_seconds.append(between())
            resumed[0] = time.perf_counter()

    model.fit(dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[StepTimer()])
    if len(fit_seconds) != steps:
        raise BenchError(f"model.fit ran {len(fit_seconds) + 1} of {steps + 1} steps: "
                         f"the dataset has only {len(dataset)} batches.")
    return fit_seconds, other_seconds


def _train_task(params: dict, choice, sampler: RssSampler, backend: str) -> dict:
    import keras

    from keras_ham.model import build_model
    from keras_ham.train import _compile  # the exact optimizer/loss/metrics of training

    options = params["options"]
    steps, repeats, warmup = options["steps"], options["repeats"], options["warmup_steps"]
    config = _bench_config(options)
    dataset = _dataset(params, params["train_images"], cache_dir=params["cache_dir"])
    model = build_model(config)
    _compile(model, config, config.lr, choice)
    result: dict = {"rss_before_training_mb": sampler.rss_mb()}
    loop = _TorchLoop(model, dataset, config) if backend == "torch" else None

    def loop_step() -> float:
        sampler.phase = "loop"
        started = time.perf_counter()
        loop.step()
        seconds = time.perf_counter() - started
        sampler.phase = "fit"
        return seconds

    between = loop_step if loop is not None else None
    sampler.phase = "fit"
    _timed_fit(model, dataset, warmup, between)  # warm-up of both
    fit_steps: list[float] = []
    loop_steps: list[float] = []
    fit_repeat: list[float] = []
    loop_repeat: list[float] = []
    for repeat in range(repeats):
        print(f"  train repeat {repeat + 1}/{repeats}", flush=True)
        fit_seconds, loop_seconds = _timed_fit(model, dataset, steps, between)
        fit_steps += fit_seconds
        fit_repeat.append(median(fit_seconds))
        if loop is not None:
            loop_steps += loop_seconds
            loop_repeat.append(median(loop_seconds))
    sampler.phase = "after"
    result.update({
        "fit_seconds_per_step": fit_steps,
        "fit_repeat_seconds_per_step": fit_repeat,
        "peak_rss_mb": {k: round(v, 1) for k, v in sampler.peaks.items() if k in ("fit", "loop")},
        "ru_maxrss_mb": round(ru_maxrss_mb(), 1),
        "jit_compile": getattr(model, "jit_compile", None),
    })
    if loop is not None:
        result["loop_seconds_per_step"] = loop_steps
        result["loop_repeat_seconds_per_step"] = loop_repeat
    del model
    keras.backend.clear_session()
    return result


class _TorchLoop:
    """The plain PyTorch training loop over the Keras model (an nn.Module on torch)."""

    def __init__(self, model, dataset, config):
        import torch

        from keras_ham.labels import NUM_CLASSES
        from keras_ham.predict import model_device

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


def _images(params: dict, count: int) -> np.ndarray:
    """(count, S, S, 3) float32 batch of the benchmark images via the cached dataset."""
    dataset = _dataset(params, max(count, 1), cache_dir=params["cache_dir"], shuffle=False)
    batches = [dataset[i][0] for i in range(len(dataset))]
    return np.concatenate(batches)[:count]


def _inference_task(params: dict, backend: str) -> dict:
    import keras

    from keras_ham.model import build_model
    from keras_ham.predict import Predictor, model_device

    options = params["options"]
    batch_size, runs = options["batch_size"], options["steps"] * options["repeats"]
    model = build_model(_bench_config(options))
    _randomize_batchnorm(model)
    batch = _images(params, batch_size)
    single = batch[:1]
    started = time.perf_counter()
    predictor = Predictor(model, batch_size=batch_size)
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
    for function in functions.values():
        for _ in range(options["warmup_steps"]):
            function(batch)
            function(single)
    batch_seconds = _interleaved(functions, batch, runs)
    latency_functions = {k: v for k, v in functions.items() if k != "predictor_keras_path"}
    latency_seconds = _interleaved(latency_functions, single, options["latency_runs"])
    difference = float(np.max(np.abs(functions["predictor"](batch) - model.predict(batch, verbose=0))))
    result = {
        "batch_seconds": batch_seconds,
        "latency_seconds": latency_seconds,
        "fast_path": bool(getattr(predictor, "fast_path", False)),
        "predictor_build_seconds": build_seconds,
        "max_abs_difference": difference,
    }
    del model
    keras.backend.clear_session()
    return result


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


def _interleaved(functions: dict[str, Callable], argument, runs: int) -> dict[str, list[float]]:
    """Call every function on `argument`, round-robin, `runs` times each; seconds per call."""
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            started = time.perf_counter()
            function(argument)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def _gradcam_task(params: dict) -> dict:
    import keras
    import torch

    from keras_ham.gradcam import GradCAM
    from keras_ham.model import build_model
    from keras_ham.predict import model_device

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
    seconds = _interleaved(functions, image, options["latency_runs"])
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
    from keras.src.backend.torch import nn as keras_torch_nn

    from keras_ham.model import build_model
    from keras_ham.predict import TorchInferenceGraph, model_device

    options = params["options"]
    model = build_model(_bench_config(options))
    _randomize_batchnorm(model)
    batch = torch.from_numpy(_images(params, options["batch_size"])).to(model_device(model))
    original = keras_torch_nn._transpose_spatial_inputs

    def without_copy(inputs):  # the permuted NHWC view is already channels_last: no copy needed
        if inputs.ndim == 4:
            return torch.permute(inputs, (0, 3, 1, 2))
        return original(inputs)

    def patched(function):
        def run(x):
            keras_torch_nn._transpose_spatial_inputs = without_copy
            try:
                return function(x)
            finally:
                keras_torch_nn._transpose_spatial_inputs = original
        return run

    unfolded, folded = TorchInferenceGraph(model, fold_batchnorm=False), TorchInferenceGraph(model)
    keras_call = lambda x: model(x, training=False)  # noqa: E731
    functions = {
        "keras_call": keras_call,
        "keras_call_without_layout_copies": patched(keras_call),
        "torch_graph_unfolded_batchnorm": unfolded,
        "torch_graph_folded_batchnorm": folded,
    }
    runs = options["steps"] * options["repeats"]
    with torch.inference_mode():
        for function in functions.values():
            function(batch)
        batch_seconds = _interleaved(functions, batch, runs)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            keras_call(batch)
    total = sum(event.self_cpu_time_total for event in profiler.key_averages())
    top = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    profile_top = {event.key: round(event.self_cpu_time_total / total, 3) for event in top}

    config = _bench_config(options)
    dataset = _dataset(params, params["train_images"], cache_dir=params["cache_dir"])
    loop = _TorchLoop(model, dataset, config)
    step_functions = {"torch_loop": lambda _: loop.step(), "torch_loop_without_layout_copies": patched(lambda _: loop.step())}
    for function in step_functions.values():
        function(None)
    train_seconds = _interleaved(step_functions, None, options["steps"])
    del model
    keras.backend.clear_session()
    return {"batch_seconds": batch_seconds, "train_step_seconds": train_seconds, "profile_top_ops": profile_top}


def _runtime_info(backend: str, choice) -> dict:
    info: dict = {"backend": backend, "device": getattr(choice, "torch_device", None)}
    if backend == "torch":
        import torch

        info.update({"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
                     "mkldnn": torch.backends.mkldnn.is_available()})
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
        print("usage: python -m keras_ham.bench --worker PARAMS.json OUT.json (run by scripts/bench.py)", file=sys.stderr)
        sys.exit(2)
    run_worker(sys.argv[2], sys.argv[3])
