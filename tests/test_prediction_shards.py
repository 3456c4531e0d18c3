"""predict.py --shard K/N: the K-th of N interleaved parts of the inputs, for SLURM array
jobs; the parts cover every input once, share one header and merge into the unsharded
output (examples/slurm_predict_array.sh --merge)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

import build_multi_hot_model
import predict
from symbol_trainer import prediction
from conftest import FAST, ROOT, run_script, write_two_symbol_frames
from test_predict import make_video

SCRIPT = ROOT / "examples" / "slurm_predict_array.sh"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny two-symbol model (random backbone, a few seconds) and 10 frames in a folder to
    predict (10 is not a multiple of 3, so the parts of 3 differ in size)."""
    root = tmp_path_factory.mktemp("shards")
    frames = root / "frames"
    write_two_symbol_frames(frames, count=24, per_episode=12, seed=5).drop(
        columns="episode").to_csv(root / "labels.csv", index=False)
    model = root / "model"
    assert run_script(build_multi_hot_model, [frames, root / "labels.csv", model,
                                              "--weights", "none", *FAST,
                                              "--fine-tune-epochs", "0"]) == 0
    new = root / "new"
    write_two_symbol_frames(new, count=10, per_episode=5, seed=8)
    return model, new


def _names(path: Path) -> list[str]:
    return pd.read_csv(path, keep_default_na=False)["filename"].tolist()


def _merge(out: Path, parts: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--merge", str(out), str(parts)],
                          capture_output=True, text=True, timeout=60)


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values("filename").reset_index(drop=True)


def test_parts_of_three_cover_every_image_once_and_merge_to_the_unsharded_rows(
        trained, tmp_path, capsys):
    model, new = trained
    whole = tmp_path / "all.csv"
    assert run_script(predict, [model, new, "-o", whole, "--quiet"]) == 0
    expected = _names(whole)
    assert len(expected) == 10
    out = tmp_path / "parts"
    parts = []
    for k in (1, 2, 3):
        parts.append(out / f"part_{k:03d}_of_003.csv")
        assert run_script(predict, [model, new, "--shard", f"{k}/3", "-o", parts[-1]]) == 0
        assert f"--shard {k}/3: predicting {len(expected[k - 1::3])} of 10 inputs" in \
            capsys.readouterr().err
    names = [_names(p) for p in parts]
    # Interleaved, in the unsharded order: items K-1, K-1+N, ...
    assert names == [expected[0::3], expected[1::3], expected[2::3]]
    assert sorted(sum(names, [])) == sorted(expected)  # disjoint, every input exactly once
    assert {p.read_text().splitlines()[0] for p in parts} == {whole.read_text().splitlines()[0]}

    merged = _merge(out, 3)
    assert merged.returncode == 0, merged.stderr
    assert "10 rows from 3 parts" in merged.stderr
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(_sorted(table), _sorted(pd.read_csv(whole, keep_default_na=False)))
    # The documented one-liner gives the same file.
    awk = subprocess.run(["awk", "FNR==1 && NR!=1 {next} {print}", *map(str, parts)],
                         capture_output=True, text=True, check=True)
    assert awk.stdout == (out / "predictions.csv").read_text()


def test_merge_refuses_missing_parts_and_parts_of_other_runs(tmp_path):
    for k in (1, 3):
        (tmp_path / f"part_{k:03d}_of_003.csv").write_text("filename,a\nx.png,1\n")
    merged = _merge(tmp_path, 3)
    assert merged.returncode == 1
    assert "1 of 3 parts are missing" in merged.stderr and "part_002_of_003.csv" in merged.stderr
    (tmp_path / "part_002_of_003.csv").write_text("filename,b\ny.png,1\n")
    merged = _merge(tmp_path, 3)
    assert merged.returncode == 1 and "another header" in merged.stderr
    assert not (tmp_path / "predictions.csv").exists()


def test_the_array_script_runs_its_part_with_its_own_output(tmp_path):
    env = {**os.environ, "PYTHON": "echo", "SLURM_ARRAY_TASK_ID": "2",
           "SLURM_ARRAY_TASK_COUNT": "12", "SEGMENTS": "1", "PREDICT_FLAGS": "--fps 2"}
    run = subprocess.run(["bash", str(SCRIPT), "models/m", str(tmp_path / "out"), "a dir", "b.mp4"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    assert run.stdout.split() == [
        "predict.py", "models/m", "a", "dir", "b.mp4", "--shard", "2/12",
        "-o", f"{out}/part_002_of_012.csv", "--segments", f"{out}/segments_002_of_012.csv",
        "--fps", "2"]
    # Some parts again (sbatch --array=3,7 counts 2 tasks): N from PARTS.
    env.update(SLURM_ARRAY_TASK_ID="7", SLURM_ARRAY_TASK_COUNT="2", PARTS="12", SEGMENTS="")
    run = subprocess.run(["bash", str(SCRIPT), "models/m", str(out), "x"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert run.stdout.split()[3:7] == ["--shard", "7/12", "-o", f"{out}/part_007_of_012.csv"]
    env.pop("SLURM_ARRAY_TASK_ID")
    run = subprocess.run(["bash", str(SCRIPT), "models/m", str(out), "x"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert run.returncode != 0 and "--array=1-N" in run.stderr


@pytest.mark.parametrize("value", ["0/3", "4/3", "1/0", "0/0", "-1/3", "a/b", "3", "2/3/4", "/",
                                   "1.5/3"])
def test_a_bad_shard_exits_2_naming_the_flag_and_the_value(trained, value, capsys):
    model, new = trained
    with pytest.raises(SystemExit) as stop:
        predict.main([str(model), str(new), f"--shard={value}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--shard" in err and repr(value) in err
    if value == "/":  # what $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT is outside an array
        assert "SLURM_ARRAY_TASK_ID" in err


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_part_without_inputs_writes_an_empty_output_and_exits_0(trained, tmp_path, capsys, fmt):
    model, new = trained
    images = sorted(new.rglob("*.png"))[:2]
    clip = make_video(tmp_path / "clip.mp4", frames=5, rate=5)
    whole, out, segments = tmp_path / "all.out", tmp_path / "p3.out", tmp_path / "s3.csv"
    assert run_script(predict, [model, *images, clip, "--format", fmt, "-o", whole,
                                "--quiet"]) == 0
    assert run_script(predict, [model, *images, clip, "--shard", "5/5", "--format", fmt,
                                "-o", out, "--segments", segments]) == 0
    assert "--shard 5/5: this part has no inputs (there are 3 inputs for 5 parts)" in \
        capsys.readouterr().err
    if fmt == "csv":  # the header, the same as the whole run's (with the video columns)
        assert out.read_text() == whole.read_text().splitlines(keepends=True)[0]
        assert "video" in out.read_text()
    else:
        assert out.read_text() == ""
    assert segments.read_text().strip() == ",".join(prediction.SEGMENT_COLUMNS)


def test_a_video_stays_whole_in_one_part_and_every_part_has_the_video_columns(trained, tmp_path):
    model, new = trained
    images = sorted(new.rglob("*.png"))[:3]
    clip = make_video(tmp_path / "clip.mp4", frames=10, rate=5)
    inputs = [*images, clip, images[0].parent]  # 3 images, a video (item 4), a folder of 5
    whole = tmp_path / "all.csv"
    assert run_script(predict, [model, *inputs, "--fps", "5", "-o", whole, "--quiet"]) == 0
    rows = pd.read_csv(whole, keep_default_na=False)
    assert (rows["video"] == "clip").sum() == 10
    parts = [tmp_path / f"part{k}.csv" for k in (1, 2)]
    for k, part in enumerate(parts, 1):
        assert run_script(predict, [model, *inputs, "--fps", "5", "--shard", f"{k}/2",
                                    "-o", part, "--quiet"]) == 0
    tables = [pd.read_csv(p, keep_default_na=False) for p in parts]
    assert [list(t.columns) for t in tables] == [list(rows.columns)] * 2
    # Items 0..8: image, image, image, video, 5 folder images; part 2 has items 1, 3, 5, 7.
    assert (tables[0]["video"] == "clip").sum() == 0
    assert (tables[1]["video"] == "clip").sum() == 10
    assert len(tables[0]) == 5 and len(tables[1]) == 3 + 10
    pd.testing.assert_frame_equal(_sorted(pd.concat(tables, ignore_index=True)), _sorted(rows))


def test_shard_of_numbers_images_and_whole_videos_in_input_order():
    inputs = prediction.Inputs()
    images = [prediction.ImageInput(f"{i}.png", f"{i}.png") for i in range(5)]
    videos = [prediction.VideoInput(f"v{i}.mp4", f"v{i}") for i in range(2)]
    inputs.add_images(images[:2])
    inputs.add_video(videos[0])
    inputs.add_images(images[2:])
    inputs.add_video(videos[1])
    order = [images[0], images[1], videos[0], images[2], images[3], images[4], videos[1]]

    def items(part):
        return [i for s in part.sources for i in (s if isinstance(s, list) else [s])]

    parts = [prediction.shard_of(inputs, k, 3) for k in (1, 2, 3)]
    assert [items(p) for p in parts] == [order[0::3], order[1::3], order[2::3]]
    assert parts[0].videos == [videos[1]] and parts[0].images == 2
    # Consecutive images of a part form one run, decoded together.
    assert parts[1].sources == [[images[1], images[3]]]
    assert items(prediction.shard_of(inputs, 1, 1)) == order
    empty = prediction.shard_of(inputs, 9, 9)
    assert empty.sources == [] and empty.images == 0 and empty.videos == []
    for part, count in ((0, 3), (4, 3), (1, 0)):
        with pytest.raises(ValueError):
            prediction.shard_of(inputs, part, count)
