#!/usr/bin/env python3
"""The clean symbol images of docs/measurements/accuracy_symbol_image_*.md, made the way a user
would make them: one adidas and one puma logo cut from a TRAINING photo of
../shared/data/adidas_puma_logos (photos that bench/accuracy.py keeps for training, never its
unseen quarter), with transparency where the photo is lighter than the logo (a magic-wand
selection in an image editor does the same). The photos cannot be committed, so this script
makes the PNGs again:

    python bench/symbol_crops.py /tmp          # -> /tmp/adidas.png, /tmp/puma.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import SHARED  # noqa: E402

BASE = SHARED / "data" / "adidas_puma_logos"
# symbol: (photo, crop box left, top, right, bottom in its 512x512 pixels); both are dark
# logos on white fabric, of photos img_a_32 and img_p_25.
CROPS = {
    "adidas": ("adidas/img_a_32_jpg.rf.b3843c1e5e69e786d5fe3262b2ecf4f8.jpg", (150, 240, 330, 380)),
    "puma": ("puma/img_p_25_jpg.rf.eeb535a879eda0eefb6a95c4b406d777.jpg", (120, 120, 470, 490)),
}
# Alpha 1 at luminance 80 and darker, 0 at 170 and lighter, linear between.
DARK, LIGHT = 80.0, 170.0


def unseen_photos() -> set[str]:
    """bench/accuracy.py's unseen quarter (load_adidas), without importing TensorFlow."""
    import pandas as pd
    photos = sorted(set(pd.read_csv(BASE / "splits.csv")["source_image"]))
    permuted = np.random.default_rng(0).permutation(photos)
    return set(permuted[: round(len(photos) / 4)])


def crop(photo: str, box: tuple[int, int, int, int]) -> Image.Image:
    pixels = np.asarray(Image.open(BASE / "images" / photo).convert("RGB").crop(box), np.float32)
    alpha = np.clip((LIGHT - pixels @ np.float32([0.299, 0.587, 0.114])) / (LIGHT - DARK), 0, 1)
    ys, xs = np.nonzero(alpha > 0.05)
    top, left = max(ys.min() - 2, 0), max(xs.min() - 2, 0)
    rgba = np.dstack([pixels, alpha * 255])[top:ys.max() + 3, left:xs.max() + 3]
    return Image.fromarray(rgba.astype(np.uint8), "RGBA")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="Where to write adidas.png and puma.png.")
    args = parser.parse_args(argv)
    unseen = unseen_photos()
    for symbol, (photo, box) in CROPS.items():
        source = Path(photo).name.split("_jpg")[0]
        if source in unseen:
            raise SystemExit(f"{photo} is one of bench/accuracy.py's unseen photos")
        path = Path(args.folder) / f"{symbol}.png"
        image = crop(photo, box)
        image.save(path)
        print(f"{path}: {image.width}x{image.height} from {photo} (a training photo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
