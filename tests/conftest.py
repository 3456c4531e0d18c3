"""Shared fixtures: tiny generated images, the shared ImageNet weights, and a CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared"
SHARED_WEIGHTS_K3 = SHARED / "weights" / "mobilenet_v2_0.35_no_top_imagenet.weights.h5"
SHARED_WEIGHTS_LEGACY = (
    SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")

# Options that make a training run take seconds: a small backbone on small inputs.
FAST = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32",
        "--epochs", "3", "--fine-tune-epochs", "1", "--batch-size", "16", "--quiet"]


@pytest.fixture(autouse=True)
def isolated_keras_home(tmp_path_factory, monkeypatch):
    """Every test gets an empty $KERAS_HOME, so nothing depends on this machine's cache."""
    home = tmp_path_factory.mktemp("keras_home")
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.fixture
def shared_weights():
    """Real ImageNet MobileNetV2-0.35 weights from ../shared, which CI and developers have.
    A user's clone has no ../shared; the learning tests then skip and say so."""
    if not SHARED_WEIGHTS_K3.is_file():
        pytest.skip(f"needs the real ImageNet weights in {SHARED_WEIGHTS_K3}, which a clone "
                    "without ../shared lacks; random weights cannot show learning reliably")
    return str(SHARED_WEIGHTS_K3)


def scene(rng: np.random.Generator, square: bool, circle: bool, size=(64, 48)) -> Image.Image:
    """A smooth random background with, optionally, a red square and a blue circle."""
    w, h = size
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None]
    pixels = (c0 * (1 - t) + c1 * t) * np.ones((h, 1, 1)) + rng.normal(0, 8, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for present, colour, shape in ((square, (230, 20, 20), draw.rectangle),
                                   (circle, (20, 40, 230), draw.ellipse)):
        if present:
            s = int(rng.integers(12, 20))
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            shape([x, y, x + s, y + s], fill=colour)
    return image


def write_two_symbol_frames(folder: Path, count: int, per_episode: int, seed: int):
    """`count` frames in folders ep0, ep1, ... of `per_episode` each, where a red square and a
    blue circle appear independently (all four combinations equally often), and their labels:
    a table with filename, episode, red_square_visible and blue_circle_visible."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        square, circle = index % 2 == 1, index // 2 % 2 == 1
        name = f"ep{index // per_episode}/frame{index:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        scene(rng, square, circle).save(folder / name)
        rows.append({"filename": name, "episode": index // per_episode,
                     "red_square_visible": int(square), "blue_circle_visible": int(circle)})
    return pd.DataFrame(rows)


@pytest.fixture
def binary_dirs(tmp_path):
    """with_square/ (in episode subfolders) and without_square/, 24 images each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "frames"
    for index in range(48):
        square = index % 2 == 0
        folder = root / ("with_square" if square else "without_square") / f"ep{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        scene(rng, square, bool(rng.random() < 0.5)).save(folder / f"frame{index:03d}.png")
    return root / "with_square", root / "without_square"


@pytest.fixture
def small_two_symbol_csv(tmp_path):
    """32 frames in 4 episodes of 8 and their labels.csv: the data of the tests that start
    real training processes, small enough to keep each of them at seconds."""
    root = tmp_path / "frames"
    root.mkdir()
    write_two_symbol_frames(root, 32, 8, seed=3).to_csv(root / "labels.csv", index=False)
    return root, root / "labels.csv"


def training_command(data, out, *options) -> list[str]:
    """The command line of build_multi_hot_model.py on `data` (a small_two_symbol_csv)."""
    root, csv_path = data
    return [sys.executable, str(ROOT / "build_multi_hot_model.py"), str(root), str(csv_path),
            str(out), *map(str, options)]


def process_environment(keras_home: Path, **extra) -> dict:
    """The environment of a training subprocess: its own $KERAS_HOME, no GPU, no cluster
    (TF_CONFIG) unless `extra` gives one, and unbuffered output."""
    env = {**os.environ, "KERAS_HOME": str(keras_home), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1"}
    env.pop("TF_CONFIG", None)
    return {**env, **extra}


def run_script(module, argv) -> int:
    """Run a script's main() in this process, as the command line would."""
    return module.main([str(a) for a in argv])


def listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path))
