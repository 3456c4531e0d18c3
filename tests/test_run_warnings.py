"""Every warning a run gives reaches report.html and metrics.json, not only the log."""

from __future__ import annotations

import html
import json
import logging

import pandas as pd
from conftest import FAST, run_script, write_two_symbol_frames

import build_multi_hot_model
from symbol_trainer import run_warnings


def test_collects_the_tools_warnings_once_each_and_not_other_libraries():
    tool = logging.getLogger("symbol_trainer.images")
    with run_warnings.collecting() as collector:
        tool.info("an info line")
        tool.warning("Skipping %s: %s", "a.png", "truncated")
        tool.warning("Skipping %s: %s", "a.png", "truncated")  # repeated: kept once
        logging.getLogger("tensorflow").warning("a library's warning")
        logging.getLogger("symbol_trainer.evaluation").error("an error")
        with run_warnings.collecting() as inner:  # nested: the same collector
            logging.getLogger("symbol_trainer.report").warning("inside")
        assert inner is collector and run_warnings.current() is collector.records
    assert collector.records == [
        {"level": "WARNING", "source": "images", "message": "Skipping a.png: truncated"},
        {"level": "ERROR", "source": "evaluation", "message": "an error"},
        {"level": "WARNING", "source": "report", "message": "inside"}]
    tool.warning("after the block")
    assert len(collector.records) == 3 and run_warnings.current() == []
    assert collector not in logging.getLogger().handlers


def test_a_runs_warnings_are_in_the_report_and_metrics_json(tmp_path):
    """Random weights, an unreadable image, a repeated CSV row (logged while the labels are
    read, before training starts), near-duplicate validation frames of a split frame by
    frame, few validation positives and the thresholds that rest on them: each warning of
    the run is listed in report.html, near the top, and in metrics.json."""
    root = tmp_path / "frames"
    table = write_two_symbol_frames(root, 32, 8, seed=4)
    (root / "broken.png").write_bytes(b"not an image")
    table = pd.concat([table, table.iloc[[0]],
                       pd.DataFrame([{"filename": "broken.png", "episode": 9,
                                      "red_square_visible": 0, "blue_circle_visible": 1}])])
    table.to_csv(root / "labels.csv", index=False)
    out = tmp_path / "model"
    code = run_script(build_multi_hot_model, [
        root, root / "labels.csv", out, "--weights", "none", "--group-by", "none",
        "--validation-split", "0.25", *FAST])
    assert code == 0

    metrics = json.loads((out / "metrics.json").read_text())
    messages = [w["message"] for w in metrics["warnings"]]
    expected = ["same file and labels as an earlier row",       # read before training
                "Skipping ",                                    # the unreadable image
                "look nearly identical to a training frame",    # a split frame by frame
                "Fewer than 10 positives in validation",
                "Random backbone weights (--weights none)",
                "may not hold on new frames"]                   # the thresholds' flags
    for words in expected:
        assert any(words in m for m in messages), (words, messages)
    assert {w["level"] for w in metrics["warnings"]} == {"WARNING"}
    for symbol in ("red_square", "blue_circle"):
        m = metrics["symbols"][symbol]
        assert m["positives"] < 10 and m["threshold_unstable"] is True
        assert "few_positives" in m["threshold_flags"]
        assert "label more frames" in m["threshold_advice"]

    report = (out / "report.html").read_text()
    warnings_at, summary_at = report.index('<h2 id="warnings">'), report.index('<h2 id="summary">')
    assert warnings_at < summary_at
    section = report[warnings_at:summary_at]
    assert f"Warnings ({len(messages)})" in section
    for message in messages:
        assert html.escape(message) in section
    assert report.count('class="note unstable"') == 2  # each symbol's section gives the advice
    assert report.count(' !</td>') == 2  # and the summary table marks both thresholds
