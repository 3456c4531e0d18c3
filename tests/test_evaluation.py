"""Thresholds, metrics, bootstrap intervals, evaluation.csv's table and the HTML report, on
hand-made arrays whose right answers are known, and against scikit-learn's."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import (average_precision_score, confusion_matrix, f1_score,
                             precision_recall_curve, roc_auc_score)

from symbol_trainer import evaluation
from symbol_trainer import report
from symbol_trainer.evaluation import ThresholdRule, choose_threshold, parse_threshold_rule

# Eight frames by descending score; the symbol is in frames 1, 2, 3 and 5.
LABELS = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])


def test_best_f1_threshold_on_hand_made_scores():
    # F1 at each cut: 0.4, 0.67, 0.86, 0.75, 0.89 (4 TP, 1 FP), 0.8, 0.73, 0.67.
    choice = choose_threshold(LABELS, SCORES, ThresholdRule(), smoothed=False)
    assert (choice.threshold, choice.rule, choice.reached) == (0.5, "f1", True)
    # Smoothed, the best F1 lies in the gap below that cut (the same counts on these frames),
    # not on the score of one frame.
    smoothed = choose_threshold(LABELS, SCORES, ThresholdRule())
    assert 0.4 < smoothed.threshold < 0.5 and smoothed.reached


@pytest.mark.parametrize("rule, expected", [
    ("precision=0.75", 0.5),   # precision by cut: 1, 1, 1, 0.75, 0.8, 0.67, ...: lowest is 0.5
    ("precision=0.9", 0.7),    # 0.8 at 0.5 is too low; 3/3 at 0.7
    ("precision=1", 0.7),
    ("recall=0.75", 0.7),      # highest threshold that still finds 3 of 4
    ("recall=1", 0.5),
    ("recall=0.2", 0.9),
])
def test_precision_and_recall_targets_on_hand_made_scores(rule, expected):
    choice = choose_threshold(LABELS, SCORES, parse_threshold_rule(rule))
    assert choice.threshold == expected and choice.reached and choice.rule == rule


def test_unreachable_precision_falls_back_to_best_f1_and_says_so(caplog):
    labels = np.array([0, 0, 1, 1], bool)  # the two most confident frames are wrong
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    choice = choose_threshold(labels, scores, parse_threshold_rule("precision=0.9"))
    assert not choice.reached and choice.threshold == 0.6  # F1 0.67 there, 0.4 at 0.7
    assert "precision 0.9 is not reached" in choice.note and "at most 0.500" in choice.note
    with caplog.at_level(logging.WARNING, logger="symbol_trainer.evaluation"):
        choices = evaluation.choose_thresholds(np.c_[labels, labels].astype(float),
                                               np.c_[scores, scores], ["star", "logo"],
                                               parse_threshold_rule("precision=0.9"))
    assert [c.reached for c in choices.values()] == [False, False]
    assert re.search(r"star: precision 0.9 is not reached", caplog.text)


def test_symbol_without_validation_positives_keeps_one_half():
    choice = choose_threshold(np.zeros(5, bool), np.linspace(0, 1, 5), ThresholdRule())
    assert choice.threshold == 0.5 and not choice.reached and "no positive" in choice.note


@pytest.mark.parametrize("text, message", [
    ("precision=1.5", "above 0 and at most 1"), ("accuracy=0.9", "write f1, precision=VALUE"),
    ("recall=", "write f1"), ("precision=0.9.1", "not a number")])
def test_threshold_rule_errors_say_what_to_write(text, message):
    with pytest.raises(ValueError, match=message):
        parse_threshold_rule(text)


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_and_metrics_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.1
    scores = np.round(np.clip(labels * 0.35 + rng.random(300) * 0.7, 0, 1), 2)  # with ties
    assert evaluation.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert evaluation.average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores))
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = choose_threshold(labels, scores, ThresholdRule(), smoothed=False).threshold
    assert f1_score(labels, scores >= best) == pytest.approx(f1[:-1].max())
    wanted = choose_threshold(labels, scores, parse_threshold_rule("precision=0.6")).threshold
    assert wanted == thresholds[precision[:-1] >= 0.6].min()
    wanted = choose_threshold(labels, scores, parse_threshold_rule("recall=0.8")).threshold
    assert wanted == thresholds[recall[:-1] >= 0.8].max()

    m = evaluation.symbol_metrics(labels.astype(float), scores, best)
    tn, fp, fn, tp = confusion_matrix(labels, scores >= best).ravel()
    assert (m["true_positives"], m["false_positives"], m["false_negatives"], m["true_negatives"]) \
        == (tp, fp, fn, tn)
    assert m["f1"] == pytest.approx(f1_score(labels, scores >= best))
    assert m["prevalence"] == pytest.approx(labels.mean())


def test_symbol_metrics_leave_out_unannotated_frames():
    labels = np.array([1, 1, 0, 0, 0, np.nan])
    probabilities = np.array([0.9, 0.4, 0.6, 0.1, 0.2, 0.99])
    m = evaluation.symbol_metrics(labels, probabilities)
    assert (m["true_positives"], m["false_negatives"], m["false_positives"], m["true_negatives"]) == (1, 1, 1, 2)
    assert m["frames"] == 5 and m["positives"] == 2 and m["prevalence"] == 0.4
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5 and m["accuracy"] == 0.6
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.4, 0.9, 0.8])))


def test_weighted_average_precision_equals_it_on_repeated_frames():
    rng = np.random.default_rng(0)
    labels = rng.random(40) < 0.3
    scores = np.round(rng.random(40), 1)
    weights = rng.integers(0, 3, (5, 40)).astype(float)
    got = evaluation._weighted_average_precision(labels, scores, weights)
    for row, value in zip(weights.astype(int), got):
        repeated = np.repeat(labels, row)
        assert value == pytest.approx(average_precision_score(repeated, np.repeat(scores, row)))


def test_bootstrap_draws_whole_groups_and_widens_for_near_duplicates():
    """30 shots of 20 identical frames: resampling frames one by one pretends there are 600
    independent frames; resampling shots sees 30."""
    rng = np.random.default_rng(1)
    shot_labels = rng.random(30) < 0.4
    shot_scores = np.clip(shot_labels * 0.3 + rng.random(30) * 0.7, 0, 1)
    labels = np.repeat(shot_labels, 20).astype(float)[:, None]
    scores = np.repeat(shot_scores, 20)[:, None]
    groups = np.repeat(np.arange(30), 20).astype(str)
    for weights in evaluation._bootstrap_weights(groups, 50, seed=0):
        per_group = weights.reshape(len(weights), 30, 20)
        assert (per_group == per_group[:, :, :1]).all()  # a shot is drawn whole
        assert (per_group[:, :, 0].sum(axis=1) == 30).all()  # as many draws as shots
    by_group = evaluation.evaluation_metrics(labels, scores, ["s"], groups=groups, seed=0)
    by_frame = evaluation.evaluation_metrics(labels, scores, ["s"], groups=None, seed=0)
    width = [m["symbols"]["s"]["average_precision_interval"] for m in (by_group, by_frame)]
    assert width[0][1] - width[0][0] > 3 * (width[1][1] - width[1][0])
    point = by_group["symbols"]["s"]["average_precision"]
    assert width[0][0] <= point <= width[0][1]
    again = evaluation.evaluation_metrics(labels, scores, ["s"], groups=groups, seed=0)
    assert again == by_group  # seeded


def test_no_interval_from_positives_in_fewer_than_three_groups():
    labels = np.zeros((200, 1))
    labels[[0, 1, 50, 51]] = 1
    scores = np.linspace(1, 0, 200)[:, None]
    m = evaluation.evaluation_metrics(labels, scores, ["rare"], groups=np.arange(200) // 50)
    assert m["symbols"]["rare"]["average_precision_interval"] is None  # two shots show it
    m = evaluation.evaluation_metrics(labels, scores, ["rare"], groups=np.arange(200) // 2)
    assert m["symbols"]["rare"]["average_precision_interval"] is None  # two shots again
    m = evaluation.evaluation_metrics(labels, scores, ["rare"], groups=np.arange(200))
    assert m["symbols"]["rare"]["average_precision_interval"] is not None  # four frames


def _frames(tmp_path, n=30):
    rng = np.random.default_rng(2)
    labels = np.c_[rng.random(n) < 0.4, rng.random(n) < 0.3].astype(float)
    labels[3, 1] = np.nan  # not annotated
    probabilities = np.clip(labels * 0.4 + rng.random((n, 2)) * 0.6, 0, 1)
    probabilities = np.nan_to_num(probabilities, nan=0.5)
    names = [f"ep{i % 3}/frame{i:02d}.png" for i in range(n)]
    paths = []
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 36), tuple(int(v) for v in rng.integers(0, 255, 3))).save(path)
        paths.append(str(path))
    return names, [n.split("/")[0] for n in names], labels, probabilities, paths


def test_evaluation_table_rows_columns_and_outcomes(tmp_path):
    names, groups, labels, probabilities, _ = _frames(tmp_path)
    thresholds = {"star": evaluation.ThresholdChoice(0.5, "f1", True),
                  "logo": evaluation.ThresholdChoice(0.6, "f1", True)}
    table = evaluation.evaluation_table(names, groups, labels, probabilities, ["star", "logo"],
                                        thresholds)
    assert list(table.columns) == ["filename", "group", "errors",
                                   "star_label", "star_probability", "star_predicted", "star_outcome",
                                   "logo_label", "logo_probability", "logo_predicted", "logo_outcome"]
    assert table["filename"].tolist() == names and table["group"].tolist() == groups
    row = table.iloc[3]
    assert pd.isna(row["logo_label"]) and row["logo_outcome"] == ""
    for j, symbol in enumerate(["star", "logo"]):
        predicted = probabilities[:, j] >= thresholds[symbol].threshold
        np.testing.assert_array_equal(table[f"{symbol}_predicted"], predicted.astype(int))
        m = evaluation.symbol_metrics(labels[:, j], probabilities[:, j], thresholds[symbol].threshold)
        assert (table[f"{symbol}_outcome"] == "false negative").sum() == m["false_negatives"]
        assert (table[f"{symbol}_outcome"] == "true negative").sum() == m["true_negatives"]
    annotated = ~np.isnan(labels)
    wrong = (annotated & ((labels == 1) != (probabilities >= [0.5, 0.6]))).sum(axis=1)
    assert table["errors"].tolist() == wrong.tolist()
    written = tmp_path / "evaluation.csv"
    table.to_csv(written, index=False)
    assert written.read_text().splitlines()[4].split(",")[7] == ""  # empty label cell


def test_report_embeds_curves_and_thumbnails_of_the_worst_errors(tmp_path):
    names, groups, labels, probabilities, paths = _frames(tmp_path)
    symbols = ["star", "logo"]
    thresholds = evaluation.choose_thresholds(labels, probabilities, symbols, ThresholdRule())
    metrics = evaluation.evaluation_metrics(labels, probabilities, symbols, thresholds,
                                            np.array(groups), group_name="groups, by folder")
    table = evaluation.evaluation_table(names, groups, labels, probabilities, symbols, thresholds)
    counts = {"train": {"images": 90, "groups": 9,
                        "positives": {"star": 30, "logo": 20}, "negatives": {"star": 60, "logo": 70}},
              "validation": {"images": 30, "groups": 3,
                             "positives": {"star": 12, "logo": 9}, "negatives": {"star": 18, "logo": 20}},
              "listed": 121, "unreadable": 1, "grouping": "folder"}
    metadata = {"symbols": symbols, "input": {"width": 64, "height": 36},
                "data": {"counts": counts}, "packages": {"keras": "3"},
                "training": {"config": {"backbone": "mobilenet_v2", "alpha": 0.35, "resize": "letterbox",
                                        "patience": 5, "threshold_for": "f1"},
                             "started_at": "2026-11-22T10:00:00+00:00",
                             "phase_seconds": {"features": 3.0, "head": 2.0, "fine_tune": 9.0}}}
    history = pd.DataFrame({"phase": ["head"] * 3 + ["fine_tune"] * 2, "epoch": [1, 2, 3, 1, 2],
                            "loss": [0.9, 0.7, 0.6, 0.5, 0.45], "val_loss": [0.8, 0.7, 0.75, 0.6, 0.62],
                            "val_ap": [0.5, 0.6, 0.7, 0.72, 0.71]})
    # The kept epoch is the best val_ap (head: 3, not 2 of the lowest val_loss), and the
    # lowest val_loss in histories without val_ap (written by earlier versions); fine-tuning
    # whose epochs do not beat the head's best keeps the head's weights (0).
    assert report.kept_epoch(history, "head") == 3
    assert report.kept_epoch(history.drop(columns="val_ap"), "head") == 2
    assert report.kept_epoch(history, "fine_tune") == 1
    assert report.kept_epoch(history.drop(columns="val_ap"), "fine_tune") == 1
    lower = history.assign(val_ap=[0.5, 0.6, 0.7, 0.65, 0.7])
    assert report.kept_epoch(lower, "fine_tune") == 0
    # Runs without rankable symbols watch val_loss in both phases (val_ap all NaN), and
    # fine-tuning competes with the head's lowest loss there too (0.7 against 0.6).
    by_loss = history.assign(val_ap=np.nan)
    assert report.kept_epoch(by_loss, "head") == 2 and report.kept_epoch(by_loss, "fine_tune") == 1
    assert report.kept_epoch(by_loss.assign(val_loss=[0.8, 0.5, 0.75, 0.6, 0.62]), "fine_tune") == 0
    assert len(report.training_curves_png(lower)) > 1000
    path = report.write_report(tmp_path, model_name="symbols", metadata=metadata, metrics=metrics,
                               history=history, table=table, paths=paths)
    html = path.read_text()
    # One thumbnail per group (episode folder) and kind of mistake: its most confident frame;
    # and as many of the hits.
    shown = sum(min(report.CONTACT_SHEET_SIZE, table.loc[table[f"{s}_outcome"] == kind, "group"].nunique())
                for s in symbols for kind in ("false positive", "false negative"))
    shown += sum(min(report.HITS_SHOWN, table.loc[table[f"{s}_outcome"] == "true positive", "group"].nunique())
                 for s in symbols)
    assert shown > 0
    assert html.count("data:image/jpeg;base64,") == shown
    assert html.count("data:image/png;base64,") == 3
    assert "http://" not in html and "https://" not in html
    assert "The run gave no warnings." in html  # none were given to it
    wrong = table[table["star_outcome"] == "false positive"].sort_values("star_probability")
    worst = wrong.iloc[-1]
    others = int((wrong["group"] == worst["group"]).sum()) - 1
    assert (f"{worst['filename']}<br>p = {worst['star_probability']:.3f}<br>+{others} more of "
            f"group {worst['group']}") in html
    for symbol in symbols:
        assert f'<a href="#symbol-{symbol}">{symbol}</a>' in html
    assert (tmp_path / "plots" / "training_curves.png").stat().st_size > 1000
