#!/usr/bin/env python3
"""The validation leak: a random frame-by-frame split against a grouped one, scored on unseen groups.

Neighbouring frames of one shot are near-identical, so a random split validates frames on their
own twins and reports a score the model will not reach on the next episode. This benchmark holds
out whole groups (episodes, sign tracks) as an unseen test set, trains on the rest once per
variant, and prints, for each, the validation macro average precision that training reported
(metrics.json) against the macro average precision on the unseen groups. An honest split has a
small gap.

Variants (each trains in a fresh process with the default TrainingConfig, MobileNetV2 alpha 0.35
on the shared ImageNet weights, so it runs offline):
  random                   --group-by none: frames split one by one, the usual practice
  grouped                  --group-by <group column>: what our tools do by default
  grouped-no-augmentation  the same with --augment none: what the default augmentation gains
  grouped-squash           the same with --resize squash: what keeping the 16:9 shape gains

Data:
  frames  make_symbol_frames.py --layout multi output (labels.csv has an episode column);
          20 % of the episodes (seeded) are the unseen test set.
  gtsrb   ../shared/data/gtsrb_subset: 43 sign classes x 3 tracks of 30 frames of one physical
          sign; one-hot labels, grouped by track; the last track of every class is unseen.
          Its images are 32x32, so it trains at --image-size 96 by default.

    python ../shared/tools/make_symbol_frames.py /tmp/frames3000 --n 3000 --layout multi
    python bench/leak.py frames --frames-dir /tmp/frames3000
    python bench/leak.py gtsrb
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from train_speed import ALPHA, SHARED, WEIGHTS, check_inputs, macro_ap

GTSRB = SHARED / "data" / "gtsrb_subset"
VARIANTS = {
    "random": {"group_by": "none"},
    "grouped": {},
    "grouped-no-augmentation": {"augment": "none"},
    "grouped-squash": {"resize": "squash"},
}
GROUP_COLUMN = {"frames": "episode", "gtsrb": "track"}


def load_data(args):
    """(LabelledImages of every frame, bool per row: in the unseen test set)."""
    import pandas as pd

    from symbol_trainer import labels_csv
    if args.data == "frames":
        base = Path(args.frames_dir)
        images = labels_csv.images_from_csv(base / "images", base / "labels.csv")
        episodes = images.table["episode"].astype(str).to_numpy()
        unique = np.random.default_rng(0).permutation(sorted(set(episodes)))
        unseen = set(unique[: max(1, round(0.2 * len(unique)))])
        return images, np.isin(episodes, list(unseen))
    # GTSRB as multi-hot labels: one <class>_visible column per class, one 1 per row.
    splits = pd.read_csv(GTSRB / "splits.csv", dtype={"track_id": str})
    names = sorted(set(splits["class_name"]))
    labels = pd.DataFrame({"filename": splits["filename"], "track": splits["track_id"]})
    for name in names:
        labels[f"{name}_visible"] = (splits["class_name"] == name).astype(int)
    csv_path = Path(args.work) / "gtsrb_labels.csv"
    labels.to_csv(csv_path, index=False)
    images = labels_csv.images_from_csv(GTSRB / "images", csv_path)
    last_track = splits.groupby("class_id")["track_id"].transform("max")
    unseen = (splits["track_id"] == last_track).to_numpy()
    return images, unseen


def train_variant(args) -> dict:
    from symbol_trainer import image_predictions, labelled_images, pipeline
    from symbol_trainer.command import configure_logging
    from symbol_trainer.settings import TrainingConfig
    configure_logging(quiet=True)
    images, unseen = load_data(args)
    seen = labelled_images.LabelledImages(images.table[~unseen].reset_index(drop=True),
                                 images.symbols, images.source)
    test = images.table[unseen]
    settings = {"group_by": GROUP_COLUMN[args.data], **VARIANTS[args.variant]}
    config = TrainingConfig(alpha=ALPHA, weights=str(WEIGHTS), image_size=args.image_size,
                                   seed=args.seed, **settings)
    output = Path(args.work) / f"model_{args.variant}"
    result = pipeline.train_and_save(seen, config, output, overwrite=True)
    probabilities = image_predictions.predict_images(output, test["path"].tolist())
    columns = [f"{s}_probability" for s in images.symbols]
    validation = result.counts["validation"]
    return {
        "variant": args.variant,
        "train_images": result.counts["train"]["images"],
        "validation_images": validation["images"],
        "validation_groups": validation["groups"],
        # Only counted for frame-by-frame splits (see preparation.prepare_training_data).
        "validation_near_duplicates": validation.get("near_duplicates_in_train"),
        "unseen_images": len(test),
        "validation_macro_ap": result.metrics["macro"]["average_precision"],
        "unseen_macro_ap": macro_ap(test[images.symbols].to_numpy(),
                                    probabilities[columns].to_numpy()),
        "seconds": result.seconds,
    }


def run_variant(name: str, args) -> dict:
    command = [sys.executable, __file__, args.data, "--variant", name, "--work", args.work,
               "--image-size", str(args.image_size), "--seed", str(args.seed)]
    if args.frames_dir:
        command += ["--frames-dir", args.frames_dir]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"variant {name} failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def report(results: list[dict], args) -> None:
    first = results[0]
    print(f"\nData: {args.data}; {first['train_images'] + first['validation_images']:,} frames to "
          f"train and validate on, {first['unseen_images']:,} frames of unseen "
          f"{GROUP_COLUMN[args.data]}s to test on. MobileNetV2 alpha {ALPHA}, image size "
          f"{args.image_size}, seed {args.seed}; otherwise default settings.\n")
    print(f"{'variant':<26}{'val. frames':>12}{'val. groups':>12}{'near-dup.':>10}{'val. AP':>9}"
          f"{'unseen AP':>11}{'gap':>8}{'train, s':>10}")
    for r in results:
        twins = r["validation_near_duplicates"]
        print(f"{r['variant']:<26}{r['validation_images']:>12,}{r['validation_groups']:>12,}"
              f"{'-' if twins is None else f'{twins:,}':>10}"
              f"{r['validation_macro_ap']:>9.3f}{r['unseen_macro_ap']:>11.3f}"
              f"{r['validation_macro_ap'] - r['unseen_macro_ap']:>+8.3f}{r['seconds']:>10.0f}")
    print("\nval. AP: the validation macro average precision the run reported (metrics.json); "
          "unseen AP: the same model on the unseen groups; gap: how much the validation score "
          "overstates it. near-dup.: validation frames with a training frame within "
          "4 bits of perceptual hash (counted for frame-by-frame splits only). With --group-by "
          "none, 'val. groups' counts frames.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", choices=sorted(GROUP_COLUMN))
    parser.add_argument("--frames-dir", help="Output folder of make_symbol_frames.py --layout multi.")
    parser.add_argument("--variants", default="random,grouped",
                        help=f"Comma-separated, from {', '.join(VARIANTS)}. Default: random,grouped.")
    parser.add_argument("--image-size", type=int,
                        help="Short side of the model input. Default: 224 (frames), 96 (gtsrb).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/leak", help="Folder for the models.")
    parser.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_inputs(parser, args)
    if args.image_size is None:
        args.image_size = 224 if args.data == "frames" else 96
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.variant:
        print(json.dumps(train_variant(args)))
        return 0
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = []
    for name in variants:
        started = time.monotonic()
        print(f"Training {name} ...", flush=True)
        results.append(run_variant(name, args))
        print(json.dumps(results[-1]) + f"  ({time.monotonic() - started:.0f} s)", flush=True)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
