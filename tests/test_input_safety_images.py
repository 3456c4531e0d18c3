"""Odd image folders and files: links and loops, one picture in several files, files this user
may not read, and file names that are not UTF-8 (issue 24)."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import FAST, run_script, scene

import build_binary_classifier
from symbol_trainer import (duplicates, image_folders, labelled_images,
                            model_format, output_dir, preparation, settings)
from symbol_trainer.errors import InputError
from symbol_trainer.images import find_images, scan_images
from symbol_trainer.labels_csv import images_from_csv


def write_frames(folder, count, seed, square, prefix="frame"):
    """`count` distinct PNG frames (a red square in each when `square`) in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        scene(rng, square, False, (32, 24)).save(folder / f"{prefix}{index:02d}.png")
    return folder


def dry_run_record(capsys, argv):
    """The --json record and the log of a --dry-run of build_binary_classifier.py."""
    code = run_script(build_binary_classifier, [*argv, "--dry-run", "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


# --------------------------------------------------------------------------------------------
# One file, several paths


def test_a_link_loop_counts_each_image_once(tmp_path, capsys, caplog):
    with_dir = write_frames(tmp_path / "with_square", 20, 1, True)
    (with_dir / "loop").symlink_to(".")  # the case of the issue: 20 files became 820 images
    without_dir = write_frames(tmp_path / "without_square", 20, 2, False)

    with caplog.at_level(logging.WARNING):
        found = find_images(with_dir)
    assert len(found) == 20 and len(set(found)) == 20
    assert all(path.parent == with_dir for path in found)
    assert ("1 folder link(s) lead to a folder searched already (for example 'loop' leads back "
            "to '.', a loop)") in caplog.text

    code, record, log_text = dry_run_record(capsys, [with_dir, without_dir, tmp_path / "m"])
    assert code == 0
    assert record["images"]["train"] + record["images"]["validation"] == 40
    assert "Found 20 images with the symbol, 20 without" in log_text


def test_links_and_hard_links_to_one_file_list_it_once_by_its_plain_path(tmp_path, caplog):
    root = tmp_path / "frames"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for name in ("b.png", "c.png", "sub/d.png"):
        (root / name).write_bytes(b"x")
    (outside / "e.png").write_bytes(b"x")
    (root / "a_link.png").symlink_to("b.png")            # sorts before its target
    os.link(root / "c.png", root / "sub" / "hard.png")    # a hard link: the same file
    (root / "sub" / "up").symlink_to("..")                # another loop, deeper down
    (root / "out").symlink_to(outside)                    # a folder outside: followed once
    (root / "out_again").symlink_to(outside)
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")  # dangling: the scan reports it

    with caplog.at_level(logging.WARNING):
        found = [p.relative_to(root).as_posix() for p in find_images(root)]
    assert found == ["b.png", "c.png", "gone.png", "out/e.png", "sub/d.png"]
    assert "2 folder link(s) lead to a folder searched already (for example 'sub/up' leads " \
           "back to '.', a loop)" in caplog.text
    assert "2 path(s) lead to an image found already (a link or hard link: for example " \
           "'sub/hard.png' is 'c.png')" in caplog.text


def test_a_hard_link_between_training_and_validation_folders_is_refused(tmp_path, capsys):
    with_dir = write_frames(tmp_path / "with_square", 6, 1, True)
    without_dir = write_frames(tmp_path / "without_square", 6, 2, False)
    held_with = write_frames(tmp_path / "held" / "with_square", 3, 3, True)
    held_without = write_frames(tmp_path / "held" / "without_square", 3, 4, False)
    os.link(with_dir / "frame00.png", held_with / "linked.png")
    code = run_script(build_binary_classifier, [
        with_dir, without_dir, tmp_path / "m", "--validation-dirs", held_with, held_without,
        "--dry-run"])
    assert code == 2
    error = capsys.readouterr().err
    assert "1 image(s) are also training images" in error and "linked.png" in error


# --------------------------------------------------------------------------------------------
# One picture, several files


def test_the_same_picture_with_and_without_the_symbol_is_an_error_naming_both(tmp_path, capsys):
    with_dir = write_frames(tmp_path / "with_square", 8, 1, True)
    without_dir = write_frames(tmp_path / "without_square", 8, 2, False)
    shutil.copy(with_dir / "frame03.png", without_dir / "copy.png")
    (without_dir / "link.png").symlink_to(with_dir / "frame05.png")
    out = tmp_path / "m"

    code = run_script(build_binary_classifier, [with_dir, without_dir, out, *FAST, "--dry-run"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert "2 picture(s) are both among the frames with the symbol and among the frames " \
           "without it" in errors[0]
    assert (f"{str(with_dir / 'frame03.png')!r} (with square) = "
            f"{str(without_dir / 'copy.png')!r} (without)") in errors[0]
    assert str(without_dir / "link.png") in errors[0]
    assert "Delete the copy or link that is in the wrong folder" in errors[0]
    assert not out.exists()


def test_many_conflicting_pictures_are_shown_as_a_few_and_a_count(tmp_path):
    with_dir = write_frames(tmp_path / "with_square", 8, 1, True)
    without_dir = write_frames(tmp_path / "without_square", 2, 2, False)
    for index in range(8):
        shutil.copy(with_dir / f"frame{index:02d}.png", without_dir / f"copy{index}.png")
    images = image_folders.images_from_directories(with_dir, without_dir)
    with pytest.raises(InputError, match=r"^8 picture\(s\) .*; and 3 more\. Delete"):
        preparation.prepare_training_data(images, settings.TrainingConfig(weights="none"))


def labels_csv(root, rows):
    path = root / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_csv_rows_of_one_picture_with_different_labels_are_a_warning_per_symbol(tmp_path, caplog):
    root = write_frames(tmp_path / "frames", 12, 1, True)
    shutil.copy(root / "frame00.png", root / "copy_of_00.png")
    rows = [{"filename": f"frame{i:02d}.png", "a_visible": i % 2, "b_visible": i // 2 % 2}
            for i in range(12)]
    rows.append({"filename": "copy_of_00.png", "a_visible": 1, "b_visible": 0})  # a disagrees
    images = images_from_csv(root, labels_csv(root, rows))
    with caplog.at_level(logging.WARNING):
        prepared = preparation.prepare_training_data(images, settings.TrainingConfig(weights="none"))
    assert ("1 set(s) of frames with identical content (copies) have different labels for a: "
            "'copy_of_00.png' (1) = 'frame00.png' (0). They train against each other" in caplog.text)
    assert "labels for b" not in caplog.text
    assert prepared.counts["identical_content"]["conflicting"] == {"a": 1}
    split = prepared.split_table().set_index("filename")["split"]
    assert split["frame00.png"] == split["copy_of_00.png"]


def test_copies_with_the_same_labels_are_reported_and_kept_on_one_side_of_the_split(tmp_path, caplog):
    root = write_frames(tmp_path / "frames", 20, 1, True)
    rows = [{"filename": f"frame{i:02d}.png", "square_visible": i % 2} for i in range(20)]
    for i in range(20):  # every frame twice: a frame-by-frame split would part most pairs
        shutil.copy(root / f"frame{i:02d}.png", root / f"copy{i:02d}.png")
        rows.append({"filename": f"copy{i:02d}.png", "square_visible": i % 2})
    images = images_from_csv(root, labels_csv(root, rows))
    for seed in range(3):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            prepared = preparation.prepare_training_data(
                images, settings.TrainingConfig(weights="none", seed=seed, group_by="none"))
        split = prepared.split_table().set_index("filename")["split"]
        parted = [i for i in range(20) if split[f"frame{i:02d}.png"] != split[f"copy{i:02d}.png"]]
        assert parted == [], f"seed {seed}: copies on both sides: {parted}"
        assert prepared.is_validation.sum() == 8  # 20 % of the 40 frames, in 4 pairs
    assert "20 frame(s) are copies of another frame with the same labels (identical file " \
           "content; 20 picture(s) in all): 'frame00.png' = 'copy00.png'" in caplog.text
    assert prepared.counts["identical_content"] == {
        "pictures_in_several_frames": 20, "copies": 20, "conflicting": {}}


def test_copies_join_their_groups_so_no_group_is_split_by_a_copy():
    groups = np.array(["e1", "e1", "e2", "e3", "e4"])
    sha1 = ["x", "y", "z", "x", "w"]  # e1 and e3 share a picture
    assert duplicates.split_groups(groups, sha1).tolist() == ["e1", "e1", "e2", "e1", "e4"]
    assert duplicates.split_groups(groups, ["a", "b", "c", "d", "e"]) is groups
    assert duplicates.split_groups(None, ["a", "b", "c"]) is None
    assert duplicates.split_groups(None, ["a", "b", "a"]).tolist() == ["0", "1", "0"]


def test_a_validation_copy_of_a_training_frame_is_reported(tmp_path, capsys):
    with_dir = write_frames(tmp_path / "with_square", 6, 1, True)
    without_dir = write_frames(tmp_path / "without_square", 6, 2, False)
    held_with = write_frames(tmp_path / "held" / "with_square", 3, 3, True)
    held_without = write_frames(tmp_path / "held" / "without_square", 3, 4, False)
    shutil.copy(with_dir / "frame02.png", held_with / "copy.png")
    code, record, log_text = dry_run_record(capsys, [
        with_dir, without_dir, tmp_path / "m", "--validation-dirs", held_with, held_without])
    assert code == 0 and record["images"] == {"train": 12, "validation": 7}
    assert (f"1 validation frame(s) have the same content as a training frame (copies): "
            f"{str(held_with / 'copy.png')!r} = {str(with_dir / 'frame02.png')!r}") in log_text


def test_a_validation_csv_copy_of_a_training_frame_is_reported(tmp_path, caplog):
    root = write_frames(tmp_path / "frames", 16, 1, True)
    shutil.copy(root / "frame01.png", root / "copy.png")
    rows = [{"filename": f"frame{i:02d}.png", "square_visible": i % 2} for i in range(16)]
    train_csv = labels_csv(root, rows[:12])
    valid_csv = root / "valid.csv"
    pd.DataFrame(rows[12:] + [{"filename": "copy.png", "square_visible": 1}]).to_csv(valid_csv, index=False)
    train = images_from_csv(root, train_csv)
    images, is_validation = labelled_images.with_validation_set(
        train, images_from_csv(root, valid_csv), "--validation-csv valid.csv")
    with caplog.at_level(logging.WARNING):
        prepared = preparation.prepare_training_data(images, settings.TrainingConfig(weights="none"),
                                                is_validation)
    assert "1 validation frame(s) have the same content as a training frame (copies): " \
           "'copy.png' = 'frame01.png'" in caplog.text
    assert prepared.counts["identical_content"]["validation_copies_of_training"] == 1


# --------------------------------------------------------------------------------------------
# Files this user may not read


def _deny(monkeypatch, path):
    """Reading `path` fails as it does for a file without read permission (the tests run as
    root, for whom chmod 000 does not stop reading)."""
    read_bytes = pathlib.Path.read_bytes

    def guarded(self):
        if str(self) == str(path):
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", guarded)


def test_an_image_that_may_not_be_read_is_skipped_and_listed(tmp_path, capsys, monkeypatch):
    with_dir = write_frames(tmp_path / "with_square", 8, 1, True)
    without_dir = write_frames(tmp_path / "without_square", 8, 2, False)
    _deny(monkeypatch, with_dir / "frame03.png")

    scan = scan_images([with_dir / "frame02.png", with_dir / "frame03.png"])
    assert scan.readable.tolist() == [True, False]
    assert scan.errors == [(str(with_dir / "frame03.png"),
                            "permission denied: this user may not read the file (check its "
                            "permissions, and its folder's)")]

    code = run_script(build_binary_classifier, [with_dir, without_dir, tmp_path / "m", "--dry-run",
                                                "--max-unreadable", "0.1"])
    captured = capsys.readouterr()
    assert code == 0
    assert "Images: 16 listed, 15 readable, 1 skipped as unreadable." in captured.out
    assert f"{with_dir / 'frame03.png'}: permission denied" in captured.out

    # It counts against --max-unreadable like a corrupt file.
    code = run_script(build_binary_classifier, [with_dir, without_dir, tmp_path / "m", "--dry-run",
                                                "--max-unreadable", "0"])
    error = capsys.readouterr().err
    assert code == 2
    assert "1 of 16 images (6.2%) cannot be read, more than --max-unreadable 0" in error
    assert "frame03.png: permission denied" in error


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their permissions; the monkeypatched test "
                           "above covers this case")
def test_chmod_000_image_is_skipped(tmp_path):
    with_dir = write_frames(tmp_path / "with_square", 4, 1, True)
    locked = with_dir / "frame01.png"
    locked.chmod(0)
    try:
        scan = scan_images([with_dir / "frame00.png", locked])
    finally:
        locked.chmod(0o644)
    assert scan.readable.tolist() == [True, False]
    assert "permission denied" in scan.errors[0][1]


# --------------------------------------------------------------------------------------------
# File names that are not UTF-8


def odd_name(text: bytes) -> str:
    """The str Python uses for a file name of these bytes (lone surrogates where they are not
    UTF-8), as os.listdir would return it."""
    return os.fsdecode(text)


@pytest.mark.skipif(sys.platform in ("win32", "darwin"),
                    reason="the file system refuses names that are not valid Unicode")
def test_file_names_that_are_not_utf8_train_and_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(5)
    names = {}
    # Latin-1 names, as an old camera or Windows share writes them; a folder too.
    with_dir, without_dir = tmp_path / "with_square", odd_name(bytes(tmp_path) + b"/sans_carr\xe9")
    for folder, square in ((with_dir, True), (without_dir, False)):
        os.mkdir(folder)
        for index in range(12):
            raw = (b"caf\xe9 %d.png" if index % 2 else b"frame%d.png") % index
            path = os.path.join(os.fsencode(folder), raw)
            scene(rng, square, False, (32, 24)).save(os.fsdecode(path))
            names[os.fsdecode(path)] = path
    out = tmp_path / "model"

    code = run_script(build_binary_classifier, [with_dir, without_dir, out, *FAST, "--weights", "none"])
    assert code == 0, capsys.readouterr().err

    # The CSV files hold each name's bytes, so reading them back gives the files on disk.
    split = pd.read_csv(out / model_format.SPLIT_FILE, encoding_errors="surrogateescape")
    assert sorted(os.fsencode(name) for name in split["filename"]) == sorted(names.values())
    assert all(os.path.isfile(name) for name in split["filename"])
    evaluation = pd.read_csv(out / model_format.EVALUATION_FILE, encoding_errors="surrogateescape")
    validated = set(split.loc[split["split"] == "validation", "filename"])
    assert set(evaluation["filename"]) == validated
    assert any(b"\xe9" in os.fsencode(name) for name in validated)
    # JSON files are ASCII: such a name is escaped as \udcXX, which json.loads gives back.
    metadata = json.loads((out / output_dir.METADATA_FILE).read_text(encoding="ascii"))
    assert os.fsencode(metadata["data"]["source"]).endswith(b"/sans_carr\xe9 (without)")
    assert (out / "report.html").read_text(encoding="utf-8")  # valid UTF-8
    assert not (tmp_path / "model.partial").exists()


@pytest.mark.skipif(sys.platform in ("win32", "darwin"),
                    reason="the file system refuses names that are not valid Unicode")
def test_an_unreadable_file_with_a_name_that_is_not_utf8_is_listed(tmp_path, monkeypatch):
    with_dir = write_frames(tmp_path / "with_square", 12, 1, True)
    without_dir = write_frames(tmp_path / "without_square", 12, 2, False)
    bad = os.fsdecode(os.path.join(os.fsencode(with_dir), b"broken\xff.jpg"))
    with open(bad, "wb") as handle:
        handle.write(b"not an image")
    # Standard output as a UTF-8 terminal has it: strict, so the name cannot be printed as is.
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    code = run_script(build_binary_classifier, [with_dir, without_dir, tmp_path / "m", "--dry-run"])
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("utf-8")
    assert code == 0
    assert "1 skipped as unreadable" in printed and "broken\\xff.jpg: cannot be decoded" in printed
