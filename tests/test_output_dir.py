"""output_dir.py: a model directory never is, contains or lies inside an input, and
--overwrite only ever replaces a model directory the tool wrote."""

from __future__ import annotations

import os
import shutil

import pytest

import build_binary_classifier
import build_multi_hot_model
from symbol_trainer import export
from symbol_trainer import output_dir
from symbol_trainer import report
from conftest import FAST, ROOT, listdir, run_script
from symbol_trainer.errors import InputError


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]


def _snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@pytest.mark.parametrize("where", ["image_dir", "inside", "parent", "csv_folder"])
def test_multi_hot_output_overlapping_the_frames_is_refused_and_nothing_is_touched(
        small_two_symbol_csv, tmp_path, capsys, where):
    # The case of the issue: `build_multi_hot_model.py frames frames/labels.csv frames
    # --overwrite` trained, then deleted every frame and the CSV.
    root, csv_path = small_two_symbol_csv
    labels_elsewhere = tmp_path / "labels"
    labels_elsewhere.mkdir()
    shutil.copy(csv_path, labels_elsewhere / "labels.csv")
    before = _snapshot(root)
    out, labels = {"image_dir": (root, csv_path),
                   "inside": (root / "ep0" / "model", csv_path),
                   "parent": (tmp_path, csv_path),
                   "csv_folder": (labels_elsewhere, labels_elsewhere / "labels.csv")}[where]
    code = run_script(build_multi_hot_model, [root, labels, out, *FAST, "--weights", "none",
                                              "--overwrite"])
    errors = _errors(capsys)
    assert code == 2 and len(errors) == 1, errors
    relation = {"image_dir": "is", "inside": "lies inside", "parent": "contains",
                "csv_folder": "is the folder of LABELS_CSV"}[where]
    assert f"OUTPUT_MODEL_DIR {out} {relation} " in errors[0]
    assert str(root) in errors[0] or str(labels_elsewhere) in errors[0]
    assert _snapshot(root) == before
    assert not (out.parent / (out.name + ".partial")).exists()


def test_binary_output_equal_to_without_dir_through_a_symlink_and_dots(binary_dirs, tmp_path, capsys):
    with_dir, without_dir = binary_dirs
    link = tmp_path / "link_to_frames"
    link.symlink_to(without_dir.parent)
    sneaky = link / "with_square" / ".." / without_dir.name
    before = _snapshot(without_dir)
    code = run_script(build_binary_classifier, [with_dir, without_dir, sneaky, *FAST,
                                                "--weights", "none", "--overwrite"])
    errors = _errors(capsys)
    assert code == 2 and f"is WITHOUT_DIR {without_dir}" in errors[0]
    assert _snapshot(without_dir) == before


def test_output_inside_the_validation_folders_or_the_cache_is_refused(binary_dirs, tmp_path, capsys):
    with_dir, without_dir = binary_dirs
    val_with, val_without = tmp_path / "val" / "with_square", tmp_path / "val" / "without_square"
    shutil.copytree(with_dir / "ep0", val_with)
    shutil.copytree(without_dir / "ep0", val_without)
    code = run_script(build_binary_classifier, [
        with_dir / "ep1", without_dir / "ep1", val_without / "model", *FAST, "--weights", "none",
        "--validation-dirs", val_with, val_without])
    assert code == 2 and "lies inside --validation-dirs WITHOUT" in _errors(capsys)[0]
    cache = tmp_path / "cache"
    code = run_script(build_binary_classifier, [with_dir, without_dir, cache / "model", *FAST,
                                                "--cache-dir", cache])
    assert code == 2 and "lies inside --cache-dir" in _errors(capsys)[0]


def test_validation_csv_folder_is_an_input(small_two_symbol_csv, tmp_path, capsys):
    root, csv_path = small_two_symbol_csv
    elsewhere = tmp_path / "val"
    elsewhere.mkdir()
    shutil.copy(csv_path, elsewhere / "val.csv")
    code = run_script(build_multi_hot_model, [root, csv_path, elsewhere, *FAST,
                                              "--validation-csv", elsewhere / "val.csv"])
    assert code == 2 and "is the folder of --validation-csv" in _errors(capsys)[0]
    # Beside the labels CSV (work/labels.csv, work/model) is fine: nothing there is a frame.
    assert output_dir.overlap(elsewhere / "model", elsewhere) == "lies inside"
    output_dir.check_outside_inputs(elsewhere / "model", {"IMAGE_DIR": root},
                                    {"--validation-csv": elsewhere / "val.csv"})


def test_output_that_is_or_contains_the_scripts_checkout_is_refused(binary_dirs, capsys):
    for out in (ROOT, ROOT.parent):
        code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--overwrite"])
        errors = _errors(capsys)
        assert code == 2 and "the folder of this tool's scripts" in errors[0]
    assert (ROOT / "common.py").is_file()


def test_dry_run_refuses_an_overlapping_output_too(binary_dirs, capsys):
    with_dir, without_dir = binary_dirs
    code = run_script(build_binary_classifier, [with_dir, without_dir, with_dir / "m", "--dry-run"])
    assert code == 2 and "lies inside WITH_DIR" in _errors(capsys)[0]


def test_library_callers_are_protected_too(binary_dirs, tmp_path):
    from symbol_trainer import image_folders, pipeline, settings

    with_dir, without_dir = binary_dirs
    images = image_folders.images_from_directories(with_dir, without_dir)
    config = settings.TrainingConfig(weights="none", image_size=32, epochs=1, fine_tune_epochs=0)
    with pytest.raises(InputError, match="lies inside the image folder"):
        pipeline.train_and_save(images, config, with_dir / "ep0" / "model")
    with pytest.raises(InputError, match="contains the image folder"):
        pipeline.train_and_save(images, config, with_dir.parent, overwrite=True)
    assert len(list(with_dir.rglob("*.png"))) == 24


def test_case_insensitive_spelling_is_caught_where_the_filesystem_ignores_case(tmp_path):
    folder = tmp_path / "Frames"
    folder.mkdir()
    other = tmp_path / "FRAMES"
    if not other.exists():
        pytest.skip("this filesystem tells case apart, so FRAMES is another folder here")
    assert output_dir.overlap(other, folder) == "is"


def test_overlap_relations():
    assert output_dir.overlap("/a/b", "/a/b/") == "is"
    assert output_dir.overlap("/a/b/c", "/a/b") == "lies inside"
    assert output_dir.overlap("/a", "/a/b") == "contains"
    assert output_dir.overlap("/a/bc", "/a/b") is None
    assert output_dir.overlap("/a/b/../c", "/a/c/d") == "contains"


def test_overwrite_refuses_a_folder_that_is_not_a_model_directory(binary_dirs, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.docx").write_text("years of work")
    code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--weights", "none",
                                                "--overwrite"])
    errors = _errors(capsys)
    assert code == 2 and "is not a model directory written by this tool" in errors[0]
    assert "thesis.docx" in errors[0]
    assert listdir(out) == ["thesis.docx"]


def test_overwrite_replaces_a_model_directory_but_not_files_added_to_it(binary_dirs, tmp_path, capsys):
    out = tmp_path / "model"
    args = [*binary_dirs, out, *FAST, "--weights", "none", "--fine-tune-epochs", "0"]
    assert run_script(build_binary_classifier, args) == 0
    written = set(listdir(out))
    # Everything a run writes is in the list --overwrite may replace (exports are checked below).
    assert written <= output_dir.MODEL_DIRECTORY_ENTRIES
    assert run_script(build_binary_classifier, [*args, "--overwrite"]) == 0
    (out / "my_notes.txt").write_text("what I changed")
    capsys.readouterr()
    assert run_script(build_binary_classifier, [*args, "--overwrite"]) == 2
    assert "holds files this tool did not write (my_notes.txt)" in _errors(capsys)[0]
    assert (out / "my_notes.txt").read_text() == "what I changed"


def test_the_list_of_model_directory_entries_matches_the_modules_that_write_them():
    for name in (report.REPORT_FILE, report.PLOTS_DIR, export.SAVED_MODEL_FOLDER,
                 export.TFLITE_FILE, export.ONNX_FILE):
        assert name in output_dir.MODEL_DIRECTORY_ENTRIES
    from symbol_trainer import model_format
    from symbol_trainer.output_dir import METADATA_FILE, MODEL_FILE
    for name in (model_format.HISTORY_FILE, model_format.METRICS_FILE, model_format.SPLIT_FILE,
                 model_format.EVALUATION_FILE, MODEL_FILE, METADATA_FILE):
        assert name in output_dir.MODEL_DIRECTORY_ENTRIES


def test_an_output_next_to_the_inputs_is_fine(binary_dirs, tmp_path):
    out = tmp_path / "frames_model"
    assert output_dir.overlap(out, binary_dirs[0]) is None
    output_dir.check_outside_inputs(out, {"WITH_DIR": binary_dirs[0], "WITHOUT_DIR": None})
    assert not os.path.exists(out)


def test_a_folder_of_the_users_named_like_the_partial_folder_is_never_emptied(binary_dirs, tmp_path, capsys):
    out = tmp_path / "model"
    partial = tmp_path / "model.partial"
    partial.mkdir()
    (partial / "holiday.jpg").write_bytes(b"a photo")
    code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--weights", "none"])
    errors = _errors(capsys)
    assert code == 2 and "model.partial holds files this tool did not write (holiday.jpg)" in errors[0]
    assert listdir(partial) == ["holiday.jpg"] and not out.exists()
