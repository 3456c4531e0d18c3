"""bench/accuracy.py and bench/unseen_scores.py: configurations as flag strings, scoring on unseen groups with paired
bootstrap differences (on hand-made predictions), the results file, and one tiny training run
through the library in-process (a few seconds: 32 px inputs, random weights)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest

from conftest import ROOT, write_two_symbol_frames

sys.path.insert(0, str(ROOT / "bench"))
import accuracy  # noqa: E402
import measurements  # noqa: E402
import unseen_scores  # noqa: E402
from symbol_trainer import settings  # noqa: E402


def test_configuration_flags_reach_the_training_config():
    config = accuracy.training_config("--image-size 320 --augment light", weights="none",
                                      seed=7, group_by="episode")
    assert (config.image_size, config.augment, config.seed, config.weights, config.group_by) \
        == (320, "light", 7, "none", "episode")
    # The flags override the benchmark's defaults, except the seed, which is always --seeds'.
    config = accuracy.training_config("--group-by none --seed 99", weights="none", seed=1,
                                      group_by="episode")
    assert (config.group_by, config.seed) == ("none", 1)
    quick = accuracy.training_config("--image-size 320", weights="none", seed=0, quick=True)
    assert (quick.image_size, quick.alpha, quick.fine_tune_epochs) == (64, 0.35, 1)
    with pytest.raises(accuracy.ConfigError, match="--no-such-flag"):
        accuracy.training_config("--no-such-flag 3", weights="none", seed=0)
    with pytest.raises(settings.InputError, match="--image-size"):
        accuracy.training_config("--image-size 5", weights="none", seed=0)


def test_old_release_flags_are_explicit_and_new_is_todays_defaults(monkeypatch):
    defaults = settings.TrainingConfig(weights="none")
    old = accuracy.training_config(accuracy.OLD_RELEASE_FLAGS, weights="none", seed=0)
    new = accuracy.training_config(accuracy.DEFAULT_CONFIGS["new"], weights="none", seed=0)
    assert accuracy.differing_settings(new, defaults) == {}
    assert (old.backbone, old.alpha, old.image_size, old.fine_tune_fraction) \
        == ("mobilenet_v2", 1.0, 224, 0.3)
    # A flag the last release lacked is added with its old value only where it exists.
    monkeypatch.setattr(accuracy, "OLD_RELEASE_LATER_FLAGS",
                        {"--dropout": "0.2", "--no-such-flag": "x"})
    flags = accuracy.config_flags(accuracy.OLD_RELEASE_FLAGS)
    assert flags.endswith("--dropout 0.2") and "--no-such-flag" not in flags
    assert accuracy.config_flags("--image-size 320") == "--image-size 320"
    assert accuracy.differing_settings(
        accuracy.training_config("--image-size 320", weights="none", seed=0), new) \
        == {"--image-size": 320}
    # Since issue 25 the defaults fine-tune differently from the last release; "old" keeps it.
    assert accuracy.differing_settings(new, old) == {
        "--fine-tune-fraction": 1.0, "--fine-tune-learning-rate": 2e-4,
        "--fine-tune-patience": 5, "--fine-tune-schedule": "cosine"}


def test_config_option_parsing():
    assert accuracy.parse_config_option('new=--pooling max --image-size 320') \
        == ("new", "--pooling max --image-size 320")
    assert accuracy.parse_config_option("old=") == ("old", "")
    for bad in ("no-equals-sign", "a b=--dropout 0.1"):
        with pytest.raises(accuracy.ConfigError, match="NAME=FLAGS"):
            accuracy.parse_config_option(bad)
    with pytest.raises(SystemExit):
        accuracy.parse_arguments(["--config", "x=--dropout 2"])
    _, args = accuracy.parse_arguments(["--config", "a=", "--config", "b=--dropout 0.1",
                                        "--sets", "adidas", "--seeds", "4,5"])
    assert (list(args.configs.items()), args.set_list, args.seed_list, args.n_frames,
            args.n_unseen) == ([("a", ""), ("b", "--dropout 0.1")], ["adidas"], [4, 5], 1200, 600)
    _, args = accuracy.parse_arguments(["--quick"])
    assert (args.configs, args.seed_list, args.n_frames, args.replicates) \
        == (accuracy.DEFAULT_CONFIGS, [0], 160, 200)
    assert accuracy.parse_arguments(["--quick", "--seeds=1,2"])[1].seed_list == [1, 2]


def test_bootstrap_resamples_whole_groups():
    groups = np.array(["a", "a", "b", "b", "b", "c"])
    resamples = unseen_scores.group_resamples(groups, 50, seed=0)
    assert len(resamples) == 50
    for rows in resamples:
        counts = np.bincount(rows, minlength=len(groups))
        # Every row of a group is drawn as often as the group; three groups are drawn.
        for members in ([0, 1], [2, 3, 4], [5]):
            assert len(set(counts[members])) == 1
        assert counts[0] + counts[2] + counts[5] == 3


def hand_made_runs(seed_count=2):
    """Unseen labels of 2 symbols in 40 groups of 3 frames, a model that ranks them perfectly
    and one that guesses, each over `seed_count` seeds."""
    rng = np.random.default_rng(0)
    labels = np.repeat(rng.integers(0, 2, (40, 2)), 3, axis=0)
    labels[:3] = [1, 1]  # both symbols have positives and negatives
    labels[3:6] = [0, 0]
    groups = np.repeat(np.arange(40), 3).astype(str)
    perfect = [{"seed": s, "probabilities": labels * 0.8 + rng.uniform(0, 0.1, labels.shape),
                "validation_macro_ap": 0.9, "seconds": 20.0} for s in range(seed_count)]
    guess = [{"seed": s, "probabilities": rng.uniform(0, 1, labels.shape),
              "validation_macro_ap": 0.7, "seconds": 10.0} for s in range(seed_count)]
    return labels, groups, {"old": guess, "new": perfect}


def test_scores_and_paired_differences_on_hand_made_predictions():
    labels, groups, runs = hand_made_runs()
    scored = unseen_scores.score_set(labels, ["p", "q"], groups, runs, "old", replicates=300)
    assert (scored["unseen_frames"], scored["unseen_groups"]) == (120, 40)
    new, old = scored["configs"]["new"], scored["configs"]["old"]
    assert new["macro_average_precision"]["value"] == 1.0
    assert new["macro_average_precision"]["interval"] == [1.0, 1.0]
    assert new["macro_roc_auc"]["value"] == 1.0
    assert old["macro_average_precision"]["value"] < 0.8
    low, high = old["macro_average_precision"]["interval"]
    assert low < old["macro_average_precision"]["value"] < high
    assert old["macro_average_precision"]["seed_sd"] > 0
    assert new["gap"] == pytest.approx(0.9 - 1.0)
    difference = scored["differences"]["new - old"]
    assert difference["macro_average_precision"]["value"] == pytest.approx(
        1.0 - old["macro_average_precision"]["value"])
    assert difference["macro_average_precision"]["interval"][0] > 0
    assert difference["seconds_ratio"] == 2.0
    assert len(difference["macro_roc_auc"]["per_seed"]) == 2
    run = scored["runs"][0]
    assert (run["config"], run["seed"]) == ("old", 0)
    assert run["gap"] == pytest.approx(0.7 - run["macro_average_precision"]["value"])
    assert set(run["symbols"]) == {"p", "q"}
    # The mean of per-symbol APs is the macro AP.
    assert np.mean([run["symbols"][s]["average_precision"]["value"] for s in "pq"]) \
        == pytest.approx(run["macro_average_precision"]["value"])


def test_identical_configurations_differ_by_exactly_zero():
    labels, groups, runs = hand_made_runs(seed_count=1)
    scored = unseen_scores.score_set(labels, ["p", "q"], groups,
                                {"old": runs["old"], "same": runs["old"]}, "old", replicates=100)
    difference = scored["differences"]["same - old"]["macro_average_precision"]
    assert difference["value"] == 0 and difference["interval"] == [0.0, 0.0]
    assert scored["configs"]["old"]["macro_average_precision"]["seed_sd"] is None


def test_results_file_markdown_and_json(tmp_path):
    import datetime
    labels, groups, runs = hand_made_runs()
    labels[:, 1] = 0  # q has no unseen positive: no AP ('-' in the table, null in the JSON)
    scored = unseen_scores.score_set(labels, ["p", "q"], groups, runs, "old", replicates=100)
    results = {"configs": {"old": {"flags": "--dropout 0.2", "baseline": True,
                                   "differs_from_baseline": {}},
                           "new": {"flags": "", "baseline": False,
                                   "differs_from_baseline": {"--image-size": 320}}},
               "seeds": [0, 1], "quick": False, "weights": "none", "replicates": 100,
               "sets": {"frames-multi": {"description": "hand-made", "group_name": "shots",
                                         "runs_finished": ["2026-01-01T10:00", "2026-01-01T11:00"],
                                         **scored}},
               "header": measurements.header("Accuracy", datetime.datetime.now(), None)}
    markdown, twin = measurements.write(tmp_path / "docs" / "accuracy.md",
                                        accuracy.report_markdown(results), results)
    text = markdown.read_text()
    for expected in ("# Accuracy", "- Command: `", "- Commit: ", "- Machine: ", "## frames-multi",
                     "Unseen: 120 images in 40 shots; positives: p ", "| new - old | ",
                     "differs from the baseline in --image-size 320", "| **old** | mean of 2, sd ",
                     "Runs finished from 2026-01-01T10:00 to 2026-01-01T11:00 (UTC)."):
        assert expected in text, expected
    assert "| q | " in text and " - |" in text
    stored = json.loads(twin.read_text())
    new = stored["sets"]["frames-multi"]["configs"]["new"]
    assert new["symbols"]["q"]["average_precision"]["value"] is None
    assert new["macro_average_precision"]["value"] == new["symbols"]["p"]["average_precision"]["value"]
    assert stored["header"]["machine"]["cpu_cores"] >= 1


def test_a_stored_run_with_the_same_settings_is_reused(tmp_path, monkeypatch):
    args = argparse.Namespace(work=str(tmp_path), quick=True, weights="none", n_frames=160,
                              n_unseen=80, gtsrb_positive="^speed_limit",
                              frames_python=sys.executable)
    data = argparse.Namespace(name="frames-multi")
    directory = accuracy.run_directory(args, "frames-multi", "old", 0)
    directory.mkdir(parents=True)
    np.save(directory / "unseen_probabilities.npy", np.zeros((3, 2)))
    key = accuracy.run_key(args, "frames-multi", "--dropout 0.2", 0)
    (directory / "run.json").write_text(json.dumps({"key": key, "seconds": 5.0}))
    # The same settings: read back, no training process is started.
    assert accuracy.run_job(args, data, "old", "--dropout 0.2", 0)["seconds"] == 5.0
    assert accuracy.run_key(args, "frames-multi", "--dropout 0.3", 0) != key
    # The key holds what the flags resolve to: no flags means today's defaults, so a run
    # stored under other defaults (the same empty flag string) is trained again.
    defaults = accuracy.run_key(args, "frames-multi", "", 0)["settings"]
    assert defaults["fine_tune_schedule"] == repr(settings.TrainingConfig().fine_tune_schedule)
    stale = {**key, "settings": {**key["settings"], "fine_tune_schedule": "'constant-then'"}}
    (directory / "run.json").write_text(json.dumps({"key": stale, "seconds": 5.0}))
    monkeypatch.setattr(accuracy.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("trains again")))
    with pytest.raises(RuntimeError, match="trains again"):
        accuracy.run_job(args, data, "old", "--dropout 0.2", 0)


def test_synthetic_runs_of_other_frame_counts_are_stored_apart():
    small = argparse.Namespace(work="w", n_frames=600, n_unseen=300)
    large = argparse.Namespace(work="w", n_frames=1200, n_unseen=300)
    assert accuracy.run_directory(small, "frames-multi", "new", 0) != \
        accuracy.run_directory(large, "frames-multi", "new", 0)
    assert accuracy.run_directory(small, "adidas", "new", 0) == \
        accuracy.run_directory(large, "adidas", "new", 0)


def test_a_run_stored_before_a_setting_existed_matches_that_setting_at_its_default():
    args = argparse.Namespace(work="unused", quick=True, weights="none", n_frames=160,
                              n_unseen=80, gtsrb_positive="^speed_limit")
    key = accuracy.run_key(args, "frames-multi", "", 0)
    older = {**key, "settings": {k: v for k, v in key["settings"].items() if k != "focal_gamma"}}
    assert accuracy.same_run(older, key)
    assert not accuracy.same_run(older, accuracy.run_key(args, "frames-multi", "--focal-gamma 2", 0))
    # A setting the stored run had and this checkout lacks, or another value, is another run.
    assert not accuracy.same_run({**key, "settings": {**key["settings"], "gone": "1"}}, key)
    assert not accuracy.same_run({**older, "seed": 1}, key)
    assert not accuracy.same_run(None, key)


def test_one_run_trains_through_the_library_and_scores_unseen_frames(tmp_path, monkeypatch):
    from symbol_trainer import labels_csv
    train_table = write_two_symbol_frames(tmp_path / "train", 32, 4, seed=0)
    train_table.to_csv(tmp_path / "train.csv", index=False)
    test_table = write_two_symbol_frames(tmp_path / "test", 12, 3, seed=1)
    symbols = ["red_square", "blue_circle"]
    train = labels_csv.images_from_csv(tmp_path / "train", tmp_path / "train.csv")
    data = accuracy.DataSet("tiny", "tiny", train,
                            [str(tmp_path / "test" / f) for f in test_table["filename"]],
                            test_table[[f"{s}_visible" for s in symbols]].to_numpy(),
                            test_table["episode"].astype(str).to_numpy(), "episode", "episodes")
    monkeypatch.setitem(accuracy.LOADERS, "tiny", lambda args: data)
    args = argparse.Namespace(
        job_set="tiny", job_seed=3, job_dir=str(tmp_path / "run"), weights="none", quick=False,
        job_flags="--alpha 0.35 --image-size 32 --epochs 2 --fine-tune-epochs 0 --batch-size 8")
    run = accuracy.train_and_score(args)
    probabilities = np.load(tmp_path / "run" / "unseen_probabilities.npy")
    assert probabilities.shape == (12, 2) and np.all((probabilities >= 0) & (probabilities <= 1))
    assert run["input"]["height"] == 32 and run["train_images"] + run["validation_images"] == 32
    assert 0 <= run["validation_macro_ap"] <= 1 and run["seconds"] > 0
    assert run["backend"]["keras_backend"] == "tensorflow"
    assert not (tmp_path / "run" / "model").exists()
    scored = unseen_scores.score_set(data.test_labels, symbols, data.test_groups,
                                {"only": [{**run, "seed": 3, "probabilities": probabilities}]},
                                "only", replicates=50)
    assert 0 <= scored["configs"]["only"]["macro_roc_auc"]["value"] <= 1
