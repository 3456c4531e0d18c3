#!/usr/bin/env python3
"""Accuracy on groups training never saw: named training configurations, compared per data set.

Each configuration is a named string of training flags (`--config NAME="FLAGS"`), read by the
training scripts' own parser (settings.add_training_arguments, then settings.config_from_args),
so any flag of TrainingConfig works, including flags added after this script was written. The
default pair:
  old  the settings of the last release, written out (OLD_RELEASE_FLAGS), so that they stay
       fixed when the defaults change;
  new  today's defaults (no flags).
The first configuration is the baseline every other one is compared with.

Data sets (--sets), each split into training groups and unseen groups:
  frames-multi   make_symbol_frames.py --layout multi: training on --n-frames frames from
                 backgrounds set a, split by episode; unseen: --n-unseen frames from
                 backgrounds set b (other photographs), resampled by shot (4 near-identical
                 frames; the tool draws each shot independently, an episode is 10 of them).
  frames-binary  the same with --layout binary --symbols star (folders with_star and
                 without_star; episodes from the file names, ep(\\d+)_).
  adidas         ../shared/data/adidas_puma_logos, grouped by source_image (splits.csv; 3
                 augmented copies per photo): a seeded quarter of the photos is unseen.
  gtsrb          ../shared/data/gtsrb_subset as one binary symbol (--gtsrb-positive, a regular
                 expression on the class names; default the speed-limit signs, 8 classes, since
                 one class alone has only 3 tracks), grouped by track: the last track of every
                 class is unseen.
  logodet        ../shared/data/logodet3k_clothes (45 brands; larger): the pictures of its own
                 test split are unseen, with their exact copies and look-alikes from the other
                 splits (most test images are copies of training images); grouped by
                 look-alike cluster.
The synthetic frames are generated into --work when missing, by running the tool with
--frames-python (it needs numpy, pillow, scikit-learn and scikit-image).

For every set x configuration x seed, one training run (a fresh process; the seed is
TrainingConfig.seed, so it changes the validation split, the initialisation and the batch
order; the unseen groups stay the same) is scored on the unseen groups: macro and per-symbol
average precision and ROC-AUC with 95 % bootstrap intervals resampling whole unseen groups,
the validation macro AP the run itself reported (metrics.json), the gap (validation - unseen)
and the training time. Across seeds: the mean, and each configuration minus the baseline,
paired (same resamples, same seeds) with its interval. The results go to --output (markdown,
with the same name .json beside it). Runs already in --work with the same settings are reused:
delete the folder (or the run's) to train again.

    python bench/accuracy.py --quick                       # smoke run, a minute or two
    python bench/accuracy.py --sets frames-multi --n-frames 600 --n-unseen 300 --seeds 0,1
    python bench/accuracy.py --config old="" --config max="--pooling max --image-size 320"
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import measurements  # noqa: E402
from symbol_trainer import settings  # noqa: E402
from train_speed import SHARED  # noqa: E402
from unseen_scores import BOOTSTRAP_REPLICATES, METRICS, score_set  # noqa: E402

DATA = SHARED / "data"
FRAMES_TOOL = SHARED / "tools" / "make_symbol_frames.py"
WEIGHTS_1_0 = SHARED / "weights" / "mobilenet_v2_1.0_no_top_imagenet_dequantized.h5"
WEIGHTS_0_35 = SHARED / "weights" / "mobilenet_v2_0.35_no_top_imagenet.weights.h5"

# The training defaults of the last release (the version before issue 25), written out so
# that "old" stays what it was when TrainingConfig's defaults change. --flip was off.
OLD_RELEASE_FLAGS = (
    "--backbone mobilenet_v2 --alpha 1.0 --image-size 224 --resize letterbox --batch-size 32 "
    "--epochs 100 --fine-tune-epochs 5 --learning-rate 0.003 --fine-tune-learning-rate 0.0001 "
    "--fine-tune-fraction 0.3 --augment default --dropout 0.2 --patience 5 "
    "--fine-tune-patience 2 --positive-weighting balanced --validation-split 0.2 "
    "--threshold-for f1")
# Settings that the last release did not have as flags, with the value that reproduces it;
# added to OLD_RELEASE_FLAGS only where this checkout's parser knows the flag.
OLD_RELEASE_LATER_FLAGS = {"--pooling": "avg", "--fine-tune-schedule": "constant"}
DEFAULT_CONFIGS = {"old": OLD_RELEASE_FLAGS, "new": ""}
# --quick: a tiny backbone on tiny inputs, few epochs; appended after each configuration's
# flags, so they win (a smoke run of the script, not a measurement).
QUICK_FLAGS = ["--alpha", "0.35", "--image-size", "64", "--epochs", "4",
               "--fine-tune-epochs", "1", "--batch-size", "16"]
SETS = ("frames-multi", "frames-binary", "adidas", "gtsrb", "logodet")


# ---------------------------------------------------------------------------------------------
# Configurations


class ConfigError(ValueError):
    pass


class _FlagParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def flag_parser() -> argparse.ArgumentParser:
    parser = _FlagParser(prog="--config", add_help=False)
    settings.add_training_arguments(parser)
    return parser


def known_flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def config_flags(flags: str) -> str:
    """The flags of a configuration as they will be parsed: OLD_RELEASE_FLAGS gains the later
    flags that reproduce the last release, where this checkout knows them."""
    if flags != OLD_RELEASE_FLAGS:
        return flags
    known = known_flags(flag_parser())
    extra = [f"{flag} {value}" for flag, value in OLD_RELEASE_LATER_FLAGS.items() if flag in known]
    return " ".join([flags, *extra])


def training_config(flags: str, *, weights: str, seed: int, group_by: str | None = None,
                    quick: bool = False) -> settings.TrainingConfig:
    """The TrainingConfig of a configuration's flag string (shell quoting), with the
    benchmark's weights and group column as defaults the flags may override, and the seed
    always the benchmark's. Raises ConfigError (unknown flag, bad value) or InputError."""
    parser = flag_parser()
    parser.set_defaults(weights=weights, group_by=group_by)
    tokens = shlex.split(config_flags(flags)) + (QUICK_FLAGS if quick else [])
    parsed = parser.parse_args(tokens)
    parsed.seed = seed
    return settings.config_from_args(parsed)


def parse_config_option(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{text!r}: write NAME=FLAGS, e.g. new=\"--image-size 320\"")
    return name, flags


def differing_settings(config: settings.TrainingConfig,
                       baseline: settings.TrainingConfig) -> dict:
    """The settings (by flag) where `config` differs from `baseline`, as {flag: value}."""
    return {settings.flag_of(f.name): getattr(config, f.name)
            for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(baseline, f.name)}


# ---------------------------------------------------------------------------------------------
# Data sets: training images and unseen test images with their groups


@dataclasses.dataclass
class DataSet:
    name: str
    description: str
    train: object               # labelled_images.LabelledImages
    test_paths: list[str]
    test_labels: np.ndarray     # frames x symbols, 0/1
    test_groups: np.ndarray     # what the bootstrap resamples
    group_by: str | None        # the training split's grouping (TrainingConfig.group_by)
    group_name: str


def frames_folder(args, layout: str, backgrounds: str, n: int) -> Path:
    """A make_symbol_frames.py output in --work, generated on first use."""
    seed = {"a": 0, "b": 1}[backgrounds]
    folder = Path(args.work) / "frames" / f"{layout}_{backgrounds}_{n}_seed{seed}"
    done = folder / "complete.txt"
    if done.is_file():
        return folder
    if not FRAMES_TOOL.is_file():
        raise SystemExit(f"frames sets need {FRAMES_TOOL} (../shared is absent)")
    shutil.rmtree(folder, ignore_errors=True)
    command = [args.frames_python, str(FRAMES_TOOL), str(folder), "--layout", layout,
               "--n", str(n), "--backgrounds", backgrounds, "--seed", str(seed)]
    if layout == "binary":
        command += ["--symbols", "star"]
    print(f"Generating {n} frames: {shlex.join(command)}", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"make_symbol_frames.py failed (exit {completed.returncode}); with "
                         f"--frames-python {args.frames_python}, which needs numpy, pillow, "
                         f"scikit-learn and scikit-image:\n{completed.stderr[-2000:]}")
    done.write_text(shlex.join(command) + "\n")
    return folder


EPISODE_IN_NAME = r"ep(\d+)_"
SHOT_IN_NAME = r"_shot(\d+)_"


def load_frames(args, layout: str) -> DataSet:
    from symbol_trainer import image_folders, labels_csv
    train_dir = frames_folder(args, layout, "a", args.n_frames)
    test_dir = frames_folder(args, layout, "b", args.n_unseen)
    if layout == "multi":
        train = labels_csv.images_from_csv(train_dir / "images", train_dir / "labels.csv",
                                       group_by="episode")
        test = labels_csv.images_from_csv(test_dir / "images", test_dir / "labels.csv").table
        group_by = "episode"
    else:
        train = image_folders.images_from_directories(train_dir / "with_star", train_dir / "without_star",
                                               "star")
        test = image_folders.images_from_directories(test_dir / "with_star", test_dir / "without_star",
                                              "star").table
        group_by = EPISODE_IN_NAME
    # The generator draws every shot (background crop, symbols, distractors) independently;
    # an episode is only ten shots in a row. So the unseen frames are resampled by shot.
    groups = test["path"].map(lambda p: re.search(SHOT_IN_NAME, Path(p).name).group(1)).to_numpy()
    return DataSet(f"frames-{layout}",
                   f"make_symbol_frames.py --layout {layout}: {len(train.table):,} training "
                   f"frames (backgrounds a), {len(test):,} unseen frames (backgrounds b)",
                   train, test["path"].tolist(), test[train.symbols].to_numpy(),
                   groups, group_by, "shots")


def held_out(images, unseen: np.ndarray, name: str, description: str, group_column: str,
             group_by: str | None, group_name: str) -> DataSet:
    from symbol_trainer import labelled_images
    table = images.table
    train = labelled_images.LabelledImages(table[~unseen].reset_index(drop=True), images.symbols,
                                  images.source)
    test = table[unseen]
    return DataSet(name, description, train, test["path"].tolist(),
                   test[images.symbols].to_numpy(), test[group_column].astype(str).to_numpy(),
                   group_by, group_name)


def load_adidas(args) -> DataSet:
    from symbol_trainer import labels_csv
    base = DATA / "adidas_puma_logos"
    images = labels_csv.images_from_csv(base / "images", base / "labels.csv",
                                    group_by="source_image", groups_csv=base / "splits.csv")
    photos = np.random.default_rng(0).permutation(sorted(set(images.table["source_image"])))
    unseen_photos = set(photos[: round(len(photos) / 4)])
    unseen = images.table["source_image"].isin(unseen_photos).to_numpy()
    return held_out(images, unseen, "adidas",
                    f"adidas_puma_logos: {len(photos) - len(unseen_photos)} photos to train on, "
                    f"{len(unseen_photos)} unseen (a seeded quarter); photos of its original "
                    "training split come in 3 augmented copies, the others in one",
                    "source_image", "source_image", "photos")


def load_gtsrb(args) -> DataSet:
    import pandas as pd

    from symbol_trainer import labels_csv
    base = DATA / "gtsrb_subset"
    splits = pd.read_csv(base / "splits.csv", dtype={"track_id": str})
    symbol = re.sub(r"\W+", "_", args.gtsrb_positive).strip("_").lower() or "positive"
    positive = splits["class_name"].str.contains(args.gtsrb_positive, regex=True)
    if not positive.any() or positive.all():
        raise SystemExit(f"--gtsrb-positive {args.gtsrb_positive!r} must match some classes, "
                         "not all")
    labels = pd.DataFrame({"filename": splits["filename"], "track": splits["track_id"],
                           f"{symbol}_visible": positive.astype(int)})
    csv_path = Path(args.work) / "gtsrb_labels.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    labels.to_csv(csv_path, index=False)
    images = labels_csv.images_from_csv(base / "images", csv_path, group_by="track")
    last_track = splits.groupby("class_id")["track_id"].transform("max")
    unseen = (splits["track_id"] == last_track).to_numpy()
    classes = sorted(set(splits.loc[positive, "class_name"]))
    return held_out(images, unseen, "gtsrb",
                    f"gtsrb_subset, {symbol} = {len(classes)} classes ({', '.join(classes)}) "
                    "against the other classes; the last of each class's 3 tracks unseen",
                    "track", "track", "tracks")


def picture_clusters(sha1: list[str], looks: list[int], max_bits: int) -> np.ndarray:
    """A cluster number per image: images with the same content, or perceptual hashes within
    `max_bits` of each other (directly or through a chain of such images), share one."""
    parent = list(range(len(sha1)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    first_of: dict[str, int] = {}
    for i, digest in enumerate(sha1):
        join(i, first_of.setdefault(digest, i))
    hashes = np.array([int(h) for h in looks], dtype=np.uint64)
    for start in range(0, len(hashes), 512):
        close = np.bitwise_count(hashes[start:start + 512, None] ^ hashes[None, :]) <= max_bits
        for i, j in zip(*np.nonzero(close)):
            join(start + int(i), int(j))
    roots = [root(i) for i in range(len(sha1))]
    return np.unique(roots, return_inverse=True)[1]


def load_logodet(args) -> DataSet:
    """The original test split's pictures are unseen; its copies are not. 530 of the 637 test
    images are byte-identical copies of training or validation images, and 54 more are within
    4 bits of one (perceptual hash): scored as they come, "unseen" would mostly be seen. So
    images are clustered by content and look (`picture_clusters`); every cluster holding a
    test image is unseen, with each picture once; the rest trains, grouped by cluster."""
    import pandas as pd

    from symbol_trainer import images as image_files
    from symbol_trainer import labels_csv
    from symbol_trainer.splitting import NEAR_DUPLICATE_BITS
    base = DATA / "logodet3k_clothes"
    csv_path = Path(args.work) / f"logodet_pictures_{NEAR_DUPLICATE_BITS}bits.csv"
    if not csv_path.is_file():
        labels = pd.read_csv(base / "labels.csv")
        original = pd.read_csv(base / "splits.csv").set_index("filename")["original_split"]
        scan = image_files.scan_images([base / "images" / f for f in labels["filename"]])
        if scan.errors:
            raise SystemExit(f"logodet: unreadable images: {scan.errors[:3]}")
        clusters = picture_clusters(scan.sha1, scan.look, NEAR_DUPLICATE_BITS)
        is_test = (labels["filename"].map(original) == "test").to_numpy()
        unseen = np.isin(clusters, clusters[is_test])
        repeated = pd.Series(scan.sha1).duplicated().to_numpy()
        labels.insert(1, "picture", clusters)
        labels.insert(2, "unseen", unseen.astype(int))
        kept = labels[~(unseen & repeated)]
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        kept.to_csv(csv_path.with_suffix(".tmp"), index=False)
        csv_path.with_suffix(".tmp").replace(csv_path)
    table = pd.read_csv(csv_path)
    images = labels_csv.images_from_csv(base / "images", csv_path, group_by="picture")
    unseen = images.table["filename"].map(dict(zip(table["filename"], table["unseen"])))
    unseen = unseen.astype(bool).to_numpy()
    return held_out(images, unseen, "logodet",
                    f"logodet3k_clothes: the pictures of its own test split unseen, each once "
                    f"({unseen.sum():,} images in {images.table.loc[unseen, 'picture'].nunique():,} "
                    f"look-alike clusters), with their copies and look-alikes from the other "
                    f"splits; {(~unseen).sum():,} images to train on, grouped by cluster",
                    "picture", "picture", "picture clusters")


LOADERS = {"frames-multi": lambda args: load_frames(args, "multi"),
           "frames-binary": lambda args: load_frames(args, "binary"),
           "adidas": load_adidas, "gtsrb": load_gtsrb, "logodet": load_logodet}


# ---------------------------------------------------------------------------------------------
# One training run (a process of its own)


def run_directory(args, set_name: str, config_name: str, seed: int) -> Path:
    """Where one run is stored. Synthetic sets' runs sit in a folder of their frame counts,
    so that runs on 600 frames and on 1,200 both stay (one replaced the other before)."""
    folder = set_name
    if set_name.startswith("frames-"):
        folder = f"{set_name}_{args.n_frames}x{args.n_unseen}"
    return Path(args.work) / "runs" / folder / f"{config_name}_seed{seed}"


def run_key(args, set_name: str, flags: str, seed: int, group_by: str | None = None) -> dict:
    """What a stored run must match to be reused: the flags as written and every setting they
    resolve to, so that a run stored before a default changed is not taken for one of the new
    default (an empty flag string once meant the old defaults)."""
    config = training_config(flags, weights=args.weights, seed=seed, group_by=group_by,
                             quick=args.quick)
    return {"set": set_name, "flags": config_flags(flags), "seed": seed, "quick": args.quick,
            "weights": args.weights, "n_frames": args.n_frames, "n_unseen": args.n_unseen,
            "gtsrb_positive": args.gtsrb_positive,
            "settings": {f.name: repr(getattr(config, f.name))
                         for f in dataclasses.fields(config)}}


def same_run(stored: dict | None, key: dict) -> bool:
    """Whether a stored run's key is `key`. A setting the stored key lacks was added to
    TrainingConfig after that run; it matches when `key` has it at its default, since every
    setting is added with a default that reproduces the behaviour before it (--pooling avg,
    --focal-gamma 0)."""
    if not stored or set(stored) != set(key) or not set(stored["settings"]) <= set(key["settings"]):
        return stored == key
    defaults = settings.TrainingConfig()
    filled = {name: stored["settings"].get(name, repr(getattr(defaults, name)))
              for name in key["settings"]}
    return {**stored, "settings": filled} == key


def train_and_score(args) -> dict:
    """The --job process: train one configuration on one set with one seed, predict the unseen
    images, store the probabilities, and return what the parent reports."""
    from symbol_trainer import image_predictions, model_dir, pipeline
    from symbol_trainer.command import configure_logging
    configure_logging(quiet=True)
    data = LOADERS[args.job_set](args)
    flags = args.job_flags
    config = training_config(flags, weights=args.weights, seed=args.job_seed,
                             group_by=data.group_by, quick=args.quick)
    directory = Path(args.job_dir)
    directory.mkdir(parents=True, exist_ok=True)
    result = pipeline.train_and_save(data.train, config, directory / "model", overwrite=True,
                                   resume=False)
    loaded = model_dir.load_model_dir(directory / "model")
    predicted = image_predictions.predict_images(loaded, data.test_paths)
    probabilities = predicted[[f"{s}_probability" for s in data.train.symbols]].to_numpy()
    np.save(directory / "unseen_probabilities.npy", probabilities)
    shutil.rmtree(directory / "model")  # the probabilities are what the report needs
    return {"validation_macro_ap": result.metrics["macro"]["average_precision"],
            "validation_images": result.counts["validation"]["images"],
            "train_images": result.counts["train"]["images"],
            "seconds": result.seconds, "phase_seconds": result.phase_seconds,
            "input": loaded.metadata["input"], "backend": measurements.backend_description()}


def run_job(args, data: DataSet, config_name: str, flags: str, seed: int) -> dict:
    """The stored run of this set, configuration and seed, training it in a fresh process
    (python bench/accuracy.py --job ...) unless --work holds it with the same settings."""
    directory = run_directory(args, data.name, config_name, seed)
    key = run_key(args, data.name, flags, seed, getattr(data, "group_by", None))
    stored = directory / "run.json"
    if stored.is_file() and (directory / "unseen_probabilities.npy").is_file():
        run = json.loads(stored.read_text())
        if same_run(run.get("key"), key):
            print(f"  {data.name} {config_name} seed {seed}: reused {stored}", flush=True)
            return run
    shutil.rmtree(directory, ignore_errors=True)
    command = [sys.executable, __file__, "--job-set", data.name, "--job-flags=" + flags,
               "--job-seed", str(seed), "--job-dir", str(directory), "--work", args.work,
               "--weights", args.weights, "--n-frames", str(args.n_frames),
               "--n-unseen", str(args.n_unseen), "--gtsrb-positive", args.gtsrb_positive,
               "--frames-python", args.frames_python] + (["--quick"] if args.quick else [])
    started = time.monotonic()
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{data.name} {config_name} seed {seed} failed with exit code "
                         f"{completed.returncode}")
    run = {"key": key, **json.loads(completed.stdout.strip().splitlines()[-1])}
    run["process_seconds"] = time.monotonic() - started
    stored.write_text(json.dumps(measurements.finite(run), indent=1))
    print(f"  {data.name} {config_name} seed {seed}: validation AP "
          f"{run['validation_macro_ap']:.3f}, {run['seconds']:.0f} s", flush=True)
    return run


# ---------------------------------------------------------------------------------------------
# The results file


def cell(entry: dict | None, signed: bool = False) -> str:
    """'0.812 (0.75-0.87)' from {'value', 'interval'}; '-' for a missing value."""
    if not entry or entry.get("value") is None or not np.isfinite(entry["value"]):
        return "-"
    value = f"{entry['value']:+.3f}" if signed else f"{entry['value']:.3f}"
    low_high = entry.get("interval")
    if not low_high:
        return value
    form = "{:+.3f}" if signed else "{:.3f}"
    return f"{value} ({form.format(low_high[0])} to {form.format(low_high[1])})"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def set_markdown(name: str, description: str, scored: dict) -> list[str]:
    lines = [f"## {name}", "", description + ".",
             f"Unseen: {scored['unseen_frames']:,} images in {scored['unseen_groups']:,} "
             f"{scored['group_name']}; positives: "
             + ", ".join(f"{s} {n:,}" for s, n in scored["unseen_positives"].items()) + "."]
    if scored.get("runs_finished"):
        lines.append("Runs finished from {} to {} (UTC).".format(*scored["runs_finished"]))
    lines.append("")
    rows = [[r["config"], str(r["seed"]), f"{r['validation_macro_ap']:.3f}",
             cell(r["macro_average_precision"]), cell(r["macro_roc_auc"]), f"{r['gap']:+.3f}",
             f"{r['seconds']:,.0f}"] for r in scored["runs"]]
    for config, c in scored["configs"].items():
        sd = c["macro_average_precision"]["seed_sd"]
        rows.append([f"**{config}**", f"mean of {c['seeds']}" + (f", sd {sd:.3f}" if sd else ""),
                     f"{c['validation_macro_ap']:.3f}", cell(c["macro_average_precision"]),
                     cell(c["macro_roc_auc"]), f"{c['gap']:+.3f}", f"{c['seconds']:,.0f}"])
    lines += table(["configuration", "seed", "validation AP", "unseen macro AP (95 %)",
                    "unseen macro ROC-AUC (95 %)", "gap", "training, s"], rows)
    lines += ["", "Per symbol, mean over seeds (95 % intervals):", ""]
    configs = list(scored["configs"])
    lines += table(["symbol"] + [f"{c} {m}" for c in configs for m in ("AP", "ROC-AUC")],
                   [[s] + [cell(scored["configs"][c]["symbols"][s][m]) for c in configs
                           for m in METRICS] for s in scored["symbols"]])
    if scored["differences"]:
        lines += ["", "Paired differences (same seeds, same resamples; mean over seeds):", ""]
        lines += table(["comparison", "macro AP (95 %)", "macro ROC-AUC (95 %)",
                        "macro AP per seed", "training time ratio"],
                       [[comparison, cell(d["macro_average_precision"], True),
                         cell(d["macro_roc_auc"], True),
                         ", ".join(cell({"value": p["value"]}, True)
                                   for p in d["macro_average_precision"]["per_seed"]),
                         f"{d['seconds_ratio']:.2f}x"]
                        for comparison, d in scored["differences"].items()])
    return lines + [""]


def report_markdown(results: dict) -> str:
    lines = [measurements.header_markdown(results["header"])]
    lines += ["Configurations (the first is the baseline; flags as parsed, after the "
              "benchmark's defaults: --weights " + f"`{results['weights']}`" + ", --seed from "
              "--seeds, --group-by per data set" + (", then --quick's flags" if results["quick"]
                                                    else "") + "):", ""]
    for name, c in results["configs"].items():
        changed = ", ".join(f"{k} {v}" for k, v in c["differs_from_baseline"].items())
        flags = c["flags"] or "(no flags: today's defaults)"
        lines.append(f"- **{name}**: `{flags}`"
                     + (f"; differs from the baseline in {changed}" if changed else
                        "; the same settings as the baseline" if c["baseline"] is False else ""))
    lines += ["", f"Seeds: {', '.join(map(str, results['seeds']))}. Intervals: 95 %, "
              f"{results['replicates']:,} bootstrap resamples of whole unseen groups, the same "
              "resamples for every run of a set. Validation AP: the macro average precision the "
              "run reported on its own validation split (metrics.json); unseen: the saved model "
              "(model_dir.load_model_dir, image_predictions.predict_images) on groups training never saw; gap: "
              "validation AP - unseen macro AP; training, s: pipeline.train_and_save's wall time.",
              ""]
    for name, s in results["sets"].items():
        lines += set_markdown(name, s["description"], s)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], metavar='NAME="FLAGS"',
                        help="A configuration: a name and training flags (shell quoting), "
                             "e.g. new=\"--image-size 320\"; repeat for several, the first is "
                             "the baseline. Default: old (the last release's settings, "
                             "written out) and new (today's defaults).")
    parser.add_argument("--sets", default="frames-multi,frames-binary,adidas,gtsrb",
                        help=f"Comma-separated data sets from {', '.join(SETS)}. "
                             "Default: %(default)s.")
    parser.add_argument("--seeds", default="0,1,2", help="Training seeds. Default: %(default)s.")
    parser.add_argument("--n-frames", type=int,
                        help="Synthetic training frames (backgrounds a). Default: 1200; "
                             "160 with --quick.")
    parser.add_argument("--n-unseen", type=int,
                        help="Synthetic unseen frames (backgrounds b). Default: half of "
                             "--n-frames.")
    parser.add_argument("--gtsrb-positive", default="^speed_limit",
                        help="Regular expression on GTSRB class names: the classes that are "
                             "the symbol. Default: %(default)s.")
    parser.add_argument("--work", default="/tmp/accuracy_bench",
                        help="Folder for generated frames and runs. Default: %(default)s.")
    parser.add_argument("--weights",
                        help=f"Backbone weights of every run unless a configuration sets "
                             f"--weights. Default: {WEIGHTS_1_0} if present, else imagenet; with "
                             f"--quick, {WEIGHTS_0_35} if present, else none.")
    parser.add_argument("--frames-python", default=sys.executable,
                        help="Python that runs make_symbol_frames.py (needs numpy, pillow, "
                             "scikit-learn, scikit-image). Default: this one.")
    parser.add_argument("--quick", action="store_true",
                        help="A smoke run: tiny sizes (" + " ".join(QUICK_FLAGS) + " after "
                             "each configuration's flags), seed 0, 200 resamples; not a "
                             "measurement.")
    parser.add_argument("--replicates", type=int, help="Bootstrap resamples. Default: 1000.")
    parser.add_argument("--output", default=str(ROOT / "docs" / "measurements" / "accuracy.md"),
                        help="Results file (markdown; the JSON goes beside it). "
                             "Default: docs/measurements/accuracy.md.")
    for hidden in ("--job-set", "--job-flags", "--job-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--job-seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.quick and not any(a.split("=")[0] == "--seeds" for a in given):
        args.seeds = "0"
    args.n_frames = args.n_frames or (160 if args.quick else 1200)
    args.n_unseen = args.n_unseen or max(40, args.n_frames // 2)
    args.replicates = args.replicates or (200 if args.quick else BOOTSTRAP_REPLICATES)
    if args.weights is None:
        preferred, fallback = (WEIGHTS_0_35, "none") if args.quick else (WEIGHTS_1_0, "imagenet")
        args.weights = str(preferred) if preferred.is_file() else fallback
    if args.job_set:
        return parser, args
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: whole numbers separated by commas")
    args.set_list = [s for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(args.set_list) - set(SETS))
    if unknown or not args.set_list or not args.seed_list:
        parser.error(f"--sets: choose from {', '.join(SETS)}; --seeds: at least one")
    try:
        args.configs = dict(parse_config_option(c) for c in args.config) or dict(DEFAULT_CONFIGS)
        for name, flags in args.configs.items():
            training_config(flags, weights=args.weights, seed=0, quick=args.quick)
    except ConfigError as error:
        parser.error(f"--config {error}")
    except settings.InputError as error:
        parser.error(f"--config {name}: {error}")
    return parser, args


def config_summary(args) -> dict:
    parsed = {name: training_config(flags, weights=args.weights, seed=0, quick=args.quick)
              for name, flags in args.configs.items()}
    baseline = next(iter(parsed.values()))
    return {name: {"flags": config_flags(args.configs[name]),
                   "baseline": index == 0,
                   "differs_from_baseline": differing_settings(parsed[name], baseline)}
            for index, name in enumerate(parsed)}


def main(argv=None) -> int:
    parser, args = parse_arguments(argv)
    if args.job_set:
        print(json.dumps(measurements.finite(train_and_score(args))))
        return 0
    started = datetime.datetime.now(datetime.timezone.utc)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    from symbol_trainer.command import configure_logging
    configure_logging(quiet=True)
    results = {"configs": config_summary(args), "seeds": args.seed_list, "quick": args.quick,
               "weights": args.weights, "replicates": args.replicates, "sets": {}}
    # The commit and date of this command; runs reused from --work say when they finished.
    facts = measurements.header("Accuracy on unseen groups (bench/accuracy.py)", started, None)
    backend = None
    for set_name in args.set_list:
        print(f"{set_name}:", flush=True)
        data = LOADERS[set_name](args)
        runs = {name: [] for name in args.configs}
        for seed in args.seed_list:  # seed-major: an interrupted run leaves whole seeds
            for config_name, flags in args.configs.items():
                run = run_job(args, data, config_name, flags, seed)
                backend = backend or run.get("backend")
                directory = run_directory(args, set_name, config_name, seed)
                runs[config_name].append({**run, "seed": seed, "probabilities": np.load(
                    directory / "unseen_probabilities.npy")})
        finished = sorted(datetime.datetime.fromtimestamp(
            (run_directory(args, set_name, c, seed) / "run.json").stat().st_mtime,
            datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
            for c in args.configs for seed in args.seed_list)
        scored = score_set(data.test_labels, data.train.symbols, data.test_groups, runs,
                           next(iter(args.configs)), args.replicates)
        results["sets"][set_name] = {"description": data.description,
                                     "group_name": data.group_name,
                                     "runs_finished": [finished[0], finished[-1]], **scored}
        # Written after every set, so that a long run leaves its finished sets behind.
        results["header"] = {**facts, "backend": backend or {}}
        markdown, json_path = measurements.write(args.output, report_markdown(results), results)
        print(f"  wrote {markdown} and {json_path}", flush=True)
    print(Path(args.output).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
