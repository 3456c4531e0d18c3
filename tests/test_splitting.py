"""Grouped splits: --group-by in each form, the automatic episode column, near-duplicates."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import scene

from symbol_trainer import (errors, image_folders, labels_csv,
                            model_dir, model_format, preparation, splitting)
from symbol_trainer.settings import TrainingConfig


@pytest.fixture
def episodes(tmp_path):
    """60 frames of 6 episodes (ep0..ep5) in 3 folders; a square in every other frame."""
    rng = np.random.default_rng(3)
    root = tmp_path / "frames"
    rows = []
    for index in range(60):
        episode = index % 6
        name = f"season{episode % 3}/ep{episode}_f{index:03d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        scene(rng, index % 2 == 0, False, (32, 24)).save(root / name)
        rows.append({"filename": name, "Episode": f"E{episode}", "square_visible": int(index % 2 == 0),
                     "note": "x"})
    csv_path = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return root, csv_path


def prepared_with(root, csv_path, **settings):
    config = TrainingConfig(weights="none", image_size=32, **settings)
    return preparation.prepare_training_data(labels_csv.images_from_csv(root, csv_path), config)


def assert_groups_stay_together(prepared, expected_groups):
    split = prepared.split_table()
    assert split["group"].tolist() == list(expected_groups)
    per_group = split.groupby("group")["split"].nunique()
    assert (per_group == 1).all(), per_group[per_group > 1]
    assert set(split["split"]) == {"train", "validation"}


def test_an_episode_column_groups_the_split_automatically(episodes, caplog):
    caplog.set_level(logging.INFO)
    prepared = prepared_with(*episodes)
    table = prepared.images.table
    assert_groups_stay_together(prepared, table["Episode"])
    assert "Split grouped by the column 'Episode' (found automatically" in caplog.text
    counts = prepared.counts
    assert counts["train"]["groups"] + counts["validation"]["groups"] == 6
    assert counts["validation"]["positives"]["square"] >= 1
    summary = preparation.format_data_summary(prepared)
    assert "Grouped by the column 'Episode'" in summary and "no group is in both" in summary


@pytest.mark.parametrize("group_by, expected", [
    ("folder", lambda t: t["folder"]),
    (r"ep(\d+)_", lambda t: t["filename"].str.extract(r"ep(\d+)_")[0]),
    ("Episode", lambda t: t["Episode"]),
])
def test_each_group_by_form_keeps_its_groups_together(episodes, group_by, expected):
    prepared = prepared_with(*episodes, group_by=group_by)
    assert_groups_stay_together(prepared, expected(prepared.images.table))


def test_group_by_none_splits_frames_and_reports_near_duplicates(episodes, caplog):
    root, csv_path = episodes
    frames = pd.read_csv(csv_path)
    # Each frame twice, as consecutive frames of a static shot would be.
    for name in frames["filename"]:
        (root / name.replace(".png", "_copy.png")).write_bytes((root / name).read_bytes())
    doubled = pd.concat([frames, frames.assign(filename=frames["filename"].str.replace(".png", "_copy.png"))])
    doubled.to_csv(csv_path, index=False)
    with caplog.at_level(logging.WARNING):
        prepared = prepared_with(root, csv_path, group_by="none")
    assert prepared.groups is None
    duplicated = prepared.counts["validation"]["near_duplicates_in_train"]
    assert duplicated >= 0.5 * prepared.counts["validation"]["images"]
    assert f"{duplicated:,} of {prepared.counts['validation']['images']:,} validation frames" in caplog.text
    assert "--group-by" in caplog.text
    assert "look nearly identical" in preparation.format_data_summary(prepared)


def test_binary_folders_group_the_same_episode_of_both_classes(binary_dirs):
    images = image_folders.images_from_directories(*binary_dirs)
    assert set(images.table["folder"]) == {"ep0", "ep1", "ep2"}
    config = TrainingConfig(weights="none", image_size=32, group_by="folder")
    prepared = preparation.prepare_training_data(images, config)
    assert_groups_stay_together(prepared, prepared.images.table["folder"])


@pytest.mark.parametrize("group_by, fragments", [
    ("season", ["--group-by 'season': not a column", "other columns: Episode, note",
                "needs a group in parentheses"]),
    ("ep(", ["not a valid regular expression"]),
    (r"show(\d+)", ["does not match 60 of 60 file names", "'season0/ep0_f000.png'"]),
    ("note", ["every frame is in the same group ('x')", "--group-by none"]),
    (r"(season)\d", ["every frame is in the same group ('season')"]),
])
def test_bad_group_by_names_the_value_and_the_fix(episodes, group_by, fragments):
    with pytest.raises(errors.InputError) as error:
        prepared_with(*episodes, group_by=group_by)
    for fragment in fragments:
        assert fragment in str(error.value), str(error.value)


def test_an_automatic_column_with_one_value_falls_back_to_frames(episodes, caplog):
    root, csv_path = episodes
    frames = pd.read_csv(csv_path).assign(Episode="E1")
    frames.to_csv(csv_path, index=False)
    with caplog.at_level(logging.WARNING):
        prepared = prepared_with(root, csv_path)
    assert prepared.groups is None
    assert "The column 'Episode' has the same value for every frame" in caplog.text


def test_too_few_groups_for_a_split_is_an_error(episodes):
    root, csv_path = episodes
    frames = pd.read_csv(csv_path)
    frames["Episode"] = np.where(np.arange(len(frames)) < 59, "E1", "E2")  # 59 frames and 1
    frames["square_visible"] = np.arange(len(frames)) % 2
    frames.to_csv(csv_path, index=False)
    prepared = prepared_with(root, csv_path)
    assert prepared.counts["validation"]["groups"] == 1  # the split still keeps them apart
    assert_groups_stay_together(prepared, prepared.images.table["Episode"])


def test_near_duplicates_counts_hash_neighbours():
    hashes = [0b0, 0b1111, 0b1, (1 << 63) | (0b111111 << 20), 0b1 << 40]
    is_validation = np.array([False, False, True, True, True])
    np.testing.assert_array_equal(splitting.near_duplicates(hashes, is_validation, max_bits=4),
                                  [True, False, True])
    assert not splitting.near_duplicates(hashes, np.ones(5, bool)).any()  # no training frames


def test_a_validation_csv_replaces_the_split(episodes, tmp_path, capsys):
    import build_multi_hot_model
    root, csv_path = episodes
    frames = pd.read_csv(csv_path)
    held_out = frames["Episode"].isin(["E4", "E5"])
    frames[~held_out].to_csv(tmp_path / "train.csv", index=False)
    frames[held_out].to_csv(tmp_path / "valid.csv", index=False)
    code = build_multi_hot_model.main([str(root), str(tmp_path / "train.csv"), str(tmp_path / "m"),
                                       "--validation-csv", str(tmp_path / "valid.csv"), "--dry-run"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Split: 40 train, 20 validation (the given validation set)." in printed
    assert "0 in validation" not in printed

    # A frame in both is refused, naming it.
    frames[held_out | (frames.index == 0)].to_csv(tmp_path / "valid.csv", index=False)
    assert build_multi_hot_model.main([str(root), str(tmp_path / "train.csv"), str(tmp_path / "m"),
                                       "--validation-csv", str(tmp_path / "valid.csv"), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "--validation-csv" in error and "1 image(s) are also training images" in error
    assert "'season0/ep0_f000.png'" in error

    # A validation CSV without one of the trained symbols names that file, not --symbols.
    symbol_column = next(c for c in frames.columns if c.endswith("_visible"))
    frames[held_out].rename(columns={symbol_column: "other_visible"}).to_csv(
        tmp_path / "valid.csv", index=False)
    assert build_multi_hot_model.main([str(root), str(tmp_path / "train.csv"), str(tmp_path / "m"),
                                       "--validation-csv", str(tmp_path / "valid.csv"), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "--validation-csv needs every trained symbol" in error and "--symbols" not in error
    assert f"{symbol_column.removesuffix('_visible')!r} not found in {tmp_path / 'valid.csv'}" in error


def test_validation_dirs_replace_the_split(binary_dirs, tmp_path, capsys):
    import shutil

    import build_binary_classifier
    with_dir, without_dir = binary_dirs
    held = tmp_path / "held"
    for source, name in ((with_dir, "with_square"), (without_dir, "without_square")):
        shutil.move(str(source / "ep2"), str(held / name / "ep2"))
    code = build_binary_classifier.main([str(with_dir), str(without_dir), str(tmp_path / "m"),
                                         "--validation-dirs", str(held / "with_square"),
                                         str(held / "without_square"), "--dry-run"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Split: 32 train, 16 validation (the given validation set)." in printed


# --- --groups-csv: the groups in a CSV of their own ----------------------------------------


def write_groups(path, rows, header="filename,scene", delimiter=","):
    path.write_text("\n".join([header, *(delimiter.join(map(str, r)) for r in rows)]) + "\n",
                    encoding="utf-8")
    return path


def scene_of(name: str) -> str:
    """Scenes of 2 consecutive frames: finer than the episodes, and across their folders."""
    return f"S{int(name[-7:-4]) // 2}"


def groups_error(root, csv_path, groups_csv, group_by=None) -> str:
    with pytest.raises(errors.InputError) as error:
        labels_csv.images_from_csv(root, csv_path, group_by=group_by, groups_csv=groups_csv)
    return str(error.value)


def test_a_groups_csv_groups_the_split_by_its_column(episodes, tmp_path, caplog):
    root, csv_path = episodes
    names = pd.read_csv(csv_path)["filename"].tolist()
    # Any order, names written as LABELS_CSV may write them, ';' separated, a file that is not
    # labelled, and a file listed twice with the same group.
    rows = [(("./" + n).replace("/", "\\") if i % 3 == 0 else n, scene_of(n))
            for i, n in enumerate(reversed(names))]
    rows += [("season0/not_labelled.png", "S99"), (names[0], scene_of(names[0]))]
    groups_csv = write_groups(tmp_path / "splits.csv", rows, "filename;scene", ";")
    caplog.set_level(logging.INFO)
    images = labels_csv.images_from_csv(root, csv_path, groups_csv=groups_csv)
    assert images.table["scene"].tolist() == [scene_of(n) for n in names]
    assert images.details["groups_csv"] == {"path": str(groups_csv), "column": "scene"}
    assert (f"--groups-csv {groups_csv}: 1 of its files are not labelled in {csv_path}; their rows "
            "are ignored (for example row 62, 'season0/not_labelled.png')") in caplog.text
    # The labels' Episode column no longer groups the split, so it is reported as ignored.
    assert "Ignoring columns: Episode, note" in caplog.text

    config = TrainingConfig(weights="none", image_size=32)
    prepared = preparation.prepare_training_data(images, config)
    assert_groups_stay_together(prepared, [scene_of(n) for n in names])
    assert prepared.counts["grouping"] == f"the column 'scene' of --groups-csv {groups_csv}"
    assert prepared.counts["train"]["groups"] + prepared.counts["validation"]["groups"] == 30


def test_the_column_that_groups_the_split_is_not_reported_as_ignored(episodes, caplog):
    root, csv_path = episodes
    caplog.set_level(logging.INFO)
    images = labels_csv.images_from_csv(root, csv_path)  # Episode groups automatically
    assert "Ignoring columns: note (kept" in caplog.text
    assert images.details["ignored_columns"] == ["note"]
    caplog.clear()
    labels_csv.images_from_csv(root, csv_path, group_by="note")
    assert "Ignoring columns: Episode (kept" in caplog.text
    caplog.clear()
    labels_csv.images_from_csv(root, csv_path, group_by="none")
    assert "Ignoring columns: Episode, note (kept" in caplog.text


def test_groups_csv_training_writes_a_split_that_keeps_each_group_on_one_side(small_two_symbol_csv, tmp_path):
    """The shared adidas_puma_logos layout: splits.csv with filename,original_split,source_image."""
    import build_multi_hot_model
    from conftest import FAST, run_script

    root, csv_path = small_two_symbol_csv
    names = pd.read_csv(csv_path)["filename"].tolist()
    splits = write_groups(tmp_path / "splits.csv", [(n, "train", scene_of(n)) for n in names],
                          "filename,original_split,source_image")
    out = tmp_path / "model"
    command = [root, csv_path, out, "--groups-csv", splits, "--weights", "none", *FAST,
               "--epochs", "1", "--fine-tune-epochs", "0"]
    assert run_script(build_multi_hot_model, command) == 2  # two columns: which one?
    assert not out.exists()
    assert run_script(build_multi_hot_model, [*command, "--group-by", "source_image"]) == 0
    split = pd.read_csv(out / model_format.SPLIT_FILE, dtype=str)
    assert split["group"].tolist() == [scene_of(n) for n in split["filename"]]
    per_group = split.groupby("group")["split"].nunique()
    assert (per_group == 1).all(), per_group[per_group > 1]
    assert set(split["split"]) == {"train", "validation"}
    assert split["group"].nunique() == 16  # by source_image, not by the labels' 4 episodes
    data = model_dir.load_model_dir(out).metadata["data"]
    assert data["details"]["groups_csv"]["column"] == "source_image"


@pytest.mark.parametrize("make, group_by, fragments", [
    (lambda names: [(n, scene_of(n)) for n in names[12:]], None,
     ["12 of 60 labelled frames have no row: rows 2 ('season0/ep0_f000.png'), 3 (",
      "and 7 more (12 rows) of", "Every labelled frame needs a group"]),
    (lambda names: [(n, scene_of(n)) for n in names] + [(names[5], "S77")], None,
     ["1 file(s) listed twice with different groups: 'season2/ep5_f005.png' in rows 7 ('S2') and 62 ('S77')"]),
    (lambda names: [(n, "") if i == 3 else (n, scene_of(n)) for i, n in enumerate(names)], None,
     ["column scene: empty for 1 labelled frame(s), in row 5"]),
    (lambda names: [(f"/data/frames/{n}", scene_of(n)) for n in names], None,
     ["60 of 60 labelled frames have no row", "this file names e.g. '/data/frames/season0/ep0_f000.png'"]),
    (lambda names: [(n, scene_of(n)) for n in names], "Episode",
     ["--group-by 'Episode': not a column of --groups-csv", "besides filename: scene", "or is left out"]),
])
def test_groups_csv_mistakes_are_input_errors(episodes, tmp_path, make, group_by, fragments):
    root, csv_path = episodes
    names = pd.read_csv(csv_path)["filename"].tolist()
    groups_csv = write_groups(tmp_path / "splits.csv", make(names))
    message = groups_error(root, csv_path, groups_csv, group_by)
    assert str(groups_csv) in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("header, fragments", [
    ("name,scene", ["no 'filename' column (the header has: name, scene)"]),
    ("filename", ["no column besides filename"]),
    ("filename,scene,take", ["2 columns besides filename (scene, take)", "--group-by COLUMN"]),
    ("filename,Episode", ["column 'Episode' has the name of a column that the labels"]),
    ("filename,folder", ["column 'folder' has the name of a column"]),
])
def test_groups_csv_header_mistakes(episodes, tmp_path, header, fragments):
    root, csv_path = episodes
    names = pd.read_csv(csv_path)["filename"].tolist()
    width = header.count(",")
    groups_csv = write_groups(tmp_path / "splits.csv", [(n, *["g"] * width) for n in names], header)
    message = groups_error(root, csv_path, groups_csv)
    for fragment in fragments:
        assert fragment in message, message


def test_groups_csv_that_does_not_exist(episodes, tmp_path):
    assert (f"--groups-csv {tmp_path / 'nope.csv'}: no such file"
            in groups_error(*episodes, tmp_path / "nope.csv"))


def test_binary_groups_csv_names_images_relative_to_its_folder(binary_dirs, tmp_path, capsys):
    import build_binary_classifier
    with_dir, without_dir = binary_dirs
    frames = with_dir.parent
    images = sorted(p.relative_to(frames).as_posix() for p in frames.rglob("*.png"))
    pair = {name: f"P{int(name[-7:-4]) // 2}" for name in images}  # one with, one without
    groups_csv = write_groups(frames / "groups.csv", [(n, pair[n]) for n in images], "filename,pair")
    loaded = image_folders.images_from_directories(with_dir, without_dir, groups_csv=groups_csv)
    config = TrainingConfig(weights="none", image_size=32)
    prepared = preparation.prepare_training_data(loaded, config)
    expected = [pair[Path(p).relative_to(frames).as_posix()] for p in prepared.images.table["path"]]
    assert_groups_stay_together(prepared, expected)

    out = tmp_path / "m"
    assert build_binary_classifier.main([str(with_dir), str(without_dir), str(out), "--dry-run",
                                         "--groups-csv", str(groups_csv)]) == 0
    assert f"Grouped by the column 'pair' of --groups-csv {groups_csv}: " in capsys.readouterr().out
    write_groups(frames / "groups.csv", [(n, pair[n]) for n in images[1:]], "filename,pair")
    assert build_binary_classifier.main([str(with_dir), str(without_dir), str(out), "--dry-run",
                                         "--groups-csv", str(groups_csv)]) == 2
    error = capsys.readouterr().err
    assert "1 of 48 labelled frames have no row" in error and "relative to the folder of" in error
