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
import build_multi_hot_model
import common


def write_frames(folder, count, seed, square, prefix="frame"):
    """`count` distinct PNG frames (a red square in each when `square`) in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        scene(rng, square, False, (32, 24)).save(folder / f"{prefix}{index:02d}.png")
    return folder


def dry_run_record(capsys, argv, script=build_binary_classifier):
    """The --json record and the log of a --dry-run of `script`."""
    code = run_script(script, [*argv, "--dry-run", "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


# --------------------------------------------------------------------------------------------
# One file, several paths


def test_a_link_loop_counts_each_image_once(tmp_path, capsys, caplog):
    with_dir = write_frames(tmp_path / "with_square", 20, 1, True)
    (with_dir / "loop").symlink_to(".")  # the case of the issue: 20 files became 820 images
    without_dir = write_frames(tmp_path / "without_square", 20, 2, False)

    with caplog.at_level(logging.WARNING):
        found = common.find_images(with_dir)
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
        found = [p.relative_to(root).as_posix() for p in common.find_images(root)]
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
