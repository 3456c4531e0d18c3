"""End-to-end training: the model directory, reload and predict, learning, the ImageNet path."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import pandas as pd
import pytest

import build_binary_classifier
from symbol_trainer import (datasets, errors, features, image_folders, image_predictions, model_dir,
                            model_format, pipeline, preparation, settings)
from symbol_trainer.images import ImageGeometry, load_image_array
from conftest import FAST, ROOT, SHARED_WEIGHTS_LEGACY, listdir, run_script, scene


def _train(binary_dirs, out, *extra):
    images = image_folders.images_from_directories(*binary_dirs)
    args = build_binary_classifier.build_parser().parse_args(
        [str(binary_dirs[0]), str(binary_dirs[1]), str(out), *FAST, *extra])
    return pipeline.train_and_save(images, settings.config_from_args(args), out)


def test_model_directory_contents(binary_dirs, tmp_path, monkeypatch, capsys):
    decoded = []
    original = load_image_array

    def counting(path, geometry):
        decoded.append(str(path))
        return original(path, geometry)

    for module in (datasets, features, pipeline):  # every module that decodes images for training
        monkeypatch.setattr(module, "load_image_array", counting)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "model"
    not_quiet = [flag for flag in FAST if flag != "--quiet"]
    code = run_script(build_binary_classifier, [*binary_dirs, out, *not_quiet, "--weights", "none",
                                                "--tensorboard", scratch / "tb"])
    assert code == 0
    # Standard output is not a terminal here, as in a batch job: one log line per epoch,
    # no progress bars.
    printed = capsys.readouterr()
    epochs = [line for line in printed.err.splitlines() if " epoch " in line]
    assert [line.split(":")[1].split()[:3] for line in epochs] == [
        ["head", "epoch", "1/3"], ["head", "epoch", "2/3"], ["head", "epoch", "3/3"],
        ["fine_tune", "epoch", "1/1"]]
    assert "\r" not in printed.err + printed.out and "━" not in printed.err + printed.out
    for phase in ("head", "fine_tune"):  # TensorBoard event files of both phases
        assert list((scratch / "tb" / phase).rglob("events.out.tfevents.*")), phase
    assert listdir(out) == ["evaluation.csv", "history.csv", "metadata.json", "metrics.json",
                            "model.keras", "plots", "report.html", "split.csv"]
    assert listdir(tmp_path) == ["frames", "model", "scratch"]  # no .partial left behind
    assert not list(scratch.glob("decoded-images-*"))  # the decoded images' file is deleted

    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["format_version"] == model_format.MODEL_FORMAT_VERSION
    assert metadata["symbols"] == ["square"]
    assert metadata["input"] == {"height": 32, "width": 32, "resize": "letterbox", "channels": 3,
                                 "color": "RGB", "dtype": "uint8", "value_range": [0, 255],
                                 "alpha_background": "white", "exif_orientation": "applied"}
    assert metadata["backbone"] == {"name": "mobilenet_v2", "alpha": 0.35, "weights": "none",
                                    "preprocessing": "tf"}
    assert metadata["training"]["config"]["batch_size"] == 16
    counts = metadata["data"]["counts"]
    assert counts["train"]["images"] + counts["validation"]["images"] == 48
    assert counts["validation"]["positives"]["square"] >= 1
    assert counts["validation"]["negatives"]["square"] >= 1
    assert len(metadata["data"]["fingerprint_sha256"]) == 64
    assert metadata["training"]["mixed_precision"] is False
    split = pd.read_csv(out / "split.csv", keep_default_na=False)
    assert list(split.columns) == ["filename", "group", "split"]
    assert (split["split"] == "validation").sum() == counts["validation"]["images"]
    assert (split["group"] == split["filename"]).all()  # no grouping: each frame alone
    assert counts["grouping"] == "none (each frame alone)"
    # Each image is decoded once for its features, then read back from the decoded-image file
    # by the fine-tuning epoch and the final scoring; --weights none first sets BatchNorm
    # statistics from (at most 64) training images.
    assert len(decoded) == 48 + min(64, counts["train"]["images"])
    assert len(set(decoded)) == 48
    assert set(metadata["packages"]) >= {"tensorflow", "keras", "numpy", "pandas", "pillow"}

    with open(out / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["phase"] for r in rows] == ["head"] * 3 + ["fine_tune"]
    assert {"epoch", "loss", "val_loss", "seconds", "train_seconds"} <= set(rows[0])
    assert all(0 < float(r["train_seconds"]) < float(r["seconds"]) for r in rows)

    metrics = json.loads((out / "metrics.json").read_text())
    square = metrics["symbols"]["square"]
    assert {"loss", "accuracy", "precision", "recall", "roc_auc", "average_precision"} <= set(square)
    assert square["frames"] == counts["validation"]["images"]
    assert 0 <= square["roc_auc"] <= 1


def test_reloaded_model_predicts_what_the_trained_model_predicted(binary_dirs, tmp_path):
    out = tmp_path / "model"
    result = _train(binary_dirs, out, "--weights", "none")
    loaded = model_dir.load_model_dir(out)
    assert loaded.metadata["symbols"] == ["square"]
    paths = sorted(str(p) for p in binary_dirs[0].rglob("*.png"))[:5]
    table = image_predictions.predict_images(out, paths)
    assert list(table.columns) == ["filename", "square_probability", "square_visible"]
    assert table["filename"].tolist() == paths
    geometry = ImageGeometry.from_json(loaded.metadata["input"])
    pixels = np.stack([load_image_array(p, geometry) for p in paths])
    in_memory = result.model(pixels, training=False)["square"].numpy()[:, 0]
    np.testing.assert_allclose(table["square_probability"].to_numpy(), in_memory, rtol=1e-5, atol=1e-6)
    again = image_predictions.predict_images(loaded, paths)
    np.testing.assert_array_equal(again["square_probability"], table["square_probability"])
    # Trained with the default augmentation, which must not be part of the saved model.
    assert loaded.metadata["training"]["config"]["augment"] == "default"
    assert "augmentation" not in [layer.name for layer in loaded.model.layers]
    assert [layer.name for layer in loaded.model.layers][:2] == ["image", "preprocessing"]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(errors.InputError, match="corrupt.jpg: cannot be decoded as an image"):
        image_predictions.predict_images(loaded, [paths[0], corrupt])
    with pytest.raises(errors.ImageReadError, match="missing.png: file not found"):
        image_predictions.predict_images(loaded, [tmp_path / "missing.png"])


def test_overwrite_replaces_a_previous_model(binary_dirs, tmp_path):
    out = tmp_path / "model"
    args = [*binary_dirs, out, *FAST, "--weights", "none", "--fine-tune-epochs", "0"]
    assert run_script(build_binary_classifier, args) == 0
    (out / "report.html").write_text("the old report")
    assert run_script(build_binary_classifier, [*args, "--overwrite"]) == 0
    assert "model.keras" in listdir(out) and (out / "report.html").read_text() != "the old report"
    assert listdir(tmp_path) == ["frames", "model"]


def test_a_failure_during_training_leaves_no_model_directory(binary_dirs, tmp_path, monkeypatch, capsys):
    """An error after the head phase leaves no model directory, only the checkpoint of the
    finished phase in model.partial, and says how to continue; an error before any work
    worth keeping leaves nothing at all."""
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(pipeline, "fine_tune", crash)
    out = tmp_path / "model"
    code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--weights", "none"])
    assert code == 1
    err = capsys.readouterr().err
    assert "RuntimeError: disk full (run again with --debug for the traceback)" in err
    assert "keeps the backbone features and the completed epochs (head phase done); run the " \
           "same command again to continue" in err
    assert listdir(tmp_path) == ["frames", "model.partial"]
    assert listdir(tmp_path / "model.partial") == ["checkpoint"]

    monkeypatch.setattr(pipeline, "backbone_features", crash)
    code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--weights", "none",
                                                "--no-resume"])
    assert code == 1 and listdir(tmp_path) == ["frames"]


def test_corrupt_image_is_skipped_and_counted(binary_dirs, tmp_path, caplog):
    (binary_dirs[1] / "ep0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "model"
    assert run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--weights", "none",
                                                "--fine-tune-epochs", "0"]) == 0
    assert any("corrupt.jpg" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    counts = json.loads((out / "metadata.json").read_text())["data"]["counts"]
    assert counts["unreadable"] == 1
    assert counts["train"]["images"] + counts["validation"]["images"] == 48


def test_learns_a_small_visual_task(binary_dirs, tmp_path, shared_weights):
    """A red square against none, on 48 frames: a pipeline that mixed up labels, preprocessing
    or outputs would sit near 0.5; a working one separates the validation frames."""
    out = tmp_path / "model"
    result = _train(binary_dirs, out, "--weights", shared_weights, "--image-size", "64",
                    "--epochs", "60", "--fine-tune-epochs", "2")
    square = result.metrics["symbols"]["square"]
    assert square["frames"] >= 9
    assert square["roc_auc"] >= 0.95 and square["accuracy"] >= 0.85, square


def test_imagenet_weights_path_works_offline_from_the_keras_cache(binary_dirs, tmp_path):
    """The real weights='imagenet' code path, run as a user runs it: a new process whose
    $KERAS_HOME/models already holds the file Keras would download (Keras reads KERAS_HOME once,
    at import). The backbone must carry exactly those weights, not random ones."""
    if not SHARED_WEIGHTS_LEGACY.is_file():
        pytest.skip(f"needs {SHARED_WEIGHTS_LEGACY} (absent in a clone without ../shared)")
    keras_home = tmp_path / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    cached = shutil.copy(SHARED_WEIGHTS_LEGACY, keras_home / "models" / SHARED_WEIGHTS_LEGACY.name)
    out = tmp_path / "model"
    process = subprocess.run(
        [sys.executable, str(ROOT / "build_binary_classifier.py"), *map(str, binary_dirs), str(out),
         *FAST, "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "224",
         "--fine-tune-epochs", "0", "--epochs", "40"],
        env={**os.environ, "KERAS_HOME": str(keras_home)}, capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    assert "Downloading" not in process.stdout + process.stderr
    loaded = model_dir.load_model_dir(out)
    assert loaded.metadata["backbone"]["weights"] == "imagenet"
    with h5py.File(cached, "r") as weights_file:
        expected = np.asarray(weights_file["Conv1"]["Conv1/kernel"])
    kernel = loaded.model.get_layer("backbone").get_layer("Conv1").get_weights()[0]
    np.testing.assert_array_equal(kernel, expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["symbols"]["square"]["roc_auc"] >= 0.9


def test_a_given_validation_mask_replaces_the_split(binary_dirs, tmp_path):
    """The library accepts an explicit split (used by the benchmark; issue 5's explicit
    validation sets build on it): exactly the marked frames are validated on."""
    images = image_folders.images_from_directories(*binary_dirs)
    names = images.table["filename"].tolist()
    is_validation = np.array(["ep0" in name for name in names])  # one episode folder of three
    (tmp_path / "elsewhere").mkdir()  # not the model's folder: that may hold no frame of the run
    broken_path = tmp_path / "elsewhere" / "broken.png"
    broken_path.write_bytes(b"not a png")
    broken = images.table.iloc[:1].assign(path=str(broken_path), filename=str(broken_path))
    images.table = pd.concat([images.table, broken], ignore_index=True)
    is_validation = np.r_[is_validation, True]
    config = settings.TrainingConfig(backbone="mobilenet_v2", alpha=0.35, weights="none",
                                   image_size=32, epochs=1, fine_tune_epochs=0)
    result = pipeline.train_and_save(images, config, tmp_path / "model", is_validation=is_validation)
    assert result.counts["validation"]["images"] == int(is_validation[:-1].sum())  # broken one dropped
    assert result.counts["train"]["images"] == int((~is_validation).sum())
    phases = json.loads((tmp_path / "model" / "metadata.json").read_text())["training"]["phase_seconds"]
    assert set(phases) == {"features", "head"}
    with pytest.raises(errors.InputError, match="no readable validation images"):
        pipeline.train_and_save(images, config, tmp_path / "model2", is_validation=np.zeros(len(is_validation), bool))


def test_the_same_seed_gives_the_same_split_and_metrics(binary_dirs, tmp_path):
    """--seed fixes the split, shuffling, augmentation and initialisation: two runs on CPU
    agree to the last digit; another seed draws another split."""
    runs = [_train(binary_dirs, tmp_path / name, "--weights", "none", "--seed", "7")
            for name in "ab"]
    splits = [(tmp_path / name / "split.csv").read_text() for name in "ab"]
    metrics = [(tmp_path / name / "metrics.json").read_text() for name in "ab"]
    histories = [pd.read_csv(tmp_path / name / "history.csv").drop(columns=["seconds", "train_seconds"])
                 for name in "ab"]
    assert splits[0] == splits[1] and metrics[0] == metrics[1]
    pd.testing.assert_frame_equal(histories[0], histories[1])
    assert runs[0].metrics == runs[1].metrics
    other = preparation.prepare_training_data(image_folders.images_from_directories(*binary_dirs),
                                         settings.TrainingConfig(weights="none", seed=8))
    assert other.split_table().to_csv(index=False) != splits[0]


def test_wide_frames_get_a_wide_input_and_prediction_letterboxes_the_same_way(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "frames"
    for index in range(24):
        folder = root / ("with_square" if index % 2 else "without_square")
        folder.mkdir(parents=True, exist_ok=True)
        scene(rng, bool(index % 2), False, (96, 54)).save(folder / f"f{index}.png")  # 16:9
    out = tmp_path / "model"
    images = image_folders.images_from_directories(root / "with_square", root / "without_square")
    config = settings.TrainingConfig(alpha=0.35, weights="none", image_size=32, epochs=1,
                                   fine_tune_epochs=0)
    pipeline.train_and_save(images, config, out)
    loaded = model_dir.load_model_dir(out)
    assert {k: loaded.metadata["input"][k] for k in ("height", "width", "resize")} == \
        {"height": 32, "width": 64, "resize": "letterbox"}  # 32 x 16/9 = 57 -> 64
    assert loaded.model.input_shape == (None, 32, 64, 3)
    square = tmp_path / "square.png"
    scene(rng, True, False, (60, 60)).save(square)
    paths = [str(square), str(root / "with_square" / "f1.png")]
    table = image_predictions.predict_images(loaded, paths)
    geometry = ImageGeometry(32, 64, "letterbox")
    pixels = np.stack([load_image_array(p, geometry) for p in paths])
    assert pixels[0][:, :10].max() == 0  # the square image is letterboxed with side bars
    expected = loaded.model(pixels, training=False)["square"].numpy()[:, 0]
    np.testing.assert_allclose(table["square_probability"], expected, rtol=1e-5, atol=1e-6)
