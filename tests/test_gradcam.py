"""Grad-CAM: the closed-form CAM identity, cross-backend agreement, inputs, no mutation, CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from PIL import Image

from keras_ham.gradcam import (
    GradCAM,
    GradCAMError,
    default_layer_name,
    layer_choices,
    feature_map_layers,
    load_class_names,
    overlay,
    parse_class,
)
from keras_ham.labels import CLASS_NAMES
from keras_ham.runs import LabelsError

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "_gradcam_worker.py"
SCRIPT = REPO_ROOT / "scripts" / "gradcam.py"


# --------------------------------------------------------------------------- models


def closed_form_model(size=8, channels=6, classes=4, strides=1, relu=False, seed=1) -> keras.Model:
    """input -> Rescaling -> Conv2D("features") -> GAP -> Dense("logits") -> softmax."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(
        channels, 3, strides=strides, padding="same", activation="relu" if relu else None, name="features"
    )(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dense(classes, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="closed_form")


def contract_model(size=32, classes=4, seed=2, logits_name="logits") -> keras.Model:
    """A tiny classifier following the keras_ham contract, with BatchNorm in non-trivial state."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = keras.layers.RandomFlip("horizontal", name="augment_flip")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="block_out")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    x = keras.layers.Dense(classes, name=logits_name)(x)
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="contract")
    rng = np.random.default_rng(seed)
    for name in ("bn1", "bn2"):
        bn = model.get_layer(name)
        width = bn.moving_mean.shape[0]
        bn.moving_mean.assign(rng.normal(0.0, 0.5, width).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, width).astype("float32"))
        bn.gamma.assign(rng.uniform(0.5, 1.5, width).astype("float32"))
        bn.beta.assign(rng.normal(0.0, 0.3, width).astype("float32"))
    return model


def random_images(count, size, seed=0) -> np.ndarray:
    """Random RGB images (float 0..255): smooth blobs plus pixel noise, so the CAMs have structure."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (count, 3, 4, 4)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").permute(0, 2, 3, 1).numpy()
    return np.clip(smooth + rng.uniform(-20, 20, smooth.shape), 0, 255).astype(np.float32)


def numpy_closed_form(model, images, classes):
    """ReLU(sum_k W[k, c] A_k) / (h * w), from the 'features' output and the 'logits' kernel."""
    features = keras.Model(model.inputs[0], model.get_layer("features").output)(images, training=False)
    features = keras.ops.convert_to_numpy(features).astype(np.float64)
    kernel = keras.ops.convert_to_numpy(model.get_layer("logits").kernel).astype(np.float64)
    height, width = features.shape[1:3]
    return np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0.0) / (height * width)


def normalised(maps):
    return np.stack([m / m.max() if m.max() > 0 else np.zeros_like(m) for m in maps])


def run_worker(backend, jobs, tmp_path) -> None:
    jobs_path = tmp_path / f"jobs_{backend}.json"
    jobs_path.write_text(json.dumps(jobs))
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(jobs_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("strides", [1, 2])
def test_closed_form_cam_identity_on_torch(strides):
    model = closed_form_model(strides=strides)
    images = random_images(3, 8)
    # Explain, per image, a class whose closed-form map is not all zero (so the check bites).
    peaks = np.stack([numpy_closed_form(model, images, np.full(3, c)).max(axis=(1, 2)) for c in range(4)], axis=1)
    classes = peaks.argmax(axis=1).tolist()
    result = GradCAM(model).cam(images, class_index=classes)
    expected = numpy_closed_form(model, images, np.array(classes))

    assert result.layer_name == "features"
    assert result.class_indices.tolist() == classes
    assert all(m.max() > 0 for m in expected)  # the check below is not vacuous
    # The raw CAM keeps the 1/(h*w) scale of the identity exactly.
    np.testing.assert_allclose(result.feature_cams, expected, rtol=0, atol=1e-5 * expected.max())
    # The heatmap is the same map, bilinearly upsampled (independent implementation) and normalised.
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(expected)[:, None], size=(8, 8), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(result.heatmaps, normalised(upsampled), rtol=0, atol=1e-5)


def test_all_zero_cam_stays_zero_without_nan():
    model = closed_form_model(relu=True)  # A >= 0
    kernel = keras.ops.convert_to_numpy(model.get_layer("logits").kernel).copy()
    kernel[:, 1] = -np.abs(kernel[:, 1]) - 0.1  # every w_k < 0 for class 1 -> cam = ReLU(<= 0) = 0
    model.get_layer("logits").kernel.assign(kernel)
    result = GradCAM(model).cam(random_images(2, 8), class_index=1)
    assert np.all(np.isfinite(result.heatmaps))
    assert np.all(result.heatmaps == 0.0)
    other = GradCAM(model).cam(random_images(2, 8), class_index=0)
    assert other.heatmaps.max() == pytest.approx(1.0)


# --------------------------------------------------------------------------- other backends


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    """Closed-form and contract models saved under torch, explained in fresh processes."""
    folder = tmp_path_factory.mktemp("gradcam_backends")
    closed = closed_form_model(strides=2, seed=3)
    closed.save(folder / "closed.keras")
    np.save(folder / "closed_images.npy", random_images(3, 8, seed=4))
    contract = contract_model(size=32, seed=5)
    contract.save(folder / "contract.keras")
    np.save(folder / "contract_images.npy", random_images(4, 32, seed=6))
    tf_jobs = [
        {"model": str(folder / "closed.keras"), "images": str(folder / "closed_images.npy"),
         "out": str(folder / "closed_tf.npz"), "closed_form": True, "class_index": "peak"},
        {"model": str(folder / "contract.keras"), "images": str(folder / "contract_images.npy"),
         "out": str(folder / "contract_tf.npz")},
    ]
    torch_jobs = [
        {"model": str(folder / "contract.keras"), "images": str(folder / "contract_images.npy"),
         "out": str(folder / "contract_torch.npz")},
    ]
    run_worker("tensorflow", tf_jobs, folder)
    run_worker("torch", torch_jobs, folder)
    return folder


def test_closed_form_cam_identity_on_tensorflow(backend_runs):
    run = np.load(backend_runs / "closed_tf.npz")
    assert str(run["backend"]) == "tensorflow"
    expected = run["expected"]
    assert all(m.max() > 0 for m in expected)
    np.testing.assert_allclose(run["feature_cams"], expected, rtol=0, atol=1e-5 * expected.max())
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(expected)[:, None], size=(8, 8), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(run["heatmaps"], normalised(upsampled), rtol=0, atol=1e-5)


def test_same_model_file_gives_the_same_heatmaps_on_torch_and_tensorflow(backend_runs):
    on_torch = np.load(backend_runs / "contract_torch.npz")
    on_tf = np.load(backend_runs / "contract_tf.npz")
    assert str(on_torch["backend"]) == "torch" and str(on_tf["backend"]) == "tensorflow"
    assert on_torch["predicted"].tolist() == on_tf["predicted"].tolist()
    np.testing.assert_allclose(on_torch["probabilities"], on_tf["probabilities"], atol=1e-4)
    a, b = on_torch["heatmaps"].ravel(), on_tf["heatmaps"].ravel()
    assert a.std() > 0.05  # non-trivial maps
    correlation = float(np.corrcoef(a, b)[0, 1])
    print(f"torch vs tensorflow heatmap Pearson correlation: {correlation:.7f}")
    assert correlation >= 0.999


# --------------------------------------------------------------------------- behaviour


@pytest.fixture(scope="module")
def model():
    return contract_model(size=32, classes=4, seed=7)


@pytest.fixture(scope="module")
def gradcam(model):
    return GradCAM(model)


def test_default_layer_is_the_last_feature_map(gradcam):
    assert gradcam.layer_name == "block_out"
    assert gradcam.num_classes == 4
    assert gradcam.input_size == (32, 32)
    assert gradcam.logits_source == "logits"


def test_output_shapes_ranges_and_inference_mode(model, gradcam):
    images = random_images(3, 32, seed=8)
    result = gradcam.cam(images)
    assert result.heatmaps.shape == (3, 32, 32) and result.heatmaps.dtype == np.float32
    assert result.feature_cams.shape == (3, 16, 16)
    assert result.heatmaps.min() >= 0.0 and result.heatmaps.max() <= 1.0
    assert np.allclose(result.heatmaps.max(axis=(1, 2)), 1.0)
    assert result.probabilities.shape == (3, 4)
    # BatchNorm in inference mode, augmentation/dropout off: the probabilities are predict()'s.
    predicted = model.predict(images, verbose=0)
    np.testing.assert_allclose(result.probabilities, predicted, atol=1e-5)
    training = keras.ops.convert_to_numpy(model(images, training=True))
    assert np.abs(training - predicted).max() > 1e-3  # training mode would have been visible
    assert result.predicted.tolist() == predicted.argmax(axis=1).tolist()
    assert result.class_indices.tolist() == result.predicted.tolist()


def test_batch_equals_one_by_one(gradcam):
    images = random_images(5, 32, seed=9)
    batch = gradcam.cam(images, batch_size=2)
    singles = [gradcam.cam(images[i : i + 1]) for i in range(5)]
    np.testing.assert_allclose(batch.heatmaps, np.concatenate([s.heatmaps for s in singles]), atol=1e-5)
    np.testing.assert_allclose(batch.probabilities, np.concatenate([s.probabilities for s in singles]), atol=1e-6)
    assert batch.class_indices.tolist() == [int(s.class_indices[0]) for s in singles]


def test_explicit_class_index(gradcam):
    images = random_images(3, 32, seed=10)
    default = gradcam.cam(images)
    explicit = gradcam.cam(images, class_index=default.predicted.tolist())
    np.testing.assert_allclose(explicit.heatmaps, default.heatmaps, atol=1e-6)
    others = [(int(c) + 1) % 4 for c in default.predicted]
    other = gradcam.cam(images, class_index=np.array(others))
    assert other.class_indices.tolist() == others
    assert other.predicted.tolist() == default.predicted.tolist()
    assert np.abs(other.feature_cams - default.feature_cams).max() > 1e-6
    same_for_all = gradcam.cam(images, class_index=2)
    assert same_for_all.class_indices.tolist() == [2, 2, 2]
    np.testing.assert_allclose(same_for_all.heatmaps[0], gradcam.cam(images[:1], class_index=[2]).heatmaps[0], atol=1e-5)


@pytest.mark.parametrize(
    "class_index, message",
    [(4, "out of range"), (-1, "out of range"), ([0, 1], "2 class indices for 3 images"), (1.5, "expected None"),
     (["mel", 0, 1], "expected None")],
)
def test_bad_class_index(gradcam, class_index, message):
    with pytest.raises(GradCAMError, match=message):
        gradcam.cam(random_images(3, 32), class_index=class_index)


def test_images_of_other_sizes_and_modes(gradcam, tmp_path):
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    gray = rng.uniform(0, 255, (32, 32)).astype(np.float32)
    rgba = np.concatenate([rgb[:32, :32], np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    png = tmp_path / "x.png"
    Image.fromarray(rgb).save(png)

    result = gradcam.cam([rgb, gray, rgba, str(png), Image.fromarray(rgb)])
    assert result.heatmaps.shape == (5, 32, 32)
    assert 0.0 <= result.heatmaps.min() and result.heatmaps.max() <= 1.0

    resized = np.asarray(Image.fromarray(rgb).resize((32, 32), Image.Resampling.BILINEAR, reducing_gap=3.0))
    expected = gradcam.cam(np.stack([resized, np.repeat(gray[:, :, None], 3, axis=2), rgb[:32, :32], resized, resized]))
    np.testing.assert_allclose(result.heatmaps, expected.heatmaps, atol=1e-5)
    np.testing.assert_allclose(result.probabilities, expected.probabilities, atol=1e-6)

    # Transparent pixels become white, as load_image does for files.
    clear = rgba.copy()
    clear[:, :, 3] = 0
    white = gradcam.cam(np.full((1, 32, 32, 3), 255, np.uint8))
    np.testing.assert_allclose(gradcam.cam([clear]).probabilities, white.probabilities, atol=1e-6)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((32, 32, 3)), "expected a batch"),
        (np.full((1, 32, 32, 3), -1.0), "0..255"),
        (np.full((1, 32, 32, 3), 300.0), "0..255"),
        (np.full((1, 32, 32, 3), np.nan), "NaN"),
        ([], "empty"),
        ([np.zeros((8, 8, 5))], r"\(H, W, 4\)"),
        ("not a list", "expected an array"),
    ],
)
def test_bad_images(gradcam, images, message):
    with pytest.raises(GradCAMError, match=message):
        gradcam.cam(images)


def _state(model):
    return (
        [v.path for v in model.variables],
        [keras.ops.convert_to_numpy(v).copy() for v in model.variables],
        [v.trainable for v in model.variables],
        [v.value.requires_grad for v in model.variables],
        [layer.name for layer in model.layers],
        [layer.trainable for layer in model.layers],
        len(model.outputs),
    )


@pytest.mark.parametrize("frozen_backbone", [False, True])
def test_does_not_mutate_the_model_and_works_with_a_frozen_backbone(frozen_backbone):
    model = contract_model(size=32, seed=12)
    if frozen_backbone:  # transfer learning: only the head trains, A needs no parameter gradients
        for layer in model.layers[:-3]:
            layer.trainable = False
    before = _state(model)
    images = random_images(2, 32, seed=13)
    kept = images.copy()
    result = GradCAM(model).cam(images)
    after = _state(model)
    assert before[0] == after[0] and before[2:] == after[2:]
    for old, new in zip(before[1], after[1]):
        np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(images, kept)
    assert all(v.grad is None for v in (var.value for var in model.variables))
    assert result.feature_cams.max() > 0


def test_resnet50_default_layer_is_conv5_block3_out():
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(backbone.output)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    x = keras.layers.Dense(7, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    assert "conv5_block3_out" in [layer.name for layer in model.layers]  # flat, not nested
    assert default_layer_name(model) == "conv5_block3_out"
    assert feature_map_layers(model)[-1] == "conv5_block3_out"
    result = GradCAM(model).cam(random_images(1, 64))
    assert result.layer_name == "conv5_block3_out"
    assert result.heatmaps.shape == (1, 64, 64) and result.feature_cams.shape == (1, 2, 2)
    # Stage outputs, deepest first: what the dashboard offers when the 2x2 map is too coarse.
    assert layer_choices(model) == [("conv5_block3_out", (2, 2)), ("conv4_block6_out", (4, 4)),
                                    ("conv3_block4_out", (8, 8))]
    assert layer_choices(model, count=4)[3] == ("conv2_block3_out", (16, 16))


def test_named_layer_and_bad_layer_names(model):
    assert GradCAM(model, layer_name="relu1").cam(random_images(1, 32)).feature_cams.shape == (1, 32, 32)
    with pytest.raises(GradCAMError, match=r"no layer named 'conv9'.*block_out"):
        GradCAM(model, layer_name="conv9")
    with pytest.raises(GradCAMError, match=r"'avg_pool' has output shape .*not a 4-D"):
        GradCAM(model, layer_name="avg_pool")


def test_logits_fall_back_to_the_softmax_input():
    named = contract_model(seed=14)
    unnamed = contract_model(seed=14, logits_name="scores")
    images = random_images(2, 32, seed=15)
    fallback = GradCAM(unnamed)
    assert fallback.logits_source == "input of 'probabilities'"
    np.testing.assert_allclose(fallback.cam(images).heatmaps, GradCAM(named).cam(images).heatmaps, atol=1e-5)

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, name="features")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    fused = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probs")(x))
    with pytest.raises(GradCAMError, match="pre-softmax class scores"):
        GradCAM(fused)


# --------------------------------------------------------------------------- overlay


def test_overlay_blends_at_the_image_size():
    rng = np.random.default_rng(16)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[:4, :4] = 1.0
    blended = overlay(image, heatmap, alpha=0.5)
    assert blended.shape == (30, 40, 3) and blended.dtype == np.uint8
    np.testing.assert_array_equal(overlay(image, heatmap, alpha=0.0), image)
    full = overlay(image, heatmap, alpha=1.0)
    np.testing.assert_array_equal(full[0, 0], [128, 0, 0])  # jet(1.0) = dark red
    np.testing.assert_array_equal(full[-1, -1], [0, 0, 128])  # jet(0.0) = dark blue
    expected_corner = np.round(0.5 * image[0, 0] + 0.5 * np.array([127.5, 0, 0]))
    assert np.abs(blended[0, 0].astype(int) - expected_corner).max() <= 1
    gray = overlay(image[:, :, 0], heatmap, alpha=0.0)
    np.testing.assert_array_equal(gray, np.repeat(image[:, :, :1], 3, axis=2))


@pytest.mark.parametrize(
    "kwargs, message",
    [({"alpha": 1.5}, "alpha"), ({"colormap": "no-such-map"}, "colormap"), ({"heatmap": np.zeros(5)}, "2-D")],
)
def test_overlay_bad_arguments(kwargs, message):
    arguments = {"image": np.zeros((4, 4, 3), np.uint8), "heatmap": np.zeros((4, 4))} | kwargs
    with pytest.raises(GradCAMError, match=message):
        overlay(**arguments)


# --------------------------------------------------------------------------- CLI


def test_class_names_and_parse_class(tmp_path):
    model_path = tmp_path / "best.keras"
    assert load_class_names(model_path, 7) == CLASS_NAMES
    with pytest.raises(LabelsError, match="7 class names, but the model has 4"):
        load_class_names(model_path, 4)
    (tmp_path / "labels.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    assert load_class_names(model_path, 2) == ("a", "b")
    (tmp_path / "labels.json").write_text("{not json")
    with pytest.raises(LabelsError, match="labels.json"):
        load_class_names(model_path, 2)
    assert parse_class("mel", CLASS_NAMES) == 4
    assert parse_class("6", CLASS_NAMES) == 6
    assert parse_class(None, CLASS_NAMES) is None
    for bad in ("melanoma", "7", "-1"):
        with pytest.raises(GradCAMError, match="expected one of akiec"):
            parse_class(bad, CLASS_NAMES)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run folder: a 7-class contract model (best.keras) and two images of other sizes/modes."""
    folder = tmp_path_factory.mktemp("gradcam_run")
    contract_model(size=32, classes=7, seed=17).save(folder / "best.keras")
    rng = np.random.default_rng(18)
    Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)).save(folder / "lesion_a.jpg")
    Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8)).save(folder / "lesion_b.png")
    return folder


def test_script_end_to_end(saved_run, tmp_path):
    out = tmp_path / "overlays"
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(saved_run / "best.keras"), str(saved_run / "lesion_a.jpg"),
         str(saved_run / "lesion_b.png"), "--out", str(out), "--class", "mel"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, stem, size in zip(lines, ("lesion_a", "lesion_b"), ((45, 30), (40, 50))):
        assert stem in line and "predicted" in line and "p=" in line
        assert any(f"predicted {name} " in line for name in CLASS_NAMES)
        written = Image.open(out / f"{stem}_gradcam.png")
        assert written.format == "PNG" and written.mode == "RGB" and written.size == size
    assert sorted(p.name for p in out.iterdir()) == ["lesion_a_gradcam.png", "lesion_b_gradcam.png"]  # no temp files


def _script_main():
    spec = importlib.util.spec_from_file_location("gradcam_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_uses_labels_json(saved_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.keras").write_bytes((saved_run / "best.keras").read_bytes())
    names = [f"class{i}" for i in range(7)]
    (run / "labels.json").write_text(json.dumps(names))
    code = _script_main()(["--model", str(run / "best.keras"), str(saved_run / "lesion_a.jpg"), "--out",
                           str(tmp_path / "o"), "--class", "class3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "explained class3" in printed or "predicted class3" in printed
    assert any(f"predicted {name} " in printed for name in names)


def test_script_lists_layers_deepest_first(saved_run, capsys):
    code = _script_main()(["--model", str(saved_run / "best.keras"), "--list-layers"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0].endswith("(default)") and sum("(default)" in line for line in lines) == 1
    cells = [int(line.split()[1].split("x")[0]) for line in lines]
    assert cells == sorted(cells) and len(set(cells)) == len(cells)  # one line per resolution, coarsest first
    with pytest.raises(SystemExit):  # neither images nor --list-layers
        _script_main()(["--model", str(saved_run / "best.keras")])


@pytest.mark.parametrize("case", ["missing_model", "corrupt_model", "unreadable_image", "bad_class", "bad_layer"])
def test_script_errors_exit_2_without_traceback(saved_run, tmp_path, capsys, case):
    model = saved_run / "best.keras"
    images = [str(saved_run / "lesion_a.jpg")]
    extra = []
    if case == "missing_model":
        model = tmp_path / "nope.keras"
    elif case == "corrupt_model":
        model = tmp_path / "corrupt.keras"
        model.write_bytes(b"this is not a zip file")
    elif case == "unreadable_image":
        bad = tmp_path / "broken.jpg"
        bad.write_text("not an image")
        images.append(str(bad))
    elif case == "bad_class":
        extra = ["--class", "melanoma"]
    elif case == "bad_layer":
        extra = ["--layer", "conv9"]
    out = tmp_path / "out"
    code = _script_main()(["--model", str(model), *images, "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and "Traceback" not in captured.err
    expected = {"missing_model": "nope.keras", "corrupt_model": "corrupt.keras", "unreadable_image": "broken.jpg",
                "bad_class": "melanoma", "bad_layer": "conv9"}[case]
    assert expected in captured.err
    assert not out.exists() or not any(out.iterdir())  # nothing written on a bad input
