"""Scores of models on groups that training never saw, for the benchmarks in bench/.

Average precision and ROC-AUC per symbol and their macro average, with 95 % intervals from
bootstrap resamples of whole groups (episodes, shots, photos, tracks); a configuration's mean
over training seeds; and the paired difference between two configurations, scored on the same
resamples. numpy and evaluation.py only; bench/accuracy.py is the first user.
"""

from __future__ import annotations

import warnings

import numpy as np

BOOTSTRAP_REPLICATES = 1000
METRICS = ("average_precision", "roc_auc")




def group_resamples(groups: np.ndarray, replicates: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of each bootstrap resample: whole groups drawn with replacement, as many as
    there are groups (evaluation._bootstrap_weights), each drawn group's rows repeated."""
    from symbol_trainer import evaluation
    rows = np.arange(len(groups))
    return [np.repeat(rows, counts.astype(int))
            for chunk in evaluation._bootstrap_weights(np.asarray(groups), replicates, seed)
            for counts in chunk]


def symbol_metrics(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(metrics x symbols): average precision and ROC-AUC per symbol; NaN where a symbol has
    no positive (AP) or lacks a class (ROC-AUC)."""
    from symbol_trainer import evaluation
    y = np.asarray(labels) == 1
    return np.array([[evaluation.average_precision(y[:, j], probabilities[:, j])
                      for j in range(y.shape[1])],
                     [evaluation.roc_auc(y[:, j], probabilities[:, j]) for j in range(y.shape[1])]])


def replicate_metrics(labels, probabilities, resamples) -> np.ndarray:
    """(replicates x metrics x symbols) on each resample's rows."""
    return np.stack([symbol_metrics(labels[rows], probabilities[rows]) for rows in resamples])


def macro(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis (symbols), ignoring NaN; NaN where every symbol is NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=-1)


def interval(values: np.ndarray) -> list[float] | None:
    """95 % percentile interval of the finite replicate values (evaluation._interval: none when
    fewer than half the replicates are finite)."""
    from symbol_trainer import evaluation
    return evaluation._interval(np.asarray(values, np.float64))


def estimate(point: float, replicates: np.ndarray) -> dict:
    return {"value": float(point), "interval": interval(replicates)}


def run_scores(run: dict, point: np.ndarray, boot: np.ndarray, symbols: list[str]) -> dict:
    """One run's row: its unseen scores (`point`: metrics x symbols; `boot`: replicates x
    metrics x symbols) with intervals, its own validation AP and the gap."""
    return {"config": run["config"], "seed": run["seed"],
            "validation_macro_ap": run["validation_macro_ap"], "seconds": run["seconds"],
            "gap": run["validation_macro_ap"] - float(macro(point[0])),
            **{f"macro_{m}": estimate(macro(point[i]), macro(boot[:, i]))
               for i, m in enumerate(METRICS)},
            "symbols": {s: {m: estimate(point[i, j], boot[:, i, j]) for i, m in enumerate(METRICS)}
                        for j, s in enumerate(symbols)}}


def config_scores(seeds: list[dict], points: list, boots: list, symbols: list[str]) -> dict:
    """A configuration over its seeds: means of the per-seed values, point and per resample
    (so the interval is that of the mean), and the spread between seeds."""
    macro_points = np.array([macro(p) for p in points])  # seeds x metrics
    macro_boots = np.mean([macro(b) for b in boots], axis=0)  # replicates x metrics
    point, boot = np.mean(points, axis=0), np.mean(boots, axis=0)
    validation_ap = float(np.mean([r["validation_macro_ap"] for r in seeds]))
    result = {"seeds": len(seeds), "validation_macro_ap": validation_ap,
              "seconds": float(np.mean([r["seconds"] for r in seeds])),
              "gap": validation_ap - float(np.mean(macro_points[:, 0]))}
    for i, m in enumerate(METRICS):
        result[f"macro_{m}"] = {
            **estimate(np.mean(macro_points[:, i]), macro_boots[:, i]),
            "seed_sd": float(np.std(macro_points[:, i], ddof=1)) if len(seeds) > 1 else None}
    result["symbols"] = {s: {m: estimate(point[i, j], boot[:, i, j])
                             for i, m in enumerate(METRICS)} for j, s in enumerate(symbols)}
    return result


def paired_difference(points: list, boots: list, base_points: list, base_boots: list) -> dict:
    """Macro metrics of a configuration minus the baseline's, per seed and as the mean over
    seeds, each on the same resamples: a paired difference with its interval."""
    result = {}
    for i, m in enumerate(METRICS):
        per_seed = [macro(p[i]) - macro(q[i]) for p, q in zip(points, base_points)]
        per_resample = [macro(b[:, i]) - macro(c[:, i]) for b, c in zip(boots, base_boots)]
        result[f"macro_{m}"] = {
            **estimate(np.mean(per_seed), np.mean(per_resample, axis=0)),
            "per_seed": [estimate(v, r) for v, r in zip(per_seed, per_resample)]}
    return result


def score_set(labels: np.ndarray, symbols: list[str], groups: np.ndarray, runs: dict,
              baseline: str, replicates: int = BOOTSTRAP_REPLICATES) -> dict:
    """Every number the report shows for one data set. `runs` maps configuration name to a list,
    one per seed (the same seeds in the same order for every configuration), of dicts with
    'seed', 'probabilities' (unseen frames x symbols), 'validation_macro_ap' and 'seconds'.
    Every run is scored on the same group resamples, so means over seeds and differences from
    `baseline` get paired intervals."""
    resamples = group_resamples(groups, replicates)
    points = {name: [symbol_metrics(labels, r["probabilities"]) for r in seeds]
              for name, seeds in runs.items()}
    boots = {name: [replicate_metrics(labels, r["probabilities"], resamples) for r in seeds]
             for name, seeds in runs.items()}
    result = {"symbols": symbols, "unseen_frames": int(len(labels)),
              "unseen_groups": int(len(set(groups))),
              "unseen_positives": {s: int((labels[:, j] == 1).sum())
                                   for j, s in enumerate(symbols)},
              "runs": [run_scores({**run, "config": name}, p, b, symbols)
                       for name, seeds in runs.items()
                       for run, p, b in zip(seeds, points[name], boots[name])],
              "configs": {name: config_scores(seeds, points[name], boots[name], symbols)
                          for name, seeds in runs.items()},
              "differences": {}}
    for name in runs:
        if name != baseline:
            result["differences"][f"{name} - {baseline}"] = {
                **paired_difference(points[name], boots[name], points[baseline], boots[baseline]),
                "seconds_ratio": result["configs"][name]["seconds"]
                / result["configs"][baseline]["seconds"]}
    return result
