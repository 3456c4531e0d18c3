"""A damaged or hand-edited model directory: predict.py (and load_model_dir) stop with exit
code 2 and one message naming the file and the field and what to do, before any output, for
an empty, truncated or damaged model.keras and for a metadata.json that is not valid JSON,
misses a field, has a field of the wrong type or value, or disagrees with the model."""

from __future__ import annotations

import json
import re
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from symbol_trainer import errors, model_dir, model_format, output_dir
import predict
from conftest import run_script

SYMBOLS = ["red_square", "blue_circle"]
HEIGHT, WIDTH = 8, 12
ADVICE = "Restore the model directory from a backup or copy it again, or train the model again"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model directory of this tool's format, built directly (no training): uint8 RGB input
    of HEIGHT x WIDTH, one sigmoid output per symbol named after it, and its metadata."""
    import keras

    root = tmp_path_factory.mktemp("tiny_model")
    directory = root / "model"
    directory.mkdir()
    pixels = keras.Input((HEIGHT, WIDTH, 3), dtype="uint8")
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    outputs = {s: keras.layers.Dense(1, activation="sigmoid", name=s)(features) for s in SYMBOLS}
    keras.Model(pixels, outputs).save(directory / output_dir.MODEL_FILE)
    metadata = {"format_version": model_format.MODEL_FORMAT_VERSION, "symbols": SYMBOLS,
                "input": {"height": HEIGHT, "width": WIDTH, "resize": "letterbox"},
                "training": {"config": {"resize": "letterbox", "image_size": HEIGHT}},
                "thresholds": {"red_square": 0.5, "blue_circle": 0.25}}
    (directory / output_dir.METADATA_FILE).write_text(json.dumps(metadata))
    frames = root / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(
            frames / f"frame{index}.png")
    return directory, frames


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    directory, frames = tiny_model
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    return copy, frames


def _predict_refused(model, frames, tmp_path, capsys) -> str:
    """Run predict.py on a damaged model: exit 2, no output file; the error message."""
    out = tmp_path / "p.csv"
    assert run_script(predict, [model, frames, "-o", out]) == 2
    assert not out.exists() and not (tmp_path / "p.csv.partial").exists()
    return capsys.readouterr().err


def test_the_undamaged_model_directory_predicts(tiny_model, tmp_path):
    """The copies the other tests damage work before they are damaged."""
    model, frames = tiny_model
    out = tmp_path / "p.csv"
    assert run_script(predict, [model, frames, "-o", out, "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("damage, reason", [
    (lambda data: b"", r"model\.keras is empty \(0 bytes\)"),
    (lambda data: data[:len(data) // 2], r"model\.keras is not a complete \.keras file"),
    (lambda data: data[:-10], r"model\.keras is not a complete \.keras file"),
])
def test_empty_or_truncated_model_keras_exits_2_naming_the_file(model_copy, tmp_path, capsys,
                                                               damage, reason):
    model, frames = model_copy
    path = model / output_dir.MODEL_FILE
    path.write_bytes(damage(path.read_bytes()))
    err = _predict_refused(model, frames, tmp_path, capsys)
    assert re.search(reason, err) and str(path) in err and ADVICE in err
    assert "File not found" not in err
    with pytest.raises(errors.InputError, match=reason):
        model_dir.load_model_dir(model)


def test_model_keras_with_a_damaged_member_fails_its_checksum(model_copy, tmp_path, capsys):
    model, frames = model_copy
    path = model / output_dir.MODEL_FILE
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("config.json")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 10] ^= 0xFF  # one flipped byte inside config.json's stored data
    path.write_bytes(bytes(data))
    err = _predict_refused(model, frames, tmp_path, capsys)
    assert "damaged .keras archive: its member 'config.json' fails its checksum" in err


def test_model_keras_that_keras_cannot_rebuild_exits_2(model_copy, tmp_path, capsys):
    model, frames = model_copy
    with zipfile.ZipFile(model / output_dir.MODEL_FILE, "w") as archive:
        archive.writestr("config.json", "{not a model")
    err = _predict_refused(model, frames, tmp_path, capsys)
    assert f"{model / output_dir.MODEL_FILE}: cannot be loaded as a Keras model" in err and ADVICE in err


@pytest.mark.parametrize("text, reason", [
    ('{"format_version": 1, "symbols": ["red_square"', "is not valid JSON"),
    ("", r"is empty \(0 bytes\)"),
    ("[1, 2]", "holds a JSON list, not the JSON object"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_metadata_that_is_not_a_json_object_exits_2(model_copy, tmp_path, capsys, text, reason):
    model, frames = model_copy
    path = model / output_dir.METADATA_FILE
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    err = _predict_refused(model, frames, tmp_path, capsys)
    assert re.search(f"{re.escape(str(path))} {reason}", err) and ADVICE in err


_DELETE = object()


def _set(path, value, *more):
    """A change to metadata: the dotted field `path` set to `value` (_DELETE removes it), and
    likewise for the pairs in `more`."""
    def change(metadata):
        for field, new in ((path, value), *zip(more[::2], more[1::2])):
            *parents, last = field.split(".")
            node = metadata
            for key in parents:
                node = node[key]
            if new is _DELETE:
                del node[last]
            else:
                node[last] = new
    return change


@pytest.mark.parametrize("change, field, says", [
    (_set("input.height", HEIGHT + 1), "input.height", "but the model in model.keras takes images of 8x12"),
    (_set("input.width", WIDTH * 2), "input.width", "but the model in model.keras takes images of 8x12"),
    (_set("input.height", "8"), "input.height", "must be a whole number of pixels"),
    (_set("input.width", 0), "input.width", "must be a whole number of pixels"),
    (_set("input.height", 8.5), "input.height", "must be a whole number of pixels"),
    (_set("input", _DELETE), "input", "must be an object with height, width and resize"),
    (_set("input", [8, 12]), "input", "must be an object with height, width and resize"),
    (_set("input.resize", "zoom"), "input.resize", "must be one of letterbox, squash, crop"),
    (_set("input.resize", "squash"), "input.resize", "trained with --resize letterbox"),
    (_set("thresholds.red_square", 1.5), "thresholds.red_square", "probability between 0 and 1; found 1.5"),
    (_set("thresholds.red_square", -0.1), "thresholds.red_square", "probability between 0 and 1"),
    (_set("thresholds.blue_circle", "0.5"), "thresholds.blue_circle", "probability between 0 and 1; found '0.5'"),
    (_set("thresholds.blue_circle", None), "thresholds.blue_circle", "chose no threshold"),
    (_set("thresholds.blue_circle", True), "thresholds.blue_circle", "probability between 0 and 1"),
    (_set("thresholds.blue_circle", _DELETE), "thresholds", "has no threshold for the symbol 'blue_circle'"),
    (_set("thresholds.star", 0.5), "thresholds", "names 'star', which is not among the symbols"),
    (_set("thresholds", [0.5, 0.5]), "thresholds", "must be an object with one probability per symbol"),
    (_set("symbols", "red_square"), "symbols", "must be a non-empty list of symbol names"),
    (_set("symbols", _DELETE), "symbols", "must be a non-empty list of symbol names"),
    (_set("symbols", [1, 2]), "symbols", "must be a non-empty list of symbol names"),
    (_set("symbols", ["red_square", "red_square"]), "symbols", "names 'red_square' more than once"),
    (_set("symbols", ["red_square", "star"], "thresholds", {"red_square": 0.5, "star": 0.5}),
     "symbols", "do not match the symbols in metadata.json"),
])
def test_each_invalid_or_disagreeing_metadata_field_exits_2_naming_it(model_copy, tmp_path, capsys,
                                                                       change, field, says):
    model, frames = model_copy
    path = model / output_dir.METADATA_FILE
    metadata = json.loads(path.read_text())
    change(metadata)
    path.write_text(json.dumps(metadata))
    err = _predict_refused(model, frames, tmp_path, capsys)
    assert f"{path}: field '{field}'" in err and says in err and ADVICE in err
    assert "ValueError" not in err and "KeyError" not in err


def test_a_nan_threshold_exits_2_naming_it(model_copy, tmp_path, capsys):
    """json.loads reads NaN, which no strict JSON writer (nor this tool) writes."""
    model, frames = model_copy
    path = model / output_dir.METADATA_FILE
    path.write_text(path.read_text().replace('"blue_circle": 0.25', '"blue_circle": NaN'))
    err = _predict_refused(model, frames, tmp_path, capsys)
    assert f"{path}: field 'thresholds.blue_circle' must be a probability between 0 and 1; found nan" in err


def test_an_unsupported_format_version_names_the_field(model_copy, tmp_path, capsys):
    model, frames = model_copy
    path = model / output_dir.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["format_version"] = True  # equal to 1 in Python, but not the version number 1
    path.write_text(json.dumps(metadata))
    err = _predict_refused(model, frames, tmp_path, capsys)
    assert "format version True (field 'format_version') is not supported" in err


def test_a_model_directory_that_is_not_there_exits_2(tmp_path, capsys, tiny_model):
    _, frames = tiny_model
    err = _predict_refused(tmp_path / "no_model", frames, tmp_path, capsys)
    assert "MODEL_DIR" in err and "no such folder" in err


def test_a_bad_threshold_override_from_python_is_an_input_error(tiny_model):
    loaded = model_dir.load_model_dir(tiny_model[0])
    assert model_dir.decision_thresholds(loaded.metadata, {"red_square": np.float32(0.75)}) == {
        "red_square": 0.75, "blue_circle": 0.25}
    for value in ("high", None, float("nan"), 2):
        with pytest.raises(errors.InputError, match="a threshold is a probability between 0 and 1"):
            model_dir.decision_thresholds(loaded.metadata, {"red_square": value})
