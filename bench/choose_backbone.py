#!/usr/bin/env python3
"""The measurement behind the default backbone and image size (docs/choosing-the-backbone.md).

Speed: for each backbone at 224x224, images/s of feature extraction (inference) and of a
fine-tuning training step on in-memory tensors, on this machine's CPU. Weights do not change
speed, so random weights are used and no download is needed.

Accuracy: only MobileNetV2-0.35 has ImageNet weights offline here (../shared/weights), so
accuracy is measured for it at several input sizes: validation ROC-AUC and average precision
of the head phase (backbone frozen) on frames from ../shared/tools/make_symbol_frames.py.

    python bench/choose_backbone.py FRAMES_DIR   # FRAMES_DIR from make_symbol_frames.py --layout binary
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from symbol_trainer import (command, datasets, image_folders,
                            model, settings, splitting, training)  # noqa: E402
from symbol_trainer.features import extract_features
from symbol_trainer.images import ImageGeometry
from symbol_trainer import evaluation  # noqa: E402
import keras  # noqa: E402

SHARED_WEIGHTS = (Path(__file__).resolve().parents[2] / "shared" / "weights"
                  / "mobilenet_v2_0.35_no_top_imagenet.weights.h5")
SPEED_BACKBONES = [("mobilenet_v2", 0.35), ("mobilenet_v2", 1.0), ("mobilenet_v3_small", 1.0),
                   ("mobilenet_v3_large", 1.0), ("efficientnet_b0", 1.0),
                   ("efficientnet_v2_b0", 1.0), ("resnet50", 1.0), ("inception_v3", 1.0),
                   ("convnext_tiny", 1.0)]


def rate(step, batch, repeats):
    step(batch)  # trace and warm up
    step(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        step(batch)
    return repeats * len(batch) / (time.perf_counter() - start)


def speed(batch_size=32, size=224, repeats=3):
    print(f"Speed at {size}x{size}, batch {batch_size}, CPU threads {os.cpu_count()}")
    print(f"{'backbone':<22}{'params (M)':>11}{'features img/s':>16}{'fine-tune img/s':>17}")
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3)).astype("float32")
    labels = {"s": np.zeros((batch_size, 1), "float32")}
    for name, alpha in SPEED_BACKBONES:
        config = settings.TrainingConfig(backbone=name, alpha=alpha, weights="none", image_size=size)
        parts = model.build_model(["s"], config, ImageGeometry(size, size))
        infer = datasets.compiled_inference(parts.features)
        features = rate(lambda b: np.asarray(infer(b)), batch, repeats)
        model.unfreeze_top(parts.backbone, config.fine_tune_fraction)
        parts.model.compile(optimizer="adam", loss={"s": "binary_crossentropy"})
        train = rate(lambda b: parts.model.train_on_batch(b, labels), batch, repeats)
        label = f"{name} (alpha {alpha})" if settings.BACKBONES[name].alphas else name
        print(f"{label:<22}{parts.model.count_params() / 1e6:>11.1f}{features:>16.1f}{train:>17.1f}",
              flush=True)
        keras.backend.clear_session()


def accuracy(frames_dir, sizes=(128, 160, 224, 288), symbol="star"):
    if not SHARED_WEIGHTS.is_file():
        print(f"accuracy: skipped, {SHARED_WEIGHTS} is missing")
        return
    images = image_folders.images_from_directories(Path(frames_dir) / f"with_{symbol}",
                                            Path(frames_dir) / f"without_{symbol}")
    labels = images.labels()
    validation = splitting.split_train_validation(labels, 0.2, seed=0)
    print(f"\nAccuracy of MobileNetV2-0.35 (ImageNet), head phase only, {len(labels)} frames, "
          f"{validation.sum()} validated")
    print(f"{'size':>6}{'features s':>12}{'ROC-AUC':>9}{'AP':>7}")
    for size in sizes:
        config = settings.TrainingConfig(alpha=0.35, weights=str(SHARED_WEIGHTS), image_size=size)
        geometry = ImageGeometry(size, size)
        keras.utils.set_random_seed(0)
        parts = model.build_model([symbol], config, geometry)
        start = time.perf_counter()
        features = extract_features(parts, images.table["path"].tolist(), geometry, 32)
        seconds = time.perf_counter() - start
        weights = training.sample_weights(labels, training.positive_weights(labels[~validation], "balanced"))
        training.train_head(parts, [symbol], config,
                          (features[~validation], labels[~validation], weights[~validation]),
                          (features[validation], labels[validation], weights[validation]), [])
        p = parts.head.predict(features[validation], verbose=0)[symbol][:, 0]
        m = evaluation.symbol_metrics(labels[validation, 0], p)
        print(f"{size:>6}{seconds:>12.1f}{m['roc_auc']:>9.3f}{m['average_precision']:>7.3f}", flush=True)
        keras.backend.clear_session()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frames_dir")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    command.configure_logging(quiet=True)
    if not args.skip_speed:
        speed()
    accuracy(args.frames_dir)
