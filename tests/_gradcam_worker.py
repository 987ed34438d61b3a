"""Run Grad-CAM in a fresh process on the backend named by KERAS_BACKEND (test helper).

    KERAS_BACKEND=tensorflow python tests/_gradcam_worker.py jobs.json

jobs.json is a list of {"model": .keras path, "images": .npy (N, H, W, 3), "out": .npz,
"closed_form": bool, "class_index": None | int | [int] | "peak"}. Each .npz gets heatmaps, feature_cams, probabilities, class_indices,
predicted and backend; with closed_form, also `expected`: ReLU(sum_k W[k, c] A_k) / (h * w)
computed from the layer "features" and the kernel of "logits" in this same process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np

from keras_ham.gradcam import GradCAM


def closed_form(model: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    features = keras.Model(model.inputs[0], model.get_layer("features").output)(images, training=False)
    features = keras.ops.convert_to_numpy(features).astype(np.float64)
    kernel = keras.ops.convert_to_numpy(model.get_layer("logits").kernel).astype(np.float64)
    height, width = features.shape[1:3]
    return np.maximum(np.einsum("nhwk,kn->nhw", features, kernel[:, classes]), 0.0) / (height * width)


def main(jobs_path: str) -> None:
    for job in json.loads(Path(jobs_path).read_text()):
        model = keras.saving.load_model(job["model"], compile=False)
        images = np.load(job["images"])
        class_index = job.get("class_index")
        if class_index == "peak":  # per image, the class whose closed-form map peaks highest
            count, classes = len(images), int(model.get_layer("logits").kernel.shape[-1])
            peaks = [closed_form(model, images, np.full(count, c)).max(axis=(1, 2)) for c in range(classes)]
            class_index = np.stack(peaks, axis=1).argmax(axis=1).tolist()
        result = GradCAM(model).cam(images, class_index=class_index)
        arrays = {
            "heatmaps": result.heatmaps,
            "feature_cams": result.feature_cams,
            "probabilities": result.probabilities,
            "class_indices": result.class_indices,
            "predicted": result.predicted,
            "backend": np.array(keras.backend.backend()),
        }
        if job.get("closed_form"):
            arrays["expected"] = closed_form(model, images, result.class_indices)
        np.savez(job["out"], **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
