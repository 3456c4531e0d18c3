#!/usr/bin/env python3
"""Do decision thresholds chosen on the validation frames hold on new ones?

Compares the rules of evaluation.choose_threshold on held-out groups of real images:

  exact      the highest F1 at an exact cut of the validation scores (the rule before issue
             24: `smoothed=False`)
  smoothed   the highest F1 on kernel-smoothed counts, each group counted once (the default)
  bootstrap  an alternative not adopted: the cut of the highest F1 averaged over 200
             bootstrap resamples of the validation groups, halfway to the next lower score

and, for --threshold-for precision=0.9, the exact rule (kept: the lowest validation score whose
precision reaches 0.9) against the lowest threshold whose smoothed precision reaches it (an
alternative not adopted).

Scores come from a linear probe, not from the full training (which would take hours on two
cores for these seeds): multi-label logistic regression with positives weighted as
--positive-weighting balanced weights them, on frozen MobileNetV2-0.35 ImageNet features
(../shared/weights, average-pooled, 128x128 squashed inputs), computed once per dataset.

Data (../shared/data):
  adidas_puma_logos  352 photos, 2 symbols; 3 augmented copies per source photo, so groups
                     are the source_image column (130 groups)
  logodet3k_clothes  6,386 product photos, 45 symbols of about 150 positives each (2-5 %
                     prevalence); each image is its own group

Per seed the groups are shuffled into 45 % for training the probe, 35 % held out as the new
frames, and 20 % validation; the first quarter of the validation groups is also used alone
(5 %), the few-positives case. For every symbol with both classes in validation and positives
in the held-out groups, each rule chooses a threshold on validation, and the held-out frames
give: the F1 at that threshold, the regret (the best F1 any threshold reaches on the held-out
frames minus that F1), the distance in log-odds from that best held-out threshold, and
whether the threshold lies outside [0.1, 0.9].

    python bench/threshold_stability.py             # about 3.5 CPU-minutes (2 cores)
    python bench/threshold_stability.py --quick     # fewer seeds, for a try

Writes docs/measurements/threshold_stability.md (command, commit, machine, tables). Needs
scipy (installed with requirements-dev.txt's scikit-learn) for the probe.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from symbol_trainer import evaluation  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_0.35_no_top_imagenet.weights.h5"
DATASETS = {"adidas_puma_logos": "source_image", "logodet3k_clothes": None}
IMAGE_SIZE = 128
TRAIN_SHARE, HELD_OUT_SHARE = 0.45, 0.35  # validation: the remaining 0.20
FEW_SHARE = 0.05  # the first quarter of the validation groups
PRECISION_TARGET = 0.9
BOOTSTRAP_REPLICATES = 200


def features(name: str, cache_dir: Path | None) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Pooled backbone features, labels (table of 0/1 per symbol) and group per image."""
    base = SHARED / "data" / name
    labels = pd.read_csv(base / "labels.csv")
    group_column = DATASETS[name]
    groups = (pd.read_csv(base / "splits.csv").set_index("filename")
              .loc[labels["filename"], group_column].to_numpy() if group_column
              else labels["filename"].to_numpy())
    cached = cache_dir / f"{name}_{IMAGE_SIZE}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        values = np.load(cached)
    else:
        from symbol_trainer import images
        import keras
        geometry = images.input_geometry(IMAGE_SIZE, "squash", [(1, 1)])
        backbone = keras.applications.MobileNetV2(
            alpha=0.35, include_top=False, weights=str(WEIGHTS), pooling="avg",
            input_shape=(geometry.height, geometry.width, 3))
        paths = [str(base / "images" / f) for f in labels["filename"]]
        chunks = []
        for start in range(0, len(paths), 64):
            batch = np.stack([images.load_image_array(p, geometry) for p in paths[start:start + 64]])
            chunks.append(backbone.predict(keras.applications.mobilenet_v2.preprocess_input(
                batch.astype("float32")), verbose=0))
        values = np.concatenate(chunks)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, values)
    return values, labels.drop(columns="filename"), groups


def linear_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-2):
    """Multi-label logistic regression, positives weighted by negatives/positives clipped to
    [1, 100] as --positive-weighting balanced does; returns a function giving probabilities."""
    from scipy.optimize import minimize

    n, d = x.shape
    k = y.shape[1]
    positive_weight = np.clip((n - y.sum(0)) / np.maximum(y.sum(0), 1), 1, 100)
    weights = np.where(y == 1, positive_weight, 1.0)
    weights /= weights.sum(0)

    def loss_and_gradient(theta):
        w, b = theta[:d * k].reshape(d, k), theta[d * k:]
        logits = x @ w + b
        loss = (weights * (np.logaddexp(0, logits) - y * logits)).sum() + l2 * (w ** 2).sum() / 2
        g = weights * (1 / (1 + np.exp(-logits)) - y)
        return loss, np.r_[(x.T @ g + l2 * w).ravel(), g.sum(0)]

    result = minimize(loss_and_gradient, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                      options={"maxiter": 200})
    w, b = result.x[:d * k].reshape(d, k), result.x[d * k:]
    return lambda z: 1 / (1 + np.exp(-(z @ w + b)))


def bootstrap_threshold(labels, scores, groups, rng) -> float:
    """The alternative: the cut of the highest F1 averaged over bootstrap resamples of the
    validation groups, placed halfway (in log-odds) between its score and the next lower one
    so that, like the smoothed rule, it does not sit on the score of one frame."""
    order, sorted_scores, last = evaluation._ranked(labels, scores)
    thresholds = sorted_scores[last]
    weights = np.concatenate(list(evaluation._bootstrap_weights(
        groups, BOOTSTRAP_REPLICATES, int(rng.integers(2 ** 31)))))[:, order]
    tp = np.cumsum(weights * labels[order], axis=1)[:, last]
    seen = np.cumsum(weights, axis=1)[:, last]
    drawn = tp[:, -1] > 0
    best = int(np.argmax(np.mean(2 * tp[drawn] / (seen[drawn] + tp[drawn, -1:]), axis=0)))
    if best == len(thresholds) - 1:
        return float(thresholds[best])
    middle = (log_odds(thresholds[best]) + log_odds(thresholds[best + 1])) / 2
    return float(1 / (1 + np.exp(-middle)))


def smoothed_precision_threshold(labels, scores, groups) -> float:
    """The alternative for precision targets: the lowest threshold whose smoothed precision
    reaches the target (the smoothed best F1 where none does)."""
    smoothed = evaluation.smoothed_counts(labels, scores, groups)
    if smoothed is None:
        return float(np.min(scores))
    grid, tp, fp = smoothed
    meets = np.flatnonzero(tp / np.maximum(tp + fp, 1e-12) >= PRECISION_TARGET)
    if len(meets) == 0:
        return evaluation.smoothed_f1_threshold(labels, scores, groups)
    return float(1 / (1 + np.exp(-grid[meets[0]])))


def outcome(labels, scores, threshold):
    predicted = scores >= threshold
    tp = int((predicted & labels).sum())
    return (2 * tp / (predicted.sum() + labels.sum()),
            tp / predicted.sum() if predicted.sum() else float("nan"), tp / labels.sum())


def log_odds(p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def measure(name: str, seeds: int, cache_dir: Path | None) -> pd.DataFrame:
    x, table, groups = features(name, cache_dir)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = table.to_numpy(np.float64)
    distinct = np.unique(groups)
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        shuffled = rng.permutation(distinct)
        n = len(shuffled)
        cut_train, cut_held = int(TRAIN_SHARE * n), int((TRAIN_SHARE + HELD_OUT_SHARE) * n)
        validation_groups = shuffled[cut_held:]
        train = np.isin(groups, shuffled[:cut_train])
        held = np.isin(groups, shuffled[cut_train:cut_held])
        probe = linear_probe(x[train], y[train])
        held_scores = probe(x[held])
        for share, chosen in (("20 %", validation_groups),
                              ("5 %", validation_groups[:int(FEW_SHARE * n)])):
            valid = np.isin(groups, chosen)
            valid_scores = probe(x[valid])
            for j, symbol in enumerate(table.columns):
                labels, scores = y[valid, j] == 1, valid_scores[:, j]
                new_labels, new_scores = y[held, j] == 1, held_scores[:, j]
                if not (labels.any() and (~labels).any() and new_labels.any()):
                    continue
                cuts, precision, recall = evaluation.precision_recall_curve(new_labels, new_scores)
                f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
                best = int(np.argmax(f1))
                f1_rules = {
                    "exact": evaluation.choose_threshold(
                        labels, scores, evaluation.ThresholdRule(), groups[valid],
                        smoothed=False).threshold,
                    "smoothed": evaluation.choose_threshold(
                        labels, scores, evaluation.ThresholdRule(), groups[valid]).threshold,
                    "bootstrap": bootstrap_threshold(labels, scores, groups[valid], rng)}
                precision_rules = {
                    "exact": evaluation.choose_threshold(
                        labels, scores, evaluation.ThresholdRule("precision", PRECISION_TARGET),
                        groups[valid]).threshold,
                    "smoothed": smoothed_precision_threshold(labels, scores, groups[valid])}
                base = {"data": name, "validation": share, "seed": seed, "symbol": symbol,
                        "positives": int(labels.sum()), "held_best_f1": f1[best]}
                for rule, threshold in f1_rules.items():
                    got, _, _ = outcome(new_labels, new_scores, threshold)
                    rows.append({**base, "target": "f1", "rule": rule, "threshold": threshold,
                                 "f1": got, "regret": f1[best] - got,
                                 "log_odds_distance": abs(log_odds(threshold) - log_odds(cuts[best])),
                                 "outside": not 0.1 <= threshold <= 0.9})
                for rule, threshold in precision_rules.items():
                    _, got_precision, got_recall = outcome(new_labels, new_scores, threshold)
                    rows.append({**base, "target": f"precision={PRECISION_TARGET:g}", "rule": rule,
                                 "threshold": threshold, "precision": got_precision,
                                 "recall": got_recall, "outside": not 0.1 <= threshold <= 0.9})
        print(f"{name}: seed {seed + 1}/{seeds} done", file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def f1_table(results: pd.DataFrame) -> str:
    f1 = results[results["target"] == "f1"]
    lines = ["| data | validation groups | median positives | cases | rule | held-out F1 | "
             "regret (mean) | regret (90th pct.) | log-odds from held-out best (median) | "
             "outside [0.1, 0.9] | regret lower than exact / higher | regret minus exact's "
             "(95 % interval) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (data, share), part in f1.groupby(["data", "validation"], sort=False):
        exact = part[part["rule"] == "exact"].set_index(["seed", "symbol"])["regret"]
        for rule, rows in part.groupby("rule", sort=False):
            mine = rows.set_index(["seed", "symbol"])["regret"]
            versus = difference = ""
            if rule != "exact":
                versus = f"{(mine < exact - 1e-12).mean():.0%} / {(mine > exact + 1e-12).mean():.0%}"
                low, high = seed_interval(mine - exact)
                difference = f"{(mine - exact).mean():+.4f} ({low:+.4f} to {high:+.4f})"
            lines.append(
                f"| {data} | {share} | {rows['positives'].median():.0f} | {len(rows)} | {rule} | "
                f"{rows['f1'].mean():.3f} | {rows['regret'].mean():.4f} | "
                f"{rows['regret'].quantile(0.9):.3f} | {rows['log_odds_distance'].median():.2f} | "
                f"{rows['outside'].mean():.0%} | {versus} | {difference} |")
    return "\n".join(lines)


def seed_interval(differences: pd.Series, replicates: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of the mean difference, resampling whole seeds: the symbols of
    one seed share its probe and split, so they are not independent cases."""
    per_seed = differences.groupby(level="seed").agg(["sum", "count"]).to_numpy()
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(per_seed), (replicates, len(per_seed)))
    means = per_seed[draws, 0].sum(axis=1) / per_seed[draws, 1].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def precision_table(results: pd.DataFrame) -> str:
    part = results[results["target"] != "f1"]
    lines = [f"| data | validation groups | rule | held-out precision (mean) | held-out precision "
             f">= {PRECISION_TARGET:g} | held-out recall (mean) | outside [0.1, 0.9] |",
             "|---|---|---|---|---|---|---|"]
    for (data, share, rule), rows in part.groupby(["data", "validation", "rule"], sort=False):
        lines.append(
            f"| {data} | {share} | {rule} | {rows['precision'].mean():.3f} | "
            f"{(rows['precision'] >= PRECISION_TARGET).mean():.0%} | {rows['recall'].mean():.3f} | "
            f"{rows['outside'].mean():.0%} |")
    return "\n".join(lines)


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(20, 5), metavar=("ADIDAS", "LOGODET"),
                        help="seeds per dataset (default: 20 5)")
    parser.add_argument("--quick", action="store_true", help="3 and 1 seeds")
    parser.add_argument("--cache-dir", type=Path,
                        help="keep the backbone features here between runs")
    parser.add_argument("--output", type=Path,
                        default=ROOT / "docs" / "measurements" / "threshold_stability.md")
    args = parser.parse_args(argv)
    missing = [str(p) for p in [WEIGHTS, *(SHARED / "data" / d for d in DATASETS)] if not p.exists()]
    if missing:
        print(f"Needs ../shared (data and weights); missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    seeds = (3, 1) if args.quick else tuple(args.seeds)
    started = time.monotonic()
    results = pd.concat([measure(name, n, args.cache_dir) for name, n in zip(DATASETS, seeds)])
    seconds = time.monotonic() - started
    import numpy
    command = "python bench/threshold_stability.py " + " ".join(argv if argv is not None else sys.argv[1:])
    document = f"""# Threshold stability: do validation thresholds hold on new frames?

Written by `bench/threshold_stability.py` (see its docstring for the protocol).

- Command: `{command.strip()}`
- Commit: {commit()}
- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
- Machine: {platform.platform()}, {os.cpu_count()} CPU threads, Python {platform.python_version()}, NumPy {numpy.__version__}
- Run time: {seconds:.0f} s; seeds: {seeds[0]} (adidas_puma_logos), {seeds[1]} (logodet3k_clothes)

Scores: a linear probe on frozen MobileNetV2-0.35 ImageNet features (not the full training).
Each seed splits the groups 45 % probe training, 35 % held out (the "new frames"), 20 %
validation, of which the first quarter (5 % of the groups) is also used alone. A case is one
symbol in one seed with both classes in validation and positives in the held-out groups.

## --threshold-for f1

Regret: the best F1 any threshold reaches on the held-out frames minus the F1 of the chosen
threshold there (0 is ideal). The last two columns compare each case with the exact rule's:
the share of cases with lower and with higher regret, and the mean difference in regret with
a 95 % bootstrap interval that resamples whole seeds (negative: the rule loses less F1).

{f1_table(results)}

## --threshold-for precision={PRECISION_TARGET:g}

{precision_table(results)}
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(document)
    print(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
