"""Evaluation on the validation set: a decision threshold per symbol, metrics with bootstrap
intervals, and the table of every validation frame.

numpy and pandas only: the numbers are exact (no binned curves), unweighted whatever weighting
training used, and computed in seconds for tens of thousands of frames. Unannotated labels
(NaN) are left out of every number of their symbol.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from symbol_trainer.settings import ThresholdRule, parse_threshold_rule  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

THRESHOLD_TARGETS = ("f1", "precision", "recall")
# Used for a symbol whose validation frames have no positive: nothing to choose from.
FALLBACK_THRESHOLD = 0.5
# A threshold resting on fewer validation positives than this, or outside this range of
# probabilities, is flagged: it may not hold on new frames.
MIN_THRESHOLD_POSITIVES = 10
STABLE_THRESHOLD_RANGE = (0.1, 0.9)
# The smoothed F1 curve is evaluated at this many thresholds, evenly spaced in log-odds
# between the lowest and the highest validation score.
SMOOTHING_GRID = 1024
# Bandwidths (in log-odds) never go below this, so identical scores still get a smooth curve.
MIN_BANDWIDTH = 0.05
_PROBABILITY_CLIP = 1e-7
BOOTSTRAP_REPLICATES = 1000
INTERVAL_LEVEL = 0.95
# A symbol gets no interval unless its validation positives lie in at least this many groups
# (frames, when the split was not grouped).
MIN_POSITIVE_GROUPS_FOR_INTERVAL = 3
# Rows x frames of bootstrap weights held at once (float32): about 16 MB.
_BOOTSTRAP_CHUNK_CELLS = 4_000_000


# --------------------------------------------------------------------------------------------
# Ranking metrics


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN without both classes."""
    labels = np.asarray(labels, bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, np.float64)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _ranked(labels: np.ndarray, scores: np.ndarray):
    """Frames by descending score and, per distinct score, the index of its last frame: the
    cut points of every threshold `score >= t`."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
    sorted_scores = np.asarray(scores, np.float64)[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    return order, sorted_scores, last_of_tie


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision as scikit-learn defines it: sum over thresholds of
    (recall step) x precision, thresholds at the distinct scores."""
    labels = np.asarray(labels, bool)
    if labels.sum() == 0:
        return float("nan")
    return float(_weighted_average_precision(labels, scores, np.ones((1, len(labels))))[0])


def _weighted_average_precision(labels: np.ndarray, scores: np.ndarray,
                                weights: np.ndarray) -> np.ndarray:
    """Average precision for each row of `weights` (replicates x frames), each frame counted
    as often as its weight says: equal to `average_precision` on the frames repeated, without
    repeating them. NaN for a row that weights no positive."""
    order, _, last = _ranked(labels, scores)
    positive = np.asarray(labels, bool)[order]
    w = weights[:, order]
    tp = np.cumsum(w * positive, axis=1)[:, last]
    seen = np.cumsum(w, axis=1)[:, last]
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(seen > 0, tp / np.where(seen > 0, seen, 1), 0.0)
        recall = tp / total
        steps = np.diff(recall, axis=1, prepend=0.0)
        return np.where(total[:, 0] > 0, np.sum(steps * precision, axis=1), np.nan)


# --------------------------------------------------------------------------------------------
# Decision thresholds


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    rule: str
    reached: bool  # False: the rule's target could not be met; `note` says what was done
    note: str = ""
    # Why the threshold may not hold on new frames ('few_positives', 'outside_range'), and
    # what to do about it; empty when neither applies.
    flags: tuple[str, ...] = ()
    advice: str = ""


def _counts_at_cuts(labels: np.ndarray, scores: np.ndarray):
    """Thresholds (the distinct scores, descending) and TP and FP of `score >= threshold`."""
    order, sorted_scores, last = _ranked(labels, scores)
    positive = np.asarray(labels, bool)[order]
    return sorted_scores[last], np.cumsum(positive)[last], np.cumsum(~positive)[last]


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray):
    """Thresholds (the distinct scores, descending) and the precision and recall of
    `score >= threshold` at each."""
    labels = np.asarray(labels, bool)
    thresholds, tp, fp = _counts_at_cuts(labels, scores)
    return thresholds, tp / (tp + fp), tp / max(1, int(labels.sum()))


def _log_odds(scores: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, np.float64), _PROBABILITY_CLIP, 1 - _PROBABILITY_CLIP)
    return np.log(p) - np.log1p(-p)


def _spread(values: np.ndarray) -> float:
    """A robust standard deviation: the smaller of the standard deviation and the
    interquartile range / 1.34 (Silverman's); 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    quartiles = np.percentile(values, [25, 75])
    iqr_sd = (quartiles[1] - quartiles[0]) / 1.34
    return float(min(np.std(values), iqr_sd) if iqr_sd > 0 else np.std(values))


def _kernel_scale(values: np.ndarray, independent: int, fallback_spread: float) -> float:
    """The scale of the logistic kernel that smooths one class's log-odds: Silverman's
    bandwidth for `independent` observations (groups, or frames when not grouped), as a
    standard deviation, converted to the logistic's scale. A class whose values do not spread
    (one frame) takes `fallback_spread`, the spread of all scores."""
    spread = _spread(values) or fallback_spread or 1.0
    bandwidth = max(0.9 * spread * max(1, independent) ** -0.2, MIN_BANDWIDTH)
    return bandwidth * math.sqrt(3) / math.pi


def smoothed_counts(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray | None = None):
    """Thresholds (log-odds, SMOOTHING_GRID of them evenly from the lowest to the highest
    score) and the smoothed numbers of positive and of negative frames at or above each: each
    frame's score, in log-odds, is spread by a logistic kernel whose width follows
    Silverman's rule per class (visible, not visible), counting each group (shot, episode)
    once, since the frames of a shot repeat each other. None when all scores are equal."""
    labels = np.asarray(labels, bool)
    z = _log_odds(scores)
    low, high = float(z.min()), float(z.max())
    if high - low < 1e-9:
        return None
    units = np.arange(len(z)) if groups is None else np.asarray(groups)
    grid = np.linspace(low, high, SMOOTHING_GRID)
    step = grid[1] - grid[0]
    offsets = np.arange(-(SMOOTHING_GRID - 1), SMOOTHING_GRID) * step
    above = []
    for members in (labels, ~labels):
        if not members.any():
            above.append(np.zeros(SMOOTHING_GRID))
            continue
        scale = _kernel_scale(z[members], len(np.unique(units[members])), _spread(z))
        # Frames are counted at the nearest grid point (under 0.016 away in log-odds), so
        # the cost does not grow with the number of frames.
        counts = np.bincount(np.rint((z[members] - low) / step).astype(int),
                             minlength=SMOOTHING_GRID).astype(np.float64)
        kernel = 0.5 * (1 + np.tanh(offsets / scale / 2))  # the logistic CDF, overflow-free
        above.append(np.convolve(counts, kernel[::-1], mode="valid"))
    return grid, above[0], above[1]


def smoothed_f1_threshold(labels: np.ndarray, scores: np.ndarray,
                          groups: np.ndarray | None = None) -> float:
    """The threshold of the highest F1 on the smoothed counts (`smoothed_counts`). They are
    smooth in the threshold, so the maximum lies where a neighbourhood of thresholds scores
    well, rather than at the one cut where a few frames happened to fall
    (bench/threshold_stability.py measures the difference on held-out frames)."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    smoothed = smoothed_counts(labels, scores, groups)
    if smoothed is None:  # one score: only "all visible" can find anything
        return float(scores.min())
    grid, tp, fp = smoothed
    best = int(np.argmax(2 * tp / (tp + fp + labels.sum())))
    if best == 0:  # exactly the lowest score, not a rounding of it that leaves it out
        return float(scores.min())
    if best == SMOOTHING_GRID - 1:
        return float(scores.max())
    return float(1 / (1 + math.exp(-grid[best])))


def threshold_flags(positives: int, threshold: float) -> tuple[tuple[str, ...], str]:
    """Why a symbol's threshold may not hold on new frames, and what to do: fewer than
    MIN_THRESHOLD_POSITIVES validation positives ('few_positives'), or a threshold outside
    STABLE_THRESHOLD_RANGE ('outside_range'), where the probabilities crowd and a small shift
    in new frames moves many of them across it. ((), '') when neither applies."""
    low, high = STABLE_THRESHOLD_RANGE
    flags, reasons, actions = [], [], []
    if positives < MIN_THRESHOLD_POSITIVES:
        flags.append("few_positives")
        reasons.append(f"rests on {positives} validation positive{'s' if positives != 1 else ''} "
                       f"(fewer than {MIN_THRESHOLD_POSITIVES})")
        actions.append("label more frames that show it, or give a --validation-csv with more "
                       "of them")
    if not low <= threshold <= high:
        flags.append("outside_range")
        reasons.append(f"lies {'below' if threshold < low else 'above'} "
                       f"{low if threshold < low else high:g}")
        actions.append("check the distribution of its probabilities (evaluation.csv, and the "
                       "precision-recall curve in report.html)")
    if not flags:
        return (), ""
    actions.append("consider --threshold-for precision=P with the precision you need")
    advice = (f"threshold {threshold:.3g} {' and '.join(reasons)}, so it may not hold on new "
              f"frames: {'; '.join(actions)}")
    return tuple(flags), advice


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: ThresholdRule,
                     groups: np.ndarray | None = None, *, smoothed: bool = True) -> ThresholdChoice:
    """The decision threshold of one symbol, `score >= threshold` meaning visible, chosen on
    annotated validation frames (`labels` bool; `groups` their groups, if the split was
    grouped). 'f1' maximises F1 on smoothed counts (`smoothed_f1_threshold`; with
    `smoothed=False`, on the exact counts, which puts the threshold at a validation score).
    'precision' and 'recall' targets are met on the exact counts at a validation score."""
    labels = np.asarray(labels, bool)
    positives = int(labels.sum())
    if positives == 0:
        return ThresholdChoice(FALLBACK_THRESHOLD, str(rule), False,
                               f"no positive validation frame; threshold {FALLBACK_THRESHOLD} kept",
                               *threshold_flags(0, FALLBACK_THRESHOLD))

    def choice(threshold: float, reached: bool = True, note: str = "") -> ThresholdChoice:
        return ThresholdChoice(float(threshold), str(rule), reached, note,
                               *threshold_flags(positives, float(threshold)))

    thresholds, tp, fp = _counts_at_cuts(labels, scores)
    precision, recall = tp / (tp + fp), tp / positives
    f1 = 2 * tp / (tp + fp + positives)  # from counts, so equal F1s compare equal
    best_f1 = float(smoothed_f1_threshold(labels, scores, groups) if smoothed
                    else thresholds[int(np.argmax(f1))])  # first maximum: the highest threshold
    if rule.target == "f1":
        return choice(best_f1)
    # A hair of tolerance so that a target met exactly (e.g. 19/20 = 0.95) counts as met.
    tolerance = 1e-9
    if rule.target == "precision":
        meets = np.flatnonzero(precision >= rule.value - tolerance)
        if len(meets) == 0:
            return choice(best_f1, False,
                          f"precision {rule.value:g} is not reached at any threshold (at most "
                          f"{precision.max():.3f}); the threshold of the best F1 is used instead")
        return choice(thresholds[meets[-1]])
    meets = np.flatnonzero(recall >= rule.value - tolerance)  # the last cut has recall 1
    return choice(thresholds[meets[0]])


def choose_thresholds(labels: np.ndarray, probabilities: np.ndarray, symbols: Sequence[str],
                      rule: ThresholdRule, groups: np.ndarray | None = None, *,
                      smoothed: bool = True) -> dict[str, ThresholdChoice]:
    """One ThresholdChoice per symbol (columns of `labels`, NaN where not annotated; `groups`
    one per row, if the split was grouped); logs a warning for each symbol whose target could
    not be met, and for each whose threshold may not hold on new frames, with what to do."""
    choices = {}
    for j, symbol in enumerate(symbols):
        annotated = ~np.isnan(labels[:, j])
        choice = choose_threshold(labels[annotated, j] == 1, probabilities[annotated, j], rule,
                                  None if groups is None else np.asarray(groups)[annotated],
                                  smoothed=smoothed)
        if not choice.reached:
            log.warning("%s: %s.", symbol, choice.note)
        if choice.flags:
            log.warning("%s: %s.", symbol, choice.advice)
        choices[symbol] = choice
    return choices


# --------------------------------------------------------------------------------------------
# Metrics


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def symbol_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5) -> dict:
    """Metrics of one symbol over the annotated frames (NaN labels are left out): ranking
    metrics, and the confusion counts and their ratios at `threshold`."""
    annotated = ~np.isnan(labels)
    y = labels[annotated] == 1
    scores = probabilities[annotated]
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)  # for the loss only
    predicted = scores >= threshold  # exactly as prediction decides
    tp = int(np.sum(predicted & y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    tn = int(np.sum(~predicted & ~y))
    return {
        "frames": int(annotated.sum()),
        "positives": int(y.sum()),
        "prevalence": _ratio(int(y.sum()), int(annotated.sum())),
        "loss": float(-np.mean(y * np.log(p) + (~y) * np.log(1 - p))) if len(p) else float("nan"),
        "roc_auc": roc_auc(y, scores),
        "average_precision": average_precision(y, scores),
        "threshold": float(threshold),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(p)),
        "true_positives": tp, "false_positives": fp, "false_negatives": fn, "true_negatives": tn,
    }


def _bootstrap_weights(groups: np.ndarray, replicates: int, seed: int) -> Iterable[np.ndarray]:
    """Chunks of (replicates x frames) weights: how often each frame is drawn when whole
    groups are drawn with replacement, as many draws as there are groups."""
    _, group_of_frame = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_frame.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_CELLS // max(1, len(groups)))
    for start in range(0, replicates, chunk):
        size = min(chunk, replicates - start)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=size)
        yield counts[:, group_of_frame].astype(np.float32)


def bootstrap_replicates(labels: np.ndarray, probabilities: np.ndarray, thresholds: np.ndarray,
                         groups: np.ndarray | None, replicates: int = BOOTSTRAP_REPLICATES,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Average precision and F1 at `thresholds` of every symbol in `replicates` bootstrap
    resamples of the validation frames: two (replicates x symbols) arrays, NaN where a
    resample has no positive of a symbol. With `groups`, whole groups (shots, episodes) are
    resampled, because neighbouring frames are near-identical and resampling them one by one
    would give intervals far too narrow."""
    n, k = labels.shape
    groups = np.arange(n) if groups is None else np.asarray(groups)
    ap = np.full((replicates, k), np.nan)
    f1 = np.full((replicates, k), np.nan)
    row = 0
    for weights in _bootstrap_weights(groups, replicates, seed):
        rows = slice(row, row + len(weights))
        for j in range(k):
            annotated = ~np.isnan(labels[:, j])
            y = labels[annotated, j] == 1
            p = probabilities[annotated, j]
            w = weights[:, annotated]
            ap[rows, j] = _weighted_average_precision(y, p, w)
            predicted = p >= thresholds[j]
            tp = w @ (y & predicted)
            wrong = w @ (y != predicted)  # false positives + false negatives
            with np.errstate(invalid="ignore", divide="ignore"):
                f1[rows, j] = np.where(w @ y > 0, 2 * tp / (2 * tp + wrong), np.nan)
        row += len(weights)
    return ap, f1


def _interval(values: np.ndarray, level: float = INTERVAL_LEVEL) -> list[float] | None:
    finite = values[np.isfinite(values)]
    # Below half the replicates the resamples mostly lack a positive: no honest interval.
    if len(finite) < max(2, len(values) // 2):
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return [float(low), float(high)]


def _nanmean(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


MACRO_KEYS = ("prevalence", "loss", "roc_auc", "average_precision", "precision", "recall", "f1",
              "accuracy")


def evaluation_metrics(labels: np.ndarray, probabilities: np.ndarray, symbols: Sequence[str],
                       thresholds: dict[str, ThresholdChoice] | None = None,
                       groups: np.ndarray | None = None, *, group_name: str = "frames",
                       replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict:
    """metrics.json content: per symbol and macro average (the mean over symbols), with 95 %
    bootstrap intervals of average precision and F1. `thresholds` default to 0.5."""
    thresholds = thresholds or {s: ThresholdChoice(0.5, "0.5", True) for s in symbols}
    per_symbol = {}
    for j, symbol in enumerate(symbols):
        choice = thresholds[symbol]
        per_symbol[symbol] = {
            **symbol_metrics(labels[:, j], probabilities[:, j], choice.threshold),
            "threshold_rule": choice.rule, "threshold_reached": choice.reached,
            **({"threshold_note": choice.note} if choice.note else {}),
            "threshold_unstable": bool(choice.flags), "threshold_flags": list(choice.flags),
            **({"threshold_advice": choice.advice} if choice.advice else {})}
    macro = {k: _nanmean(m[k] for m in per_symbol.values()) for k in MACRO_KEYS}
    if replicates > 0 and len(labels):
        ap, f1 = bootstrap_replicates(labels, probabilities,
                                      np.array([thresholds[s].threshold for s in symbols]),
                                      groups, replicates, seed)
        units = np.arange(len(labels)) if groups is None else np.asarray(groups)
        for j, symbol in enumerate(symbols):
            # Resampling one or two shots that show a symbol says nothing about new ones.
            enough = len(set(units[labels[:, j] == 1])) >= MIN_POSITIVE_GROUPS_FOR_INTERVAL
            per_symbol[symbol]["average_precision_interval"] = _interval(ap[:, j]) if enough else None
            per_symbol[symbol]["f1_interval"] = _interval(f1[:, j]) if enough else None
        with warnings.catch_warnings():  # a replicate without any positive: 'empty slice'
            warnings.simplefilter("ignore", RuntimeWarning)
            macro["average_precision_interval"] = _interval(np.nanmean(ap, axis=1))
            macro["f1_interval"] = _interval(np.nanmean(f1, axis=1))
    return {
        "split": "validation",
        "bootstrap": {"replicates": replicates, "level": INTERVAL_LEVEL, "seed": seed,
                      "resampled": group_name},
        "symbols": per_symbol, "macro": macro}


# --------------------------------------------------------------------------------------------
# The table of validation frames

OUTCOMES = {(True, True): "true positive", (False, True): "false positive",
            (True, False): "false negative", (False, False): "true negative"}


def evaluation_table(filenames: Sequence[str], groups: Sequence[str], labels: np.ndarray,
                     probabilities: np.ndarray, symbols: Sequence[str],
                     thresholds: dict[str, ThresholdChoice]) -> pd.DataFrame:
    """evaluation.csv: one row per validation frame, in split order, with its group, how many
    symbols it gets wrong, and per symbol the label (empty where not annotated), the
    probability, the decision at the symbol's threshold and the outcome ('false positive',
    ...), so a spreadsheet filter finds the mistakes of one symbol."""
    table = pd.DataFrame({"filename": list(filenames), "group": list(groups)})
    wrong = np.zeros(len(table), int)
    columns = {}
    for j, symbol in enumerate(symbols):
        label = labels[:, j]
        annotated = ~np.isnan(label)
        predicted = probabilities[:, j] >= thresholds[symbol].threshold
        outcome = [OUTCOMES[(bool(l == 1), bool(d))] if a else ""
                   for l, d, a in zip(label, predicted, annotated)]
        wrong += annotated & ((label == 1) != predicted)
        columns[f"{symbol}_label"] = pd.array(np.where(annotated, label, np.nan), dtype="Int64")
        columns[f"{symbol}_probability"] = probabilities[:, j].astype(np.float64)
        columns[f"{symbol}_predicted"] = predicted.astype(int)
        columns[f"{symbol}_outcome"] = outcome
    table["errors"] = wrong
    return pd.concat([table, pd.DataFrame(columns)], axis=1)


def format_metrics_summary(metrics: dict) -> str:
    """A plain-text table of the validation metrics per symbol and their macro average."""
    names = list(metrics["symbols"])
    width = max(len("macro average"), *(len(s) for s in names))
    head = (f"{'symbol':<{width}}  {'frames':>6}  {'pos':>5}  {'AP':>5}  {'95 % interval':>13}  "
            f"{'thresh.':>8}  {'prec.':>5}  {'recall':>6}  {'F1':>5}")
    lines = [head, "-" * len(head)]

    def number(value, digits=3, width=5):
        return f"{value:>{width}.{digits}f}" if value is not None and math.isfinite(value) \
            else f"{'-':>{width}}"

    def interval(values):
        return f"{values[0]:.2f}-{values[1]:.2f}" if values else "-"

    for name, m in metrics["symbols"].items():
        mark = ("*" if not m.get("threshold_reached", True) else "") + \
            ("!" if m.get("threshold_unstable") else "")
        lines.append(
            f"{name:<{width}}  {m['frames']:>6,}  {m['positives']:>5,}  "
            f"{number(m['average_precision'])}  {interval(m.get('average_precision_interval')):>13}  "
            f"{number(m['threshold'], width=6)}{mark:<2}  {number(m['precision'])}  "
            f"{number(m['recall'], width=6)}  {number(m['f1'])}")
    if len(names) > 1:
        m = metrics["macro"]
        lines.append(
            f"{'macro average':<{width}}  {'':>6}  {'':>5}  {number(m['average_precision'])}  "
            f"{interval(m.get('average_precision_interval')):>13}  {'':>8}  "
            f"{number(m['precision'])}  {number(m['recall'], width=6)}  {number(m['f1'])}")
    if any(not m.get("threshold_reached", True) for m in metrics["symbols"].values()):
        lines.append("* the threshold rule's target was not met on validation; see metrics.json.")
    if any(m.get("threshold_unstable") for m in metrics["symbols"].values()):
        low, high = STABLE_THRESHOLD_RANGE
        lines.append(f"! the threshold may not hold on new frames: fewer than "
                     f"{MIN_THRESHOLD_POSITIVES} validation positives, or outside "
                     f"{low:g}-{high:g}; the warnings and threshold_advice in metrics.json "
                     "say what to do.")
    return "\n".join(lines)
