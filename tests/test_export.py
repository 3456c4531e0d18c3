"""--export: a SavedModel whose default signature takes encoded images, and TensorFlow Lite,
each loaded back here and compared with the Keras model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import build_multi_hot_model
from symbol_trainer import backend, images, model_dir
from symbol_trainer import export
from conftest import FAST, run_script, write_two_symbol_frames


@pytest.fixture
def exported(tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    write_two_symbol_frames(root, 32, 8, seed=5).to_csv(root / "labels.csv", index=False)
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model, [root, root / "labels.csv", out, *FAST, "--weights",
                                              "none", "--epochs", "1", "--fine-tune-epochs", "0",
                                              "--export", "saved_model", "--export", "tflite"])
    assert code == 0
    return out, sorted(root.glob("ep*/*.png"))


def test_exports_predict_what_the_keras_model_predicts(exported):
    tf = backend.tf
    out, frames = exported
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["exports"] == {"saved_model": "saved_model", "tflite": "model.tflite"}
    loaded = model_dir.load_model_dir(out)
    geometry = images.ImageGeometry.from_json(metadata["input"])
    pixels = np.stack([images.load_image_array(p, geometry) for p in frames[:5]])
    keras_out = loaded.model(pixels)

    serving = tf.saved_model.load(str(out / "saved_model"))
    from_files = serving.signatures["serving_default"](
        image_bytes=tf.constant([p.read_bytes() for p in frames[:5]]))
    from_pixels = serving.signatures["serve_pixels"](image=tf.constant(pixels))
    assert set(from_files) == set(from_pixels) == {"red_square", "blue_circle"}
    for symbol in ("red_square", "blue_circle"):
        expected = np.ravel(keras_out[symbol])
        np.testing.assert_allclose(from_pixels[symbol].numpy(), expected, atol=1e-4)
        assert from_files[symbol].shape == (5,)
        assert np.all((from_files[symbol].numpy() >= 0) & (from_files[symbol].numpy() <= 1))

    runner = tf.lite.Interpreter(str(out / "model.tflite")).get_signature_runner("serve_pixels")
    lite = runner(image=pixels[:1])
    for symbol in ("red_square", "blue_circle"):
        np.testing.assert_allclose(np.ravel(lite[symbol]), np.ravel(keras_out[symbol])[:1],
                                   atol=1e-4)


def test_an_export_that_disagrees_fails(tmp_path, monkeypatch):
    """A broken export must not pass as a success: here the TFLite file is swapped for one of
    another model, and the check raises (the command then exits 1 without a model directory)."""
    keras = backend.keras
    geometry = images.ImageGeometry(32, 32, "letterbox")
    symbols = ["red_square", "blue_circle"]

    def model(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
        pooled = keras.layers.GlobalAveragePooling2D()(keras.ops.cast(inputs, "float32") / 255)
        return keras.Model(inputs, {s: keras.layers.Dense(1, activation="sigmoid", name=s)(pooled)
                                    for s in symbols})

    real = export.write_tflite

    def another_model(saved_model, path):
        export.write_saved_model(model(2), symbols, geometry, tmp_path / "other")
        real(tmp_path / "other", path)

    monkeypatch.setattr(export, "write_tflite", another_model)
    write_two_symbol_frames(tmp_path, 4, 4, seed=1)
    frames = sorted(str(p) for p in tmp_path.glob("ep0/*.png"))
    (tmp_path / "out").mkdir()
    with pytest.raises(export.ExportCheckError, match="the tflite export gives probabilities"):
        export.export_and_check(tmp_path / "out", model(1), symbols, geometry, ["tflite"], frames)
