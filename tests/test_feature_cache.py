"""--cache-dir: a second run reuses features, a change misses, corruption is repaired, and two
runs at once leave a sound cache."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, scene

from symbol_trainer import errors, labelled_images, labels_csv, model, settings
from symbol_trainer.features import backbone_features, extract_features
from symbol_trainer.images import ImageGeometry, scan_images
from symbol_trainer import feature_cache
from symbol_trainer import features as features_module


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A MobileNetV2-0.35 weights file made here (random but fixed), so these tests need
    neither the network nor ../shared: the cache does not care what the features mean."""
    import keras
    path = tmp_path_factory.mktemp("weights") / "mnv2_035.weights.h5"
    keras.utils.set_random_seed(0)
    keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights=None,
                                   input_shape=(32, 32, 3)).save_weights(path)
    return path


@pytest.fixture
def frames(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "frames"
    root.mkdir()
    rows = []
    for index in range(12):
        scene(rng, index % 2 == 0, index % 3 == 0).save(root / f"f{index:02d}.png")
        rows.append({"filename": f"f{index:02d}.png", "square_visible": int(index % 2 == 0)})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return root, tmp_path / "labels.csv"


def scanned_table(root, csv_path) -> pd.DataFrame:
    images = labels_csv.images_from_csv(root, csv_path)
    return labelled_images.drop_unreadable(images, scan_images(images.table["path"].tolist()), 0).table


@pytest.fixture
def computed(monkeypatch):
    """Records how many images each call of extract_features computes."""
    calls: list[int] = []
    original = extract_features

    def spy(parts, paths, geometry, batch_size, store=None):
        calls.append(len(paths))
        return original(parts, paths, geometry, batch_size, store)

    monkeypatch.setattr(features_module, "extract_features", spy)  # where backbone_features finds it
    return calls


def features_with(config, table):
    geometry = ImageGeometry(config.image_size, config.image_size)
    parts = model.build_model(["square"], config, geometry)
    return backbone_features(parts, table, geometry, config)


def test_second_run_reuses_every_feature_and_a_changed_image_misses_alone(frames, tmp_path, weights_file,
                                                                          computed, caplog):
    caplog.set_level("INFO")
    config = settings.TrainingConfig(alpha=0.35, weights=str(weights_file), image_size=32,
                                   cache_dir=str(tmp_path / "cache"))
    first = features_with(config, scanned_table(*frames))
    assert computed == [12]
    second = features_with(config, scanned_table(*frames))
    assert computed == [12]  # nothing computed the second time
    np.testing.assert_array_equal(first, second)
    assert "12 of 12 images found, 0 to compute" in caplog.text

    root, csv_path = frames
    scene(np.random.default_rng(9), True, True).save(root / "f03.png")  # new content, same name
    features_with(config, scanned_table(*frames))
    assert computed == [12, 1]


def test_another_backbone_geometry_or_weights_file_misses(frames, tmp_path, weights_file, computed):
    table = scanned_table(*frames)
    base = dict(alpha=0.35, weights=str(weights_file), image_size=32, cache_dir=str(tmp_path / "cache"))
    features_with(settings.TrainingConfig(**base), table)
    features_with(settings.TrainingConfig(**{**base, "image_size": 48}), table)
    other = tmp_path / "other.weights.h5"
    other.write_bytes(weights_file.read_bytes())
    features_with(settings.TrainingConfig(**{**base, "weights": str(other)}), table)  # same content: hit
    with open(other, "r+b") as handle:  # same name, different content: miss
        handle.seek(-64, os.SEEK_END)
        handle.write(bytes(64))
    features_with(settings.TrainingConfig(**{**base, "weights": str(other)}), table)
    # Another backbone (MobileNet v1) on the same images and input: a miss, under its own key.
    v1 = tmp_path / "mnv1_025.weights.h5"
    keras.applications.MobileNet(alpha=0.25, include_top=False, weights=None,
                                 input_shape=(32, 32, 3)).save_weights(v1)
    v1_features = features_with(settings.TrainingConfig(
        **{**base, "backbone": "mobilenet", "alpha": 0.25, "weights": str(v1)}), table)
    assert v1_features.shape == (12, 256)
    assert computed == [12, 12, 12, 12]
    keys = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(keys) == 4


def test_corrupt_entry_is_recomputed_and_rewritten(frames, tmp_path, weights_file, computed, caplog):
    config = settings.TrainingConfig(alpha=0.35, weights=str(weights_file), image_size=32,
                                   cache_dir=str(tmp_path / "cache"))
    table = scanned_table(*frames)
    first = features_with(config, table)
    entries = sorted((tmp_path / "cache").glob("*/*/*.npy"))
    assert len(entries) == 12
    entries[0].write_bytes(entries[0].read_bytes()[:40])  # truncated
    entries[1].write_bytes(b"garbage")
    again = features_with(config, table)
    assert computed == [12, 2]
    assert caplog.text.count("recomputing it") == 2
    assert np.abs(first).max() > 0
    # The two rebuilt rows as before; a batch of 2 instead of 12 may change the last bits, and
    # random weights give features near 1e-12, so the tolerance is relative to the largest.
    np.testing.assert_allclose(first, again, rtol=1e-3, atol=1e-4 * np.abs(first).max())
    features_with(config, table)
    assert computed == [12, 2]  # repaired: the third run computes nothing


def test_unusable_cache_dir_is_an_input_error(frames, tmp_path, weights_file):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(errors.InputError, match="--cache-dir .* is a file"):
        settings.TrainingConfig(alpha=0.35, weights=str(weights_file), cache_dir=str(blocker))
    config = settings.TrainingConfig(alpha=0.35, weights=str(weights_file), image_size=32,
                                   cache_dir=str(blocker / "sub"))
    with pytest.raises(errors.InputError, match="--cache-dir .*cannot be used"):
        features_with(config, scanned_table(*frames))


def test_two_runs_at_once_leave_one_sound_cache(frames, tmp_path, weights_file):
    root, csv_path = frames
    cache = tmp_path / "cache"
    command = [sys.executable, str(ROOT / "build_multi_hot_model.py"), str(root), str(csv_path)]
    flags = ["--alpha", "0.35", "--weights", str(weights_file), "--image-size", "32", "--epochs", "1",
             "--fine-tune-epochs", "0", "--quiet", "--cache-dir", str(cache)]
    runs = [subprocess.Popen([*command, str(tmp_path / f"model{i}"), *flags], stderr=subprocess.PIPE,
                             text=True) for i in range(2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    [key_dir] = list(cache.iterdir())
    assert (key_dir / "key.json").is_file()
    entries = sorted(key_dir.glob("*/*.npy"))
    assert len(entries) == 12
    assert not [p for p in key_dir.rglob(".*")]  # no temporary files left behind
    for entry in entries:
        vector = np.load(entry, allow_pickle=False)
        assert vector.shape == (1280,) and np.isfinite(vector).all()


def test_readers_never_see_a_half_written_entry(tmp_path, caplog):
    """Writers rewrite the same entries while readers load them: every entry a reader finds is
    complete (a direct, non-atomic write would show readers truncated files)."""
    import threading

    cache = feature_cache.FeatureCache(tmp_path, {"test": "atomic"}, 50_000)
    keys = [f"{i:040x}" for i in range(8)]
    stop = threading.Event()
    problems: list[str] = []

    def write():
        rng = np.random.default_rng()
        while not stop.is_set():
            cache.store(keys, rng.random((len(keys), 50_000), dtype=np.float32))

    def read():
        while not stop.is_set():
            features, found = cache.load(keys)
            if found.any() and not (features[found] > 0).any(axis=1).all():
                problems.append("an entry read as all zeros")

    threads = [threading.Thread(target=write) for _ in range(2)] + [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    stop.wait(3)
    stop.set()
    for thread in threads:
        thread.join()
    assert not problems
    assert "recomputing" not in caplog.text
    assert not list(tmp_path.rglob(".*.npy.*"))
