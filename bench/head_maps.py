#!/usr/bin/env python3
"""What a spatial head's head phase costs against the pooled vectors of `--pooling avg`:
memory and disk per image, feature extraction rate, and head-phase time per epoch.

The backbone runs with random weights (speed and sizes do not depend on them) on random
pixels; the head phase trains on random features of the right shape and dtype, as
training.train_head trains it in a real run (the fused head, one compiled call per epoch).

    python bench/head_maps.py                      # MobileNetV2 alpha 1.0 at 224x384
    python bench/head_maps.py --alpha 0.35 --frames 5000

Writes docs/measurements/head_maps.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from symbol_trainer import datasets, model, training  # noqa: E402
from symbol_trainer.features import feature_array
from symbol_trainer.images import ImageGeometry
from symbol_trainer.settings import TrainingConfig
from symbol_trainer import feature_cache  # noqa: E402
from symbol_trainer import heads  # noqa: E402
from symbol_trainer import settings  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
import measurements  # noqa: E402


def extraction_rate(parts, images: int, batch: int) -> float:
    infer = datasets.compiled_inference(parts.features)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, *parts.model.input_shape[1:]))
    pixels = pixels.astype(np.float32)
    np.asarray(infer(pixels))  # trace
    out = feature_array(parts, images)
    start = time.perf_counter()
    for first in range(0, images, batch):
        result = np.asarray(infer(pixels))[:images - first]
        out[first:first + len(result)] = result
    return images / (time.perf_counter() - start)


def head_epoch_seconds(parts, symbols, config, frames: int) -> float:
    rng = np.random.default_rng(1)
    shape = tuple(parts.features.output_shape[1:])
    features = feature_array(parts, frames)
    for first in range(0, frames, 512):  # ReLU6 features: non-negative, a few units
        chunk = rng.uniform(0, 6, (min(512, frames - first), *shape))
        features[first:first + len(chunk)] = chunk
    labels = (rng.random((frames, len(symbols))) < 0.3).astype(np.float32)
    weights = np.ones_like(labels)
    split = int(frames * 0.8)
    rows: list[dict] = []
    training.train_head(parts, symbols, config, (features[:split], labels[:split], weights[:split]),
                      (features[split:], labels[split:], weights[split:]), rows)
    # The median epoch: the first also traces and compiles the step.
    return float(np.median([row["seconds"] for row in rows])), len(rows)


def cache_bytes_per_image(parts, images: int = 8) -> float:
    shape = tuple(parts.features.output_shape[1:])
    dtype = heads.MAP_DTYPE if parts.spatial else np.float32
    with tempfile.TemporaryDirectory() as folder:
        cache = feature_cache.FeatureCache(folder, {"bench": "head_maps"}, shape, dtype)
        cache.store([f"{i:040x}" for i in range(images)], np.ones((images, *shape), dtype))
        files = list(Path(cache.directory).glob("*/*.npy"))
        return sum(f.stat().st_size for f in files) / len(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--height", type=int, default=224)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--images", type=int, default=128, help="images for the extraction rate")
    parser.add_argument("--frames", type=int, default=1200, help="frames in the head phase")
    parser.add_argument("--symbols", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--output", default=str(ROOT / "docs" / "measurements" / "head_maps.md"))
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    geometry = ImageGeometry(args.height, args.width)
    symbols = [f"s{i}" for i in range(args.symbols)]
    lines, rows = [], []
    for pooling in settings.POOLINGS:
        config = TrainingConfig(alpha=args.alpha, weights="none", image_size=args.height,
                                       pooling=pooling, epochs=args.epochs, patience=args.epochs,
                                       seed=0)
        parts = model.build_model(symbols, config, geometry)
        shape = tuple(parts.features.output_shape[1:])
        dtype = heads.MAP_DTYPE if parts.spatial else np.float32
        memory = int(np.prod(shape)) * np.dtype(dtype).itemsize
        rate = extraction_rate(parts, args.images, config.batch_size)
        epoch, epochs = head_epoch_seconds(parts, symbols, config, args.frames)
        disk = cache_bytes_per_image(parts)
        lines.append(f"| {pooling} | {'x'.join(map(str, shape))} {np.dtype(dtype).name} | "
                     f"{memory / 1024:,.1f} | {disk / 1024:,.1f} | "
                     f"{memory * args.frames / 1e6:,.0f} | {rate:.1f} | {epoch:.3f} ({epochs}) |")
        rows.append({"pooling": pooling, "feature_shape": shape, "dtype": np.dtype(dtype).name,
                     "memory_bytes_per_image": memory, "disk_bytes_per_image": float(disk),
                     "extraction_images_per_second": float(rate),
                     "head_epoch_seconds": float(epoch), "head_epochs": int(epochs)})
        print(lines[-1], flush=True)
    # The command, commit, date and machine (TensorFlow is imported in this process).
    facts = measurements.header("Head phase on feature maps against pooled vectors", started,
                                measurements.backend_description())
    header = [
        measurements.header_markdown(facts),
        f"Alpha {args.alpha}, input {args.height}x{args.width}, {args.frames} frames in the head "
        f"phase (80 % training), {args.symbols} symbols, batch 32 (when other work shares the "
        "CPU, the rates are indicative).",
        "",
        "Memory: per image in the head phase's array (the in-memory set is twice the total "
        "below at most: the whole set, and its training rows gathered for the phase). "
        "Disk: one --cache-dir entry (.npy with its header). Extraction: images/s of the "
        "backbone with the copy into that array, random pixels. Head epoch: seconds per "
        "epoch of training.train_head (fused head, training and validation), over the epochs "
        "run (in brackets).",
        "",
        "| --pooling | feature per image | memory KiB/image | disk KiB/image | memory MB, all frames "
        "| extraction images/s | head epoch s (epochs) |",
        "|---|---|---|---|---|---|---|",
    ]
    data = {"header": facts, "alpha": args.alpha, "height": args.height, "width": args.width,
            "frames": args.frames, "symbols": args.symbols, "runs": rows}
    markdown, twin = measurements.write(args.output, "\n".join(header + lines), data)
    print(f"Wrote {markdown} and {twin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
