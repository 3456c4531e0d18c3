"""--export onnx: model.onnx written through Keras's exporter and run here by onnxruntime; and
the exports' checks before training (the TensorFlow-only ones under another backend, the
ONNX packages)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import build_multi_hot_model
from symbol_trainer import backend, export, images, model_dir
from conftest import FAST, ROOT, process_environment, run_script, write_two_symbol_frames

SYMBOLS = ["red_square", "blue_circle"]


def needs_onnx_packages():
    """The ONNX tests need requirements-onnx.txt, which requirements-dev.txt installs: in CI
    (CI=true) under TensorFlow a missing package fails them. Elsewhere, and under JAX (whose
    jax2onnx is in requirements-onnx-jax.txt), a Python without them skips them."""
    missing = [m for m in export.ONNX_PACKAGES[backend.BACKEND]
               if importlib.util.find_spec(m) is None]
    if missing and not (os.environ.get("CI") and backend.BACKEND == "tensorflow"):
        pytest.skip(f"--export onnx needs {', '.join(missing)} (pip install -r "
                    "requirements-onnx.txt)")


@pytest.fixture
def frames(tmp_path):
    root = tmp_path / "frames"
    root.mkdir()
    write_two_symbol_frames(root, 32, 8, seed=5).to_csv(root / "labels.csv", index=False)
    return root


def train(frames, out, *options):
    return run_script(build_multi_hot_model, [
        frames, frames / "labels.csv", out, *FAST, "--weights", "none", "--epochs", "1",
        "--fine-tune-epochs", "0", *options])


def test_onnx_export_predicts_what_the_keras_model_predicts(frames, tmp_path):
    needs_onnx_packages()
    import onnxruntime

    out = tmp_path / "model"
    assert train(frames, out, "--export", "onnx", "--pooling", "lse") == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["exports"] == {"onnx": "model.onnx"}
    assert (out / "model.onnx").stat().st_size > 100_000  # the backbone's weights are in it

    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert (image.name, image.type, image.shape) == ("image", "tensor(uint8)",
                                                     ["batch", 32, 32, 3])
    assert [(o.name, o.type, o.shape) for o in session.get_outputs()] == [
        (s, "tensor(float)", ["batch", 1]) for s in metadata["symbols"]]

    loaded = model_dir.load_model_dir(out)
    geometry = images.ImageGeometry.from_json(metadata["input"])
    files = sorted(frames.glob("ep*/*.png"))
    pixels = np.stack([images.load_image_array(p, geometry) for p in files[:7]])
    keras_out = loaded.model(pixels, training=False)
    for batch in (pixels, pixels[2:3]):  # any batch size
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(None, {"image": batch})))
        expected = keras_out if len(batch) == len(pixels) else {
            s: np.asarray(v)[2:3] for s, v in keras_out.items()}
        for symbol in SYMBOLS:
            assert got[symbol].shape == (len(batch), 1)
            np.testing.assert_allclose(got[symbol], np.asarray(expected[symbol]), atol=1e-4,
                                       rtol=0)
    # The outputs are not interchangeable: each symbol's is its own head's.
    assert not np.allclose(got["red_square"], got["blue_circle"], atol=1e-4)


def tiny_model(seed):
    keras = backend.keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), dtype="float32", name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, {s: keras.layers.Dense(1, activation="sigmoid", name=s)(pooled)
                                for s in SYMBOLS})


def test_an_onnx_export_that_disagrees_leaves_no_file(tmp_path, monkeypatch):
    needs_onnx_packages()
    write_two_symbol_frames(tmp_path, 4, 4, seed=1)
    paths = sorted(str(p) for p in tmp_path.glob("ep0/*.png"))
    geometry = images.ImageGeometry(32, 32, "letterbox")
    out = tmp_path / "out"
    out.mkdir()
    real = export.run_onnx

    def off_by_a_little(path, pixels):
        return {name: value + 3e-4 for name, value in real(path, pixels).items()}

    monkeypatch.setattr(export, "run_onnx", off_by_a_little)
    with pytest.raises(export.ExportCheckError,
                       match=r"the onnx export gives probabilities up to 0\.0003 away"):
        export.export_and_check(out, tiny_model(1), SYMBOLS, geometry, ["onnx"], paths)
    assert list(out.iterdir()) == []
    monkeypatch.setattr(export, "run_onnx", real)  # the same model, compared as it is, passes
    written = export.export_and_check(out, tiny_model(1), SYMBOLS, geometry, ["onnx"], paths)
    assert written == {"onnx": out / "model.onnx"} and sorted(os.listdir(out)) == ["model.onnx"]


def test_a_converter_failure_is_one_error_and_leaves_no_file(tmp_path, monkeypatch):
    needs_onnx_packages()
    write_two_symbol_frames(tmp_path, 4, 4, seed=1)
    paths = sorted(str(p) for p in tmp_path.glob("ep0/*.png"))

    def broken(model, filepath, **kwargs):
        raise ValueError("Unsupported op FancyOp\nmany more lines")

    monkeypatch.setattr(backend.keras.Model, "export", broken)
    (tmp_path / "out").mkdir()
    with pytest.raises(export.ExportCheckError) as error:
        export.export_and_check(tmp_path / "out", tiny_model(1), SYMBOLS,
                                images.ImageGeometry(32, 32, "letterbox"), ["onnx"], paths)
    assert "(ValueError: Unsupported op FancyOp); no model.onnx was kept" in str(error.value)
    assert "\n" not in str(error.value) and list((tmp_path / "out").iterdir()) == []


def test_missing_onnx_packages_stop_the_run_before_training(frames, tmp_path, monkeypatch,
                                                            capsys):
    monkeypatch.setitem(export.ONNX_PACKAGES, backend.BACKEND,
                        {**export.ONNX_PACKAGES[backend.BACKEND],
                         "no_such_onnx_converter": "no-such-onnx-converter"})
    for dry_run in ([], ["--dry-run"]):
        assert train(frames, tmp_path / "model", "--export", "onnx", *dry_run) == 2
        err = capsys.readouterr().err
        (line,) = [line for line in err.splitlines() if "--export onnx" in line]
        # (and whichever of the real packages this Python lacks, in the same list)
        assert re.search(r"needs ([\w-]+, )*no-such-onnx-converter, which this Python", line)
        assert f"-m pip install -r {ROOT / export.ONNX_REQUIREMENTS[backend.BACKEND]}'" in line
        assert "Epoch" not in err  # nothing was trained, no checkpoint was started
        assert not (tmp_path / "model").exists()
        assert not (tmp_path / "model.partial").exists()


@pytest.mark.parametrize("name", ["saved_model", "tflite"])
def test_tensorflow_only_exports_name_the_backend(name, monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", "torch")
    monkeypatch.setattr(export, "BACKEND", "torch")
    with pytest.raises(backend.BackendError, match=f"^--export {name} needs the TensorFlow "
                                                   "backend, and this run uses "
                                                   "KERAS_BACKEND=torch"):
        export.check_formats(["onnx", name])


@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="needs jax in this Python to start a run under KERAS_BACKEND=jax")
@pytest.mark.parametrize("exports, message", [
    (["onnx", "tflite"], "ERROR: --export tflite needs the TensorFlow backend, and this run "
                         "uses KERAS_BACKEND=jax. Run it with KERAS_BACKEND=tensorflow "
                         "(TensorFlow installed), or leave --export tflite out."),
    (["saved_model"], "ERROR: --export saved_model needs the TensorFlow backend"),
    (["onnx"], re.compile(r"needs ([\w-]+, )*jax2onnx, which this Python"))])
def test_under_jax_exports_fail_at_flag_check_time(exports, message, frames, tmp_path,
                                                   isolated_keras_home):
    if exports == ["onnx"] and importlib.util.find_spec("jax2onnx") is not None:
        pytest.skip("this Python has jax2onnx: --export onnx works under JAX")
    command = [sys.executable, str(ROOT / "build_multi_hot_model.py"), str(frames),
               str(frames / "labels.csv"), str(tmp_path / "model"), *FAST, "--weights", "none",
               *(f"--export={name}" for name in exports)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=process_environment(isolated_keras_home, KERAS_BACKEND="jax"))
    assert done.returncode == 2, done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert message.search(error) if isinstance(message, re.Pattern) else message in error
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()
