"""bench/gpu.py and bench/decode_speed.py: the synthetic frames, a decode rate, a stage that
fails without losing the others, and the ours / raw table from hand-made results."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import decode_speed  # noqa: E402
import gpu  # noqa: E402


def test_synthetic_frames_and_their_labels(tmp_path):
    paths = decode_speed.make_frames(tmp_path, 5, (64, 36), workers=1)
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert list(labels.columns) == ["filename", "episode", "star_visible", "disc_visible"]
    assert [tmp_path / name for name in labels.filename] == paths
    assert all(Image.open(p).size == (64, 36) and Image.open(p).format == "JPEG" for p in paths)


def test_a_decode_rate_in_threads(tmp_path):
    paths = decode_speed.make_frames(tmp_path, 3, (128, 72), workers=1)
    assert decode_speed.decode_rate([str(p) for p in paths], "threads", 2, 0.05) > 0


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    """ours_predict without a model fails at once; nvjpeg still runs (here: not measured,
    no torch or no GPU) and the results file holds both."""
    results = tmp_path / "gpu.md"
    monkeypatch.delenv("OUT", raising=False)
    code = gpu.main(["--stages", "ours_predict,nvjpeg", "--work", str(tmp_path / "work"),
                     "--results", str(results), "--budget", "120", "--commit", "abc123"])
    assert code == 0
    data = json.loads(results.with_suffix(".json").read_text())
    failed = data["results"]["ours_predict"]["failed"]
    assert failed.startswith("exit code 1: ") and "no model in" in failed
    assert "nvjpeg" in data["results"]["nvjpeg"]
    assert "failed" not in data["results"]["nvjpeg"]
    text = results.read_text()
    assert "| ours_predict |" in text and "no model in" in text
    assert "- Commit: abc123 (given with --commit)" in text


def test_a_stage_with_no_time_left_is_skipped(tmp_path):
    args = gpu.parse_arguments(["--quick", "--work", str(tmp_path)])
    args.passed = []
    result = gpu.run_stage("raw", args, deadline=gpu.time.monotonic() + 5)
    assert result["failed"].startswith("skipped: ")


def test_ours_against_raw_with_the_targets():
    args = gpu.parse_arguments(["--quick", "--stages", "decode,raw,ours_train,ours_predict"])
    results = {
        "decode": {"decode": {"720p": {"threads": {"1": 100.0, "16": 1200.0},
                                       "processes": {"1": 110.0, "16": 1600.0}},
                              "1080p": {"threads": {"1": 90.0, "16": 1000.0},
                                        "processes": {"1": 95.0, "16": 1500.0}}},
                   "usable_cores": 16, "stage_seconds": 30.0},
        "raw": {"inference": 8000.0, "fine_tune_step": 5560.0, "fine_tune_step_augmented": 5000.0,
                "fine_tune_step_035": "failed: RuntimeError: out of memory"},
        "ours_train": {"ours": {"features_images_per_s": 1000.0,
                                "features_steady_images_per_s": 1400.0,
                                "fine_tune_images_per_s": 3000.0,
                                "fine_tune_steady_images_per_s": 4500.0}},
        "ours_predict": {"failed": "timed out after 90 s: INFO: Predicted 5,000 frames"},
    }
    text = gpu.report(results, args, {})
    assert "| MobileNetV2 0.35 fine-tuning step | failed: RuntimeError: out of memory |" in text
    assert "1 / 16 processes | 110.0 / 1,600.0 |" in text
    # The machine's decode rate is the better of N threads and N processes at 720p.
    assert "| feature pass, after the first chunk | 1,400.0 | decode (best of N) 1,600.0 | 88% |" in text
    assert "| fine-tuning, epochs after the first, steps alone | 4,500.0 | augmented step 5,000.0 | 90% |" in text
    assert "| prediction of a folder (predict.py) | failed (see Stages) | decode (best of N) 1,600.0 | - |" in text
    assert "| ours_predict | 0.0 | timed out after 90 s" in text


def test_a_stage_out_of_time_is_stopped_with_its_children(tmp_path, monkeypatch):
    """A stage that overruns its limit is killed with the processes it started, and
    recorded as timed out with the results it printed before."""
    args = gpu.parse_arguments(["--budget", "480", "--work", str(tmp_path)])
    args.passed = ["--work", str(tmp_path)]
    script = tmp_path / "slow_stage.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "open(sys.argv[-1] + '/child.pid', 'w').write(str(child.pid))\n"
        "print('RESULT {\"partial\": 1.5}', flush=True)\n"
        "time.sleep(60)\n")
    monkeypatch.setattr(gpu, "SCRIPT", script)
    monkeypatch.setattr(gpu, "MIN_STAGE_SECONDS", 1)
    monkeypatch.setitem(gpu.STAGE_LIMITS, "nvjpeg", 3)
    started = time.monotonic()
    result = gpu.run_stage("nvjpeg", args, deadline=time.monotonic() + 100)
    assert time.monotonic() - started < 20
    assert result["partial"] == 1.5 and result["failed"].startswith("timed out after 3 s")
    pid = int((tmp_path / "child.pid").read_text())
    time.sleep(0.5)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"  # gone (or a zombie)
