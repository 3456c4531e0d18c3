"""Input errors: one clear line naming the file or flag, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

import build_binary_classifier
from symbol_trainer import labelled_images
from conftest import FAST, ROOT, listdir, run_script


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]


@pytest.mark.parametrize("flags, message", [
    (["--backbone", "vgg99"], "--backbone choose one of .*mobilenet_v2.*; got 'vgg99'"),
    (["--batch-size", "0"], "--batch-size must be a whole number from 1 to 4096; got 0"),
    (["--validation-split", "0.9"], "--validation-split must be greater than 0 and at most 0.5"),
    (["--image-size", "16"], "--image-size must be a whole number of pixels from 32 to 2048; got 16"),
    (["--alpha", "0.6"], "--alpha 0.6 is not available for mobilenet_v2; choose one of"),
    (["--backbone", "resnet50", "--alpha", "0.5"], "--alpha only applies to MobileNet backbones"),
    (["--backbone", "inception_v3", "--alpha", "1.0", "--image-size", "64"],
     "--image-size 64 is too small for inception_v3; it needs at least 75"),
    (["--weights", "/no/such/file.h5"], "--weights '/no/such/file.h5': no such file"),
    (["--max-unreadable", "2"], "--max-unreadable must be between 0 and 1"),
    (["--fine-tune-patience", "0"], "--fine-tune-patience must be a whole number from 1 to 10000; got 0"),
    (["--threshold-for", "precision=95"], "--threshold-for 'precision=95': the precision must be "
                                          "above 0 and at most 1"),
])
def test_bad_flag_values_exit_2_with_the_flag_named(binary_dirs, tmp_path, capsys, flags, message):
    out = tmp_path / "model"
    code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, *flags])
    errors = _error_lines(capsys)
    assert code == 2 and len(errors) == 1
    assert __import__("re").search(message, errors[0]), errors[0]
    assert not out.exists()


def test_weights_file_of_the_wrong_backbone_is_refused(binary_dirs, tmp_path, capsys, shared_weights):
    out = tmp_path / "model"
    code = run_script(build_binary_classifier,
                      [*binary_dirs, out, *FAST, "--alpha", "1.0", "--weights", shared_weights])
    errors = _error_lines(capsys)
    assert code == 2 and "does not fit mobilenet_v2 with alpha 1.0" in errors[0]
    assert not out.exists() and not (tmp_path / "model.partial").exists()


def test_missing_and_empty_directories(binary_dirs, tmp_path, capsys):
    with_dir, without_dir = binary_dirs
    empty = tmp_path / "without_anything"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    cases = [
        ([tmp_path / "nope", without_dir], "WITH_DIR .*nope: no such directory"),
        ([with_dir, empty], "WITHOUT_DIR .*without_anything: no images found"),
        ([with_dir, with_dir / "ep0"], "overlap"),
    ]
    for dirs, message in cases:
        code = run_script(build_binary_classifier, [*dirs, tmp_path / "m", *FAST])
        errors = _error_lines(capsys)
        assert code == 2 and len(errors) == 1
        assert __import__("re").search(message, errors[0]), errors[0]


def test_a_class_with_one_readable_image_cannot_be_learned(tmp_path, capsys):
    (tmp_path / "with_star").mkdir()
    (tmp_path / "without_star").mkdir()
    Image.new("RGB", (40, 30), (200, 200, 0)).save(tmp_path / "with_star" / "a.png")
    for i in range(4):
        Image.new("RGB", (40, 30), (i, i, i)).save(tmp_path / "without_star" / f"{i}.png")
    code = run_script(build_binary_classifier, [tmp_path / "with_star", tmp_path / "without_star",
                                                tmp_path / "m", *FAST, "--weights", "none"])
    errors = _error_lines(capsys)
    assert code == 2
    assert "cannot learn star (1 positive, 4 negative)" in errors[0]


def test_invalid_symbol_name_is_refused(binary_dirs, tmp_path, capsys):
    code = run_script(build_binary_classifier, [*binary_dirs, tmp_path / "m", *FAST,
                                                "--symbol", "backbone"])
    assert code == 2 and "reserved" in _error_lines(capsys)[0]
    code = run_script(build_binary_classifier, [*binary_dirs, tmp_path / "m", *FAST,
                                                "--symbol", "-"])
    assert code == 2 and "not a valid output name" in _error_lines(capsys)[0]


def test_symbol_name_comes_from_the_folder():
    assert labelled_images.symbol_from_directory("frames/with_pentagram") == "pentagram"
    assert labelled_images.symbol_from_directory("frames/pentagram/") == "pentagram"
    assert labelled_images.symbol_from_directory("With-Red Star") == "Red_Star"


def test_existing_output_is_refused_without_overwrite_and_left_untouched(binary_dirs, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--weights", "none"])
    assert code == 2
    assert "exists and is not empty; pass --overwrite" in _error_lines(capsys)[0]
    assert listdir(out) == ["keep.txt"]


def test_too_many_unreadable_images_stop_before_training(binary_dirs, tmp_path, capsys):
    with_dir, without_dir = binary_dirs
    for i in range(5):
        (with_dir / f"broken{i}.jpg").write_bytes(b"\xff\xd8\xff not really")
    out = tmp_path / "model"
    code = run_script(build_binary_classifier, [with_dir, without_dir, out, *FAST,
                                                "--weights", "none", "--max-unreadable", "0.05"])
    errors = _error_lines(capsys)
    assert code == 2
    assert "5 of 53 images (9.4%) cannot be read, more than --max-unreadable 0.05" in errors[0]
    assert "broken0.jpg" in errors[0]
    assert not out.exists() and not (tmp_path / "model.partial").exists()


def test_offline_imagenet_download_failure_says_how_to_run_offline(binary_dirs, tmp_path, capsys,
                                                                  monkeypatch):
    # No network here (and none in CI), but make the failure certain and fast either way.
    def refuse(*args, **kwargs):
        raise Exception("URL fetch failure on https://example.invalid/weights.h5: no network")
    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", refuse)
    out = tmp_path / "model"
    code = run_script(build_binary_classifier, [*binary_dirs, out, *FAST, "--alpha", "1.0"])
    errors = _error_lines(capsys)
    assert code == 2 and len(errors) == 1
    assert "could not get the ImageNet weights of mobilenet_v2" in errors[0]
    assert "--weights PATH" in errors[0] and "Never trained on random weights" in errors[0]
    assert not out.exists()
    # --download-weights-only fails the same way, and needs no other argument.
    assert run_script(build_binary_classifier, ["--download-weights-only", "--alpha", "1.0"]) == 2
    assert "could not get the ImageNet weights of mobilenet_v2" in _error_lines(capsys)[0]


def test_command_line_process_exit_codes_and_clean_stderr(tmp_path):
    """A real process: argparse errors exit 2, an input error prints one line, no traceback."""
    script = str(ROOT / "build_binary_classifier.py")
    usage = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert usage.returncode == 2 and "the following arguments are required" in usage.stderr
    missing = subprocess.run([sys.executable, script, str(tmp_path / "a"), str(tmp_path / "b"),
                              str(tmp_path / "m")], capture_output=True, text=True)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"ERROR: WITH_DIR {tmp_path / 'a'}: no such directory."]
    assert "Traceback" not in missing.stderr
