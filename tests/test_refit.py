"""--refit: the model trained again on every frame for the epochs validation kept (refit.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import build_binary_classifier
from symbol_trainer import (errors, image_folders, image_predictions, images, model, model_dir,
                            pipeline, settings)
from symbol_trainer.backend import keras
import pandas as pd
from symbol_trainer import refit
from conftest import FAST, ROOT, listdir, run_script

# Enough head epochs that early stopping has something to choose.
OPTIONS = [*FAST, "--weights", "none", "--epochs", "4", "--patience", "2", "--json"]


def _weights(directory):
    return model_dir.load_model_dir(directory).model.get_weights()


def test_refit_saves_a_model_trained_on_every_frame_and_says_so(binary_dirs, tmp_path, capsys):
    plain, refitted = tmp_path / "plain", tmp_path / "refitted"
    assert run_script(build_binary_classifier, [*binary_dirs, plain, *OPTIONS]) == 0
    plain_record = json.loads(capsys.readouterr().out)
    assert run_script(build_binary_classifier, [*binary_dirs, refitted, *OPTIONS, "--refit"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)

    metadata = json.loads((refitted / "metadata.json").read_text())
    history = [row for row in pd.read_csv(refitted / "history.csv").to_dict("records")]
    kept = refit.kept_epochs(history)
    counts = metadata["data"]["counts"]
    train, validation = counts["train"]["images"], counts["validation"]["images"]
    assert metadata["refit"]["refit"] is True
    assert metadata["refit"]["epochs"] == kept and 1 <= kept["head"] <= 4
    assert metadata["refit"]["images"] == {"refit": 48, "validation_run": train,
                                           "validation": validation}
    assert train + validation == 48
    assert metadata["refit"]["metrics_from"] == "validation run before refitting"
    assert metadata["training"]["config"]["refit"] is True
    # The refit trained exactly the kept epochs, one history row each.
    assert [(r["phase"], r["epoch"]) for r in metadata["refit"]["history"]] == (
        [("head", e) for e in range(1, kept["head"] + 1)]
        + [("fine_tune", e) for e in range(1, kept["fine_tune"] + 1)])
    assert metadata["refit"]["seconds"] > 0 and "refit" in metadata["training"]["phase_seconds"]
    # Positive weights recomputed on all frames: 24 of 48 frames show the square.
    assert metadata["refit"]["positive_weights"] == {"square": 1.0}

    # Same split, same thresholds and metrics as the run without --refit: they come from the
    # validation run; only the saved weights differ.
    plain_metadata = json.loads((plain / "metadata.json").read_text())
    assert plain_metadata["refit"]["refit"] is False
    assert metadata["thresholds"] == plain_metadata["thresholds"]
    assert (refitted / "split.csv").read_text() == (plain / "split.csv").read_text()
    assert record["metrics"] == plain_record["metrics"]
    assert record["refit"]["refit"] is True and record["refit"]["epochs"] == kept
    assert "history" not in record["refit"]
    assert plain_record["refit"]["refit"] is False
    assert "refit" in record["seconds"]
    a, b = _weights(plain), _weights(refitted)
    assert [w.shape for w in a] == [w.shape for w in b]
    assert any(not np.allclose(x, y) for x, y in zip(a, b))

    # The report says it in one visible sentence; the summary on standard error too.
    report = (refitted / "report.html").read_text()
    assert 'id="refit"' in report
    assert "refitted on all 48 frames" in report
    assert "comes from the validation run before refitting" in report
    assert "refitted on all 48 frames" in captured.err
    assert "refitted on all" not in (plain / "report.html").read_text()

    # The saved model loads and predicts, with the validation run's thresholds.
    paths = sorted(str(p) for p in binary_dirs[0].rglob("*.png"))[:4]
    table = image_predictions.predict_images(refitted, paths)
    assert table["square_probability"].between(0, 1).all()
    loaded = model_dir.load_model_dir(refitted)
    geometry = images.ImageGeometry.from_json(loaded.metadata["input"])
    pixels = np.stack([images.load_image_array(p, geometry) for p in paths])
    np.testing.assert_allclose(table["square_probability"].to_numpy(),
                               loaded.model(pixels, training=False)["square"].numpy()[:, 0],
                               rtol=1e-5, atol=1e-6)


def test_an_interrupted_refit_saves_nothing_and_a_rerun_starts_it_again(
        binary_dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model"
    args = [*binary_dirs, out, *FAST, "--weights", "none", "--refit"]
    started = []
    original = refit.RefitLog.on_epoch_end

    def interrupted(self, epoch, logs=None):
        started.append((self.phase, epoch))
        raise KeyboardInterrupt()
    monkeypatch.setattr(refit.RefitLog, "on_epoch_end", interrupted)
    assert run_script(build_binary_classifier, args) == 130
    assert started == [("head", 0)]
    # No model directory, not even a partial one: only the validation run's checkpoint.
    assert listdir(tmp_path) == ["frames", "model.partial"]
    assert listdir(tmp_path / "model.partial") == ["checkpoint"]
    capsys.readouterr()

    monkeypatch.setattr(refit.RefitLog, "on_epoch_end", original)
    assert run_script(build_binary_classifier, [*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["resumed_from"] is not None  # the validation run was not trained again
    metadata = json.loads((out / "metadata.json").read_text())
    kept = metadata["refit"]["epochs"]
    assert len(metadata["refit"]["history"]) == kept["head"] + kept["fine_tune"]
    assert listdir(tmp_path) == ["frames", "model"]


def test_a_refit_checkpoint_is_the_same_run_as_one_without_refit():
    assert "refit" in pipeline.SETTINGS_NOT_IN_RUN_KEY


def test_refit_without_validation_frames_stops_naming_refit():
    with pytest.raises(errors.InputError, match="--refit needs validation frames.*"
                                                "--validation-split 0 leaves none"):
        settings.TrainingConfig(refit=True, validation_split=0)
    # Without --refit, the range check of --validation-split answers as before.
    with pytest.raises(errors.InputError, match="--validation-split must be greater than 0"):
        settings.TrainingConfig(validation_split=0)


def test_refit_without_validation_frames_exits_2_on_the_command_line(binary_dirs, tmp_path):
    out = tmp_path / "model"
    done = subprocess.run([sys.executable, str(ROOT / "build_binary_classifier.py"),
                           *map(str, binary_dirs), str(out), "--refit",
                           "--validation-split", "0"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "--refit needs validation frames" in done.stderr
    assert not out.exists()


def test_the_flag_is_in_the_help():
    done = subprocess.run([sys.executable, str(ROOT / "build_multi_hot_model.py"), "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0
    assert "--refit" in done.stdout and "docs/refit.md" in done.stdout


@pytest.mark.parametrize("rows, expected", [
    # The best head epoch by validation AP; no fine-tuning epoch beats it.
    ([("head", 1, 0.5, 1.0), ("head", 2, 0.7, 0.9), ("head", 3, 0.6, 0.8),
      ("fine_tune", 1, 0.7, 0.7), ("fine_tune", 2, 0.65, 0.6)], {"head": 2, "fine_tune": 0}),
    # A fine-tuning epoch that beats the head's best is kept; ties are not improvements.
    ([("head", 1, 0.5, 1.0), ("head", 2, 0.5, 0.9), ("fine_tune", 1, 0.6, 0.8),
      ("fine_tune", 2, 0.8, 0.7), ("fine_tune", 3, 0.8, 0.6)], {"head": 1, "fine_tune": 2}),
    # No validation AP anywhere (no symbol with both kinds of frames): the lowest loss wins.
    ([("head", 1, np.nan, 1.0), ("head", 2, np.nan, 0.8), ("head", 3, np.nan, 0.9),
      ("fine_tune", 1, np.nan, 0.7)], {"head": 2, "fine_tune": 1}),
    # No fine-tuning phase.
    ([("head", 1, 0.4, 1.0), ("head", 2, 0.3, 1.0)], {"head": 1, "fine_tune": 0}),
])
def test_kept_epochs_repeat_the_early_stopping_choice(rows, expected):
    history = [{"phase": p, "epoch": e, "val_ap": ap, "val_loss": loss}
               for p, e, ap, loss in rows]
    assert refit.kept_epochs(history) == expected


def test_kept_epochs_match_what_early_stopping_kept(binary_dirs, tmp_path):
    """On a real run, the kept head epoch's weights are those the head phase ended with."""
    labelled = image_folders.images_from_directories(*binary_dirs)
    args = build_binary_classifier.build_parser().parse_args(
        [str(binary_dirs[0]), str(binary_dirs[1]), str(tmp_path / "m"), *FAST, "--weights",
         "none", "--epochs", "5", "--patience", "2", "--fine-tune-epochs", "0"])
    config = settings.config_from_args(args)
    result = pipeline.train_and_save(labelled, config, tmp_path / "m")
    history = pd.read_csv(tmp_path / "m" / "history.csv").to_dict("records")
    kept = refit.kept_epochs(history)
    head = [r for r in history if r["phase"] == "head"]
    assert kept["fine_tune"] == 0
    # The saved model, scored for metrics.json, has the kept epoch's weights: the validation
    # AP of that epoch is the AP the metrics report.
    assert result.metrics["symbols"]["square"]["average_precision"] == pytest.approx(
        head[kept["head"] - 1]["val_ap"], abs=1e-6)
    best = max(r["val_ap"] for r in head)
    assert kept["head"] == min(r["epoch"] for r in head if r["val_ap"] == best)
    assert result.refit == {"refit": False, "metrics_from": "saved model",
                            "images": {"trained_on": result.counts["train"]["images"]},
                            "note": refit.note({"refit": False})}


def test_the_refit_fine_tunes_for_the_kept_fine_tuning_epochs(binary_dirs, tmp_path, monkeypatch):
    """Whatever validation kept is what the refit trains: here 2 head epochs and 1 of
    fine-tuning, which moves the top of the backbone away from the seed's initialisation."""
    monkeypatch.setattr(refit, "kept_epochs", lambda rows: {"head": 2, "fine_tune": 1})
    labelled = image_folders.images_from_directories(*binary_dirs)
    args = build_binary_classifier.build_parser().parse_args(
        [str(binary_dirs[0]), str(binary_dirs[1]), str(tmp_path / "m"), *FAST, "--weights",
         "none", "--refit", "--fine-tune-fraction", "0.3"])  # the bottom stays frozen
    config = settings.config_from_args(args)
    result = pipeline.train_and_save(labelled, config, tmp_path / "m")
    history = result.refit["history"]
    assert [(r["phase"], r["epoch"]) for r in history] == [("head", 1), ("head", 2),
                                                           ("fine_tune", 1)]
    assert all(np.isfinite(r["loss"]) for r in history)
    loaded = model_dir.load_model_dir(tmp_path / "m")
    assert loaded.metadata["refit"]["epochs"] == {"head": 2, "fine_tune": 1}
    assert all(w.dtype == np.float32 for w in loaded.model.get_weights())
    paths = sorted(str(p) for p in binary_dirs[1].rglob("*.png"))[:3]
    assert image_predictions.predict_images(loaded, paths)["square_probability"].between(0, 1).all()
    # A fresh model of the same seed has the initialisation; the refit fine-tuned the top
    # of the backbone (Conv_1) away from it and left the bottom (Conv1) frozen.
    keras.utils.set_random_seed(config.seed)
    fresh = model.build_model(["square"], config, images.ImageGeometry.from_json(
        loaded.metadata["input"]))
    saved = loaded.model.get_layer(fresh.backbone.name)
    assert not np.allclose(fresh.backbone.get_layer("Conv_1").get_weights()[0],
                           saved.get_layer("Conv_1").get_weights()[0])
    np.testing.assert_array_equal(fresh.backbone.get_layer("Conv1").get_weights()[0],
                                  saved.get_layer("Conv1").get_weights()[0])
