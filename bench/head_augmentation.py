#!/usr/bin/env python3
"""What augmentation would cost and gain in the head phase, where features are cached.

Our head phase trains on backbone features computed once per image, from the image as it is
(no augmentation); augmentation happens in fine-tuning, where the backbone sees every image
anew each epoch. The alternative the literature offers for cached features is a few
augmented views per training image, each computed once through the backbone and cached
beside the plain one. This measures that alternative on the split and backbone of
bench/train_speed.py (MobileNetV2-0.35 with the shared ImageNet weights):

- the cost: seconds to compute the plain features of the training images, and of each
  augmented view (the default augmentation policy, --augment default, applied to the
  decoded batch before the backbone, as fine-tuning applies it);
- the gain: held-out macro AP of the head phase (common.train_head, our default settings)
  trained on the plain features alone, and on the plain features plus 1 and plus --views
  augmented views, each over --seeds seeds (initialisation, dropout and batch order); the
  same seeds for every variant, so the differences are paired.

    python bench/head_augmentation.py logodet
    python ../shared/tools/make_symbol_frames.py /tmp/frames3000 --n 3000 --layout multi
    python bench/head_augmentation.py frames --frames-dir /tmp/frames3000
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import (ALPHA, BATCH, SIZE, WEIGHTS, add_data_arguments,  # noqa: E402
                         check_inputs, input_shape, load_data, macro_ap, peak_rss_mb)


def augmented_features(parts, paths, geometry, policy: str, seed: int) -> np.ndarray:
    """Pooled features of each image after one random draw of `policy`'s augmentation."""
    import tensorflow as tf

    import augmentation
    import common
    augmenter = augmentation.augmentation_layers(policy, False, seed)

    @tf.function(reduce_retracing=True)
    def infer(images):
        return parts.features(augmenter(images, training=True), training=False)

    chunks = []
    with contextlib.closing(common.decoded_chunks(
            paths, geometry, common.FEATURE_CHUNK_BATCHES * BATCH)) as decoded:
        for images in decoded:
            for first in range(0, len(images), BATCH):
                chunks.append(infer(images[first:first + BATCH]).numpy())
    return np.concatenate(chunks).astype(np.float32)


def head_ap(parts, symbols, config, train, validation, test_features, test_labels,
            seed: int) -> tuple[float, int]:
    """Held-out macro AP of a head trained from a fresh initialisation drawn with `seed`,
    and its epochs."""
    import keras

    import common
    keras.utils.set_random_seed(seed)
    for symbol in symbols:
        layer = parts.head.get_layer(symbol)
        layer.kernel.assign(layer.kernel_initializer(layer.kernel.shape))
        layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    rows: list[dict] = []
    common.train_head(parts, symbols, dataclasses.replace(config, seed=seed), train, validation,
                      rows)
    outputs = parts.head.predict(test_features, batch_size=1024, verbose=0)
    probabilities = np.concatenate([outputs[s] for s in symbols], axis=1)
    return macro_ap(test_labels, probabilities), len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--views", type=int, default=3,
                        help="Most augmented views per training image. Default: %(default)s.")
    parser.add_argument("--seeds", type=int, default=5,
                        help="Head trainings per variant. Default: %(default)s.")
    parser.add_argument("--policy", default="default", help="Augmentation policy of the views.")
    args = parser.parse_args()
    check_inputs(parser, args)
    logging.basicConfig(level=logging.WARNING)

    import common
    table, symbols = load_data(args)
    height, width, resize = input_shape(args)
    geometry = common.ImageGeometry(height, width, resize)
    config = common.TrainingConfig(alpha=ALPHA, weights=str(WEIGHTS), image_size=SIZE,
                                   batch_size=BATCH, resize=resize)
    parts = common.build_model(list(symbols), config, geometry)
    parts_of = {name: table[table.split == name] for name in ("train", "validation", "test")}
    print(f"Split: {len(parts_of['train']):,} train, {len(parts_of['validation']):,} validation, "
          f"{len(parts_of['test']):,} test images, input {height}x{width}", flush=True)

    seconds, features = {}, {}
    for name, part in parts_of.items():
        start = time.monotonic()
        features[name] = common.extract_features(parts, part["path"].tolist(), geometry, BATCH)
        seconds[name] = time.monotonic() - start
    train_paths = parts_of["train"]["path"].tolist()
    views, view_seconds = [], []
    for view in range(args.views):
        start = time.monotonic()
        views.append(augmented_features(parts, train_paths, geometry, args.policy, 1000 + view))
        view_seconds.append(time.monotonic() - start)
        print(f"view {view + 1}: {view_seconds[-1]:.1f} s", flush=True)

    labels = {name: part[list(symbols)].to_numpy(np.float32) for name, part in parts_of.items()}
    positive = common.positive_weights(labels["train"], config.positive_weighting)
    weights = {name: common.sample_weights(labels[name], positive) for name in labels}
    validation = (features["validation"], labels["validation"], weights["validation"])
    counts = sorted({0, 1, args.views})
    results = {count: [] for count in counts}
    for seed in range(args.seeds):
        for count in counts:
            train = (np.concatenate([features["train"], *views[:count]]),
                     np.tile(labels["train"], (count + 1, 1)),
                     np.tile(weights["train"], (count + 1, 1)))
            start = time.monotonic()
            ap, epochs = head_ap(parts, list(symbols), config, train, validation,
                                 features["test"], labels["test"], seed)
            results[count].append((ap, epochs, time.monotonic() - start))
            print(f"seed {seed}, {count} views: AP {ap:.3f}, {epochs} epochs", flush=True)

    train_images = len(train_paths)
    print()
    print(f"Plain features of the {train_images:,} training images: {seconds['train']:.1f} s "
          f"({train_images / seconds['train']:.1f} images/s)")
    print(f"One augmented view ('{args.policy}') of them: {np.median(view_seconds):.1f} s "
          f"(median of {len(view_seconds)}; {train_images / np.median(view_seconds):.1f} images/s)")
    print()
    print(f"{'head trained on':<34}{'held-out macro AP':>22}{'vs plain':>22}"
          f"{'epochs':>8}{'head s':>8}{'features s':>12}")
    plain = np.array([r[0] for r in results[0]])

    def spread(values: np.ndarray) -> str:
        return f"{values.mean():+.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"

    for count in counts:
        aps = np.array([r[0] for r in results[count]])
        label = ("plain features" if count == 0
                 else f"plain + {count} augmented view{'s' if count > 1 else ''}")
        gain = "" if count == 0 else spread(aps - plain)
        extraction = seconds["train"] + sum(view_seconds[:count])
        print(f"{label:<34}{spread(aps)[1:]:>22}{gain:>22}"
              f"{np.mean([r[1] for r in results[count]]):>8.1f}"
              f"{np.mean([r[2] for r in results[count]]):>8.1f}{extraction:>12.1f}")
    print(f"(mean ± standard deviation over {args.seeds} seeds; 'vs plain' pairs each seed's "
          f"run with the plain run of the same seed)")
    print(f"Peak RSS: {peak_rss_mb():,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
