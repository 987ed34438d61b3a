#!/usr/bin/env python
"""Measure out-of-distribution scores both ways: demo model on real images, real model on demo images.

For each seed and torch thread count, trains two small classifiers (the synthetic demo data,
and a per-class sample of the real HAM10000 subset), then scores each model's in-distribution
images (its test split plus freshly drawn images of the same kind) against the other kind's
images, and prints the AUROC of every candidate score (0.5 = no separation, 1 = perfect) and the
share of each set flagged at a threshold set on the validation split at 5 % false alarms.

Candidates: energy of the logits; Mahalanobis on the pooled penultimate features (class means,
one Ledoit-Wolf covariance); per layer, the Mahalanobis distance of the channel means and
standard deviations of that layer's activations (one Gaussian, Ledoit-Wolf covariance, fitted
on the training split); and sums of such per-layer distances, each divided by its mean on the
validation split (Lee et al. 2018's feature ensemble, with equal weights).

    python benchmarks/ood_scores.py --size 32 --epochs 3 --per-class 60 --seeds 0,1 --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np

#: Layers whose channel statistics are scored (ResNet-18 names; the stem, stage 1, stage 2...).
LAYERS = ("resnet_preprocess", "conv1_relu", "pool1_pool", "conv2_block1_out", "conv2_block2_out",
          "conv3_block2_out", "conv4_block2_out")
#: Sums of per-layer distances that are scored as one.
COMBINATIONS = {
    "stem+stage1": ("conv1_relu", "pool1_pool", "conv2_block1_out", "conv2_block2_out"),
    "pool1+stage1": ("pool1_pool", "conv2_block1_out", "conv2_block2_out"),
    "pre+pool1": ("resnet_preprocess", "pool1_pool"),
    "stem..stage2": ("conv1_relu", "pool1_pool", "conv2_block1_out", "conv2_block2_out", "conv3_block2_out"),
}
FALSE_ALARM_RATE = 0.05


def prepare_data(root: Path, real_dir: Path, per_class: int, fresh: int) -> dict:
    """Demo data and its splits, a per-class real sample and its splits, plus fresh images of each kind."""
    import pandas as pd

    from keras_ham.demo_data import make_demo_data
    from keras_ham.split import write_split_files

    demo = make_demo_data(root / "demo", seed=3, num_lesions=70, min_lesions_per_class=8, image_size=(96, 72), log=None)
    demo_extra = make_demo_data(root / "demo_extra", seed=11, num_lesions=70, min_lesions_per_class=8,
                                image_size=(96, 72), log=None)
    if not (root / "demo_splits" / "test.csv").exists():
        write_split_files(demo / "HAM10000_metadata.csv", root / "demo_splits", seed=3, log=None)
    meta = pd.read_csv(real_dir / "HAM10000_metadata.csv")
    sample = pd.concat([rows.sample(min(len(rows), per_class), random_state=0) for _, rows in meta.groupby("dx")])
    real_meta = root / f"real_{per_class}" / "HAM10000_metadata.csv"
    if not (root / f"real_{per_class}" / "splits" / "test.csv").exists():
        real_meta.parent.mkdir(parents=True, exist_ok=True)
        sample.to_csv(real_meta, index=False)
        write_split_files(real_meta, real_meta.parent / "splits", seed=1, image_dirs=[real_dir], log=None)
    unused = sorted(set(meta["image_id"]) - set(sample["image_id"]))
    chosen = np.random.default_rng(0).choice(len(unused), min(fresh, len(unused)), replace=False)
    real_paths = {p.stem: p for p in real_dir.rglob("*.jpg")}
    return {
        "demo": {"dir": demo, "splits": root / "demo_splits", "fresh": sorted(demo_extra.rglob("*.jpg"))},
        "real": {"dir": real_dir, "splits": real_meta.parent / "splits",
                 "fresh": [real_paths[unused[i]] for i in sorted(chosen)]},
    }


def load_images(kind: dict, size: int) -> dict:
    """(N, size, size, 3) arrays of the splits and the fresh images; labels of the training split."""
    import pandas as pd

    from keras_ham.images import load_image
    from keras_ham.labels import CLASS_TO_INDEX

    paths = {p.stem: p for p in Path(kind["dir"]).rglob("*.jpg")}
    out = {}
    for split in ("train", "val", "test"):
        frame = pd.read_csv(kind["splits"] / f"{split}.csv")
        out[split] = np.stack([load_image(paths[i], size) for i in frame["image_id"]]).astype("float32")
        out[f"{split}_labels"] = frame["dx"].map(CLASS_TO_INDEX).to_numpy()
    out["fresh"] = np.stack([load_image(p, size) for p in kind["fresh"]]).astype("float32")
    return out


def layer_statistics(model, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per layer of LAYERS: (N, 2C) channel means and standard deviations over positions;
    "penultimate": the pooled features; "logits"."""
    import keras

    from keras_ham.model import classifier_input

    names = list(LAYERS) + ["avg_pool", "logits"]
    extractor = keras.Model(classifier_input(model), [model.get_layer(n).output for n in names])
    parts: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(images), batch_size):
        outputs = extractor(images[start:start + batch_size], training=False)
        for name, output in zip(names, outputs):
            value = keras.ops.convert_to_numpy(output).astype(np.float64)
            if value.ndim == 4:
                value = np.concatenate([value.mean(axis=(1, 2)), value.std(axis=(1, 2))], axis=1)
            parts[name].append(value)
    out = {n: np.concatenate(v) for n, v in parts.items()}
    out["penultimate"] = out.pop("avg_pool")
    return out


def scores(train: dict, train_labels: np.ndarray, sets: dict[str, dict]) -> dict[str, dict[str, np.ndarray]]:
    """Every candidate score of every set in `sets` (which must hold "val"), higher = less familiar."""
    from sklearn.covariance import LedoitWolf

    def gaussian(features):
        mean, precision = features.mean(0), LedoitWolf().fit(features).precision_
        return lambda f: np.einsum("nd,de,ne->n", f - mean, precision, f - mean)

    out: dict[str, dict[str, np.ndarray]] = {}
    for name, values in sets.items():
        z = values["logits"]
        peak = z.max(1)
        out.setdefault("energy", {})[name] = -(peak + np.log(np.exp(z - peak[:, None]).sum(1)))
    classes = np.unique(train_labels)
    means = np.stack([train["penultimate"][train_labels == c].mean(0) for c in classes])
    precision = LedoitWolf().fit(train["penultimate"] - means[np.searchsorted(classes, train_labels)]).precision_
    for name, values in sets.items():
        d = values["penultimate"][:, None, :] - means[None]
        out.setdefault("maha_penultimate", {})[name] = np.einsum("nkd,de,nke->nk", d, precision, d).min(1)
    for layer in LAYERS:
        distance = gaussian(train[layer])
        raw = {name: distance(values[layer]) for name, values in sets.items()}
        scale = raw["val"].mean()
        out[f"meanstd:{layer}"] = {name: v / scale for name, v in raw.items()}
    for combo, layers in COMBINATIONS.items():
        out[f"sum:{combo}"] = {name: sum(out[f"meanstd:{layer}"][name] for layer in layers) for name in sets}
    return out


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def measure(kind: str, data: dict, images: dict, args, seed: int, threads: int, work: Path) -> dict:
    """Train on `kind`, score its own held-out images against the other kind's."""
    from keras_ham.config import load_config
    from keras_ham.model import load_classifier
    from keras_ham.train import train

    other = "real" if kind == "demo" else "demo"
    splits = data[kind]["splits"]
    config = load_config(overrides={
        "model": "resnet18", "weights": None, "image_size": args.size, "batch_size": 16,
        "max_epochs": args.epochs, "lr": 1e-3, "batchnorm_momentum": 0.9, "export_onnx": False, "seed": seed,
        "train_csv": str(splits / "train.csv"), "val_csv": str(splits / "val.csv"), "test_csv": str(splits / "test.csv"),
        "image_dirs": [str(data[kind]["dir"])], "cache_dir": str(work / "cache"), "out_dir": str(work / "runs"),
        "run_name": f"{kind}_s{seed}_t{threads}",
    })
    started = time.perf_counter()
    result = train(config, log=lambda message: None, verbose=0)
    train_seconds = time.perf_counter() - started
    model = load_classifier(Path(result.run_dir) / "best.keras")
    own, foreign = images[kind], images[other]
    stats = {name: layer_statistics(model, own[name]) for name in ("train", "val", "test", "fresh")}
    stats["other_test"] = layer_statistics(model, foreign["test"])
    stats["other_fresh"] = layer_statistics(model, foreign["fresh"])
    sets = {name: stats[name] for name in ("val", "test", "fresh", "other_test", "other_fresh")}
    row = {"model": kind, "seed": seed, "threads": threads, "train_seconds": round(train_seconds, 1),
           "n_train": len(own["train"]), "n_inside": len(own["test"]) + len(own["fresh"]),
           "n_outside": len(foreign["test"]) + len(foreign["fresh"]), "auroc": {}, "flagged": {}}
    for name, by_set in scores(stats["train"], own["train_labels"], sets).items():
        inside = np.r_[by_set["test"], by_set["fresh"]]
        outside = np.r_[by_set["other_test"], by_set["other_fresh"]]
        threshold = np.quantile(by_set["val"], 1 - FALSE_ALARM_RATE, method="higher")
        row["auroc"][name] = round(auroc(inside, outside), 4)
        row["flagged"][name] = [round(float((inside > threshold).mean()), 3), round(float((outside > threshold).mean()), 3)]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=60, help="real images sampled per class")
    parser.add_argument("--fresh", type=int, default=200, help="real images outside the sample, scored as well")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--kinds", default="demo,real")
    parser.add_argument("--work", default="/tmp/keras_ham_ood_scores")
    parser.add_argument("--real-data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-224"))
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args(argv)
    import torch

    from keras_ham.machine import cpu_model, load_average

    work = Path(args.work)
    data = prepare_data(work / "data", Path(args.real_data), args.per_class, args.fresh)
    images = {kind: load_images(data[kind], args.size) for kind in ("demo", "real")}
    print(f"# {cpu_model()}, {os.cpu_count()} cores, load {load_average()}, size {args.size}, epochs {args.epochs}",
          file=sys.stderr)
    for seed in (int(s) for s in args.seeds.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for kind in args.kinds.split(","):
                row = measure(kind, data, images, args, seed, threads, work / f"size{args.size}_e{args.epochs}")
                row.update({"size": args.size, "epochs": args.epochs, "per_class": args.per_class,
                            "load_average": load_average()})
                line = json.dumps(row)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as handle:
                        handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
