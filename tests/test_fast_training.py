"""What makes training fast: decoded images kept for fine-tuning, the fused head, precision."""

from __future__ import annotations

import errno
import logging
import os
import threading

import keras
import numpy as np
import pytest

from symbol_trainer import callbacks, datasets, precision, training
from symbol_trainer.errors import ImageReadError, InputError
from symbol_trainer.features import decoded_chunks, decoded_image_store, feature_description
from symbol_trainer.images import ImageGeometry, load_image_array
from symbol_trainer.model import build_model, unfreeze_top
from symbol_trainer.settings import TrainingConfig
from conftest import scene
from symbol_trainer.pixel_store import PixelStore

SHAPE = (8, 6, 3)


def fake_decoder(calls):
    def decode(path):
        calls.append(path)
        return np.full(SHAPE, int(path.rsplit("_", 1)[1]) % 256, np.uint8)
    return decode


def test_decoded_chunks_keep_order_fill_the_store_and_name_an_unreadable_file(tmp_path):
    from PIL import Image
    paths = []
    for i in range(7):
        path = tmp_path / f"frame_{i}.png"
        Image.new("RGB", (12, 10), (i * 30, 0, 0)).save(path)
        paths.append(str(path))
    geometry = ImageGeometry(10, 12, "letterbox")
    calls = []
    store = PixelStore(paths, (10, 12, 3), lambda p: (calls.append(p),
                       load_image_array(p, geometry))[1], tmp_path)
    chunks = list(decoded_chunks(paths, geometry, 3, store))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [int(image[0, 0, 0]) for c in chunks for image in c] == [i * 30 for i in range(7)]
    assert store.filled == 7 and sorted(calls) == sorted(paths)
    list(decoded_chunks(paths, geometry, 3, store))
    assert len(calls) == 7  # the second pass reads the store
    (tmp_path / "frame_4.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match="frame_4.png"):
        list(decoded_chunks(paths, geometry, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        list(decoded_chunks(paths, geometry, 0))


def test_compiled_inference_traces_once_for_batches_of_any_length():
    """The last batch of a pass is nearly always shorter; it must not cost a second trace of
    the backbone. Outputs are the model's own, dict outputs included."""
    inputs = keras.Input((6, 8, 3), dtype="uint8")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(
        keras.layers.Rescaling(1 / 255)(inputs)))
    model = keras.Model(inputs, {"a": keras.layers.Dense(1, name="a")(x),
                                 "b": keras.layers.Dense(1, name="b")(x)})
    infer = datasets.compiled_inference(model)
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 8, 3)).astype(np.uint8)
    for length in (5, 3, 1, 5):
        got = infer(images[:length])
        expected = model(images[:length], training=False)
        for name in ("a", "b"):
            assert isinstance(got[name], np.ndarray) and len(got[name]) == length
            np.testing.assert_allclose(got[name], keras.ops.convert_to_numpy(expected[name]),
                                       rtol=1e-5, atol=1e-6)
    assert infer.tracing_count() == 1
    infer(images.astype(np.float32))  # another dtype is another function
    assert infer.tracing_count() == 2


def test_pixel_store_decodes_each_image_once_and_reads_it_back(tmp_path):
    calls = []
    paths = [f"img_{i}" for i in range(5)]
    store = PixelStore(paths, SHAPE, fake_decoder(calls), tmp_path)
    first = [store.load(p) for p in paths]
    second = [store.load(p) for p in reversed(paths)]
    assert calls == paths
    assert store.filled == 5
    for a, b in zip(first, reversed(second)):
        np.testing.assert_array_equal(a, b)
    assert store.load("img_3")[0, 0, 0] == 3
    assert store.load("not_listed_7")[0, 0, 0] == 7  # unknown paths are decoded, not stored
    assert os.fstat(store._fd).st_size == 5 * int(np.prod(SHAPE))
    store.close()
    store.close()
    assert os.listdir(tmp_path) == []


def test_pixel_store_is_safe_from_many_threads(tmp_path):
    paths = [f"img_{i}" for i in range(200)]
    with PixelStore(paths, SHAPE, fake_decoder([]), tmp_path) as store:
        errors = []

        def worker(offset):
            for i in range(200):
                index = (i * 7 + offset) % 200
                if store.load(paths[index])[5, 5, 2] != index % 256:
                    errors.append(index)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store.filled == 200


def test_a_full_disk_turns_the_store_off_without_failing(tmp_path, monkeypatch, caplog):
    calls = []
    store = PixelStore(["img_1", "img_2"], SHAPE, fake_decoder(calls), tmp_path)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert store.load("img_1")[0, 0, 0] == 1
            assert store.load("img_2")[0, 0, 0] == 2
    assert len(calls) == 6  # decoded every time, and no error
    assert store.filled == 0
    assert caplog.text.count("Cannot keep more decoded images") == 1
    assert "No space left on device" in caplog.text
    store.close()


def test_decoded_image_store_only_when_it_is_used_and_fits(tmp_path, caplog):
    geometry = ImageGeometry(224, 224)
    paths = [str(tmp_path / f"{i}.jpg") for i in range(1000)]  # 0.15 GB when decoded
    caplog.set_level(logging.INFO)
    assert decoded_image_store(paths, geometry, TrainingConfig(
        fine_tune_epochs=0)) is None
    assert decoded_image_store(paths, geometry, TrainingConfig(
        decoded_cache_gb=0)) is None
    assert decoded_image_store(paths, geometry, TrainingConfig(
        decoded_cache_gb=0.1)) is None
    assert "would take 0.2 GB, more than --decoded-cache-gb 0.1" in caplog.text
    store = decoded_image_store(paths, geometry, TrainingConfig())
    assert store is not None and len(store) == 1000
    store.close()
    with pytest.raises(InputError, match=r"--decoded-cache-gb must be a number of GB, 0 or more; got -1"):
        TrainingConfig(decoded_cache_gb=-1)


def _random_parts(symbols, **settings):
    config = TrainingConfig(alpha=0.35, image_size=32, weights="none", **settings)
    return build_model(symbols, config, ImageGeometry(32, 32)), config


def test_fused_head_has_the_loss_of_the_per_symbol_outputs():
    symbols = ["a", "b", "c"]
    keras.utils.set_random_seed(1)
    parts, _ = _random_parts(symbols, dropout=0.0)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, parts.features.output_shape[-1])).astype(np.float32)
    labels = (rng.random((40, 3)) < 0.3).astype(np.float32)
    labels[3, 1] = np.nan  # not annotated: weight 0
    weights = training.sample_weights(labels, np.array([2.0, 5.0, 1.0], np.float32))

    parts.head.compile(loss={s: keras.losses.BinaryCrossentropy() for s in symbols})
    per_output = parts.head.evaluate(features,
                                     {s: np.nan_to_num(labels[:, i:i + 1]) for i, s in enumerate(symbols)},
                                     sample_weight={s: weights[:, i] for i, s in enumerate(symbols)},
                                     batch_size=40, verbose=0, return_dict=True)["loss"]
    fused = training.fused_head(parts, symbols, 0.0)
    training.compile_fused(fused, 1e-3)
    loss = fused.evaluate(features, training.fused_targets(labels, weights), batch_size=40, verbose=0)
    assert loss == pytest.approx(per_output, rel=1e-5)
    # By hand: the not-annotated label adds nothing; frame 3's other labels still count.
    p = 1 / (1 + np.exp(-fused(features, training=False).numpy().astype(np.float64)))
    y = np.nan_to_num(labels)
    by_hand = -(weights * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / len(features)
    assert loss == pytest.approx(by_hand, rel=1e-4)
    assert weights[3, 1] == 0 and weights[3, 0] > 0 and weights[3, 2] > 0

    fused.get_layer("logits").set_weights(
        [rng.normal(size=(features.shape[1], 3)).astype(np.float32), np.array([0.1, -2, 3], np.float32)])
    training._copy_fused_head(fused, parts, symbols)
    probabilities = parts.head(features, training=False)
    logits = fused(features, training=False).numpy()
    for i, s in enumerate(symbols):
        np.testing.assert_allclose(probabilities[s].numpy()[:, 0], 1 / (1 + np.exp(-logits[:, i])),
                                   rtol=1e-5, atol=1e-6)


def test_focal_gamma_weights_each_term_by_how_wrong_the_model_is():
    # --focal-gamma G multiplies each symbol's weighted cross-entropy by (1 - p)^G, p being
    # the probability of the true label; 0 is the plain loss. Checked against numpy at
    # logits far out (no NaN or infinity where p rounds to 0 or 1) and through compile_fused.
    rng = np.random.default_rng(3)
    logits = np.array([[-60.0, 0.0, 60.0], [2.0, -3.0, 0.5], [40.0, -40.0, 1.0]], np.float32)
    labels = np.array([[1, 0, 1], [0, 1, np.nan], [0, 1, 1]], np.float32)
    weights = training.sample_weights(labels, np.array([3.0, 2.0, 1.0], np.float32))
    targets = training.fused_targets(labels, weights)
    y, x = np.nan_to_num(labels).astype(np.float64), logits.astype(np.float64)
    crossentropy = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    wrong = 1 / (1 + np.exp(-(1 - 2 * y) * x))  # 1 - p of the true label
    for gamma in (0.0, 0.5, 2.0):
        expected = (crossentropy * wrong ** gamma * weights).sum(axis=1)
        got = keras.ops.convert_to_numpy(training.training_loss(gamma)(targets, logits))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert training.training_loss(0.0) is training.weighted_binary_crossentropy
    # Frame 0 by hand: the far-wrong positive (logit -60, weight 3) keeps its whole loss,
    # the undecided negative (logit 0) a quarter of ln 2, the confident right positive
    # (logit 60) none: focal moves the weight onto what the model gets wrong.
    focal = keras.ops.convert_to_numpy(training.weighted_binary_crossentropy(
        targets[:1], logits[:1], focal_gamma=2.0))
    assert focal[0] == pytest.approx(3.0 * 60.0 + np.log(2) * 0.25, rel=1e-5)

    fused_inputs = keras.Input(shape=(4,))
    model = keras.Model(fused_inputs, keras.layers.Dense(3)(fused_inputs))
    features = rng.normal(size=(3, 4)).astype(np.float32)
    training.compile_fused(model, 1e-3, focal_gamma=2.0)
    compiled = model.evaluate(features, targets, batch_size=3, verbose=0)
    raw = keras.ops.convert_to_numpy(model(features))
    assert compiled == pytest.approx(float(np.mean(keras.ops.convert_to_numpy(
        training.weighted_binary_crossentropy(targets, raw, focal_gamma=2.0)))), rel=1e-5)


def test_fine_tuning_trains_the_saved_models_backbone_and_named_outputs():
    # Fine-tuning fits image -> features -> fused logits; the saved model must get both the
    # backbone it trained and the fused head's weights in its per-symbol outputs.
    symbols = ["a", "b"]
    keras.utils.set_random_seed(2)
    parts, config = _random_parts(symbols, augment="none", dropout=0.0)
    unfreeze_top(parts.backbone, config.fine_tune_fraction)
    fused = training.fused_head(parts, symbols, config.dropout)
    model = training.training_model(parts, fused, config)
    training.compile_fused(model, 1e-2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    targets = training.fused_targets((rng.random((16, 2)) < 0.5).astype(np.float32),
                                   np.ones((16, 2), np.float32))
    backbone_before = [w.numpy().copy() for w in parts.backbone.trainable_weights]
    before = parts.model(images, training=False)
    model.train_on_batch(images, targets)
    training._copy_fused_head(fused, parts, symbols)
    after = parts.model(images, training=False)
    logits = model(images, training=False).numpy()
    assert any(not np.array_equal(b, w.numpy())
               for b, w in zip(backbone_before, parts.backbone.trainable_weights))
    for i, s in enumerate(symbols):
        assert not np.allclose(before[s].numpy(), after[s].numpy())
        np.testing.assert_allclose(after[s].numpy()[:, 0], 1 / (1 + np.exp(-logits[:, i])),
                                   rtol=1e-4, atol=1e-5)


def test_mixed_precision_is_off_on_cpu_and_the_saved_twin_computes_in_float32():
    assert precision.mixed_precision_enabled("auto") is False  # CI and this test have no GPU
    assert precision.mixed_precision_enabled("on") is True
    assert precision.mixed_precision_enabled("off") is False
    with precision.dtype_policy("mixed_float16"):
        parts, config = _random_parts(["a", "b"])
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    assert parts.features.compute_dtype == "float16"
    assert parts.model.get_layer("a").compute_dtype == "float32"
    twin = precision.float32_twin(parts, ["a", "b"], config, ImageGeometry(32, 32))
    assert {layer.compute_dtype for layer in twin.backbone.layers} == {"float32"}
    pixels = np.stack([np.asarray(scene(np.random.default_rng(i), True, False, (32, 32)))
                       for i in range(4)])
    half = parts.model(pixels, training=False)["a"].numpy()
    full = twin.model(pixels, training=False)["a"].numpy()
    np.testing.assert_allclose(full, half, atol=2e-2)
    assert feature_description(config, ImageGeometry(32, 32), "float16") \
        != feature_description(config, ImageGeometry(32, 32))


@pytest.mark.parametrize("flag,value", [("--mixed-precision", "fp16"), ("--xla", "yes")])
def test_precision_and_xla_flags_are_checked(flag, value, capsys):
    import build_binary_classifier
    with pytest.raises(SystemExit) as exit_info:
        build_binary_classifier.build_parser().parse_args(["a", "b", "c", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err


def test_validation_scores_are_the_training_loss_and_the_macro_ap_of_rankable_symbols():
    symbols = ["a", "b", "c", "d"]
    keras.utils.set_random_seed(2)
    parts, _ = _random_parts(symbols, dropout=0.0)
    rng = np.random.default_rng(3)
    features = rng.normal(size=(30, parts.features.output_shape[-1])).astype(np.float32)
    labels = (rng.random((30, 4)) < 0.4).astype(np.float32)
    labels[:, 2] = 0  # no positive: its AP says nothing and must not count
    labels[0, 0] = np.nan  # not annotated: left out of a's AP
    labels[:, 3] = 1
    labels[5, 3] = np.nan  # only positives once the unannotated frame is left out: not counted
    labels[6, 3] = 0
    weights = training.sample_weights(labels, np.array([3.0, 2.0, 1.0, 1.0], np.float32))
    weights[6, 3] = 0  # d's only negative is not annotated either
    targets = training.fused_targets(labels, weights)
    fused = training.fused_head(parts, symbols, 0.0)
    training.compile_fused(fused, 1e-3)

    scores = callbacks.ValidationScores(lambda: (features[i:i + 8] for i in range(0, 30, 8)), targets)
    scores.set_model(fused)
    scores.on_train_begin()
    logs = {"loss": 1.0}
    scores.on_epoch_end(0, logs)
    assert logs["val_loss"] == pytest.approx(
        fused.evaluate(features, targets, batch_size=30, verbose=0), rel=1e-5)
    probabilities = 1 / (1 + np.exp(-fused(features, training=False).numpy()))
    from symbol_trainer.evaluation import average_precision
    expected = np.mean([average_precision(labels[1:, 0] == 1, probabilities[1:, 0]),
                        average_precision(labels[:, 1] == 1, probabilities[:, 1])])
    assert logs["val_ap"] == pytest.approx(expected, rel=1e-6)
    assert scores.monitor() == "val_ap" and scores.seconds > 0

    nothing_to_rank = training.fused_targets(np.zeros((30, 4), np.float32), np.ones((30, 4), np.float32))
    assert callbacks.ValidationScores(lambda: [features], nothing_to_rank).monitor() == "val_loss"


def test_the_head_keeps_the_epoch_with_the_highest_validation_ap(caplog):
    # Patience longer than the run: every epoch runs, and the weights kept must be those of
    # the epoch whose val_ap was highest, which need not be the one with the lowest val_loss.
    symbols = ["a", "b"]
    keras.utils.set_random_seed(4)
    parts, config = _random_parts(symbols, epochs=8, patience=20, learning_rate=0.05)
    rng = np.random.default_rng(5)
    size = parts.features.output_shape[-1]
    x = rng.normal(size=(120, size)).astype(np.float32)
    y = (x[:, :2] + rng.normal(scale=2.0, size=(120, 2)) > 0.8).astype(np.float32)
    w = training.sample_weights(y, training.positive_weights(y[:80], "balanced"))
    rows = []
    with caplog.at_level(logging.INFO, logger="symbol_trainer"):
        training.train_head(parts, symbols, config, (x[:80], y[:80], w[:80]),
                          (x[80:], y[80:], w[80:]), rows)
    assert len(rows) == 8 and all("val_ap" in row and "val_loss" in row for row in rows)
    assert "val_ap" in caplog.text
    kept = parts.head(x[80:], training=False)
    probabilities = np.concatenate([kept[s].numpy() for s in symbols], axis=1)
    best = max(row["val_ap"] for row in rows)
    assert callbacks.validation_macro_ap(y[80:], w[80:], probabilities) == pytest.approx(best, abs=1e-6)


def test_without_rankable_validation_symbols_early_stopping_watches_the_loss(caplog):
    symbols = ["a"]
    parts, config = _random_parts(symbols, epochs=2)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20, parts.features.output_shape[-1])).astype(np.float32)
    y = np.zeros((20, 1), np.float32)
    y[:5] = 1
    w = np.ones_like(y)
    rows = []
    with caplog.at_level(logging.WARNING, logger="symbol_trainer"):
        training.train_head(parts, symbols, config, (x[:10], y[:10], w[:10]),
                          (x[10:], y[10:], w[10:]), rows)
    assert "watches the validation loss" in caplog.text
    assert len(rows) == 2 and np.isnan(rows[0]["val_ap"])


@pytest.mark.parametrize("head_val_ap, kept_head", [(1.0, True), (0.0, False)])
def test_fine_tuning_keeps_the_head_phase_weights_unless_an_epoch_beats_them(
        tmp_path, caplog, head_val_ap, kept_head):
    # A fake head row scored 1.0 cannot be beaten (AP is at most 1 and must rise strictly):
    # the model must end exactly as it started, and the phase stops after
    # --fine-tune-patience (2) of its 3 epochs. Scored 0.0, the first epoch beats it, and the
    # two after it cannot exhaust the patience before the phase's last epoch.
    from PIL import Image
    symbols = ["a", "b"]
    keras.utils.set_random_seed(3)
    parts, config = _random_parts(symbols, augment="none", fine_tune_epochs=3,
                                  fine_tune_patience=2, fine_tune_learning_rate=1e-2)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(24):
        path = tmp_path / f"frame_{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(path)
        paths.append(str(path))
    labels = np.tile(np.array([[1, 0], [0, 1], [1, 1], [0, 0]], np.float32), (6, 1))
    weights = np.ones_like(labels)
    before = [w.copy() for w in parts.model.get_weights()]
    rows = [{"phase": "head", "epoch": 1, "val_ap": head_val_ap, "val_loss": 1.0}]
    with caplog.at_level(logging.INFO, logger="symbol_trainer"):
        training.fine_tune(parts, symbols, config, ImageGeometry(32, 32),
                         (paths[:16], labels[:16], weights[:16]),
                         (paths[16:], labels[16:], weights[16:]), rows)
    after = parts.model.get_weights()
    assert [r["phase"] for r in rows] == ["head"] + ["fine_tune"] * (2 if kept_head else 3)
    unchanged = all(np.array_equal(b, a) for b, a in zip(before, after))
    assert unchanged == kept_head
    assert ("keeping the head phase's weights" in caplog.text) == kept_head
