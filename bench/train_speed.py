#!/usr/bin/env python3
"""Training speed, memory and accuracy: the keras.io transfer-learning recipe against ours.

On one data set, one split, one backbone (MobileNetV2 alpha 0.35 with the shared ImageNet
weights, so it runs offline) and one input size (see input_shape), these stages each run in a
fresh process, so that each peak RSS is its own:

1. baseline: the keras.io transfer-learning recipe, faithfully and briefly: a frozen backbone
   (called with training=False) + global average pooling + dropout 0.2 + one sigmoid Dense per
   symbol, Adam(1e-3) for --baseline-head-epochs, then the whole backbone unfrozen at
   Adam(1e-5) for --baseline-fine-tune-epochs; images read and decoded (tf.io.decode_image,
   tf.image.resize) every epoch by a standard tf.data pipeline with AUTOTUNE and prefetch.
2. ours: pipeline.train_and_save with the default TrainingConfig (but the backbone above), on the
   same training and validation images, with the test images scored after the head phase
   and after every fine-tuning epoch (not timed), so that the report can say when the run
   first held a model as good as the recipe's; ours_head, the same run stopped after the head
   phase (--fine-tune-epochs 0), which says how soon our run reaches an AP; and
   ours_head_warm, ours_head again with the feature cache (--cache-dir) that ours_head
   filled: what a second run on the same frames costs.
3. raw: images/s of train_on_batch of our fine-tuning model (backbone and fused head behind
   its default augmentation layers; also without them, with XLA, and in the saved model's
   form with one named output and loss per symbol), and of inference of the backbone, on
   in-memory uint8 batches of the same size: the ceilings of the fine-tuning phase and of
   feature extraction.

Held-out macro average precision is measured on a test split neither training saw, over the
symbols with a positive there; the difference between ours and the recipe gets a 95 %
interval from a paired bootstrap over the test set's groups (episodes, or images).

This machine's speed drifts (2-3x within the hour has been seen), so a short reference
measurement (inference of MobileNetV2-0.35 with random weights on in-memory batches) runs in a
process of its own before the first stage and after each one; the report prints them, so a
ratio between stages measured at different speeds shows as such. Splits: logodet3k_clothes uses its own train/valid/test split
(splits.csv); synthetic frames are split by episode (20 % of episodes test, then 20 % of the
rest validation), so no shot is in two splits.

    python bench/train_speed.py logodet
    python ../shared/tools/make_symbol_frames.py /tmp/frames3000 --n 3000 --layout multi
    python bench/train_speed.py frames --frames-dir /tmp/frames3000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_0.35_no_top_imagenet.weights.h5"
ALPHA, SIZE, BATCH = 0.35, 224, 32


def input_shape(args) -> tuple[int, int, str]:
    """Height, width and resize method of every model in the run. The 16:9 synthetic frames
    keep their shape, 224x384, which is our default geometry for them (--resize letterbox);
    the recipe resizes them to the same size, so both see the same pixels per frame. Square
    inputs (--square, and always for logodet's mixed portrait and landscape photos) squash."""
    if args.data == "frames" and not args.square:
        return SIZE, 384, "letterbox"
    return SIZE, SIZE, "squash"
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Data and split (computed once by the parent, written to a CSV every stage reads)


def load_data(args):
    import pandas as pd

    from symbol_trainer import labels_csv, splitting
    if args.data == "logodet":
        base = SHARED / "data" / "logodet3k_clothes"
        images = labels_csv.images_from_csv(base / "images", base / "labels.csv")
        original = pd.read_csv(base / "splits.csv").set_index("filename")["original_split"]
        split = images.table["filename"].map(original).map(
            {"train": "train", "valid": "validation", "test": "test"}).to_numpy()
    else:
        base = Path(args.frames_dir)
        images = labels_csv.images_from_csv(base / "images", base / "labels.csv")
        episodes = images.table["episode"].astype(str).to_numpy()
        rng = np.random.default_rng(0)
        unique = rng.permutation(sorted(set(episodes)))
        test_episodes = set(unique[: max(1, round(0.2 * len(unique)))])
        split = np.where(np.isin(episodes, list(test_episodes)), "test", "train").astype(object)
        rest = np.flatnonzero(split == "train")
        is_validation = splitting.split_train_validation(images.labels()[rest], 0.2, 0, episodes[rest])
        split[rest[is_validation]] = "validation"
    table = images.table.assign(split=split)
    if args.limit:
        table = pd.concat([part.head(max(2, int(args.limit * len(part) / len(table))))
                           for _, part in table.groupby("split")])
    return table, images.symbols


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that load_data and check_inputs read, shared by the benchmarks here."""
    parser.add_argument("data", choices=["logodet", "frames"])
    parser.add_argument("--frames-dir", help="Output folder of make_symbol_frames.py --layout multi.")
    parser.add_argument("--square", action="store_true",
                        help="Frames too at 224x224, squashed, as earlier versions of this "
                             "benchmark ran them, instead of 224x384.")
    parser.add_argument("--limit", type=int, default=0,
                        help="Use only about this many images (a quick check of the script).")


def check_inputs(parser: argparse.ArgumentParser, args) -> None:
    """What every benchmark here needs before it starts: its data and the shared weights."""
    if args.data == "frames" and not args.frames_dir:
        parser.error("frames needs --frames-dir")
    if not WEIGHTS.is_file():
        parser.error(f"needs the shared ImageNet weights at {WEIGHTS}")


def macro_ap(labels: np.ndarray, probabilities: np.ndarray) -> float:
    from symbol_trainer import evaluation
    values = [evaluation.average_precision(labels[:, j] == 1, probabilities[:, j])
              for j in range(labels.shape[1]) if (labels[:, j] == 1).any()]
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# Stages


def stage_baseline(table, symbols, args) -> dict:
    import keras
    import tensorflow as tf

    def dataset(part, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((part["path"].tolist(),
                                                 part[symbols].to_numpy(np.float32)))
        if shuffle:
            ds = ds.shuffle(len(part), seed=0, reshuffle_each_iteration=True)

        def load(path, label):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            return tf.image.resize(image, (height, width)), label

        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)

    height, width, _ = input_shape(args)
    train, validation, test = (table[table.split == s] for s in ("train", "validation", "test"))
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(alpha=ALPHA, include_top=False, weights=None,
                                          input_shape=(height, width, 3))
    base.load_weights(WEIGHTS)
    base.trainable = False
    inputs = keras.Input((height, width, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNetV2's preprocess_input
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(len(symbols), activation="sigmoid")(x))
    result = {"train_images": len(train)}

    started = time.monotonic()
    model.compile(keras.optimizers.Adam(), keras.losses.BinaryCrossentropy())
    model.fit(dataset(train, True), validation_data=dataset(validation, False),
              epochs=args.baseline_head_epochs, verbose=2)
    result["head_seconds"] = time.monotonic() - started
    result["head_images_per_s"] = len(train) * args.baseline_head_epochs / result["head_seconds"]

    started = time.monotonic()
    base.trainable = True
    model.compile(keras.optimizers.Adam(1e-5), keras.losses.BinaryCrossentropy())
    model.fit(dataset(train, True), validation_data=dataset(validation, False),
              epochs=args.baseline_fine_tune_epochs, verbose=2)
    result["fine_tune_seconds"] = time.monotonic() - started
    result["fine_tune_images_per_s"] = (len(train) * args.baseline_fine_tune_epochs
                                        / result["fine_tune_seconds"])
    probabilities = model.predict(dataset(test, False), verbose=0)
    save_test_probabilities(args, "baseline", probabilities)
    result["test_macro_ap"] = macro_ap(test[symbols].to_numpy(), probabilities)
    return result


class EpochTestScores:
    """Scores the test images after the head phase and after every fine-tuning epoch of our
    run, so that the report can say when the run first held a model as good as the recipe's
    final one, not only at the end. Installed as callbacks.EpochLog in the stage's process (the
    training loop makes one per phase); the time it takes is counted and taken off the run's
    times, so the run is timed as if it had not been watched.

    The model the run would have written had it stopped after epoch k is the one with the
    best validation AP so far, the head phase's included (the rule of training.fit_phase), so
    each point reports the test AP of those weights."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.start = time.monotonic()
        self.overhead = 0.0
        self.points = []  # (fine-tuning epoch, 0 for the head's weights; seconds; val_ap; test AP)

    def epoch_log_class(self):
        from symbol_trainer import callbacks, datasets
        watcher = self

        class ScoringEpochLog(callbacks.EpochLog):
            def on_train_begin(self, logs=None):
                if self.phase == "fine_tune":
                    # One trace of the fine-tuning model for all of the phase's scoring.
                    self.infer = datasets.compiled_inference(self.model)
                    head = [r["val_ap"] for r in self.rows if r["phase"] == "head"]
                    watcher.score(self.infer, 0, max(head) if head else float("nan"))

            def on_epoch_end(self, epoch, logs=None):
                super().on_epoch_end(epoch, logs)
                if self.phase == "fine_tune":
                    watcher.score(self.infer, epoch + 1,
                                  float((logs or {}).get("val_ap", np.nan)))

        return ScoringEpochLog

    def score(self, infer, epoch: int, val_ap: float) -> None:
        """Scores the test images with `infer` (from datasets.compiled_inference)."""
        from symbol_trainer import datasets
        now = time.monotonic()
        logits = datasets.run_inference(infer, (self.images[i:i + BATCH]
                                              for i in range(0, len(self.images), BATCH)))
        test_ap = macro_ap(self.labels, 1 / (1 + np.exp(-logits.astype(np.float64))))
        self.points.append((epoch, now - self.start - self.overhead, val_ap, test_ap))
        self.overhead += time.monotonic() - now

    def kept(self, finish_seconds: float) -> list[dict]:
        """Per point: when a run stopped there would have written its model (the point's time
        plus what the run spent after its last epoch: thresholds, evaluation, saving), and the
        test AP of the weights it would have kept."""
        kept, best = [], -np.inf
        for epoch, seconds, val_ap, test_ap in self.points:
            if epoch == 0 or val_ap > best:
                best, kept_ap, kept_epoch = val_ap, test_ap, epoch
            kept.append({"epoch": epoch, "seconds": seconds + finish_seconds,
                         "kept_epoch": kept_epoch, "test_macro_ap": kept_ap})
        return kept


def stage_ours(table, symbols, args, score_every_epoch: bool = False, **settings) -> dict:
    import pandas as pd

    from symbol_trainer import callbacks, image_predictions, labelled_images, pipeline
    from symbol_trainer.images import ImageGeometry, load_image_array
    from symbol_trainer.settings import TrainingConfig
    trainval = table[table.split != "test"].reset_index(drop=True)
    test = table[table.split == "test"]
    images = labelled_images.LabelledImages(trainval.drop(columns="split"), list(symbols), "benchmark")
    # The recipe's input size (see input_shape): this compares speed at one input size.
    config = TrainingConfig(alpha=ALPHA, weights=str(WEIGHTS), image_size=SIZE,
                                   batch_size=BATCH, resize=input_shape(args)[2], **settings)
    output = Path(args.work) / f"{args.stage}_model"
    watcher = None
    if score_every_epoch:
        geometry = ImageGeometry(*input_shape(args))
        # Decoded before the run starts, so that scoring costs the run no decoding.
        watcher = EpochTestScores(np.stack([load_image_array(p, geometry)
                                            for p in test["path"]]), test[symbols].to_numpy())
        callbacks.EpochLog = watcher.epoch_log_class()
    result = pipeline.train_and_save(images, config, output, overwrite=True,
                                   is_validation=(trainval.split == "validation").to_numpy())
    overhead = watcher.overhead if watcher else 0.0
    metadata = json.loads((output / "metadata.json").read_text())
    phases = metadata["training"]["phase_seconds"]
    history = pd.read_csv(output / "history.csv")
    fine_epochs = int((history.phase == "fine_tune").sum())
    # The training steps alone, without each epoch's validation pass: what compares with
    # the raw train_on_batch rate.
    fine_step_seconds = float(history.loc[history.phase == "fine_tune", "train_seconds"].sum())
    head_epochs = int((history.phase == "head").sum())
    train_images = result.counts["train"]["images"]
    probabilities = image_predictions.predict_images(output, test["path"].tolist())
    columns = [f"{s}_probability" for s in symbols]
    save_test_probabilities(args, args.stage, probabilities[columns].to_numpy())
    fine_seconds = phases.get("fine_tune", 0.0) - overhead
    outcome = {
        "train_images": train_images,
        "wall_seconds": result.seconds - overhead,
        "features_seconds": phases["features"],
        "features_images_per_s": len(trainval) / phases["features"],
        "head_seconds": phases["head"], "head_epochs": head_epochs,
        "fine_tune_seconds": fine_seconds, "fine_tune_epochs": fine_epochs,
        "fine_tune_images_per_s": train_images * fine_epochs / fine_seconds
        if fine_epochs else float("nan"),
        "fine_tune_step_images_per_s": train_images * fine_epochs / fine_step_seconds
        if fine_epochs else float("nan"),
        "test_macro_ap": macro_ap(test[symbols].to_numpy(), probabilities[columns].to_numpy()),
    }
    if watcher is not None and watcher.points:
        outcome["scoring_seconds"] = overhead
        outcome["by_epoch"] = watcher.kept(outcome["wall_seconds"] - watcher.points[-1][1])
    return outcome


def stage_raw(table, symbols, args) -> dict:
    import dataclasses

    import keras

    from symbol_trainer import datasets, training
    from symbol_trainer.images import ImageGeometry
    from symbol_trainer.model import build_model, unfreeze_top
    from symbol_trainer.settings import TrainingConfig
    height, width, resize = input_shape(args)
    config = TrainingConfig(alpha=ALPHA, weights=str(WEIGHTS), image_size=SIZE,
                                   batch_size=BATCH, resize=resize)
    parts = build_model(list(symbols), config, ImageGeometry(height, width, resize))
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, height, width, 3)).astype(np.uint8)
    infer = datasets.compiled_inference(parts.features)
    unfreeze_top(parts.backbone, config.fine_tune_fraction)
    targets = training.fused_targets(np.zeros((BATCH, len(symbols)), np.float32),
                                   np.ones((BATCH, len(symbols)), np.float32))

    def fused_step(settings: dict, xla: str = "off"):
        model = training.training_model(parts, training.fused_head(parts, list(symbols), config.dropout),
                                      dataclasses.replace(config, **settings))
        training.compile_fused(model, config.fine_tune_learning_rate, xla)
        return lambda: model.train_on_batch(batch, targets)

    # The saved model's form, one named output and loss per symbol: what fusing saves.
    parts.model.compile(keras.optimizers.Adam(config.fine_tune_learning_rate),
                        {s: keras.losses.BinaryCrossentropy() for s in symbols})
    labels = {s: np.zeros((BATCH, 1), np.float32) for s in symbols}
    weights = {s: np.ones((BATCH,), np.float32) for s in symbols}
    steps = {
        "inference_images_per_s": lambda: np.asarray(infer(batch)),
        # What fine-tuning fits by default: the backbone and fused head behind the augmentation.
        "train_on_batch_images_per_s": fused_step({}),
        "train_on_batch_no_augmentation_images_per_s": fused_step({"augment": "none"}),
        # The same step compiled with XLA: what --xla on would give on this machine.
        "train_on_batch_xla_images_per_s": fused_step({"augment": "none"}, xla="on"),
        "train_on_batch_named_outputs_images_per_s":
            lambda: parts.model.train_on_batch(batch, labels, sample_weight=weights),
    }
    for step in steps.values():  # compile and warm up every variant before timing any
        step()
        step()
    # This machine's speed drifts by 2-3x over minutes, so one long window per variant would
    # compare variants measured at different speeds. Instead every variant gets a short window
    # in each of several rounds, interleaved, and reports its median round.
    rounds = {name: [] for name in steps}
    for _ in range(args.raw_rounds):
        for name, step in steps.items():
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.raw_seconds:
                step()
                count += 1
            rounds[name].append(count * BATCH / (time.perf_counter() - start))
    result = {name: float(np.median(values)) for name, values in rounds.items()}
    result["rounds"] = {name: [round(v, 1) for v in values] for name, values in rounds.items()}
    return result


def stage_ours_default(table, symbols, args) -> dict:
    """Our default run, with the test images scored after every fine-tuning epoch (see
    EpochTestScores; its time is not counted)."""
    return stage_ours(table, symbols, args, score_every_epoch=True)


def stage_ours_head(table, symbols, args) -> dict:
    """Our run stopped after the head phase: how soon we reach an AP, not where we end. It
    fills a fresh feature cache, which ours_head_warm then reads."""
    return stage_ours(table, symbols, args, fine_tune_epochs=0, cache_dir=str(cache_dir(args)))


def stage_ours_head_warm(table, symbols, args) -> dict:
    """ours_head again on the same frames: the features come from the cache."""
    return stage_ours(table, symbols, args, fine_tune_epochs=0, cache_dir=str(cache_dir(args)))


def stage_speed(table, symbols, args) -> dict:
    """The machine's current speed: images/s of inference of MobileNetV2-0.35 (random
    weights, 224 px, batch 32) on one in-memory batch, over SPEED_SECONDS."""
    import keras

    from symbol_trainer import datasets
    model = keras.applications.MobileNetV2(alpha=ALPHA, include_top=False, weights=None,
                                           input_shape=(SIZE, SIZE, 3), pooling="avg")
    infer = datasets.compiled_inference(model)
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
    np.asarray(infer(batch))
    np.asarray(infer(batch))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < SPEED_SECONDS:
        np.asarray(infer(batch))
        count += BATCH
    return {"images_per_s": count / (time.perf_counter() - start)}


STAGES = {"baseline": stage_baseline, "ours": stage_ours_default, "ours_head": stage_ours_head,
          "ours_head_warm": stage_ours_head_warm, "raw": stage_raw, "speed": stage_speed}
SPEED_SECONDS = 5.0


def cache_dir(args) -> Path:
    return Path(args.work) / "feature_cache"


def save_test_probabilities(args, stage: str, probabilities: np.ndarray) -> None:
    np.save(Path(args.work) / f"{stage}_test_probabilities.npy", probabilities)


def load_test_probabilities(args, stage: str) -> np.ndarray:
    return np.load(Path(args.work) / f"{stage}_test_probabilities.npy")


def paired_bootstrap(labels: np.ndarray, ours: np.ndarray, baseline: np.ndarray,
                     groups: np.ndarray, resamples: int = 1000) -> tuple[float, float]:
    """95 % interval of macro AP (ours) - macro AP (baseline), resampling whole test groups
    with replacement and scoring both models on the same resample."""
    rng = np.random.default_rng(0)
    unique, members = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(members == g) for g in range(len(unique))]
    differences = []
    for _ in range(resamples):
        rows = np.concatenate([rows_of[g] for g in rng.integers(0, len(unique), len(unique))])
        if not (labels[rows] == 1).any():
            continue
        differences.append(macro_ap(labels[rows], ours[rows])
                           - macro_ap(labels[rows], baseline[rows]))
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# Parent: run the stages, print the table


def run_stage(name: str, args) -> dict:
    command = [sys.executable, __file__, args.data, "--stage", name, "--work", args.work,
               "--baseline-head-epochs", str(args.baseline_head_epochs),
               "--baseline-fine-tune-epochs", str(args.baseline_fine_tune_epochs),
               "--raw-rounds", str(args.raw_rounds), "--raw-seconds", str(args.raw_seconds)]
    if args.square:
        command.append("--square")
    if args.frames_dir:
        command += ["--frames-dir", args.frames_dir]
    started = time.monotonic()
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"stage {name} failed with exit code {completed.returncode}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.monotonic() - started
    return result


def test_groups(table) -> np.ndarray:
    """What the bootstrap resamples: whole episodes of the frames, images of logodet."""
    test = table[table.split == "test"]
    return (test["episode"] if "episode" in test else test["filename"]).astype(str).to_numpy()


def report(results: dict, args, table, symbols) -> None:
    b, o, r = results["baseline"], results["ours"], results["raw"]
    h, w = results.get("ours_head"), results.get("ours_head_warm")
    b_total = b["head_seconds"] + b["fine_tune_seconds"]
    o_head = o["features_seconds"] + o["head_seconds"]
    print(f"\nData: {args.data}, {len(table):,} images, {len(symbols)} symbols; MobileNetV2 alpha "
          f"{ALPHA}, input {input_shape(args)[1]}x{input_shape(args)[0]} ({input_shape(args)[2]}), "
          f"batch {BATCH}, {os.cpu_count()} CPU threads")
    print(f"Baseline: {args.baseline_head_epochs} head + {args.baseline_fine_tune_epochs} fine-tuning "
          f"epochs. Ours: defaults (head {o['head_epochs']} epochs, fine-tuning {o['fine_tune_epochs']}).\n")
    print(f"{'':<42}{'baseline':>11}{'ours':>11}{'raw':>11}")
    rows = [
        ("head phase, s", b["head_seconds"], o_head, None),
        ("  of which feature extraction, s", None, o["features_seconds"], None),
        ("fine-tuning phase, s", b["fine_tune_seconds"], o["fine_tune_seconds"], None),
        ("total training, s", b_total, o["wall_seconds"], None),
        ("feature extraction, images/s", None, o["features_images_per_s"], r["inference_images_per_s"]),
        ("head phase, images/s (per epoch)", b["head_images_per_s"], None, None),
        ("fine-tuning, images/s, whole phase", b["fine_tune_images_per_s"],
         o["fine_tune_images_per_s"], r["train_on_batch_images_per_s"]),
        ("  training steps alone, images/s", None, o["fine_tune_step_images_per_s"], None),
        ("  without augmentation, images/s", None, None,
         r["train_on_batch_no_augmentation_images_per_s"]),
        ("  the same with XLA, images/s", None, None, r["train_on_batch_xla_images_per_s"]),
        ("  one output per symbol, images/s", None, None,
         r["train_on_batch_named_outputs_images_per_s"]),
        ("peak RSS, MB", b["peak_rss_mb"], o["peak_rss_mb"], r["peak_rss_mb"]),
        ("held-out macro AP", b["test_macro_ap"], o["test_macro_ap"], None),
    ]
    if h:
        rows += [("  AP after our head phase alone", None, h["test_macro_ap"], None),
                 ("  wall time to that point, s", None, h["wall_seconds"], None),
                 ("  its head phase, s", None, h["features_seconds"] + h["head_seconds"], None)]
    if w:
        rows += [("  the same, second run (feature cache), s", None,
                  w["features_seconds"] + w["head_seconds"], None)]
    for label, *values in rows:
        cells = "".join(f"{'' if v is None else f'{v:,.3f}' if 'AP' in label else f'{v:,.1f}':>11}"
                        for v in values)
        print(f"{label:<42}{cells}")

    print("\nRatios (targets from issue 4 in brackets):")
    print(f"  head phase, baseline / ours:                    {b['head_seconds'] / o_head:6.1f}x  [>= 10x]")
    if h:
        print(f"    the same, our head-only run:                  "
              f"{b['head_seconds'] / (h['features_seconds'] + h['head_seconds']):6.1f}x")
    if w:
        print(f"    the same, second run with the feature cache:  "
              f"{b['head_seconds'] / (w['features_seconds'] + w['head_seconds']):6.1f}x")
    print(f"  fine-tuning steps, ours / raw train_on_batch:   "
          f"{o['fine_tune_step_images_per_s'] / r['train_on_batch_images_per_s']:6.0%}   [>= 85 %]")
    print(f"    whole phase (validation, first-epoch tracing): "
          f"{o['fine_tune_images_per_s'] / r['train_on_batch_images_per_s']:5.0%}")
    print(f"  feature extraction, ours / raw inference:       "
          f"{o['features_images_per_s'] / r['inference_images_per_s']:6.0%}")
    # The first point of our run at or above the recipe's final AP: the head-only run's
    # end, then (in the full run) the weights kept after each fine-tuning epoch, then the end.
    points = ([(h["wall_seconds"], h["test_macro_ap"])] if h else []) + [
        (p["seconds"], p["test_macro_ap"]) for p in o.get("by_epoch", []) if p["epoch"] > 0] + [
        (o["wall_seconds"], o["test_macro_ap"])]
    reached = next((seconds for seconds, ap in points if ap >= b["test_macro_ap"]), None)
    print("  time to the baseline's final AP / its total:    "
          + (f"{reached / b_total:6.0%}" if reached is not None else "not reached")
          + "   [<= 20 %]")
    test = table[table.split == "test"]
    labels = test[list(symbols)].to_numpy()
    low, high = paired_bootstrap(labels, load_test_probabilities(args, "ours"),
                                 load_test_probabilities(args, "baseline"), test_groups(table))
    print(f"  held-out macro AP, ours - baseline:             "
          f"{o['test_macro_ap'] - b['test_macro_ap']:+6.3f}  [> 0]  "
          f"(95 % interval {low:+.3f} to {high:+.3f}, paired bootstrap over "
          f"{len(set(test_groups(table))):,} test {'episodes' if 'episode' in test else 'images'})")
    print(f"  total time, ours / baseline:                    {o['wall_seconds'] / b_total:6.0%}")
    if o.get("by_epoch"):
        print("\nOur run, had it stopped after each fine-tuning epoch (the test set scored at each; "
              "that time not counted):")
        print(f"  {'epoch':>5}{'at, s':>9}{'of baseline':>13}{'kept weights':>14}{'held-out AP':>13}")
        for p in o["by_epoch"]:
            kept = "head" if p["kept_epoch"] == 0 else f"epoch {p['kept_epoch']}"
            print(f"  {p['epoch'] or 'head':>5}{p['seconds']:9.1f}{p['seconds'] / b_total:13.0%}"
                  f"{kept:>14}{p['test_macro_ap']:13.3f}")
    speeds = [(name, x["speed_before"], x["speed_after"]) for name, x in results.items()
              if "speed_before" in x]
    if speeds:
        print("\nMachine speed around each stage (reference inference, images/s, before and after):")
        print("  " + "; ".join(f"{name} {before:.0f} -> {after:.0f}"
                               + (" (earlier run)" if results[name].get("reused") else "")
                               for name, before, after in speeds))
    reused = [name for name, x in results.items() if x.get("reused")]
    if reused:
        print(f"Reused from an earlier run on the same split (--reuse): {', '.join(reused)}; "
              "ratios against them mix two runs.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--baseline-head-epochs", type=int, default=10)
    parser.add_argument("--baseline-fine-tune-epochs", type=int, default=5)
    parser.add_argument("--raw-rounds", type=int, default=5,
                        help="Interleaved timing rounds per raw rate; the median is reported.")
    parser.add_argument("--raw-seconds", type=float, default=6.0,
                        help="Seconds each raw rate is timed in each round.")
    parser.add_argument("--work", default="/tmp/train_speed", help="Folder for the split and models.")
    parser.add_argument("--stages", default="raw,ours_head,ours_head_warm,ours,baseline")
    parser.add_argument("--reuse", default="",
                        help="Comma-separated stages (for example baseline,raw) whose results to "
                             "read from WORK/results.json, written by an earlier run on the same "
                             "split, instead of running them again: for when only our pipeline "
                             "changed. The report marks them; their times are that run's, on "
                             "that day's machine.")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_inputs(parser, args)
    import pandas as pd
    split_file = Path(args.work) / "split.pkl"
    if args.stage:
        from symbol_trainer.command import configure_logging
        configure_logging(quiet=True)
        table, symbols = pd.read_pickle(split_file)
        result = STAGES[args.stage](table, symbols, args)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from symbol_trainer.command import configure_logging
    configure_logging(quiet=True)
    table, symbols = load_data(args)
    pd.to_pickle((table, symbols), split_file)
    counts = table.split.value_counts()
    print(f"Split: {counts.get('train', 0):,} train, {counts.get('validation', 0):,} validation, "
          f"{counts.get('test', 0):,} test images", flush=True)
    split_sha256 = hashlib.sha256(
        table[["filename", "split"]].to_csv(index=False).encode()).hexdigest()
    results_file = Path(args.work) / "results.json"
    earlier = json.loads(results_file.read_text()) if results_file.is_file() else {}
    reused = [name for name in args.reuse.split(",") if name]
    for name in reused:
        if name not in earlier.get("stages", {}):
            parser.error(f"--reuse {name}: {results_file} has no result of that stage")
        if earlier.get("split_sha256") != split_sha256:
            parser.error(f"--reuse: {results_file} comes from another split; run every stage")
    shutil.rmtree(cache_dir(args), ignore_errors=True)  # ours_head must start cold
    results = {name: dict(earlier["stages"][name], reused=True) for name in reused}
    # Results of other stages of an earlier run on this split stay in results.json.
    kept_stages = earlier.get("stages", {}) if earlier.get("split_sha256") == split_sha256 else {}
    speed = run_stage("speed", args)["images_per_s"]
    for name in args.stages.split(","):
        if name in reused:
            continue
        print(f"Running {name} ...", flush=True)
        results[name] = run_stage(name, args)
        results[name]["speed_before"] = speed
        speed = results[name]["speed_after"] = run_stage("speed", args)["images_per_s"]
        print(json.dumps({name: results[name]}), flush=True)
        stored = {"split_sha256": split_sha256, "stages": {**kept_stages, **results}}
        results_file.write_text(json.dumps(stored, indent=1))
    if {"raw", "ours", "baseline"} <= set(results):
        report(results, args, table, symbols)
    return 0


if __name__ == "__main__":
    sys.exit(main())
