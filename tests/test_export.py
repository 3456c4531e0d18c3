"""--export: a SavedModel whose default signature takes encoded images, and TensorFlow Lite,
each loaded back here and compared with the Keras model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import build_multi_hot_model
import common
import export
from conftest import FAST, listdir, run_script, write_two_symbol_frames


@pytest.fixture
def exported(tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    write_two_symbol_frames(root, 32, 8, seed=5).to_csv(root / "labels.csv", index=False)
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model, [root, root / "labels.csv", out, *FAST, "--weights",
                                              "none", "--fine-tune-epochs", "0", "--export",
                                              "saved_model", "--export", "tflite"])
    assert code == 0
    return out, sorted(root.glob("ep*/*.png"))


def test_exports_predict_what_the_keras_model_predicts(exported):
    tf = common.tf
    out, frames = exported
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["exports"] == {"saved_model": "saved_model", "tflite": "model.tflite"}
    loaded = common.load_model_dir(out)
    geometry = common.ImageGeometry.from_json(metadata["input"])
    pixels = np.stack([common.load_image_array(p, geometry) for p in frames[:5]])
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


def test_an_export_that_disagrees_fails_the_run_and_keeps_nothing(tmp_path, monkeypatch, capsys):
    """A broken export must not pass as a success: here the TFLite file is swapped for one of
    a different model, and the run fails with exit code 1 and no model directory."""
    real = export.write_tflite

    def wrong_model(saved_model, path):
        keras = common.keras
        inputs = keras.Input((32, 32, 3), dtype="uint8", name="image")
        fake = keras.Model(inputs, {s: keras.layers.Dense(1, activation="sigmoid", name=s)(
            keras.layers.GlobalAveragePooling2D()(keras.ops.cast(inputs, "float32")))
            for s in ("red_square", "blue_circle")})
        export.write_saved_model(fake, ["red_square", "blue_circle"],
                                 common.ImageGeometry(32, 32, "letterbox"), tmp_path / "fake")
        real(tmp_path / "fake", path)

    monkeypatch.setattr(export, "write_tflite", wrong_model)
    root = tmp_path / "frames"
    root.mkdir()
    write_two_symbol_frames(root, 32, 8, seed=5).to_csv(root / "labels.csv", index=False)
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model, [root, root / "labels.csv", out, *FAST, "--weights",
                                              "none", "--fine-tune-epochs", "0", "--export",
                                              "tflite"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the tflite export gives probabilities up to" in err
    # Training itself finished, so its checkpoint stays for a rerun, and nothing else does.
    assert "run the same command again to continue" in err
    assert not out.exists() and listdir(tmp_path / "model.partial") == ["checkpoint"]
