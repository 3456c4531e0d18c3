#!/usr/bin/env python3
"""Regenerate the small example data sets in examples/ (deterministic, needs Pillow).

- examples/stars/: 40 frames of 128x72 pixels (16:9, like TV frames) in two episode folders,
  with_star/ and without_star/: smooth random backgrounds with look-alike distractors
  (circles, squares), and in half of them a filled five-pointed star. For
  build_binary_classifier.py.
- examples/symbols/: 48 frames in two episode folders and labels.csv with the header
  `filename,pentagram_visible,star_visible`: a pentagram (a five-pointed star drawn as lines)
  and a filled star appear independently, each in half of the frames. For
  build_multi_hot_model.py; the README's Quick start trains the demo model on it.

    python examples/make_example_data.py
"""

import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
OUT = HERE / "stars"
MULTI = HERE / "symbols"
WIDTH, HEIGHT = 128, 72


def star(draw, cx, cy, radius, colour):
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.4
        angle = math.pi * i / 5 - math.pi / 2
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    draw.polygon(points, fill=colour)


def pentagram(draw, cx, cy, radius, colour):
    corners = [(cx + radius * math.cos(math.pi * 2 * i / 5 - math.pi / 2),
                cy + radius * math.sin(math.pi * 2 * i / 5 - math.pi / 2)) for i in range(5)]
    for i in range(5):
        draw.line([corners[i], corners[(i + 2) % 5]], fill=colour, width=2)


def frame(rng: random.Random, with_star: bool, with_pentagram: bool = False) -> Image.Image:
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", (WIDTH, HEIGHT))
    draw = ImageDraw.Draw(image)
    for y in range(HEIGHT):
        t = y / (HEIGHT - 1)
        draw.line([(0, y), (WIDTH, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    for _ in range(rng.randrange(3)):
        x, y, s = rng.randrange(WIDTH - 20), rng.randrange(HEIGHT - 20), rng.randrange(8, 20)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + s, y + s], outline=(rng.randrange(256),) * 3, width=2)
    if with_pentagram:
        radius = rng.randrange(10, 18)
        pentagram(draw, rng.randrange(radius, WIDTH - radius), rng.randrange(radius, HEIGHT - radius),
                  radius, rng.choice([(250, 250, 250), (20, 20, 20), (200, 0, 160)]))
    if with_star:
        radius = rng.randrange(9, 18)
        star(draw, rng.randrange(radius, WIDTH - radius), rng.randrange(radius, HEIGHT - radius),
             radius, rng.choice([(250, 220, 40), (240, 240, 240), (220, 30, 30)]))
    return image


def main():
    rng = random.Random(7)
    shutil.rmtree(OUT, ignore_errors=True)
    for index in range(40):
        with_star = index % 2 == 0
        folder = OUT / ("with_star" if with_star else "without_star") / f"episode{index // 2 % 2 + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        frame(rng, with_star).save(folder / f"frame{index:03d}.jpg", quality=90)
    print(f"wrote 40 frames to {OUT}")

    rng = random.Random(11)
    shutil.rmtree(MULTI, ignore_errors=True)
    rows = ["filename,pentagram_visible,star_visible"]
    for index in range(48):
        with_pentagram, with_star = index % 2 == 1, index // 2 % 2 == 1
        name = f"episode{index // 24 + 1}/frame{index:03d}.jpg"
        (MULTI / name).parent.mkdir(parents=True, exist_ok=True)
        frame(rng, with_star, with_pentagram).save(MULTI / name, quality=90)
        rows.append(f"{name},{int(with_pentagram)},{int(with_star)}")
    (MULTI / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"wrote 48 frames and labels.csv to {MULTI}")


if __name__ == "__main__":
    main()
