#!/usr/bin/env python3
"""Peak memory of training at two data-set sizes: does it stay flat as the frames grow?

Issue 4's target: peak RSS while training on 20,000 frames at most 1.2x that on 2,000 frames.
Each size trains in a fresh process (so each peak is its own) with the default settings and
MobileNetV2 alpha 0.35 on the shared ImageNet weights at 224x224 (--resize squash, to keep
the run short), on the first N rows of a frames
folder from make_symbol_frames.py. Fine-tuning runs --fine-tune-epochs epochs (default 1):
memory does not depend on the number of epochs, only time does.

    python ../shared/tools/make_symbol_frames.py /tmp/frames20k --n 20000 --layout multi
    python bench/memory_scaling.py /tmp/frames20k --sizes 2000,20000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_0.35_no_top_imagenet.weights.h5"
sys.path.insert(0, str(ROOT))


def train(args) -> dict:
    import numpy as np

    from symbol_trainer import command, labelled_images, labels_csv, pipeline, settings
    command.configure_logging(quiet=True)
    base = Path(args.frames_dir)
    images = labels_csv.images_from_csv(base / "images", base / "labels.csv")
    subset = labelled_images.LabelledImages(images.table.head(args.size).reset_index(drop=True),
                                   images.symbols, images.source)
    config = settings.TrainingConfig(alpha=0.35, weights=str(WEIGHTS), resize="squash",
                                   fine_tune_epochs=args.fine_tune_epochs)
    result = pipeline.train_and_save(subset, config, Path(args.work) / f"model_{args.size}",
                                   overwrite=True)
    features = len(subset.table) * 1280 * 4 / 2**20
    return {"frames": len(subset.table), "seconds": result.seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "features_mb": features,
            "macro_ap": float(np.nanmean([m["average_precision"]
                                          for m in result.metrics["symbols"].values()]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frames_dir", help="Output folder of make_symbol_frames.py --layout multi.")
    parser.add_argument("--sizes", default="2000,20000", help="Frame counts, comma-separated.")
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--work", default="/tmp/memory_scaling")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        parser.error(f"needs the shared ImageNet weights at {WEIGHTS}")
    if args.size:
        print(json.dumps(train(args)))
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        print(f"Training on {size:,} frames ...", flush=True)
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, __file__, args.frames_dir, "--size", str(size), "--work", args.work,
             "--fine-tune-epochs", str(args.fine_tune_epochs)], stdout=subprocess.PIPE, text=True)
        if completed.returncode != 0:
            raise SystemExit(f"training on {size} frames failed with exit code "
                             f"{completed.returncode}")
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        result["process_seconds"] = time.monotonic() - started
        print(json.dumps(result), flush=True)
        results.append(result)
    print(f"\nMobileNetV2 alpha 0.35, 224x224 (squash), defaults but {args.fine_tune_epochs} fine-tuning "
          f"epoch(s); {os.cpu_count()} CPU threads\n")
    print(f"{'frames':>8}{'peak RSS, MB':>14}{'of which features, MB':>23}{'training, s':>13}"
          f"{'val. macro AP':>15}")
    for r in results:
        print(f"{r['frames']:>8,}{r['peak_rss_mb']:>14,.0f}{r['features_mb']:>23,.0f}"
              f"{r['seconds']:>13,.0f}{r['macro_ap']:>15.3f}")
    if len(results) >= 2:
        first, last = results[0], results[-1]
        print(f"\nPeak RSS at {last['frames']:,} / at {first['frames']:,} frames: "
              f"{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}x  [target <= 1.2x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
