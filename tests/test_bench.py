"""The benchmark harness (benchmarks/, scripts/bench.py): tiny sizes, no timing assertions."""

import json
import math
import subprocess
import sys

import keras
import numpy as np
import pytest

from benchmarks import harness as bench

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch backend tests")


# --------------------------------------------------------------------------- pure helpers


def test_torch_loss_matches_the_training_loss():
    import torch

    from keras_ham.metrics import SparseCrossentropyWithSmoothing

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 7)).astype("float32")
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probabilities[0] = np.eye(7, dtype="float32")[2]  # a saturated row exercises the clipping
    labels = np.array([2, 0, 6, 3, 3, 1], dtype="int32")
    expected = float(SparseCrossentropyWithSmoothing(7, 0.1)(labels, probabilities))
    received = float(bench.torch_smoothed_crossentropy(torch.from_numpy(probabilities), torch.from_numpy(labels), 0.1, 7))
    assert received == pytest.approx(expected, rel=1e-5)


def test_statistics_helpers():
    assert bench.paired_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0  # median of 2, 3, 3
    assert bench.percentile(list(range(101)), 95) == pytest.approx(95.0)
    with pytest.raises(ValueError):
        bench.paired_ratio([1.0], [1.0, 2.0])


def test_a_paired_ratio_comes_with_the_distribution_free_interval_of_its_median():
    """For 15 pairs the 95 % interval of a median runs from the 4th to the 12th smallest value
    (binomial: P(at most 3 of 15 below the median) = 1.8 % <= 2.5 %); 5 pairs cannot give one."""
    ratios = np.random.default_rng(0).uniform(0.9, 1.0, 15)
    denominators = np.random.default_rng(1).uniform(1.0, 2.0, 15)
    numerators = list(ratios * denominators)
    low, high = bench.paired_ratio_interval(numerators, list(denominators))
    ordered = np.sort(ratios)
    assert low == pytest.approx(ordered[3]) and high == pytest.approx(ordered[11])
    assert low <= bench.paired_ratio(numerators, list(denominators)) <= high
    assert bench.paired_ratio_interval(numerators[:5], list(denominators[:5])) is None
    with pytest.raises(ValueError):
        bench.paired_ratio_interval([1.0], [1.0, 2.0])


def test_a_target_inside_the_runs_interval_is_reported_as_undecided():
    def checked(value, interval):
        results = {"train": {"keras_vs_torchvision_ratio": value, "keras_vs_torchvision_ratio_interval": interval}}
        return bench.check_targets(results)["train.keras_vs_torchvision_ratio"]

    close = checked(0.949, [0.93, 0.96])
    assert close["met"] is False and close["decided"] is False and close["interval"] == [0.93, 0.96]
    assert "run it again" in bench._target_line("train.keras_vs_torchvision_ratio", close)
    clear = checked(0.92, [0.90, 0.94])
    assert clear["met"] is False and clear["decided"] is True
    line = bench._target_line("train.keras_vs_torchvision_ratio", clear)
    assert "interval 0.900-0.940" in line and line.endswith("MISSED")
    unpaired = checked(0.97, None)  # e.g. a memory ratio: one value per contender, no interval
    assert unpaired["met"] is True and unpaired["decided"] is None
    assert bench._target_line("train.keras_vs_torchvision_ratio", unpaired).endswith("-> met")


def test_options_quick_preset_overrides_and_validation():
    quick = bench.make_options(quick=True, steps=3)
    assert (quick.image_size, quick.model, quick.steps, quick.quick) == (32, "resnet18", 3, True)
    assert bench.make_options().image_size == 128
    assert bench.parse_list("train, loader,train", bench.SECTIONS, "--only") == ("train", "loader")
    with pytest.raises(bench.BenchError, match="--only 'train,bogus'"):
        bench.parse_list("train,bogus", bench.SECTIONS, "--only")
    for bad in ({"image_size": 8}, {"steps": 0}, {"model": "vgg"}, {"sections": ("nope",)},
                {"backends": ("tensorflow",)}, {"threads": 0}, {"batch_size": 2.5}):
        with pytest.raises(bench.BenchError):
            bench.make_options(**bad)


def test_each_contender_settles_before_its_timed_call():
    """With settle=1 every function runs twice per turn, back to back, and only the second
    call is timed: none is timed right after another model's step."""
    calls: list[str] = []
    function = lambda name: (lambda _: calls.append(name))  # noqa: E731
    seconds = bench._interleaved({"a": function("a"), "b": function("b")}, None, runs=3, settle=1)
    assert calls == ["a", "a", "b", "b"] * 3
    assert [len(v) for v in seconds.values()] == [3, 3]
    calls.clear()
    bench._interleaved({"a": function("a"), "b": function("b")}, None, runs=2)
    assert calls == ["a", "b"] * 2
    options = bench.make_options(steps=4, repeats=2, warmup_steps=1, settle_steps=1)
    assert bench.train_steps_needed(options) == 1 + (1 + 4 * 2) * 2
    assert bench.train_steps_needed(bench.make_options(steps=4, repeats=2, warmup_steps=1, settle_steps=0)) == 10
    with pytest.raises(bench.BenchError, match="settle_steps"):
        bench.make_options(settle_steps=-1)


def test_timed_fit_times_only_the_step_after_each_settling_step():
    """fit runs 1 + steps x 2 training steps, reading a short dataset round and round;
    `between` runs after every timed one."""
    import keras

    class Counting(keras.layers.Layer):
        steps = 0

        def call(self, x, training=None):
            if training and not isinstance(x, keras.KerasTensor):
                Counting.steps += 1
            return x

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(Counting()(inputs)))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 2  # fewer than the 7 steps: read round and round

        def __getitem__(self, index):
            return np.ones((2, 4), "float32"), np.zeros(2, "int32")

    between = []
    fit_seconds, others = bench._timed_fit(model, Batches(), 3, lambda: between.append(Counting.steps) or {"x": 0.1},
                                           settle=1)
    assert len(fit_seconds) == 3 and others["x"] == [0.1] * 3
    assert Counting.steps == 1 + 3 * 2
    assert between == [3, 5, 7]  # after steps 3, 5 and 7: each timed step follows a settling one


def test_worker_tasks_follow_the_sections():
    """`--only memory` runs only the isolated memory workers (no interleaved training worker)."""
    tasks = bench._worker_tasks
    assert tasks(bench.make_options(sections=("memory",)), "torch") == []
    assert tasks(bench.make_options(sections=("memory", "train")), "torch") == ["train"]
    assert tasks(bench.make_options(sections=("train", "gradcam")), "tensorflow") == ["train"]
    assert tasks(bench.make_options(sections=("inference", "loader")), "torch") == ["inference", "loader"]


def fake_workers():
    """Raw worker timings with known answers: fit 0.5 s/step vs loop 0.4 s/step, etc."""
    torch_worker = {
        "backend": "torch", "round": 1, "tasks_run": ["train", "inference", "gradcam", "loader"],
        "load_before": [1.0, 1.0, 1.0], "load_after": [1.5, 1.0, 1.0], "runtime": {"threads": 2},
        "wall_seconds": 10.0, "peak_rss_mb_process": 900.0,
        "tasks": {
            "train": {"fit_seconds_per_step": [0.5, 0.5, 0.6, 2.0], "loop_seconds_per_step": [0.4, 0.5, 0.6, 1.6],
                      "fit_repeat_seconds_per_step": [0.5, 0.6], "loop_repeat_seconds_per_step": [0.4, 0.6],
                      # torchvision: NCHW 0.25 s/step (the faster), channels_last 0.5 s/step
                      "torchvision_nchw_seconds_per_step": [0.25, 0.25, 0.3, 1.0],
                      "torchvision_nchw_repeat_seconds_per_step": [0.25, 0.3],
                      "torchvision_channels_last_seconds_per_step": [0.5, 0.5, 0.5, 0.5],
                      "torchvision_channels_last_repeat_seconds_per_step": [0.5, 0.5],
                      "peak_rss_mb": {"fit": 800.0, "loop": 700.0}, "rss_before_training_mb": 500.0,
                      "ru_maxrss_mb": 810.0},
            "inference": {"batch_seconds": {"predictor": [0.1, 0.1], "torch_plain": [0.3, 0.3],
                                            "keras_predict": [0.35, 0.35], "predictor_keras_path": [0.3, 0.3],
                                            "torchvision_nchw": [0.2, 0.2], "torchvision_channels_last": [0.08, 0.08],
                                            "onnxruntime": [0.05, 0.05]},
                          "latency_seconds": {"predictor": [0.01, 0.02], "torch_plain": [0.05, 0.05],
                                              "keras_predict": [0.1, 0.1], "onnxruntime": [0.004, 0.004]},
                          "fast_path": True, "predictor_build_seconds": 1.0, "max_abs_difference": 1e-7,
                          "engines": {"onnx_export_seconds": 3.0, "torch_compile_error": "no compiler"}},
            "gradcam": {"gradcam_seconds": [0.2, 0.2], "forward_backward_seconds": [0.4, 0.4],
                        "forward_seconds": [0.15, 0.15], "layer": "conv5_block2_out"},
            "loader": {"images": 16, "uncached_images_per_second": 100.0, "cache_build_images_per_second": 200.0,
                       "cached_images_per_second": [1000.0, 3000.0, 2000.0], "cache_build_threads": 2},
        },
    }
    memory_workers = [
        {"backend": "torch", "round": 1, "memory_worker": name, "tasks_run": [f"memory_{name}"],
         "load_before": [1.0, 1.0, 1.0], "load_after": [1.0, 1.0, 1.0], "runtime": {"threads": 2},
         "tasks": {"memory": {"contender": name, "ru_maxrss_mb": rss, "peak_rss_mb": rss - 10.0}}}
        for name, rss in (("keras_fit_torch", 1500.0), ("torchvision_nchw", 1000.0), ("torchvision_channels_last", 900.0))
    ]
    tf_worker = {
        "backend": "tensorflow", "round": 1, "tasks_run": ["train", "inference"], "load_before": [1.0, 1.0, 1.0],
        "load_after": [1.0, 1.0, 1.0], "runtime": {"threads": "default"}, "wall_seconds": 5.0,
        "peak_rss_mb_process": 1000.0,
        "tasks": {
            "train": {"fit_seconds_per_step": [0.25, 0.25], "fit_repeat_seconds_per_step": [0.25],
                      "peak_rss_mb": {"fit": 950.0}, "rss_before_training_mb": 600.0, "ru_maxrss_mb": 960.0,
                      "jit_compile": False},
            "inference": {"batch_seconds": {"predictor": [0.2, 0.2], "keras_predict": [0.4, 0.4]},
                          "latency_seconds": {"predictor": [0.03, 0.03], "keras_predict": [0.1, 0.1]},
                          "fast_path": False, "predictor_build_seconds": 0.1, "max_abs_difference": 0.0},
        },
    }
    return [torch_worker, tf_worker, *memory_workers]


def test_summary_ratios_point_the_right_way():
    options = bench.make_options(batch_size=4)
    data = {"source": "generated", "dir": "/tmp/x", "paths": ["a"] * 16}
    results = bench.summarize(options, bench.machine_info(), data, fake_workers())
    train = results["train"]
    assert train["images_per_second"]["keras_fit_torch"] == pytest.approx(4 / 0.55)  # batch / median step
    assert train["images_per_second"]["torch_loop"] == pytest.approx(4 / 0.55)
    assert train["keras_vs_torch_ratio"] == pytest.approx(0.9)  # per-step pairs: median of 0.8, 0.8, 1, 1
    assert train["keras_vs_torch_ratio_per_repeat"] == [0.8, 1.0]
    assert train["keras_torch_vs_tensorflow_ratio"] == pytest.approx((4 / 0.55) / (4 / 0.25))
    assert results["inference"]["keras_vs_torch_ratio"] == pytest.approx(3.0)  # Predictor 3x faster
    assert results["inference"]["keras_path_vs_torch_ratio"] == pytest.approx(1.0)
    assert results["inference"]["latency_ms"]["predictor_torch"]["p50"] == pytest.approx(15.0)
    assert results["loader"]["cached_vs_train_ratio"] == pytest.approx(2000.0 / (4 / 0.55))
    assert results["gradcam"]["vs_forward_backward_ratio"] == pytest.approx(0.5)
    assert results["memory"]["peak_rss_mb"] == {"torch_fit": 800.0, "torch_loop": 700.0,
                                                "torch_process_after_training": 810.0,
                                                "tensorflow_fit": 950.0, "tensorflow_process_after_training": 960.0}
    targets = results["targets"]
    # torchvision: the faster format is chosen per section; ratios are medians of per-step pairs
    assert train["torchvision_format"] == "nchw"
    assert train["keras_vs_torchvision_ratio"] == pytest.approx(0.5)  # 0.25/0.5, 0.25/0.5, 0.3/0.6, 1/2
    assert train["keras_vs_torchvision_channels_last_ratio"] == pytest.approx((5 / 6 + 1) / 2)  # of 1, 1, 5/6, 1/4
    inference = results["inference"]
    assert inference["torchvision_format"] == "channels_last"
    assert inference["predictor_vs_torchvision_ratio"] == pytest.approx(0.8)  # Predictor 0.1 s vs 0.08 s
    assert inference["engines"]["vs_predictor_ratio"]["onnxruntime"] == pytest.approx(2.0)
    assert inference["engines"]["torch_compile_error"] == "no compiler"
    memory = results["memory"]
    assert memory["train_peak_rss_mb_isolated"]["torchvision_nchw"] == 1000.0
    assert memory["torchvision_format"] == "nchw"  # the format training chose, not the smaller RSS
    assert memory["train_peak_rss_vs_torchvision_ratio"] == pytest.approx(1.5)
    assert targets["train.keras_vs_torchvision_ratio"]["met"] is False
    assert train["keras_vs_torchvision_ratio_interval"] is None  # 4 pairs: too few for a 95 % interval
    assert train["keras_vs_torchvision_ratio_per_pair"] == [0.5, 0.5, 0.5, 0.5]
    assert targets["train.keras_vs_torchvision_ratio"]["decided"] is None
    assert targets["inference.predictor_vs_torchvision_ratio"]["met"] is False
    assert targets["memory.train_peak_rss_vs_torchvision_ratio"]["met"] is False
    assert targets["train.keras_vs_torch_ratio"]["met"] is False
    assert targets["inference.keras_vs_torch_ratio"]["met"] is True
    assert targets["gradcam.vs_forward_backward_ratio"]["met"] is True
    table = bench.format_table(results)
    assert "keras fit / torch loop" in table and "0.9x" in table and "MISSED" in table
    assert "keras fit / torchvision nchw" in table and "engine onnxruntime / Predictor" in table


def test_the_report_names_the_cpu_extensions_and_any_kernel_override(monkeypatch):
    """A run with torch / oneDNN limited to older kernels must not read as the CPU's own speed."""
    options = bench.make_options(batch_size=4)
    data = {"source": "generated", "dir": "/tmp/x", "paths": ["a"] * 16}
    from keras_ham.machine import KERNEL_OVERRIDES

    for name in KERNEL_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    plain = bench.summarize(options, bench.machine_info(), data, fake_workers())
    assert plain["machine"]["kernel_overrides"] == {} and "kernels limited" not in bench.format_table(plain)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    limited = bench.summarize(options, bench.machine_info(), data, fake_workers())
    assert limited["machine"]["kernel_overrides"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert "kernels limited by ONEDNN_MAX_CPU_ISA=AVX2" in bench.format_table(limited)


def test_failing_worker_reports_its_error(tmp_path):
    params = {"options": {"device": "cpu", "threads": None}, "tasks": ["no_such_task"]}
    with pytest.raises(bench.BenchError, match="no_such_task"):
        bench._run_worker(params, "torch", tmp_path, "t", log=lambda message: None)


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorflow") is None, reason="tensorflow not installed")
def test_tensorflow_worker_measures_fit_and_predictor(tmp_path):
    options = bench.make_options(quick=True, threads=1, backends=("torch", "tensorflow"))
    train_images = options.batch_size * bench.train_steps_needed(options)
    data = bench.prepare_images(bench.make_options(quick=True, generated_data=True), tmp_path, train_images)
    params = {"options": __import__("dataclasses").asdict(options), "paths": data["paths"], "labels": data["labels"],
              "train_images": train_images, "cache_dir": str(tmp_path / "cache"), "work_dir": str(tmp_path),
              "tasks": ["train", "inference"]}
    result = bench._run_worker(params, "tensorflow", tmp_path, "tf", log=lambda message: None)
    assert result["runtime"]["backend"] == "tensorflow" and result["runtime"]["threads"] == 1
    train, inference = result["tasks"]["train"], result["tasks"]["inference"]
    assert len(train["fit_seconds_per_step"]) == options.steps * options.repeats
    assert "loop_seconds_per_step" not in train  # the plain loop is torch-only
    assert train["peak_rss_mb"]["fit"] > 0
    assert set(inference["batch_seconds"]) == {"predictor", "keras_predict"}
    assert len(inference["latency_seconds"]["predictor"]) == options.latency_runs
    assert inference["max_abs_difference"] < 1e-5


# --------------------------------------------------------------------------- the command


def run_script(repo_root, *args, timeout=600):
    return subprocess.run([sys.executable, str(repo_root / "scripts" / "bench.py"), *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "train,bogus"], "--only 'train,bogus'"),
        (["--image-size", "8"], "image_size"),
        (["--backends", "tensorflow"], "backends"),
        (["--data-dir", "/no/such/folder"], "HAM10000_metadata.csv"),
    ],
)
def test_script_rejects_bad_input(repo_root, tmp_path, args, message):
    completed = run_script(repo_root, *args, "--out", str(tmp_path / "r.json"), timeout=60)
    assert completed.returncode == 2
    assert completed.stderr.startswith("error:") and message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "r.json").exists()


def test_quick_run_writes_json_and_prints_table(repo_root, tmp_path):
    out = tmp_path / "bench" / "results.json"
    # --threads 1: tiny models on a shared 2-core machine are dominated by OpenMP contention
    completed = run_script(repo_root, "--quick", "--threads", "1", "--backends", "torch", "--generated-data",
                           "--out", str(out))
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    for path in bench.TARGETS:
        value = bench._lookup(results, path)
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (path, value)
    assert results["options"]["quick"] and results["data"]["source"] == "generated"
    assert results["machine"]["cpu_model"] and results["machine"]["logical_cores"] >= 1
    assert results["machine"]["versions"]["torch"] and results["machine"]["versions"]["keras"]
    worker = results["workers"][0]
    assert worker["backend"] == "torch" and worker["runtime"]["threads"] == 1
    assert len(worker["load_before"]) == 3
    assert results["inference"]["fast_path"] is True and results["inference"]["predictor_engine"] == "onnxruntime"
    assert results["inference"]["fast_path_max_abs_difference"] < 1e-4
    assert results["train"]["keras_torch_jit_compile"] is False  # the lever is off unless --jit-compile
    assert set(results["train"]["images_per_second"]) == {"keras_fit_torch", "torch_loop", "torchvision_nchw",
                                                          "torchvision_channels_last"}
    assert results["memory"]["peak_rss_mb"]["torch_fit"] > 0
    isolated = results["memory"]["train_peak_rss_mb_isolated"]
    assert set(isolated) == {"keras_fit_torch", "torchvision_nchw", "torchvision_channels_last"}
    memory_workers = [w for w in results["workers"] if w.get("memory_worker")]
    assert len(memory_workers) == 3  # each contender trained alone, in its own process
    assert results["memory"]["isolated_workers"]["torchvision_nchw"]["keras_imported"] is False
    engines = results["inference"]["engines"]
    assert engines["onnxruntime_max_abs_difference"] < 1e-4 and engines["images_per_second"]["onnxruntime"] > 0
    assert set(results["targets"]) == set(bench.TARGETS)
    for line in ("keras fit / torch loop", "keras fit / torchvision", "Predictor / torchvision",
                 "engine onnxruntime / Predictor", "Predictor / plain torch", "cached / training",
                 "gradcam / forward+backward", "peak RSS torch_fit"):
        assert line in completed.stdout
    assert f"wrote {out}" in completed.stdout


def test_jit_compile_lever_compiles_the_model_as_training_does_plus_jit(tmp_path):
    """--jit-compile sets model.jit_compile on the exact training compile; off by default."""
    from keras_ham.model import build_model

    assert bench.make_options().jit_compile is False
    assert bench.make_options(jit_compile=True).jit_compile is True
    config = bench._bench_config({"model": "resnet18", "image_size": 32, "batch_size": 4})
    for wanted in (False, True):
        model = build_model(config.replace(augment_rotation=0.0))
        bench._compile_as_training(model, config, None, wanted)
        assert model.jit_compile is wanted and model.optimizer is not None
    # The default model has RandomRotation (supports_jit=False): Keras refuses and runs eager.
    model = build_model(config)
    bench._compile_as_training(model, config, None, True)
    assert model.jit_compile is False
