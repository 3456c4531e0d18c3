"""--pooling: the spatial heads (a 1x1 score map pooled over locations) train end to end, save,
load in safe mode and predict; the pooling layers compute what they claim; the head phase
trains on feature maps, which the feature cache keeps apart from pooled vectors."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import FAST, run_script, scene, write_two_symbol_frames

import build_multi_hot_model
from symbol_trainer import (datasets, errors, image_predictions, labelled_images,
                            labels_csv, model_dir, pipeline, precision, settings, training)
from symbol_trainer.features import backbone_features
from symbol_trainer.images import ImageGeometry, load_image_array, scan_images
from symbol_trainer.model import build_model
from symbol_trainer import feature_cache
from symbol_trainer import heads
from symbol_trainer import heatmaps


def pooled(pooling: str, maps: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(heads.pooling_layer(pooling)(maps.astype(np.float32)))


# --------------------------------------------------------------------------------------------
# The poolings' maths, on hand-made per-location logits


@pytest.fixture
def logits():
    """Two frames of 4x5 locations and 2 symbols, values drawn at random."""
    return np.random.default_rng(0).normal(size=(2, 4, 5, 2)).astype(np.float32)


def test_max_pooling_picks_each_symbols_maximum(logits):
    np.testing.assert_allclose(pooled("max", logits), logits.max(axis=(1, 2)), rtol=1e-6)


def test_lse_lies_between_mean_and_max_and_matches_its_formula(logits):
    got = pooled("lse", logits)
    r = heads.LSE_SHARPNESS
    expected = np.log(np.mean(np.exp(r * logits.astype(np.float64)), axis=(1, 2))) / r
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.all(got > logits.mean(axis=(1, 2))) and np.all(got < logits.max(axis=(1, 2)))
    # A flat map pools to its value; very sharp is the maximum, very blunt the mean.
    np.testing.assert_allclose(pooled("lse", np.full((1, 3, 3, 1), 2.5)), [[2.5]], rtol=1e-6)
    sharp = heads.LogSumExpPooling(sharpness=1000.0)(logits)
    blunt = heads.LogSumExpPooling(sharpness=1e-3)(logits)
    np.testing.assert_allclose(sharp, logits.max(axis=(1, 2)), atol=5e-3)
    np.testing.assert_allclose(blunt, logits.mean(axis=(1, 2)), atol=5e-3)


def test_lse_stays_finite_for_large_logits():
    maps = np.zeros((1, 7, 12, 1), np.float32)
    maps[0, 3, 4, 0] = 80.0  # exp(5 * 80) overflows float32 unless computed stably
    got = pooled("lse", maps)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [[80.0 - np.log(84) / heads.LSE_SHARPNESS]], rtol=1e-5)


def test_topk_is_the_mean_of_the_k_highest(logits):
    k = heads.top_count(20, heads.TOPK_FRACTION)
    assert k == 1  # 3 % of 20
    np.testing.assert_allclose(pooled("topk", logits), logits.max(axis=(1, 2)), rtol=1e-6)
    layer = heads.TopKMeanPooling(fraction=0.25)  # 5 of 20 locations
    flat = np.sort(logits.reshape(2, 20, 2), axis=1)[:, -5:, :]
    np.testing.assert_allclose(layer(logits), flat.mean(axis=1), rtol=1e-5)
    assert heads.top_count(84, heads.TOPK_FRACTION) == 3  # 224x384: a 7x12 map
    assert heads.top_count(336, heads.TOPK_FRACTION) == 10  # 448x768
    assert heads.top_count(3, 0.01) == 1


@pytest.mark.parametrize("pooling", ["max", "lse", "topk"])
def test_a_small_object_anywhere_survives_spatial_pooling(pooling):
    """A small symbol lighting up a 2x2 patch of the 84 locations of a 224x384 input:
    average pooling dilutes it below zero (a 'not visible' logit), every spatial pooling
    keeps it clearly positive, wherever it is."""
    results = []
    for row, column in [(0, 0), (3, 7), (5, 10)]:
        maps = np.full((1, 7, 12, 1), -4.0, np.float32)
        maps[0, row:row + 2, column:column + 2, 0] = 6.0
        results.append(pooled(pooling, maps)[0, 0])
        assert maps.mean() < 0
    assert min(results) > 1.5
    np.testing.assert_allclose(results, results[0], rtol=1e-6)


def test_attention_starts_as_the_mean_and_follows_its_weights(logits):
    layer = heads.pooling_layer("attention")
    np.testing.assert_allclose(layer([logits, np.zeros_like(logits)]), logits.mean(axis=(1, 2)),
                               rtol=1e-5)
    attention = np.zeros_like(logits)
    attention[:, 2, 3, :] = 50.0  # all the weight on one location
    np.testing.assert_allclose(layer([logits, attention]), logits[:, 2, 3, :], rtol=1e-5)
    attention[:, 1, 1, :] = 50.0  # split evenly between two
    np.testing.assert_allclose(layer([logits, attention]),
                               (logits[:, 2, 3, :] + logits[:, 1, 1, :]) / 2, rtol=1e-5)


def test_max_and_lse_keep_a_single_hot_location_that_topk_dilutes():
    maps = np.full((1, 7, 12, 1), -4.0, np.float32)
    maps[0, 6, 11, 0] = 6.0
    assert pooled("max", maps)[0, 0] == 6.0
    assert pooled("lse", maps)[0, 0] > 5.0
    np.testing.assert_allclose(pooled("topk", maps), [[(6.0 - 8.0) / 3]], rtol=1e-6)


def test_each_output_is_the_sigmoid_of_its_symbols_pooled_logit():
    head = heads.SpatialHead(["a", "b", "c"], "max", 0.0)
    maps = keras.Input((2, 2, 5))
    model = keras.Model(maps, {"logits": head.pooling(head.score_map(maps)), **head(maps)})
    got = model(np.random.default_rng(2).normal(size=(4, 2, 2, 5)).astype(np.float32))
    for i, symbol in enumerate("abc"):
        np.testing.assert_array_equal(got[symbol], keras.ops.sigmoid(got["logits"][:, i:i + 1]))
        assert not head.outputs[i].trainable


def test_feature_dataset_gathers_maps_by_index():
    maps = np.arange(6 * 2 * 3 * 4, dtype=np.float16).reshape(6, 2, 3, 4)
    targets = np.arange(6, dtype=np.float32)[:, None]
    order = datasets.BatchOrder(6, 2, batches=[[4, 1], [0, 5]])
    batches = list(datasets.feature_dataset(maps, targets, 2, order))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0][0], maps[[4, 1]])
    np.testing.assert_array_equal(batches[1][1], targets[[0, 5]])
    assert batches[0][0].dtype == np.float16


def test_pooling_is_a_checked_setting_in_the_run_key():
    assert settings.TrainingConfig().pooling == "avg"
    with pytest.raises(errors.InputError,
                       match="--pooling choose one of avg, max, lse, topk, attention"):
        settings.TrainingConfig(pooling="mean")
    assert "pooling" not in pipeline.SETTINGS_NOT_IN_RUN_KEY  # maps and vectors never resume each other
    from types import SimpleNamespace
    table = pd.DataFrame({"image_sha1": ["ab", "cd"], "s": [1.0, 0.0]})
    keys = {}
    for pooling in ("avg", "max", "lse"):
        prepared = SimpleNamespace(config=settings.TrainingConfig(pooling=pooling),
                                   split_table=lambda: table,
                                   images=SimpleNamespace(symbols=["s"], table=table))
        keys[pooling] = pipeline.run_key(prepared, ImageGeometry(32, 32), False,
                                       training.single_device_run().placement)
    # avg keys are those of runs before --pooling existed, so their checkpoints still resume.
    assert "pooling" not in keys["avg"]["settings"]
    assert keys["max"]["settings"]["pooling"] == "max" and keys["max"] != keys["lse"]
    assert {k: v for k, v in keys["max"]["settings"].items() if k != "pooling"} \
        == keys["avg"]["settings"]


# --------------------------------------------------------------------------------------------
# Models


def test_spatial_model_and_its_float32_twin(tmp_path):
    config = settings.TrainingConfig(alpha=0.35, weights="none", image_size=64, pooling="lse")
    geometry = ImageGeometry(64, 96)
    with precision.dtype_policy("mixed_float16"):
        parts = build_model(["a", "b", "c"], config, geometry)
    assert parts.spatial and parts.features.output_shape == (None, 2, 3, 1280)
    assert parts.model.get_layer("score_map").dtype_policy.compute_dtype == "float32"
    twin = precision.float32_twin(parts, ["a", "b", "c"], config, geometry)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3)).astype(np.float32)
    ours, theirs = parts.model(pixels), twin.model(pixels)
    for symbol in "abc":
        np.testing.assert_allclose(ours[symbol], theirs[symbol], atol=2e-2)
    # The fused training twin computes the same logits, and copying back is exact.
    fused = training.fused_head(parts, ["a", "b", "c"], 0.0)
    maps = np.asarray(parts.features(pixels), np.float32)
    probabilities = 1 / (1 + np.exp(-np.asarray(fused(maps))))
    head = parts.head(maps)
    np.testing.assert_allclose(probabilities, np.concatenate([head[s] for s in "abc"], axis=1),
                               atol=1e-5)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    write_two_symbol_frames(root, 32, 8, seed=3).to_csv(root / "labels.csv", index=False)
    return root


@pytest.mark.parametrize("pooling", ["max", "lse", "topk", "attention", "avg"])
def test_each_pooling_trains_saves_loads_and_predicts(frames, tmp_path, pooling):
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model, [frames, frames / "labels.csv", out, *FAST,
                                              "--image-size", "64", "--weights", "none",
                                              "--pooling", pooling])
    assert code == 0
    loaded = model_dir.load_model_dir(out)  # safe mode
    assert set(loaded.model.output) == {"red_square", "blue_circle"}
    assert loaded.metadata["training"]["config"]["pooling"] == pooling
    images = sorted(frames.glob("ep*/*.png"))[:5]
    table = image_predictions.predict_images(loaded, images)
    probabilities = table[["red_square_probability", "blue_circle_probability"]].to_numpy()
    assert probabilities.shape == (5, 2) and np.all((probabilities >= 0) & (probabilities <= 1))
    names = [layer.name for layer in loaded.model.layers]
    if pooling == "avg":
        assert "score_map" not in names  # the original head, unchanged
        return
    if pooling == "max":  # standard Keras layers only: loads without this tool's code
        assert all(type(layer).__module__.startswith("keras.") for layer in loaded.model.layers)
    score_map = keras.Model(loaded.model.inputs, loaded.model.get_layer("score_map").output)
    pixels = np.stack([load_image_array(p, ImageGeometry.from_json(
        loaded.metadata["input"])) for p in images[:2]]).astype(np.float32)
    logits = np.asarray(score_map(pixels))
    assert logits.shape == (2, 2, 3, 2) and logits.dtype == np.float32  # 64x96 input
    # heatmaps.py reads the same layer: the heatmap is the sigmoid of each location's logit.
    np.testing.assert_allclose(heatmaps.heatmaps(loaded, [str(p) for p in images[:2]]),
                               1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-5)
    # Pooling the score map by this model's pooling gives its probabilities, in symbol order.
    if pooling == "attention":
        attention = keras.Model(loaded.model.inputs,
                                loaded.model.get_layer("attention_map").output)(pixels)
        frame_logits = heads.pooling_layer("attention")([logits, np.asarray(attention)])
    else:
        frame_logits = pooled(pooling, logits)
    np.testing.assert_allclose(1 / (1 + np.exp(-frame_logits)), probabilities[:2], atol=1e-5)


# --------------------------------------------------------------------------------------------
# Feature maps in the head phase and in --cache-dir


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "mnv2_035.weights.h5"
    keras.utils.set_random_seed(0)
    keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights=None,
                                   input_shape=(64, 64, 3)).save_weights(path)
    return path


def test_feature_maps_are_cached_apart_from_vectors(tmp_path, weights_file, caplog):
    caplog.set_level("INFO")
    root = tmp_path / "frames"
    root.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        scene(rng, index % 2 == 0, False, size=(64, 64)).save(root / f"f{index}.png")
    pd.DataFrame({"filename": [f"f{i}.png" for i in range(6)],
                  "square_visible": [1, 0] * 3}).to_csv(tmp_path / "labels.csv", index=False)
    images = labels_csv.images_from_csv(root, tmp_path / "labels.csv")
    table = labelled_images.drop_unreadable(images, scan_images(images.table["path"].tolist()), 0).table
    geometry = ImageGeometry(64, 64)
    results = {}
    for pooling in ("avg", "max", "topk"):
        config = settings.TrainingConfig(alpha=0.35, weights=str(weights_file), image_size=64,
                                       cache_dir=str(tmp_path / "cache"), pooling=pooling)
        parts = build_model(["square"], config, geometry)
        results[pooling] = backbone_features(parts, table, geometry, config)
    assert results["avg"].shape == (6, 1280) and results["avg"].dtype == np.float32
    assert results["max"].shape == (6, 2, 2, 1280) and results["max"].dtype == np.float16
    # The third run (topk) found every map the second (max) stored: spatial poolings share maps.
    assert caplog.text.count("6 of 6 images found, 0 to compute") == 1
    np.testing.assert_array_equal(results["max"], results["topk"])
    # Averaging the maps gives the pooled vectors, up to float16 rounding.
    np.testing.assert_allclose(results["max"].astype(np.float32).mean(axis=(1, 2)), results["avg"],
                               rtol=1e-2, atol=1e-2)
    keys = sorted((tmp_path / "cache").iterdir())
    assert len(keys) == 2
    described = [json.loads((key / "key.json").read_text()) for key in keys]
    spatial = next(d for d in described if "feature_shape" in d)
    assert spatial["feature_shape"] == [2, 2, 1280] and spatial["dtype"] == "float16"
    assert next(d for d in described if "feature_size" in d)["feature_size"] == 1280
    entry = next(keys[described.index(spatial)].glob("*/*.npy"))
    assert np.load(entry).shape == (2, 2, 1280)


def test_large_map_sets_go_to_a_mapped_file(monkeypatch):
    monkeypatch.setattr(heads, "MAPS_IN_MEMORY_BYTES", 1000)
    small = heads.feature_map_array(2, (2, 2, 4))
    assert not isinstance(small, np.memmap) and small.dtype == np.float16
    large = heads.feature_map_array(100, (2, 2, 4))
    assert isinstance(large, np.memmap) and large.shape == (100, 2, 2, 4)
    large[99] = 1.5
    assert float(large[99, 1, 1, 3]) == 1.5
    assert heads.map_bytes(1, (7, 12, 1280)) == 7 * 12 * 1280 * 2
    large[:] = np.arange(100, dtype=np.float16)[:, None, None, None]
    rows = np.array([99, 3, 50, 7])
    taken = heads.take_rows(large, rows, chunk=3)
    assert not isinstance(taken, np.memmap)  # 4 maps fit in memory
    np.testing.assert_array_equal(taken, large[rows])
    assert isinstance(heads.take_rows(large, np.arange(90)), np.memmap)


def test_checkpoint_keeps_feature_maps_as_they_are(tmp_path):
    from symbol_trainer import checkpoints
    maps = np.random.default_rng(3).normal(size=(5, 2, 3, 8)).astype(np.float16)
    checkpoint = checkpoints.Checkpoint(tmp_path / "checkpoint", {"pooling": "max"})
    checkpoint.directory.mkdir(parents=True)
    checkpoint.save_features(maps)
    again = checkpoint.features()
    assert again.dtype == np.float16
    np.testing.assert_array_equal(again, maps)


def test_feature_cache_rejects_an_entry_of_another_shape(tmp_path, caplog):
    cache = feature_cache.FeatureCache(tmp_path, {"test": "maps"}, (2, 3, 4), np.float16)
    cache.store(["ab" * 20], np.ones((1, 2, 3, 4), np.float16))
    features, found = cache.load(["ab" * 20, "cd" * 20])
    assert found.tolist() == [True, False] and features.dtype == np.float16
    wrong = feature_cache.FeatureCache(tmp_path, {"test": "maps"}, (2, 3, 5), np.float16)
    _, found = wrong.load(["ab" * 20])
    assert not found[0] and "has shape (2, 3, 4)" in caplog.text


def test_a_spatial_model_exports_and_its_exports_agree(frames, tmp_path):
    """--export checks each export against the Keras model on validation images; a custom
    pooling layer (top-k) must survive the SavedModel and TensorFlow Lite conversions."""
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model, [frames, frames / "labels.csv", out, *FAST,
                                              "--image-size", "64", "--weights", "none",
                                              "--pooling", "topk", "--epochs", "1",
                                              "--fine-tune-epochs", "0",
                                              "--export", "saved_model", "--export", "tflite"])
    assert code == 0
    assert (out / "saved_model").is_dir() and (out / "model.tflite").is_file()
    exports = json.loads((out / "metadata.json").read_text())["exports"]
    assert set(exports) == {"saved_model", "tflite"}
