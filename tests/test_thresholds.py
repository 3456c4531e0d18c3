"""Thresholds that hold on new frames: the smoothed F1 rule, and the flags on thresholds that
rest on few validation positives or lie at an extreme of the probability range."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from symbol_trainer import evaluation
from symbol_trainer.evaluation import ThresholdRule, choose_threshold, parse_threshold_rule


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_separated_classes_get_a_threshold_in_the_gap_not_on_the_lowest_positive():
    # The exact best F1 (1.0) holds from 0.3 (excluded) to 0.7: the exact rule takes 0.7, the
    # score of one frame, so a new positive at 0.69 would be missed. Smoothing puts it in the
    # middle of the gap (in log-odds; the classes are mirror images around 0.5).
    labels = np.array([1, 1, 1, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert choose_threshold(labels, scores, ThresholdRule(), smoothed=False).threshold == 0.7
    threshold = choose_threshold(labels, scores, ThresholdRule()).threshold
    assert threshold == pytest.approx(0.5, abs=0.02)


def _population_f1(threshold, positives_logit, negatives_logit, prevalence):
    recall = np.mean(positives_logit >= math.log(threshold / (1 - threshold)))
    false_alarms = np.mean(negatives_logit >= math.log(threshold / (1 - threshold)))
    tp, fp = prevalence * recall, (1 - prevalence) * false_alarms
    return 2 * tp / (tp + fp + prevalence)


@pytest.mark.parametrize("positives, prevalence, separation", [(8, 0.05, 3.0), (8, 0.6, 1.0)])
def test_smoothed_thresholds_lose_less_f1_on_new_frames(positives, prevalence, separation):
    """Validation sets of 8 positives drawn from a known score distribution (log-odds normal):
    the F1 the chosen threshold gets on the whole population, against the best possible.
    The exact rule chases the cut where a few frames happened to fall."""
    rng = np.random.default_rng(0)
    population_pos = rng.normal(separation, 1, 200_000)
    population_neg = rng.normal(0, 1, 200_000)
    grid = _sigmoid(np.linspace(-4, 6, 401))
    best = max(_population_f1(t, population_pos, population_neg, prevalence) for t in grid)
    regret = {True: [], False: []}
    for _ in range(150):
        n = round(positives / prevalence)
        labels = np.zeros(n, bool)
        labels[:positives] = True
        scores = _sigmoid(np.where(labels, rng.normal(separation, 1, n), rng.normal(0, 1, n)))
        for smoothed in (True, False):
            t = choose_threshold(labels, scores, ThresholdRule(), smoothed=smoothed).threshold
            regret[smoothed].append(
                best - _population_f1(t, population_pos, population_neg, prevalence))
    assert np.mean(regret[True]) < 0.75 * np.mean(regret[False])


def test_smoothing_matches_exact_sums_of_the_kernel():
    """The smoothed counts are computed on a grid; a direct sum of the kernel over every
    frame finds the same best threshold to within a grid step."""
    rng = np.random.default_rng(3)
    labels = rng.random(300) < 0.2
    scores = _sigmoid(np.where(labels, rng.normal(1.5, 1.2, 300), rng.normal(-1, 1, 300)))
    got = evaluation.smoothed_f1_threshold(labels, scores)
    z = evaluation._log_odds(scores)
    grid = np.linspace(z.min(), z.max(), 4001)
    above = []
    for members in (labels, ~labels):
        h = 0.9 * evaluation._spread(z[members]) * members.sum() ** -0.2
        scale = h * math.sqrt(3) / math.pi
        above.append(_sigmoid((z[members][None, :] - grid[:, None]) / scale).sum(axis=1))
    f1 = 2 * above[0] / (above[0] + above[1] + labels.sum())
    step = (z.max() - z.min()) / (evaluation.SMOOTHING_GRID - 1)
    assert evaluation._log_odds(got) == pytest.approx(grid[np.argmax(f1)], abs=1.5 * step)


def test_groups_count_once_in_the_smoothing():
    """A shot of near-identical frames is one observation: twenty copies of each frame, each
    set in its own group, are smoothed as the single frames are and choose their threshold;
    as twenty independent frames they would get a kernel 20 ** 0.2 = 1.8 times narrower."""
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(6, bool), np.zeros(30, bool)]
    scores = _sigmoid(np.where(labels, rng.normal(1, 1.5, 36), rng.normal(-1, 1, 36)))
    copies = np.repeat(np.arange(36), 20)
    z = evaluation._log_odds(scores)
    single = evaluation._kernel_scale(z[labels], 6, 1.0)
    repeated = z[copies][labels[copies]]
    assert evaluation._kernel_scale(repeated, 6, 1.0) == pytest.approx(single, rel=0.1)
    assert evaluation._kernel_scale(repeated, 120, 1.0) == pytest.approx(single * 20 ** -0.2,
                                                                         rel=0.1)
    grouped = evaluation.smoothed_f1_threshold(labels[copies], scores[copies], groups=copies)
    assert grouped == pytest.approx(evaluation.smoothed_f1_threshold(labels, scores), abs=0.01)


@pytest.mark.parametrize("labels, scores, expected", [
    ([1, 1, 1], [0.6, 0.6, 0.6], 0.6),         # one score: all visible
    ([1, 1, 0], [0.9, 0.8, 0.8], 0.8),         # the best cut is the lowest score
    ([1, 0, 0, 0], [0.9, 0.1, 0.1, 0.1], None),
])
def test_smoothing_edge_cases(labels, scores, expected):
    labels, scores = np.array(labels, bool), np.array(scores)
    threshold = choose_threshold(labels, scores, ThresholdRule()).threshold
    if expected is not None:
        assert threshold == expected
    # Whatever the smoothing, every validation positive is kept when that is best here.
    assert (scores[labels] >= threshold).all() and 0 < threshold < 1


def test_precision_and_recall_targets_stay_on_exact_counts():
    labels = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert choose_threshold(labels, scores, parse_threshold_rule("precision=0.9")).threshold == 0.7
    assert choose_threshold(labels, scores, parse_threshold_rule("recall=1")).threshold == 0.5


@pytest.mark.parametrize("positives, threshold, flags, words", [
    (25, 0.5, (), []),
    (25, 0.1, (), []),
    (25, 0.9, (), []),
    (9, 0.5, ("few_positives",), ["rests on 9 validation positives", "label more frames",
                                  "--validation-csv"]),
    (1, 0.5, ("few_positives",), ["rests on 1 validation positive "]),
    (40, 0.075, ("outside_range",), ["threshold 0.075", "below 0.1", "distribution",
                                     "--threshold-for precision="]),
    (40, 0.97, ("outside_range",), ["above 0.9"]),
    (3, 0.99, ("few_positives", "outside_range"), ["3 validation positives", "above 0.9"]),
])
def test_threshold_flags_and_their_advice(positives, threshold, flags, words):
    got, advice = evaluation.threshold_flags(positives, threshold)
    assert got == flags
    assert bool(advice) == bool(flags)
    for word in words:
        assert word in advice
    if flags:
        assert "--threshold-for precision=P" in advice and "may not hold on new frames" in advice


def test_unstable_thresholds_are_logged_stored_and_marked(caplog):
    rng = np.random.default_rng(2)
    n = 400
    # 'common': 80 positives and a mid-range threshold; 'rare': 6 positives.
    labels = np.c_[np.arange(n) < 80, np.arange(n) < 6].astype(float)
    probabilities = _sigmoid(np.where(labels == 1, rng.normal(2, 1, (n, 2)),
                                      rng.normal(-2, 1, (n, 2))))
    symbols = ["common", "rare"]
    with caplog.at_level(logging.WARNING, logger="symbol_trainer.evaluation"):
        choices = evaluation.choose_thresholds(labels, probabilities, symbols, ThresholdRule())
    assert choices["common"].flags == () and choices["rare"].flags[0] == "few_positives"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith("rare: threshold ")
    assert "6 validation positives" in warned[0] and "label more frames" in warned[0]

    metrics = evaluation.evaluation_metrics(labels, probabilities, symbols, choices, replicates=0)
    rare, common = metrics["symbols"]["rare"], metrics["symbols"]["common"]
    assert rare["threshold_unstable"] is True and "few_positives" in rare["threshold_flags"]
    assert rare["threshold_advice"] == choices["rare"].advice
    assert common["threshold_unstable"] is False and common["threshold_flags"] == []
    assert "threshold_advice" not in common
    summary = evaluation.format_metrics_summary(metrics)
    rare_line = next(line for line in summary.splitlines() if line.startswith("rare"))
    common_line = next(line for line in summary.splitlines() if line.startswith("common"))
    assert "!" in rare_line and "!" not in common_line
    assert "! the threshold may not hold on new frames" in summary


def test_no_validation_positive_is_flagged():
    choice = choose_threshold(np.zeros(5, bool), np.linspace(0, 1, 5), ThresholdRule())
    assert choice.threshold == 0.5 and choice.flags == ("few_positives",)
    assert "rests on 0 validation positives" in choice.advice
