"""Heatmaps: per-location probabilities from a model's `score_map` layer (or class-activation
maps of models built by earlier versions), mapped back through the input's resize onto the
frame, the overlays, `predict.py --heatmaps DIR` and the report's overlaid thumbnails."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from symbol_trainer import errors, image_predictions, model_format, output_dir, settings
from symbol_trainer.images import ImageGeometry, load_image_array, resize_to_geometry
from symbol_trainer.model import build_model
from symbol_trainer.model_dir import load_model_dir, save_model
from symbol_trainer import evaluation
from symbol_trainer import heatmaps
import predict
from symbol_trainer import report
from conftest import run_script

SYMBOLS = ["red_square", "blue_circle"]
HEIGHT, WIDTH = 32, 48   # the model input; the score map is 4 x 6 cells of 8 pixels
CELL = 8


def _score_map_model(height=HEIGHT, width=WIDTH):
    """A model of the layer-name contract, built by hand: uint8 RGB -> per-location logits of
    each symbol in a 1x1 Conv2D named `score_map` (red_square: the mean redness of a cell of
    8 x 8 pixels, blue_circle: its blueness), max-pooled, one named sigmoid output per symbol
    (a Dense that picks the symbol's channel)."""
    import keras

    pixels = keras.Input((height, width, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(pixels)
    x = keras.layers.AveragePooling2D(CELL, name="cells")(x)
    score_map = keras.layers.Conv2D(len(SYMBOLS), 1, name="score_map")
    logits = score_map(x)
    score_map.set_weights([np.array([[[[12.0, -6.0], [-6.0, -6.0], [-6.0, 12.0]]]], np.float32),
                           np.array([-3.0, -3.0], np.float32)])
    pooled = keras.layers.GlobalMaxPooling2D(name="pooling")(logits)
    outputs = {}
    for j, symbol in enumerate(SYMBOLS):
        head = keras.layers.Dense(1, activation="sigmoid", name=symbol)
        outputs[symbol] = head(pooled)
        head.set_weights([np.eye(len(SYMBOLS), dtype=np.float32)[:, j:j + 1],
                          np.zeros(1, np.float32)])
    return keras.Model(pixels, outputs)


def _save_model_dir(model, directory, resize="letterbox", height=HEIGHT, width=WIDTH):
    directory.mkdir(parents=True)
    model.save(directory / output_dir.MODEL_FILE)
    metadata = {"format_version": model_format.MODEL_FORMAT_VERSION, "symbols": SYMBOLS,
                "input": {"height": height, "width": width, "resize": resize},
                "training": {"config": {"resize": resize, "image_size": height}},
                "thresholds": {"red_square": 0.5, "blue_circle": 0.5}}
    (directory / output_dir.METADATA_FILE).write_text(json.dumps(metadata))
    return directory


def _frame(size, square_at=None, colour=(230, 20, 20), side=12):
    """A grey frame of `size` (width, height), with a coloured square whose top-left corner
    is `square_at`."""
    pixels = np.full((size[1], size[0], 3), 110, np.uint8)
    if square_at is not None:
        x, y = square_at
        pixels[y:y + side, x:x + side] = colour
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save_model_dir(_score_map_model(), tmp_path_factory.mktemp("heat") / "model")


def test_heatmaps_have_the_score_maps_shape_and_are_probabilities(model_dir, tmp_path):
    loaded = load_model_dir(model_dir)
    paths = []
    for index, at in enumerate([(4, 4), (60, 30), None]):
        paths.append(tmp_path / f"f{index}.png")
        _frame((96, 64), at).save(paths[-1])
    maps = heatmaps.heatmaps(loaded, paths)
    assert maps.shape == (3, HEIGHT // CELL, WIDTH // CELL, len(SYMBOLS))
    assert ((maps > 0) & (maps < 1)).all()
    # The model max-pools its score map: each frame's probability is its heatmap's maximum.
    probabilities = image_predictions.predict_images(loaded, paths)
    for j, symbol in enumerate(SYMBOLS):
        np.testing.assert_allclose(maps[..., j].max(axis=(1, 2)),
                                   probabilities[f"{symbol}_probability"], rtol=1e-5)
    # Model inputs give the same maps as the paths they were made from.
    geometry = ImageGeometry(HEIGHT, WIDTH, "letterbox")
    inputs = [load_image_array(p, geometry) for p in paths]
    np.testing.assert_allclose(heatmaps.heatmaps(loaded, inputs), maps)
    # heatmap_model is the documented recipe: the score_map layer's output.
    import keras
    recipe = keras.Model(loaded.model.inputs, loaded.model.get_layer("score_map").output)
    np.testing.assert_allclose(heatmaps.sigmoid(recipe(np.stack(inputs))), maps, rtol=1e-5)


def test_a_square_is_found_where_it_is_on_a_letterboxed_frame(model_dir, tmp_path):
    """A tall frame is letterboxed into the wide input with bars left and right; its red
    square's heatmap peaks over the square on the frame, and the bars are cut off."""
    loaded = load_model_dir(model_dir)
    path = tmp_path / "tall.png"
    _frame((64, 128), square_at=(40, 90), side=24).save(path)   # scale 1/4: 16 x 32 input px
    (frame,) = heatmaps.frame_heatmaps(loaded.model, loaded.metadata, [path], max_size=(128, 128))
    assert frame.image.size == (64, 128)
    red = frame.maps["red_square"]
    assert red.shape == (128, 64) and not np.isnan(red).any()
    y, x = np.unravel_index(np.argmax(red), red.shape)
    assert 40 <= x < 64 and 90 <= y < 114
    assert frame.maps["blue_circle"].max() < 0.1
    assert frame.probabilities["red_square"] > 0.5


def test_one_hot_cell_maps_onto_the_right_part_of_the_frame():
    """A synthetic score map with one hot cell, through each resize method."""
    geometry = ImageGeometry(64, 64, "letterbox")
    heat = np.zeros((4, 4))
    heat[1, 3] = 1.0   # input rows 16-32, columns 48-64
    # A 128 x 64 frame letterboxes to 64 x 32 at rows 16-48 (bars above and below): the
    # hot cell is the frame's top half, right quarter.
    mapped = heatmaps.frame_heatmap(heat, geometry, (128, 64))
    assert mapped.shape == (64, 128)
    y, x = np.unravel_index(np.argmax(mapped), mapped.shape)
    assert 96 <= x < 128 and 0 <= y < 32
    assert mapped[48:, :].max() < 0.05 and mapped[:, :64].max() < 0.05
    # The same map at a reduced size of the frame lands in the same place.
    small = heatmaps.frame_heatmap(heat, geometry, (128, 64), size=(32, 16))
    y, x = np.unravel_index(np.argmax(small), small.shape)
    assert 24 <= x < 32 and 0 <= y < 8
    # Squash: the frame fills the input; the cell is the frame's second row of four.
    squashed = heatmaps.frame_heatmap(heat, ImageGeometry(64, 64, "squash"), (128, 64))
    y, x = np.unravel_index(np.argmax(squashed), squashed.shape)
    assert 96 <= x < 128 and 16 <= y < 32
    # Crop: the input shows the frame's middle 64 x 64; the sides the model never saw are NaN.
    cropped = heatmaps.frame_heatmap(heat, ImageGeometry(64, 64, "crop"), (128, 64))
    assert np.isnan(cropped[:, :32]).all() and np.isnan(cropped[:, 96:]).all()
    assert not np.isnan(cropped[:, 32:96]).any()
    y, x = np.unravel_index(np.nanargmax(cropped), cropped.shape)
    assert 80 <= x < 96 and 16 <= y < 32


@pytest.mark.parametrize("resize", ["letterbox", "crop", "squash"])
@pytest.mark.parametrize("size", [(97, 41), (41, 97), (64, 64), (300, 200)])
def test_placement_is_where_resize_to_geometry_puts_the_frame(resize, size):
    """heatmaps.placement repeats resize_to_geometry's arithmetic: a white frame
    resized onto a black input is white exactly inside the placement."""
    geometry = ImageGeometry(48, 80, resize)
    pixels = resize_to_geometry(Image.new("RGB", size, (255, 255, 255)), geometry)
    where = heatmaps.placement(size, geometry.height, geometry.width, resize)
    rows = np.flatnonzero(pixels[:, :, 0].max(axis=1) > 128)
    columns = np.flatnonzero(pixels[:, :, 0].max(axis=0) > 128)
    assert (rows[0], rows[-1] + 1) == (max(0, where.top), min(geometry.height, where.bottom))
    assert (columns[0], columns[-1] + 1) == (max(0, where.left), min(geometry.width, where.right))


def test_class_activation_maps_of_an_earlier_versions_model_average_to_its_logit(tmp_path):
    """A model of build_model's architecture (no score_map layer): its class-activation
    maps, averaged over the locations, are the logit of its probability."""
    config = settings.TrainingConfig(backbone="mobilenet_v2", alpha=0.35, weights="none",
                                   image_size=64)
    geometry = ImageGeometry(64, 96, "letterbox")
    parts = build_model(SYMBOLS, config, geometry)
    rng = np.random.default_rng(0)
    for symbol in SYMBOLS:
        kernel, bias = parts.model.get_layer(symbol).get_weights()
        parts.model.get_layer(symbol).set_weights(
            [rng.normal(0, 0.3, kernel.shape).astype(np.float32), np.float32([0.2])])
    directory = tmp_path / "model"
    directory.mkdir()
    save_model(parts, SYMBOLS, directory)
    (directory / output_dir.METADATA_FILE).write_text(json.dumps({
        "format_version": model_format.MODEL_FORMAT_VERSION, "symbols": SYMBOLS,
        "input": geometry.to_json(), "training": {"config": {"resize": "letterbox"}},
        "thresholds": {s: 0.5 for s in SYMBOLS}}))
    loaded = load_model_dir(directory)
    images = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    maps = heatmaps.heatmap_model(loaded.model, SYMBOLS)(images)
    assert tuple(maps.shape) == (3, 2, 3, 2)
    outputs = loaded.model(images)
    for j, symbol in enumerate(SYMBOLS):
        p = np.asarray(outputs[symbol], dtype=np.float64)[:, 0]
        np.testing.assert_allclose(np.asarray(maps)[..., j].mean(axis=(1, 2)),
                                   np.log(p / (1 - p)), atol=1e-4)


def test_a_model_without_score_map_or_average_pooling_is_refused():
    import keras

    pixels = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalMaxPooling2D(name="pooling")(keras.layers.Conv2D(4, 3)(pixels))
    model = keras.Model(pixels, {"star": keras.layers.Dense(1, name="star")(pooled)})
    with pytest.raises(errors.InputError, match="no 'score_map' layer.*Train it again"):
        heatmaps.heatmap_model(model)


def test_overlay_colours_the_heatmap_and_labels_the_corner():
    frame = Image.new("RGB", (120, 80), (128, 128, 128))
    heat = np.zeros((80, 120))
    heat[40:, 60:] = 1.0
    heat[:, :10] = np.nan
    shown = np.asarray(heatmaps.overlay(frame, heat, heatmaps.label("star", 0.873)))
    assert shown.shape == (80, 120, 3)
    strongest = heatmaps.OPACITY[1]
    expected = 128 * (1 - strongest) + heatmaps.COLOURS[-1] * strongest
    assert (np.abs(shown[60:, 100:] - expected) <= 1.5).all()
    assert (shown[60:, 10:50] != 128).any(axis=-1).all()   # low probability: tinted, faintly
    assert (shown[30:, :10] == 128).all()                  # not looked at: unchanged
    assert (shown[0, 0] == 0).all() and (shown[:12, :40] > 200).any()   # the label, white on black


def test_heatmap_names_mirror_the_filename_inside_the_folder():
    assert heatmaps.heatmap_name("ep1/frame.jpg", "star") == "ep1/frame.jpg.star.png"
    assert heatmaps.heatmap_name("/abs/x.png", "star") == "abs/x.png.star.png"
    assert heatmaps.heatmap_name("../up/./x.png", "s") == "__parent__/up/x.png.s.png"
    assert heatmaps.heatmap_name("C:\\f\\x.png", "s") == "C_/f/x.png.s.png"


def _report_inputs(directory, tmp_path):
    """A validation table of 24 frames in 6 groups, scored by the model in `directory`, and the
    metadata that report.write_report reads."""
    loaded = load_model_dir(directory)
    rng = np.random.default_rng(1)
    names, groups, paths, labels = [], [], [], []
    for index in range(24):
        square, circle = index % 2 == 0, index % 3 == 0
        image = _frame((96, 64), (int(rng.integers(0, 80)), int(rng.integers(0, 48))) if square
                       else None)
        if circle:
            image.paste((20, 40, 230), (60, 40, 72, 52))
        name = f"g{index % 6}/frame{index:02d}.png"
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp_path / name)
        names.append(name), groups.append(f"g{index % 6}"), paths.append(str(tmp_path / name))
        # Some labels wrong, so that every sheet has frames.
        labels.append([float(square != (index % 7 == 0)), float(circle != (index % 5 == 0))])
    labels = np.array(labels)
    predicted = image_predictions.predict_images(loaded, paths)
    probabilities = predicted[[f"{s}_probability" for s in SYMBOLS]].to_numpy()
    thresholds = evaluation.choose_thresholds(labels, probabilities, SYMBOLS,
                                              evaluation.ThresholdRule())
    metrics = evaluation.evaluation_metrics(labels, probabilities, SYMBOLS, thresholds,
                                            np.array(groups), group_name="groups, by folder")
    table = evaluation.evaluation_table(np.array(names), np.array(groups), labels,
                                        probabilities, SYMBOLS, thresholds)
    counts = {"train": {"images": 90, "groups": 9, "positives": {s: 30 for s in SYMBOLS},
                        "negatives": {s: 60 for s in SYMBOLS}},
              "validation": {"images": 24, "groups": 6, "positives": {s: 12 for s in SYMBOLS},
                             "negatives": {s: 12 for s in SYMBOLS}},
              "listed": 114, "unreadable": 0, "grouping": "folder"}
    metadata = {**loaded.metadata, "data": {"counts": counts}, "packages": {"keras": "3"},
                "training": {"config": {"backbone": "mobilenet_v2", "alpha": 0.35,
                                        "resize": "letterbox", "patience": 5,
                                        "threshold_for": "f1"},
                             "started_at": "2026-12-04T10:00:00+00:00", "phase_seconds": {}}}
    history = pd.DataFrame({"phase": ["head"] * 2, "epoch": [1, 2], "loss": [0.9, 0.7],
                            "val_loss": [0.8, 0.7], "val_ap": [0.5, 0.6]})
    return loaded, dict(model_name="symbols", metadata=metadata, metrics=metrics,
                        history=history, table=table, paths=paths)


def _jpegs(text: str) -> list[np.ndarray]:
    import base64
    import io
    import re

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(data))), dtype=np.int16)
            for data in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)]


def test_the_report_overlays_each_thumbnail_with_its_symbols_heatmap(model_dir, tmp_path):
    loaded, arguments = _report_inputs(model_dir, tmp_path / "frames")
    (tmp_path / "plain").mkdir()
    (tmp_path / "heat").mkdir()
    plain = report.write_report(tmp_path / "plain", **arguments).read_text()
    heated = report.write_report(tmp_path / "heat", **arguments, model=loaded.model).read_text()
    table = arguments["table"]
    shown = sum(min(limit, table.loc[table[f"{s}_outcome"] == kind, "group"].nunique())
                for s in SYMBOLS for kind, limit in (("true positive", report.HITS_SHOWN),
                                                     ("false positive", report.CONTACT_SHEET_SIZE),
                                                     ("false negative", report.CONTACT_SHEET_SIZE)))
    assert shown >= 12
    before, after = _jpegs(plain), _jpegs(heated)
    assert len(before) == len(after) == shown
    assert "Most confident hits" in heated
    assert "where the model sees the symbol" in heated and "where the model sees" not in plain
    # Same thumbnail sizes; every one tinted by its heatmap and labelled in its corner.
    for thumbnail, overlaid in zip(before, after):
        assert thumbnail.shape == overlaid.shape
        assert np.abs(thumbnail - overlaid).mean() > 10
        assert overlaid[1, 1].max() < 40   # the label's black box
    assert "http://" not in heated and "https://" not in heated
    assert len(heated) < 1.5 * len(plain)   # the overlays cost little more than the thumbnails


@pytest.fixture
def frames(tmp_path):
    """Frames of the same name in two folders: a red square in ep0's, nothing in ep1's."""
    root = tmp_path / "frames"
    for folder, at in (("ep0", (70, 40)), ("ep1", None)):
        (root / folder).mkdir(parents=True)
        _frame((128, 72), at).save(root / folder / "a.png")
    return root


def test_predict_writes_a_heatmap_per_frame_and_symbol_at_its_threshold(model_dir, frames,
                                                                         tmp_path):
    out = tmp_path / "heat"
    assert run_script(predict, [model_dir, frames, "-o", tmp_path / "p.csv", "--heatmaps", out,
                                "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "p.csv")
    assert table["red_square_visible"].tolist() == [1, 0]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["ep0/a.png.red_square.png"]
    with Image.open(out / written[0]) as image:
        assert image.size == (128, 72) and image.format == "PNG"
        shown = np.asarray(image.convert("RGB"), dtype=np.int16)
    # Reddest over the square (70-82, 40-52), where the model's map is hottest.
    redness = shown[..., 0] - shown[..., 2]
    y, x = np.unravel_index(np.argmax(redness[12:]), redness[12:].shape)
    assert 60 <= x < 92 and 30 <= y + 12 < 62
    # --heatmaps-all: every symbol of every frame, the folders mirrored, nothing left over.
    everything = tmp_path / "all"
    assert run_script(predict, [model_dir, frames, "-o", tmp_path / "q.csv", "--heatmaps",
                                everything, "--heatmaps-all", "--quiet"]) == 0
    assert sorted(p.relative_to(everything).as_posix() for p in everything.rglob("*")) == [
        "ep0", "ep0/a.png.blue_circle.png", "ep0/a.png.red_square.png",
        "ep1", "ep1/a.png.blue_circle.png", "ep1/a.png.red_square.png"]


def test_predict_writes_heatmaps_of_sampled_video_frames(model_dir, tmp_path):
    from test_predict import make_video

    clip = make_video(tmp_path / "clip.mp4", frames=6, rate=2, size=(96, 64))
    out = tmp_path / "heat"
    assert run_script(predict, [model_dir, clip, "-o", tmp_path / "p.csv", "--heatmaps", out,
                                "--heatmaps-all", "--quiet"]) == 0
    rows = pd.read_csv(tmp_path / "p.csv")["filename"].tolist()
    assert len(rows) == 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(
        f"{row}.{s}.png" for row in rows for s in SYMBOLS)


@pytest.mark.parametrize("where, message", [
    (lambda frames, model: frames / "heat", "would write into the INPUT folder"),
    (lambda frames, model: frames, "would write into the INPUT folder"),
    (lambda frames, model: model / "heat", "would write into the model directory"),
    (lambda frames, model: frames / "ep0", "would write into the INPUT folder"),
])
def test_predict_refuses_heatmaps_inside_an_input_or_the_model(model_dir, frames, tmp_path,
                                                               capsys, where, message):
    out = where(frames, model_dir)
    before = sorted(map(str, frames.rglob("*"))), sorted(map(str, model_dir.rglob("*")))
    assert run_script(predict, [model_dir, frames, "-o", tmp_path / "p.csv",
                                "--heatmaps", out]) == 2
    assert message in capsys.readouterr().err
    assert (sorted(map(str, frames.rglob("*"))), sorted(map(str, model_dir.rglob("*")))) == before
    assert not (tmp_path / "p.csv").exists()


def test_predict_refuses_heatmaps_that_would_collide_or_sit_beside_input_images(
        model_dir, frames, tmp_path, capsys, monkeypatch):
    # Two folder INPUTs with the same names inside: the rows and heatmaps would share names.
    assert run_script(predict, [model_dir, frames / "ep0", frames / "ep1", "--heatmaps",
                                tmp_path / "heat"]) == 2
    assert "are both named 'a.png'" in capsys.readouterr().err
    # --image-dir above both tells them apart.
    assert run_script(predict, [model_dir, frames / "ep0", frames / "ep1", "--image-dir",
                                frames, "-o", tmp_path / "p.csv", "--heatmaps",
                                tmp_path / "heat", "--heatmaps-all", "--quiet"]) == 0
    assert len(list((tmp_path / "heat").rglob("*.png"))) == 4
    # An image given as a file: its heatmaps may not be written into its folder.
    monkeypatch.chdir(frames / "ep0")
    assert run_script(predict, [model_dir, "a.png", "--heatmaps", "."]) == 2
    assert "the folder of the input image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        run_script(predict, [model_dir, frames, "--heatmaps-all"])
    assert stopped.value.code == 2
    assert "--heatmaps-all needs --heatmaps DIR" in capsys.readouterr().err


def test_a_failed_png_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "heat" / "a.png.star.png"

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        heatmaps.write_png(Image.new("RGB", (4, 4)), target)
    assert os.listdir(target.parent) == []


def test_predict_heatmaps_of_a_model_without_score_map_stop_before_any_output(frames,
                                                                               tmp_path, capsys):
    """A model that has no score_map layer and is not an earlier version's (here: no
    backbone) cannot give heatmaps: exit 2, one message, no predictions file."""
    import keras

    pixels = keras.Input((HEIGHT, WIDTH, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    model = keras.Model(pixels, {s: keras.layers.Dense(1, activation="sigmoid", name=s)(pooled)
                                 for s in SYMBOLS})
    directory = _save_model_dir(model, tmp_path / "model")
    out = tmp_path / "p.csv"
    assert run_script(predict, [directory, frames, "-o", out, "--heatmaps",
                                tmp_path / "heat"]) == 2
    assert "no 'score_map' layer" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "p.csv.partial").exists()
    assert not (tmp_path / "heat").exists()
