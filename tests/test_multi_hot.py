"""build_multi_hot_model.py end to end, and --dry-run for both scripts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, ROOT, listdir, run_script, scene, write_two_symbol_frames

import build_binary_classifier
import build_multi_hot_model
from symbol_trainer import image_predictions, labels_csv, model_dir, pipeline, settings
from symbol_trainer.errors import InputError
from symbol_trainer import evaluation


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]


@pytest.fixture
def two_symbol_frames(tmp_path):
    """96 frames in 4 episodes of 24 (folders ep0..ep3 and an `episode` column), where a red
    square and a blue circle appear independently (all four combinations equally often in
    every episode), with labels.csv in the seed's format plus extra columns."""
    root = tmp_path / "frames"
    table = write_two_symbol_frames(root, count=96, per_episode=24, seed=1)
    table.insert(3, "notes", "")
    csv_path = tmp_path / "labels.csv"
    table.to_csv(csv_path, index=False)
    return root, csv_path


def test_learns_two_independent_symbols_and_saves_outputs_in_csv_order(two_symbol_frames, tmp_path,
                                                                      shared_weights, capsys):
    """Each output must see its own symbol: labels are independent, so a model that ignored one
    symbol would score AP near its prevalence (0.5) on it."""
    root, csv_path = two_symbol_frames
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model, [
        root, csv_path, out, "--weights", shared_weights, "--backbone", "mobilenet_v2",
        "--alpha", "0.35", "--image-size", "96", "--fine-tune-epochs", "0", "--quiet",
        "--validation-split", "0.33"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "red_square" in printed and "blue_circle" in printed and "macro average" in printed

    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["symbols"] == ["red_square", "blue_circle"]
    assert metadata["data"]["details"]["ignored_columns"] == ["notes"]  # episode groups the split
    metrics = json.loads((out / "metrics.json").read_text())
    for symbol in ("red_square", "blue_circle"):
        m = metrics["symbols"][symbol]
        assert set(m) >= {"precision", "recall", "roc_auc", "average_precision"}
        assert m["average_precision"] > 0.9, (symbol, m)
        assert m["positives"] >= 10
    assert set(metrics["macro"]) >= {"precision", "recall", "roc_auc", "average_precision"}

    loaded = model_dir.load_model_dir(out)
    assert list(loaded.model.output.keys()) == ["red_square", "blue_circle"]
    frames = pd.read_csv(csv_path)
    probabilities = image_predictions.predict_images(loaded, [root / f for f in frames["filename"]])
    assert list(probabilities.columns) == ["filename", "red_square_probability", "red_square_visible",
                                           "blue_circle_probability", "blue_circle_visible"]
    for symbol in ("red_square", "blue_circle"):
        truth = frames[f"{symbol}_visible"].to_numpy()
        assert evaluation.roc_auc(truth, probabilities[f"{symbol}_probability"].to_numpy()) > 0.9

    # Decisions use the thresholds chosen on validation (best F1 by default) and stored...
    thresholds = metadata["thresholds"]
    assert metadata["threshold_rule"] == "f1" and set(thresholds) == {"red_square", "blue_circle"}
    for symbol in ("red_square", "blue_circle"):
        m = metrics["symbols"][symbol]
        assert m["threshold"] == thresholds[symbol] and m["threshold_rule"] == "f1"
        p = probabilities[f"{symbol}_probability"]
        np.testing.assert_array_equal(probabilities[f"{symbol}_visible"], (p >= thresholds[symbol]).astype(int))
        assert probabilities[f"{symbol}_visible"].nunique() == 2  # a real cut, not all one side
        # Validated on one or two of the four episodes: too few to resample, so no interval.
        assert metadata["data"]["counts"]["validation"]["groups"] < 3
        assert m["average_precision_interval"] is None and m["f1_interval"] is None
        assert m["f1"] == pytest.approx(2 * m["true_positives"] / (
            2 * m["true_positives"] + m["false_positives"] + m["false_negatives"]))
    assert metrics["bootstrap"]["resampled"].startswith("groups, by the column 'episode'")
    # ... unless overridden, for one symbol or all.
    some = [root / f for f in frames["filename"][:8]]
    overridden = image_predictions.predict_images(loaded, some, thresholds={"red_square": 1.0})
    assert overridden["red_square_visible"].sum() == 0
    np.testing.assert_array_equal(overridden["blue_circle_visible"],
                                  probabilities["blue_circle_visible"][:8])
    everything = image_predictions.predict_images(loaded, some, thresholds=0.0)
    assert (everything[["red_square_visible", "blue_circle_visible"]] == 1).all().all()
    with pytest.raises(InputError, match="triangle: the model has no such symbol"):
        image_predictions.predict_images(loaded, some, thresholds={"triangle": 0.5})

    # evaluation.csv: one row per validation frame, in split.csv's order, with its episode.
    split = pd.read_csv(out / "split.csv")
    validation = split[split["split"] == "validation"]
    table = pd.read_csv(out / "evaluation.csv")
    assert table["filename"].tolist() == validation["filename"].tolist()
    assert table["group"].tolist() == validation["group"].tolist()
    per_symbol = ["label", "probability", "predicted", "outcome"]
    assert list(table.columns) == ["filename", "group", "errors"] + [
        f"{s}_{c}" for s in ("red_square", "blue_circle") for c in per_symbol]
    truth = frames.set_index("filename").loc[table["filename"]]
    for symbol in ("red_square", "blue_circle"):
        m = metrics["symbols"][symbol]
        assert table[f"{symbol}_label"].tolist() == truth[f"{symbol}_visible"].tolist()
        assert (table[f"{symbol}_outcome"] == "false positive").sum() == m["false_positives"]
        assert (table[f"{symbol}_outcome"] == "true positive").sum() == m["true_positives"]
    wrong = sum((table[f"{s}_label"] != table[f"{s}_predicted"]).astype(int)
                for s in ("red_square", "blue_circle"))
    assert table["errors"].tolist() == wrong.tolist()

    # report.html: one file with its images inside, every symbol named; the plots beside it.
    html = (out / "report.html").read_text()
    assert 'src="http' not in html and 'href="http' not in html
    assert html.count("data:image/png;base64,") == 3  # training curves and a curve per symbol
    for symbol in ("red_square", "blue_circle"):
        assert f'id="symbol-{symbol}"' in html
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "precision_recall_blue_circle.png", "precision_recall_red_square.png", "training_curves.png"]


def test_seed_example_header_trains_pentagram_and_star_outputs(tmp_path, capsys):
    """The example shipped in examples/symbols/ has exactly the seed document's header; the
    README's Quick start trains on it."""
    example = ROOT / "examples" / "symbols"
    assert (example / "labels.csv").read_text().splitlines()[0] == "filename,pentagram_visible,star_visible"
    out = tmp_path / "model"
    assert run_script(build_multi_hot_model, [example, example / "labels.csv", out,
                                              "--weights", "none", *FAST,
                                              "--fine-tune-epochs", "0"]) == 0
    loaded = model_dir.load_model_dir(out)
    assert loaded.metadata["symbols"] == ["pentagram", "star"]
    assert list(loaded.model.output.keys()) == ["pentagram", "star"]
    assert [layer for layer in ("pentagram", "star") if loaded.model.get_layer(layer).activation.__name__ == "sigmoid"] \
        == ["pentagram", "star"]
    table = image_predictions.predict_images(loaded, [example / "episode1" / "frame000.jpg"])
    values = table[["pentagram_probability", "star_probability"]].to_numpy()
    assert values.shape == (1, 2) and ((values >= 0) & (values <= 1)).all()


def test_symbols_flag_trains_a_subset(two_symbol_frames, tmp_path):
    root, csv_path = two_symbol_frames
    out = tmp_path / "model"
    assert run_script(build_multi_hot_model, [root, csv_path, out, "--weights", "none",
                                              "--symbols", "blue_circle", *FAST, "--fine-tune-epochs", "0"]) == 0
    assert json.loads((out / "metadata.json").read_text())["symbols"] == ["blue_circle"]


def test_partial_labels_train_the_other_symbol_and_metrics_skip_them(two_symbol_frames, tmp_path):
    """Annotators label one symbol per pass: a frame without a blue_circle label still trains
    red_square (finite losses in both phases), and blue_circle's metrics count only the
    frames annotated for it."""
    root, csv_path = two_symbol_frames
    frames = pd.read_csv(csv_path)
    blank = np.arange(len(frames)) % 3 == 0
    frames["blue_circle_visible"] = frames["blue_circle_visible"].astype(object)
    frames.loc[blank, "blue_circle_visible"] = np.where(np.arange(blank.sum()) % 2, "", "-1")
    frames.to_csv(csv_path, index=False)
    out = tmp_path / "model"
    assert run_script(build_multi_hot_model, [root, csv_path, out, "--weights", "none", *FAST]) == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["data"]["details"]["not_annotated"] == {"red_square": 0, "blue_circle": 32}
    history = pd.read_csv(out / "history.csv")
    assert set(history["phase"]) == {"head", "fine_tune"}
    assert np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
    metrics = json.loads((out / "metrics.json").read_text())["symbols"]
    validation = metadata["data"]["counts"]["validation"]
    assert metrics["red_square"]["frames"] == validation["images"]
    assert metrics["blue_circle"]["frames"] == (validation["positives"]["blue_circle"]
                                                + validation["negatives"]["blue_circle"])
    assert metrics["blue_circle"]["frames"] < validation["images"]


def test_csv_error_exits_2_with_one_message_and_writes_nothing(two_symbol_frames, tmp_path, capsys):
    root, csv_path = two_symbol_frames
    frames = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    frames.loc[2, "red_square_visible"] = "yes"
    frames.to_csv(csv_path, index=False)
    out = tmp_path / "model"
    assert run_script(build_multi_hot_model, [root, csv_path, out, "--weights", "none", *FAST]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and str(csv_path) in errors[0]
    assert not out.exists() and not (tmp_path / "model.partial").exists()


def test_wrong_flag_exits_2(two_symbol_frames, tmp_path, capsys):
    root, csv_path = two_symbol_frames
    with pytest.raises(SystemExit) as exit_info:
        build_multi_hot_model.main([str(root), str(csv_path), str(tmp_path / "m"), "--symbol", "x,y"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --symbol" in capsys.readouterr().err  # no silent prefix match
    assert run_script(build_multi_hot_model, [root, csv_path, tmp_path / "m", "--symbols", "hexagram"]) == 2
    assert "'hexagram' not found" in _error_lines(capsys)[0]


def test_dry_run_multi_prints_the_split_table_and_writes_nothing(two_symbol_frames, tmp_path, capsys):
    root, csv_path = two_symbol_frames
    (root / "ep0" / "broken.png").write_bytes(b"not a png")
    frames = pd.read_csv(csv_path)
    broken = {"filename": "ep0/broken.png", "episode": 0, "red_square_visible": 1, "notes": "",
              "blue_circle_visible": 0}
    pd.concat([frames, pd.DataFrame([broken])]).to_csv(csv_path, index=False)
    before = listdir(tmp_path)
    out = tmp_path / "model"
    assert run_script(build_multi_hot_model, [root, csv_path, out, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "Dry run: all checks of the data passed; no model was trained." in captured.out
    assert "Images: 97 listed, 96 readable, 1 skipped" in captured.out
    table = [line.split() for line in captured.out.splitlines() if line.startswith(("red_square", "blue_circle"))]
    assert [row[0] for row in table] == ["red_square", "blue_circle"]
    for row in table:  # positives = train + validation, negatives likewise
        assert int(row[1]) == 48 and int(row[3]) + int(row[4]) == 48
        assert int(row[5]) == 48 and int(row[6]) + int(row[7]) == 48
    assert "ep0/broken.png" in captured.out
    assert listdir(tmp_path) == before  # nothing written, no model directory


def test_dry_run_warns_about_few_validation_positives(two_symbol_frames, tmp_path, capsys):
    root, csv_path = two_symbol_frames
    assert run_script(build_multi_hot_model, [root, csv_path, tmp_path / "m", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "Fewer than 10 positives in validation" not in captured.err  # 48 positives: ~10 in validation
    frames = pd.read_csv(csv_path)
    keep = (frames["red_square_visible"] == 0) | (frames.index < 22)  # 11 red squares left
    frames[keep].to_csv(csv_path, index=False)
    assert run_script(build_multi_hot_model, [root, csv_path, tmp_path / "m", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "Fewer than 10 positives in validation for red_square (" in captured.err
    assert "few validation positives" in captured.out


def test_dry_run_binary_and_its_errors(binary_dirs, tmp_path, capsys):
    with_dir, without_dir = binary_dirs
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert run_script(build_binary_classifier, [with_dir, without_dir, out, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "Images: 48 listed, 48 readable, 0 skipped" in captured.out
    assert "square" in captured.out
    assert "Note: OUTPUT_MODEL_DIR" in captured.out and "pass --overwrite" in captured.out
    assert listdir(out) == ["old.txt"]
    assert run_script(build_binary_classifier, [with_dir, tmp_path / "nowhere", out, "--dry-run"]) == 2
    assert "nowhere" in _error_lines(capsys)[0]


def test_a_symbol_in_2_percent_of_frames_is_learned(tmp_path, shared_weights):
    """10 red squares in 500 frames: the positive weight is negatives/positives of the training
    split, and the model finds the square in frames it has never seen."""
    rng = np.random.default_rng(3)
    root = tmp_path / "frames"
    root.mkdir()
    rows = []
    for index in range(500):
        square = index % 50 == 0
        scene(rng, square, bool(rng.random() < 0.5)).save(root / f"f{index:03d}.png")
        rows.append({"filename": f"f{index:03d}.png", "red_square_visible": int(square)})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    fresh = []
    for index in range(40):
        scene(rng, index < 20, bool(rng.random() < 0.5)).save(root / f"new{index:02d}.png")
        fresh.append(root / f"new{index:02d}.png")

    images = labels_csv.images_from_csv(root, tmp_path / "labels.csv")
    config = settings.TrainingConfig(backbone="mobilenet_v2", alpha=0.35, weights=shared_weights,
                                   image_size=96, fine_tune_epochs=0)
    result = pipeline.train_and_save(images, config, tmp_path / "model")
    train = result.counts["train"]
    weight = json.loads((tmp_path / "model" / "metadata.json").read_text())["training"]["positive_weights"]
    assert weight["red_square"] == pytest.approx(train["negatives"]["red_square"] / train["positives"]["red_square"])
    assert weight["red_square"] > 40
    p = image_predictions.predict_images(tmp_path / "model", fresh)["red_square_probability"].to_numpy()
    assert evaluation.roc_auc(np.r_[np.ones(20), np.zeros(20)], p) > 0.95
    assert (p[:20] >= 0.5).mean() >= 0.7 and (p[20:] >= 0.5).mean() <= 0.1
