#!/usr/bin/env python3
"""Prediction speed: predict.py's pipeline over a folder of 1280x720 JPEGs and over a video,
against the model's raw forward rate on in-memory tensors of the same batch size.

The model is MobileNetV2 alpha 0.35 with the shared ImageNet weights at the default input
(--image-size 224, letterbox: 224x384 for 16:9 frames), trained head-only on the frames
(training time is not measured here). The video is made from the same frames with PyAV
(H.264 when the bundled FFmpeg has it, else MPEG-4 part 2), 25 frames per second.

    python ../shared/tools/make_symbol_frames.py /tmp/frames720 --n 600 --size 1280x720
    python bench/predict_speed.py /tmp/frames720
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from train_speed import WEIGHTS, peak_rss_mb  # noqa: E402  (same folder)

ALPHA, BATCH, VIDEO_RATE = 0.35, 32, 25


def make_video(frames: list[Path], path: Path) -> str:
    import av

    width, height = Image.open(frames[0]).size
    with av.open(str(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=VIDEO_RATE)
        except Exception:  # an FFmpeg build without x264
            stream = container.add_stream("mpeg4", rate=VIDEO_RATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for name in frames:
            with Image.open(name) as image:
                for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        return stream.codec_context.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frames_dir", help="Output folder of make_symbol_frames.py --size 1280x720.")
    parser.add_argument("--work", default="/tmp/predict_speed")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Interleaved rounds of every measurement; medians are reported.")
    args = parser.parse_args()
    if not WEIGHTS.is_file():
        parser.error(f"needs the shared ImageNet weights at {WEIGHTS}")
    from symbol_trainer import command, datasets, labels_csv, settings
    from symbol_trainer.images import ImageGeometry
    from symbol_trainer.model_dir import load_model_dir
    from symbol_trainer.pipeline import train_and_save
    from symbol_trainer import prediction

    command.configure_logging(quiet=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(args.frames_dir)
    images = labels_csv.images_from_csv(base / "images", base / "labels.csv")
    paths = images.table["path"].tolist()
    with Image.open(paths[0]) as first:
        size = first.size
    model_dir = work / "model"
    if not (model_dir / "metadata.json").is_file():
        config = settings.TrainingConfig(alpha=ALPHA, weights=str(WEIGHTS), fine_tune_epochs=0,
                                       batch_size=BATCH)
        train_and_save(images, config, model_dir, overwrite=True)
    loaded = load_model_dir(model_dir)
    geometry = ImageGeometry.from_json(loaded.metadata["input"])
    clip = work / "episode.mp4"
    codec = make_video([Path(p) for p in paths], clip)

    def pipeline(arguments: list[str], fps: float | None) -> tuple[float, int]:
        inputs = prediction.collect_inputs(arguments)
        columns = prediction.output_columns(loaded.metadata["symbols"], bool(inputs.videos))
        with open(os.devnull, "w") as sink:
            summary = prediction.predict_inputs(loaded, inputs, prediction.RowWriter(sink, columns, "csv"),
                                                batch_size=BATCH, fps=fps)
        return summary.frames / summary.seconds, summary.frames

    infer = datasets.compiled_inference(loaded.model)
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, geometry.height, geometry.width, 3),
                                             dtype=np.uint8)
    infer(batch)

    def raw(seconds: float = 8.0) -> tuple[float, int]:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            next(iter(infer(batch).values()))  # wait for the result
            count += 1
        return count * BATCH / (time.perf_counter() - start), count * BATCH

    measures = {
        "raw forward, in-memory uint8 batches": lambda: raw(),
        "folder of JPEGs": lambda: pipeline([str(base / "images")], None),
        "video, every frame": lambda: pipeline([str(clip)], None),
    }
    rates = {name: [] for name in measures}
    counts = {}
    pipeline([str(base / "images")], None)  # warm up the compiled function and the page cache
    for _ in range(args.rounds):
        for name, measure in measures.items():
            rate, counts[name] = measure()
            rates[name].append(rate)
    # --fps 1 decodes every frame but classifies one a second: video seconds per second.
    start = time.perf_counter()
    _, sampled = pipeline([str(clip)], 1.0)
    fps1_seconds = time.perf_counter() - start

    ceiling = float(np.median(rates["raw forward, in-memory uint8 batches"]))
    print(f"\n{len(paths):,} frames of {size[0]}x{size[1]} (JPEG); model input "
          f"{geometry.width}x{geometry.height} ({geometry.resize}); MobileNetV2 alpha {ALPHA}; "
          f"batch {BATCH}; {os.cpu_count()} CPU threads; video {codec}, {VIDEO_RATE} fps, "
          f"{len(paths) / VIDEO_RATE:.0f} s. Medians of {args.rounds} interleaved rounds.\n")
    print(f"{'':<40}{'frames/s':>10}{'of raw':>9}   rounds")
    for name, values in rates.items():
        median = float(np.median(values))
        print(f"{name:<40}{median:>10.1f}{median / ceiling:>9.0%}   "
              + ", ".join(f"{v:.1f}" for v in values))
    print(f"\nvideo at --fps 1: {sampled} frames classified, {len(paths) / VIDEO_RATE / fps1_seconds:.1f} "
          f"seconds of video per second (every frame is decoded; one a second is classified)")
    print(f"peak RSS {peak_rss_mb():,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
