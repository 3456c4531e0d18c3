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
- the gain: held-out macro AP of the head phase (training.train_head, our default settings)
  trained on the plain features alone, and on the plain features plus 1 and plus --views
  augmented views, each over --seeds seeds (initialisation, dropout and batch order); the
  same seeds for every variant, so the differences are paired.

With --train-sizes, the same comparison is repeated on random subsets of the training split
(and a validation subset in proportion), as a user with a few hundred labelled frames has;
each seed draws its own subset, which every variant shares, and the test split stays whole.
The features and views are computed once for the whole split and subsetted by row.

    python bench/head_augmentation.py logodet
    python ../shared/tools/make_symbol_frames.py /tmp/frames3000 --n 3000 --layout multi
    python bench/head_augmentation.py frames --frames-dir /tmp/frames3000
    python bench/head_augmentation.py logodet --views 2 --seeds 8 --train-sizes 150,300,600,1500
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

    from symbol_trainer import augmentation
    from symbol_trainer.features import FEATURE_CHUNK_BATCHES, decoded_chunks
    augmenter = augmentation.augmentation_layers(policy, False, seed)

    @tf.function(reduce_retracing=True)
    def infer(images):
        return parts.features(augmenter(images, training=True), training=False)

    chunks = []
    with contextlib.closing(decoded_chunks(
            paths, geometry, FEATURE_CHUNK_BATCHES * BATCH)) as decoded:
        for images in decoded:
            for first in range(0, len(images), BATCH):
                chunks.append(np.asarray(infer(images[first:first + BATCH])))
    return np.concatenate(chunks).astype(np.float32)


def head_ap(parts, symbols, config, train, validation, test_features, test_labels,
            seed: int) -> tuple[float, int]:
    """Held-out macro AP of a head trained from a fresh initialisation drawn with `seed`,
    and its epochs."""
    import keras

    from symbol_trainer import training
    keras.utils.set_random_seed(seed)
    for symbol in symbols:
        layer = parts.head.get_layer(symbol)
        layer.kernel.assign(layer.kernel_initializer(layer.kernel.shape))
        layer.bias.assign(np.zeros(layer.bias.shape, np.float32))
    rows: list[dict] = []
    training.train_head(parts, symbols, dataclasses.replace(config, seed=seed), train, validation,
                      rows)
    outputs = parts.head.predict(test_features, batch_size=1024, verbose=0)
    probabilities = np.concatenate([outputs[s] for s in symbols], axis=1)
    return macro_ap(test_labels, probabilities), len(rows)


def spread(values: np.ndarray) -> str:
    return f"{values.mean():+.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def validation_size(train_size: int, labels: dict) -> int:
    """Validation images for a training subset: the split's own ratio, at least 20."""
    whole = len(labels["train"])
    if train_size >= whole:
        return len(labels["validation"])
    return min(len(labels["validation"]),
               max(20, round(train_size * len(labels["validation"]) / whole)))


def compare_views(parts, symbols, config, features, views, labels, variants, size, seeds):
    """{variant: [(AP, epochs, head seconds) per seed]} for heads trained on `size` training
    images (a subset drawn per seed, shared by every variant). A variant (augmented views,
    plain copies) trains on the plain features plus that many augmented views of them, or
    on the plain features repeated that many times over (the same number of steps as the
    views without their augmentation, which tells the two effects apart)."""
    from symbol_trainer import training
    results = {variant: [] for variant in variants}
    for seed in range(seeds):
        rng = np.random.default_rng(10_000 + seed)
        whole = len(labels["train"])
        rows = np.sort(rng.choice(whole, size, replace=False)) if size < whole else np.arange(whole)
        held = len(labels["validation"])
        val_rows = (np.sort(rng.choice(held, validation_size(size, labels), replace=False))
                    if size < whole else np.arange(held))
        train_labels = labels["train"][rows]
        positive = training.positive_weights(train_labels, config.positive_weighting)
        train_weights = training.sample_weights(train_labels, positive)
        validation = (features["validation"][val_rows], labels["validation"][val_rows],
                      training.sample_weights(labels["validation"][val_rows], positive))
        for variant in variants:
            count, copies = variant
            parts_of_train = [features["train"][rows]] * copies + [v[rows] for v in views[:count]]
            train = (np.concatenate(parts_of_train),
                     np.tile(train_labels, (len(parts_of_train), 1)),
                     np.tile(train_weights, (len(parts_of_train), 1)))
            start = time.monotonic()
            ap, epochs = head_ap(parts, symbols, config, train, validation,
                                 features["test"], labels["test"], seed)
            results[variant].append((ap, epochs, time.monotonic() - start))
            print(f"{size} images, seed {seed}, {variant_label(variant)}: AP {ap:.3f}, "
                  f"{epochs} epochs", flush=True)
    return results


def variant_label(variant: tuple[int, int]) -> str:
    count, copies = variant
    if count:
        return f"plain + {count} augmented view{'s' if count > 1 else ''}"
    return "plain features" if copies == 1 else f"plain features x{copies} (no augmentation)"


def compute_features(parts, parts_of, geometry, args):
    """Plain features of every split, --views augmented views of the training split, and
    the seconds each took."""
    from symbol_trainer.features import extract_features
    seconds, features = {}, {}
    for name, part in parts_of.items():
        start = time.monotonic()
        features[name] = extract_features(parts, part["path"].tolist(), geometry, BATCH)
        seconds[name] = time.monotonic() - start
    train_paths = parts_of["train"]["path"].tolist()
    views, view_seconds = [], []
    for view in range(args.views):
        start = time.monotonic()
        views.append(augmented_features(parts, train_paths, geometry, args.policy, 1000 + view))
        view_seconds.append(time.monotonic() - start)
        print(f"view {view + 1}: {view_seconds[-1]:.1f} s", flush=True)
    return features, seconds, views, view_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--views", type=int, default=3,
                        help="Most augmented views per training image. Default: %(default)s.")
    parser.add_argument("--seeds", type=int, default=5,
                        help="Head trainings per variant. Default: %(default)s.")
    parser.add_argument("--policy", default="default", help="Augmentation policy of the views.")
    parser.add_argument("--train-sizes", default="",
                        help="Comma-separated numbers of training images to repeat the "
                             "comparison on, each a random subset per seed. Default: the whole "
                             "training split only.")
    parser.add_argument("--keep", type=Path,
                        help="An .npz file that keeps the features, views and their timings: "
                             "written by the first run, read by later runs with the same data "
                             "flags, so that they only repeat the head trainings.")
    args = parser.parse_args()
    check_inputs(parser, args)
    try:
        sizes = [int(size) for size in args.train_sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--train-sizes takes numbers separated by commas; got {args.train_sizes!r}")
    if any(size < 10 for size in sizes):
        parser.error(f"--train-sizes must each be at least 10; got {args.train_sizes!r}")
    logging.basicConfig(level=logging.WARNING)

    from symbol_trainer import model, settings
    from symbol_trainer.images import ImageGeometry
    table, symbols = load_data(args)
    height, width, resize = input_shape(args)
    geometry = ImageGeometry(height, width, resize)
    config = settings.TrainingConfig(alpha=ALPHA, weights=str(WEIGHTS), image_size=SIZE,
                                   batch_size=BATCH, resize=resize)
    parts = model.build_model(list(symbols), config, geometry)
    parts_of = {name: table[table.split == name] for name in ("train", "validation", "test")}
    print(f"Split: {len(parts_of['train']):,} train, {len(parts_of['validation']):,} validation, "
          f"{len(parts_of['test']):,} test images, input {height}x{width}", flush=True)

    if args.keep and args.keep.is_file():
        with np.load(args.keep) as kept:
            features = {name: kept[f"features_{name}"] for name in parts_of}
            seconds = {name: float(kept[f"seconds_{name}"]) for name in parts_of}
            views = [kept[f"view_{view}"] for view in range(args.views)]
            view_seconds = [float(s) for s in kept["view_seconds"][:args.views]]
        if any(len(features[name]) != len(part) for name, part in parts_of.items()):
            parser.error(f"--keep {args.keep} holds features of other data; remove it")
        print(f"Features and views read from {args.keep}", flush=True)
    else:
        features, seconds, views, view_seconds = compute_features(parts, parts_of, geometry,
                                                                  args)
        if args.keep:
            np.savez(args.keep, view_seconds=np.array(view_seconds),
                     **{f"features_{name}": f for name, f in features.items()},
                     **{f"seconds_{name}": np.array(t) for name, t in seconds.items()},
                     **{f"view_{view}": v for view, v in enumerate(views)})
    train_paths = parts_of["train"]["path"].tolist()

    labels = {name: part[list(symbols)].to_numpy(np.float32) for name, part in parts_of.items()}
    train_images = len(train_paths)
    print()
    print(f"Plain features of the {train_images:,} training images: {seconds['train']:.1f} s "
          f"({train_images / seconds['train']:.1f} images/s)")
    if view_seconds:
        print(f"One augmented view ('{args.policy}') of them: {np.median(view_seconds):.1f} s "
              f"(median of {len(view_seconds)}; "
              f"{train_images / np.median(view_seconds):.1f} images/s)")
    counts = sorted({1, args.views}) if args.views else []
    variants = [(0, 1)] + [(count, 1) for count in counts] + [(0, count + 1) for count in counts]
    for size in [s for s in sizes if s < train_images] + [train_images]:
        results = compare_views(parts, list(symbols), config, features, views, labels, variants,
                                size, args.seeds)
        print()
        whole = size == train_images
        print(f"Training on {'all ' if whole else ''}{size:,} images"
              + ("" if whole else f" (a random subset per seed; validation "
                                  f"{validation_size(size, labels):,})") + ":")
        print(f"{'head trained on':<42}{'held-out macro AP':>20}{'vs plain':>18}"
              f"{'epochs':>8}{'head s':>8}{'features s':>12}")
        plain = np.array([r[0] for r in results[(0, 1)]])
        for variant in variants:
            aps = np.array([r[0] for r in results[variant]])
            gain = "" if variant == (0, 1) else spread(aps - plain)
            extraction = (seconds["train"] + sum(view_seconds[:variant[0]])) * size / train_images
            print(f"{variant_label(variant):<42}{spread(aps)[1:]:>20}{gain:>18}"
                  f"{np.mean([r[1] for r in results[variant]]):>8.1f}"
                  f"{np.mean([r[2] for r in results[variant]]):>8.1f}{extraction:>12.1f}")
    print(f"(mean ± standard deviation over {args.seeds} seeds; 'vs plain' pairs each seed's "
          f"run with the plain run of the same seed and subset; 'features s' scales the whole "
          f"split's extraction time to the subset)")
    print(f"Peak RSS: {peak_rss_mb():,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
