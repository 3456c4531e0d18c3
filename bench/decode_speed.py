#!/usr/bin/env python3
"""How fast this machine decodes and letterboxes video frames: threads against processes.

The first pass over the images (feature extraction) and predict.py are bound by decoding
JPEG frames and resizing them to the model input, the tool's own way
(`images.load_image_array`: Pillow's reduced-scale draft decode, EXIF orientation, RGB,
letterbox). Pillow releases the GIL while it decodes and resizes, so threads can share the
work; the Python around each image still holds it. This script measures, on synthetic
1280x720 and 1920x1080 JPEG frames made in a temporary folder, images/s with 1 and N workers
(N: the cores this process may use) as threads and as processes, so that the library's
decoding pool (symbol_trainer.decoding) uses the kind that keeps up. bench/gpu.py runs the
same measurement on a GPU machine (16 cores).

    python bench/decode_speed.py                 # writes docs/measurements/decode_speed.md
    python bench/decode_speed.py --seconds 3 --results /tmp/decode.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import measurements  # noqa: E402  (bench/measurements.py)

# The model input the tool chooses for 16:9 frames at the default --image-size 224.
GEOMETRY = (224, 384, "letterbox")
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
JPEG_QUALITY = 90


def usable_cores() -> int:
    """The cores this process may run on (the library's own count, which also reads the
    cgroup's CPU limit)."""
    from symbol_trainer.decoding import usable_cores as library_count
    return library_count()


# ---------------------------------------------------------------------------------------------
# Synthetic frames


def _base_frames(size: tuple[int, int], count: int, seed: int) -> list[np.ndarray]:
    """`count` textured backgrounds: smooth colour gradients with grain, which compress about
    as a broadcast frame does (a flat frame would decode unrealistically fast)."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    frames = []
    for _ in range(count):
        c0, c1, c2 = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
        pixels = c0 * (1 - x) * (1 - y) + c1 * x + c2 * y * (1 - x)
        pixels = pixels + rng.normal(0, 10, (height, width, 3)).astype(np.float32)
        frames.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return frames


def star(cx: float, cy: float, radius: float, points: int = 5) -> list[tuple[float, float]]:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, radius, radius * 0.4)
    return [(cx + r * np.cos(a), cy - r * np.sin(a)) for a, r in zip(angles, radii)]


def _write_chunk(job) -> list[dict]:
    """Write frames `first`..`first+count-1` into `folder`; returns their label rows."""
    from PIL import Image, ImageDraw
    folder, size, first, count, seed = job
    rng = np.random.default_rng(seed + first)
    bases = _base_frames(size, 4, seed + first)
    width, height = size
    rows = []
    for index in range(first, first + count):
        image = Image.fromarray(bases[index % len(bases)])
        draw = ImageDraw.Draw(image)
        # Some clutter in every frame, and a star and a disc in some: the two symbols.
        for _ in range(6):
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            s = rng.uniform(height / 36, height / 4)
            draw.rectangle([x, y, x + s, y + s / 2], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        has_star, has_disc = bool(rng.random() < 0.4), bool(rng.random() < 0.4)
        if has_star:
            r = rng.uniform(height / 20, height / 8)
            draw.polygon(star(rng.uniform(r, width - r), rng.uniform(r, height - r), r),
                         fill=(250, 220, 30))
        if has_disc:
            r = rng.uniform(height / 20, height / 8)
            x, y = rng.uniform(r, width - r), rng.uniform(r, height - r)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(200, 30, 40))
        name = f"ep{index // 100:03d}/frame{index:06d}.jpg"
        (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(Path(folder) / name, quality=JPEG_QUALITY)
        rows.append({"filename": name, "episode": index // 100, "star_visible": int(has_star),
                     "disc_visible": int(has_disc)})
    return rows


def make_frames(folder: str | os.PathLike, count: int, size: tuple[int, int] = SIZES["720p"],
                seed: int = 0, workers: int | None = None) -> list[Path]:
    """Write `count` synthetic JPEG frames of `size` (width, height) below `folder`, in
    episode folders of 100, and labels.csv (filename, episode, star_visible, disc_visible)
    beside them; returns the frames' paths in order. Made in parallel processes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    workers = workers or usable_cores()
    per_job = max(1, min(50, -(-count // workers)))
    jobs = [(str(folder), size, first, min(per_job, count - first), seed)
            for first in range(0, count, per_job)]
    rows = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            rows += _write_chunk(job)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for chunk in pool.map(_write_chunk, jobs):
                rows += chunk
    with open(folder / "labels.csv", "w", encoding="utf-8") as handle:
        handle.write("filename,episode,star_visible,disc_visible\n")
        for row in rows:
            handle.write(f"{row['filename']},{row['episode']},{row['star_visible']},"
                         f"{row['disc_visible']}\n")
    return [folder / row["filename"] for row in rows]


# ---------------------------------------------------------------------------------------------
# Decoding rates


def _decode(path: str) -> int:
    """One frame through the tool's decode and letterbox; returns a byte so the result is
    used (and, in a process, crosses back as the tool's pool would hand back an image)."""
    from symbol_trainer.images import ImageGeometry, load_image_array
    return int(load_image_array(path, ImageGeometry(*GEOMETRY))[0, 0, 0])


def _decode_image(path: str) -> np.ndarray:
    from symbol_trainer.images import ImageGeometry, load_image_array
    return load_image_array(path, ImageGeometry(*GEOMETRY))


def decode_rate(paths: list[str], kind: str, workers: int, seconds: float) -> float:
    """Images/s of decoding `paths` (cycled) for about `seconds` with `workers` threads or
    processes, each image handed back whole to this process (as the tool's pool does). A
    process pool is started and warmed up before the clock starts."""
    paths = [str(p) for p in paths]
    if kind == "threads":
        pool = concurrent.futures.ThreadPoolExecutor(workers)
    else:
        pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        list(pool.map(_decode_image, paths[:workers * 2]))  # start and warm up every worker
        done, start, index = 0, time.perf_counter(), 0
        block = max(8 * workers, 16)
        chunk = 4 if kind == "processes" else 1
        while time.perf_counter() - start < seconds:
            batch = [paths[(index + i) % len(paths)] for i in range(block)]
            index += block
            for _ in pool.map(_decode_image, batch, chunksize=chunk):
                done += 1
        return done / (time.perf_counter() - start)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decode_rates(folder: str | os.PathLike, seconds: float, frames_per_size: int = 64,
                 workers: int | None = None, kinds=("threads", "processes"),
                 log=print) -> dict:
    """{size: {kind: {workers: images/s}}} for 1 and `workers` (default: every usable core)
    threads and processes, on `frames_per_size` synthetic frames of each size made below
    `folder`."""
    workers = workers or usable_cores()
    counts = sorted({1, workers})
    results: dict = {}
    for name, size in SIZES.items():
        paths = [str(p) for p in make_frames(Path(folder) / name, frames_per_size, size)]
        results[name] = {}
        for kind in kinds:
            results[name][kind] = {}
            for count in counts:
                rate = decode_rate(paths, kind, count, seconds)
                results[name][kind][count] = rate
                log(f"  {name} {kind:>9} x{count:<2}: {rate:8.1f} images/s")
    return results


def markdown_table(rates: dict) -> str:
    kinds = list(next(iter(rates.values())))
    counts = list(next(iter(rates.values()))[kinds[0]])
    header = "| frames | " + " | ".join(f"{k} x{c}" for k in kinds for c in counts) + " |"
    lines = [header, "|---|" + "---:|" * (len(kinds) * len(counts))]
    for name, by_kind in rates.items():
        lines.append(f"| {name} | " + " | ".join(f"{by_kind[k][c]:,.1f}" for k in kinds
                                                 for c in counts) + " |")
    return "\n".join(lines)


def verdict(rates: dict) -> str:
    """Which pool kind keeps up, in one sentence, from the largest worker count."""
    parts = []
    for name, by_kind in rates.items():
        top = max(by_kind["threads"])
        if top == 1:
            return "Only one usable core: threads and processes cannot be compared here."
        threads, processes = by_kind["threads"][top], by_kind["processes"][top]
        parts.append(f"{name}: {top} threads reach {threads / processes:.0%} of {top} processes "
                     f"({threads / by_kind['threads'][1]:.2f}x one thread, processes "
                     f"{processes / by_kind['processes'][1]:.2f}x one process)")
    return "; ".join(parts) + "."


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="Seconds each rate is timed. Default: %(default)s.")
    parser.add_argument("--rounds", type=int, default=3,
                        help="Interleaved rounds; each rate's median is reported. Default: %(default)s.")
    parser.add_argument("--workers", type=int, default=0,
                        help="N, the larger worker count. Default: every usable core.")
    parser.add_argument("--results", default=str(ROOT / "docs" / "measurements" / "decode_speed.md"),
                        help="Markdown results file (a .json twin is written beside it).")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    workers = args.workers or usable_cores()
    print(f"{usable_cores()} usable cores; N = {workers}", flush=True)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="decode_speed_") as folder:
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", flush=True)
            rounds.append(decode_rates(folder, args.seconds, workers=workers))
    rates = {name: {kind: {count: float(np.median([r[name][kind][count] for r in rounds]))
                           for count in rounds[0][name][kind]}
                    for kind in rounds[0][name]} for name in rounds[0]}
    facts = measurements.header("JPEG decode and letterbox: threads against processes",
                                started, measurements.backend_description(import_keras=False))
    text = "\n".join([
        measurements.header_markdown(facts),
        f"Synthetic frames (gradients with grain, clutter and symbols, JPEG quality "
        f"{JPEG_QUALITY}), each decoded by `images.load_image_array` to the {GEOMETRY[1]}x"
        f"{GEOMETRY[0]} {GEOMETRY[2]} input (Pillow's draft decode), the image handed back "
        f"to the main process. Images/s, the median of {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s each:", "",
        markdown_table(rates), "",
        verdict(rates), ""])
    data = {**facts, "rates": rates, "rounds": rounds, "seconds": args.seconds,
            "workers": workers, "verdict": verdict(rates)}
    path, twin = measurements.write(args.results, text, data)
    print(text)
    print(f"Wrote {path} and {twin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
