"""predict.py: every kind of INPUT, the output's columns and order, thresholds, video
sampling and segments, errors, and the predictions-to-labels round trip."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest

import build_multi_hot_model
from symbol_trainer import image_predictions, labels_csv, model_dir
import predict
from symbol_trainer import prediction
from symbol_trainer import video
from conftest import FAST, run_script, scene, write_two_symbol_frames

SYMBOLS = ["red_square", "blue_circle"]


def make_video(path, frames: int, rate: int, size=(64, 48), seed=0):
    """A real video file (MPEG-4 part 2, which every FFmpeg build encodes) of `frames` random
    scenes at `rate` frames per second."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(frames):
            image = scene(rng, index % 2 == 0, index % 3 == 0, size)
            for packet in stream.encode(video_frame(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_frame(image):
    import av
    return av.VideoFrame.from_image(image)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny two-symbol model (random backbone, a few seconds) and frames in folders."""
    root = tmp_path_factory.mktemp("predict")
    frames = root / "frames"
    write_two_symbol_frames(frames, count=40, per_episode=20, seed=3).drop(columns="episode").to_csv(
        root / "labels.csv", index=False)
    model = root / "model"
    assert run_script(build_multi_hot_model, [frames, root / "labels.csv", model,
                                              "--weights", "none", *FAST, "--fine-tune-epochs", "0"]) == 0
    return model, frames, root


def _predict(argv) -> int:
    return run_script(predict, argv)


def test_folder_output_columns_order_and_stored_thresholds(trained, tmp_path):
    model, frames, _ = trained
    out = tmp_path / "predictions.csv"
    assert _predict([model, frames, "-o", out, "--quiet"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["filename", "red_square_probability", "red_square_visible",
                                   "blue_circle_probability", "blue_circle_visible", "error"]
    expected = sorted(p.relative_to(frames).as_posix() for p in frames.rglob("*.png"))
    assert table["filename"].tolist() == expected  # relative to the folder, in path order
    loaded = model_dir.load_model_dir(model)
    direct = image_predictions.predict_images(loaded, [frames / f for f in expected])
    for symbol in SYMBOLS:
        np.testing.assert_allclose(table[f"{symbol}_probability"], direct[f"{symbol}_probability"],
                                   atol=1e-6)
        np.testing.assert_array_equal(table[f"{symbol}_visible"], direct[f"{symbol}_visible"])
    assert (table["error"] == "").all()
    assert not (tmp_path / "predictions.csv.partial").exists()


def test_thresholds_overridden_for_all_and_for_one(trained, tmp_path, capsys):
    model, frames, _ = trained
    assert _predict([model, frames / "ep0", "--threshold", "0", "--threshold", "blue_circle=1",
                     "--quiet"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert (table["red_square_visible"] == 1).all()
    assert (table["blue_circle_visible"] == (table["blue_circle_probability"] >= 1)).all()
    assert _predict([model, frames, "--threshold", "triangle=0.5", "--quiet"]) == 2
    assert "triangle: the model has no such symbol" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.main([str(model), str(frames), "--threshold", "star=high"])


def test_every_input_kind_in_order(trained, tmp_path):
    model, frames, root = trained
    (tmp_path / "list.txt").write_text("# two frames\nep0/frame000.png\n\nep1/frame021.png\n")
    pd.DataFrame({"filename": ["ep1/frame030.png"], "note": ["x"]}).to_csv(tmp_path / "list.csv", index=False)
    clip = make_video(tmp_path / "clip.mp4", frames=10, rate=5)
    out = tmp_path / "all.jsonl"
    code = _predict([model, frames / "ep0" / "frame001.png", tmp_path / "list.txt",
                     tmp_path / "list.csv", str(frames / "ep1" / "frame03[12].png"), clip,
                     "--image-dir", frames, "--format", "jsonl", "-o", out, "--quiet"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["filename"] for r in rows] == [
        "ep0/frame001.png", "ep0/frame000.png", "ep1/frame021.png", "ep1/frame030.png",
        "ep1/frame031.png", "ep1/frame032.png", "clip/clip_frame0000000.jpg",
        "clip/clip_frame0000005.jpg"]
    assert list(rows[0]) == ["filename", "video", "frame_index", "timestamp", "timecode",
                             "red_square_probability", "red_square_visible",
                             "blue_circle_probability", "blue_circle_visible", "error"]
    assert rows[0]["video"] is None and rows[-1]["video"] == "clip"
    assert [(r["frame_index"], r["timestamp"], r["timecode"]) for r in rows[-2:]] == [
        (0, 0.0, "00:00:00.000"), (5, 1.0, "00:00:01.000")]


def test_fps_sampling_and_every_frame_on_a_generated_video(trained, tmp_path):
    model, _, _ = trained
    clip = make_video(tmp_path / "episode.mkv", frames=40, rate=10)  # 4 s
    for flags, expected in ((["--fps", "2"], [i * 0.5 for i in range(8)]),
                            ([], [0.0, 1.0, 2.0, 3.0]),
                            (["--every-frame"], [i / 10 for i in range(40)])):
        out = tmp_path / "p.csv"
        assert _predict([model, clip, "-o", out, "--quiet", *flags]) == 0
        table = pd.read_csv(out)
        np.testing.assert_allclose(table["timestamp"], expected, atol=1e-3)
        assert table["frame_index"].tolist() == [round(t * 10) for t in expected]
    assert table["timecode"].iloc[-1] == "00:00:03.900"


def test_corrupt_image_and_unreadable_video_get_error_rows_and_exit_3(trained, tmp_path, capsys):
    model, frames, _ = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes((frames / "ep0" / "frame000.png").read_bytes())
    (bad / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (bad / "c.png").write_bytes((frames / "ep0" / "frame001.png").read_bytes())
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video")
    out = tmp_path / "p.csv"
    assert _predict([model, bad, broken, "-o", out]) == 3
    table = pd.read_csv(out, keep_default_na=False)
    assert table["filename"].tolist() == ["a.png", "b.jpg", "c.png", broken.as_posix()]
    assert table["error"].str.contains("cannot be").tolist() == [False, True, False, True]
    assert table.loc[1, "red_square_probability"] == ""
    err = capsys.readouterr().err
    assert "b.jpg: cannot be decoded as an image" in err and "broken.mp4: cannot be read as a video" in err
    assert _predict([model, bad, "-o", out, "--skip-errors", "--quiet"]) == 3
    assert pd.read_csv(out)["filename"].tolist() == ["a.png", "c.png"]


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "missing.png", "INPUT .*missing.png: no such file or folder"),
    (lambda t: str(t / "*.gif"), r"INPUT .*\*\.gif: the pattern matches no image or video"),
    (lambda t: (t / "notes.docx").write_text("x") and t / "notes.docx", "notes.docx: not an image"),
])
def test_bad_inputs_exit_2_before_any_output(trained, tmp_path, capsys, make, message):
    model, frames, _ = trained
    out = tmp_path / "p.csv"
    assert _predict([model, frames, make(tmp_path), "-o", out]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "p.csv.partial").exists()


def test_model_directory_that_disagrees_with_its_metadata_is_refused(trained, tmp_path, capsys):
    model, frames, _ = trained
    copy = tmp_path / "model"
    __import__("shutil").copytree(model, copy)
    metadata = json.loads((copy / "metadata.json").read_text())
    metadata["symbols"] = ["red_square", "star"]
    (copy / "metadata.json").write_text(json.dumps(metadata))
    assert _predict([copy, frames]) == 2
    assert "do not match the symbols in metadata.json" in capsys.readouterr().err


def test_predictions_are_a_labels_csv_to_correct_and_train_on(trained, tmp_path):
    """The annotation loop: predict new frames of an episode, correct, retrain."""
    model, _, _ = trained
    clip = make_video(tmp_path / "ep9.mp4", frames=30, rate=10, seed=5)
    saved = tmp_path / "ep9_frames"
    predictions = saved / "labels.csv"
    assert _predict([model, clip, "--fps", "5", "--save-frames", saved, "-o", predictions,
                     "--quiet"]) == 0
    table = pd.read_csv(predictions)
    assert len(table) == 15 and all((saved / f).is_file() for f in table["filename"])
    # A person corrects the decisions in a spreadsheet: here, every other frame flipped.
    table["red_square_visible"] = np.arange(len(table)) % 2
    table["blue_circle_visible"] = np.arange(len(table)) // 2 % 2
    table.to_csv(predictions, index=False)
    images = labels_csv.images_from_csv(saved, predictions)
    assert images.symbols == SYMBOLS
    retrained = tmp_path / "retrained"
    assert run_script(build_multi_hot_model, [saved, predictions, retrained, "--weights", "none",
                                              *FAST, "--fine-tune-epochs", "0"]) == 0
    assert model_dir.load_model_dir(retrained).metadata["symbols"] == SYMBOLS


def test_segments_from_a_known_probability_sequence():
    t = np.arange(20.0)  # one frame a second
    p = np.zeros(20)
    p[2:7] = 0.9
    p[4] = 0.45          # one flickering frame: above threshold - hysteresis, stays in
    p[10:12] = 0.8
    p[12] = 0.1          # a drop of one frame: the gap is bridged by merge_gap
    p[13:15] = 0.8
    p[18] = 0.7          # a single frame
    settings = video.SegmentSettings(hysteresis=0.1, merge_gap=1.5, min_duration=0.0)
    found = video.visible_segments(t, p, 0.5, settings)
    assert [(s.start, s.end, s.frames) for s in found] == [(2, 7, 5), (10, 15, 5), (18, 19, 1)]
    assert found[0].peak_probability == 0.9
    assert found[0].mean_probability == pytest.approx((0.9 * 4 + 0.45) / 5)
    strict = video.visible_segments(t, p, 0.5, video.SegmentSettings(0.0, 0.0, 2.0))
    assert [(s.start, s.end) for s in strict] == [(2, 4), (5, 7), (10, 12), (13, 15)]
    assert video.visible_segments([], [], 0.5) == []


def test_segments_file_from_a_video(trained, tmp_path):
    model, _, _ = trained
    clip = make_video(tmp_path / "ep.mp4", frames=20, rate=10)
    segments = tmp_path / "segments.csv"
    assert _predict([model, clip, "--fps", "10", "--threshold", "0", "--segments", segments,
                     "-o", tmp_path / "p.csv", "--quiet"]) == 0
    table = pd.read_csv(segments)
    assert list(table.columns) == prediction.SEGMENT_COLUMNS
    # Threshold 0: each symbol is visible throughout, one segment of the whole 2 s.
    assert table["symbol"].tolist() == SYMBOLS
    assert table["start"].tolist() == [0, 0] and table["end"].tolist() == [2, 2]
    assert table["end_timecode"].tolist() == ["00:00:02.000"] * 2


def test_prefetch_stays_a_bounded_number_of_items_ahead():
    produced = []

    def numbers():
        for i in range(1000):
            produced.append(i)
            yield i

    seen = []
    for item in prediction.prefetched(numbers(), depth=3):
        time.sleep(0.002)
        seen.append(item)
        # The consumer has `item`; the queue holds at most 3 more and the producer one.
        assert len(produced) - len(seen) <= 3 + 1
    assert seen == list(range(1000))


def test_image_decoding_keeps_a_bounded_number_in_flight(tmp_path):
    running, most = [0], [0]
    lock = threading.Lock()

    def slow(path, geometry, keep):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.001)
        with lock:
            running[0] -= 1
        return np.zeros((1, 1, 3), np.uint8), None

    items = (prediction.ImageInput(f"{i}.png", f"{i}.png") for i in range(500))
    original = prediction.decoding.decode_frame
    prediction.decoding.decode_frame = slow
    try:
        import concurrent.futures
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            names = [f.filename for f in prediction._image_frames(items, None, pool, ahead=16)]
    finally:
        prediction.decoding.decode_frame = original
    assert names == [f"{i}.png" for i in range(500)] and most[0] <= 16


def test_progress_is_a_redrawn_line_on_a_terminal_and_log_lines_otherwise(caplog):
    import io
    import logging

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log_stream = io.StringIO()
    progress = prediction.Progress(total=100, every=0.0, stream=log_stream)
    with caplog.at_level(logging.INFO, logger="symbol_trainer.prediction"):
        progress.update(10)
        progress.update(10)
    assert caplog.text.count("Predicted 20/100 frames") == 1 and "ETA 00:00:" in caplog.text
    assert log_stream.getvalue() == ""
    terminal = Terminal()
    progress = prediction.Progress(total=None, every=30.0, stream=terminal)
    progress.last = 0.0  # as if the last redraw were long ago
    progress.update(64)
    progress.finish()
    assert terminal.getvalue().startswith("\r64 frames, ") and terminal.getvalue().endswith("\n")


def test_a_reader_that_stops_early_ends_the_run_quietly(trained, monkeypatch, capsys):
    """`predict.py MODEL frames/ | head`: the closed pipe is no error to report."""
    import sys

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    model, frames, _ = trained
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert _predict([model, frames, "--quiet"]) == 141
    assert "ERROR" not in capsys.readouterr().err


def _copied_inputs(trained, root):
    """A copy of some frames, a labels CSV naming them, a model copy and a short video, in
    `root`: inputs that a refused run must leave as they were."""
    model, frames, _ = trained
    shutil.copytree(frames / "ep0", root / "frames")
    names = sorted(p.name for p in (root / "frames").glob("*.png"))[:4]
    pd.DataFrame({"filename": names, "red_square_visible": 1}).to_csv(root / "labels.csv",
                                                                       index=False)
    shutil.copytree(model, root / "model")
    make_video(root / "clip.mp4", frames=6, rate=5)
    return root / "model", root / "frames", root / "labels.csv", root / "clip.mp4"


def _output_cases():
    """(name, how to set up and what argv to run, the message) of outputs that would
    overwrite an input."""
    def labels_over_itself(m, f, labels, clip, root):
        return [m, labels, "--image-dir", f, "-o", labels]

    def symbolic_link_to_input(m, f, labels, clip, root):
        (root / "link.csv").symlink_to(labels)
        return [m, labels, "--image-dir", f, "-o", root / "link.csv"]

    def hard_link_to_input(m, f, labels, clip, root):
        os.link(labels, root / "hard.csv")
        return [m, labels, "--image-dir", f, "-o", root / "hard.csv"]

    def dot_dot_path(m, f, labels, clip, root):
        return [m, labels, "--image-dir", f, "-o", root / "not_yet" / ".." / "labels.csv"]

    def image_in_a_folder_input(m, f, labels, clip, root):
        return [m, f, "-o", f / "frame001.png"]

    def temporary_file_is_an_input(m, f, labels, clip, root):
        (root / "p.csv.partial").symlink_to(labels)
        return [m, labels, "--image-dir", f, "-o", root / "p.csv"]

    def segments_over_the_video(m, f, labels, clip, root):
        return [m, clip, "--segments", clip, "-o", root / "p.csv"]

    def inside_the_model_directory(m, f, labels, clip, root):
        return [m, f, "-o", m / "predictions.csv"]

    def inside_the_model_directory_through_a_link(m, f, labels, clip, root):
        (root / "models").symlink_to(m, target_is_directory=True)
        return [m, f, "-o", root / "models" / "metadata.json"]

    def saved_frames_over_input_frames(m, f, labels, clip, root):
        saved = root / "saved"
        assert _predict([m, clip, "--save-frames", saved, "-o", root / "first.csv",
                         "--quiet"]) == 0
        return [m, saved, clip, "--save-frames", saved, "-o", root / "p.csv"]

    def one_file_for_two_outputs(m, f, labels, clip, root):
        return [m, clip, "--segments", root / "p.csv", "-o", root / "p.csv"]

    reads = "which this run reads as input; nothing was written"
    return [
        (labels_over_itself, rf"-o .*labels\.csv would overwrite .*labels\.csv, {reads}"),
        (symbolic_link_to_input, rf"-o .*link\.csv would overwrite .*labels\.csv, {reads}"),
        (hard_link_to_input, rf"-o .*hard\.csv would overwrite .*labels\.csv, {reads}"),
        (dot_dot_path, rf"would overwrite .*labels\.csv, {reads}"),
        (image_in_a_folder_input, rf"-o .*frame001\.png would overwrite .*frame001\.png, {reads}"),
        (temporary_file_is_an_input, r"-o .*p\.csv would overwrite \(through its temporary file "
                                     rf".*p\.csv\.partial\) .*labels\.csv, {reads}"),
        (segments_over_the_video, rf"--segments .*clip\.mp4 would overwrite .*clip\.mp4, {reads}"),
        (inside_the_model_directory, "lies inside the model directory .*model, which this run reads"),
        (inside_the_model_directory_through_a_link, "lies inside the model directory"),
        (saved_frames_over_input_frames, r"--save-frames .*saved would overwrite .*clip_frame0000000"
                                         r"\.jpg with a frame of .*clip\.mp4, but that file is "
                                         "the input image"),
        (one_file_for_two_outputs, r"-o .*p\.csv and --segments .*p\.csv name the same file"),
    ]


@pytest.mark.parametrize("setup, message", _output_cases(),
                         ids=[case[0].__name__ for case in _output_cases()])
def test_an_output_over_an_input_is_refused_before_any_work(trained, tmp_path, capsys, setup,
                                                           message):
    """`predict.py MODEL labels.csv -o labels.csv` replaced a hand-made labels CSV; no output
    (-o, --segments, --save-frames, or their temporary files) may overwrite a file the run
    reads, by any path to it, nor be written into the model directory."""
    model, frames, labels, clip = _copied_inputs(trained, tmp_path)
    argv = setup(model, frames, labels, clip, tmp_path)
    capsys.readouterr()

    def snapshot():
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*"))
                if p.is_file() and not p.is_symlink()}

    before = snapshot()
    assert _predict(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert snapshot() == before  # nothing written, changed or removed


def test_an_output_next_to_the_inputs_is_written(trained, tmp_path):
    """The README's `predict.py MODEL new_frames/ -o new_frames/predictions.csv`, run twice:
    a new file in a folder INPUT is no input of the run."""
    model, frames, _, _ = _copied_inputs(trained, tmp_path)
    out = frames / "predictions.csv"
    for _ in range(2):
        assert _predict([model, frames, "-o", out, "--quiet"]) == 0
        assert len(pd.read_csv(out)) == len(list(frames.glob("*.png")))


def test_a_file_name_that_is_not_utf8_is_predicted_and_round_trips(trained, tmp_path, capsys):
    """On Linux a file name is bytes: b'caf\\xe9-\\xff.png' (Latin-1, say) is no UTF-8. The
    CSV writer crashed on it; now its row names it with \\xNN escapes, and a list INPUT with
    such a name is read back as that file."""
    model, frames, _ = trained
    folder = tmp_path / "odd"
    folder.mkdir()
    source = (frames / "ep0" / "frame001.png").read_bytes()
    odd_name = b"caf\xe9-\xff.png"
    try:
        with open(os.fsencode(folder) + b"/" + odd_name, "wb") as handle:
            handle.write(source)
        with open(os.fsencode(folder) + b"/\xfe-broken.jpg", "wb") as handle:
            handle.write(b"\xff\xd8 not a jpeg")
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    (folder / "plain.png").write_bytes(source)
    out = tmp_path / "p.csv"
    assert _predict([model, folder, "-o", out]) == 3  # the broken JPEG is reported
    err = capsys.readouterr().err
    assert "2 input name(s) are not valid UTF-8, e.g. caf\\xe9-\\xff.png" in err
    out.read_bytes().decode("utf-8")  # the CSV is UTF-8 text
    table = pd.read_csv(out, keep_default_na=False)
    assert table["filename"].tolist() == ["caf\\xe9-\\xff.png", "plain.png", "\\xfe-broken.jpg"]
    assert "\\xfe-broken.jpg: cannot be decoded" in table.loc[2, "error"]
    probability = float(table.loc[0, "red_square_probability"])  # a column with an empty cell
    assert probability == float(table.loc[1, "red_square_probability"])
    assert os.fsencode(prediction.unescaped(table.loc[0, "filename"])) == odd_name
    # The predictions read back as a list INPUT: the same file, the same row.
    again = tmp_path / "again.jsonl"
    assert _predict([model, out, "--image-dir", folder, "--format", "jsonl", "-o", again,
                     "--skip-errors", "--quiet"]) == 3
    rows = [json.loads(line) for line in again.read_text(encoding="utf-8").splitlines()]
    assert [r["filename"] for r in rows] == ["caf\\xe9-\\xff.png", "plain.png"]
    assert rows[0]["red_square_probability"] == probability
    assert "\\xfe-broken.jpg: cannot be decoded" in capsys.readouterr().err
