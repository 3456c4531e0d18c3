#!/usr/bin/env python3
"""Regenerate the small example data set in examples/stars/ (deterministic, needs Pillow).

40 frames of 128x72 pixels (16:9, like TV frames) in two episode folders: smooth random
backgrounds with look-alike distractors (circles, squares), and in half of them a filled
five-pointed star. The README's Quick start trains the demo model on it.

    python examples/make_example_data.py
"""

import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
OUT = HERE / "stars"
WIDTH, HEIGHT = 128, 72


def star(draw, cx, cy, radius, colour):
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.4
        angle = math.pi * i / 5 - math.pi / 2
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    draw.polygon(points, fill=colour)


def frame(rng: random.Random, with_star: bool) -> Image.Image:
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


if __name__ == "__main__":
    main()
