#!/usr/bin/env python3
"""What one machine can do, and what this tool gets of it: raw rates against our own runs.

One prepared script for a GPU machine (issue 27: at most 8 minutes, under JAX, where
TensorFlow is not installed), which also runs on a CPU under TensorFlow or JAX (--quick).
At one shape (batch 128, 224x384 input, MobileNetV2 1.0 with random weights) it measures:

raw (the machine's ceilings, on in-memory batches, Keras's own compiled steps)
  - MobileNetV2 1.0 inference (the backbone and its pooling: the feature pass's model);
  - a fine-tuning step, top 30 % of the backbone trainable, BatchNorm frozen (this project's
    fused-head training model, as training.compiled_fine_tuning builds it), without and with
    this project's SymbolAugmentation (--augment default), and the same step of
    MobileNetV2 0.35;
  - JPEG decode + letterbox of 1280x720 and 1920x1080 frames with the tool's own decoder
    (images.load_image_array), with 1 and N threads and 1 and N processes (N: the usable
    cores; bench/decode_speed.py);
  - nvJPEG on the GPU through torchvision, where torchvision and a CUDA GPU are there;
ours (the programs' own entry points, on synthetic 1280x720 frames: 10,000 by default)
  - the training program (build_multi_hot_model.main: --weights none, --batch-size 128,
    --fine-tune-fraction 0.3), its feature pass and its fine-tuning phase timed from its
    log, metadata.json and history.csv;
  - predict.py (its main) on the folder of frames with the model it trained;
  - optionally the same feature pass and prediction with decoding processes instead of
    threads (decoding.POOL_KIND), when time is left.

Then it prints ours / raw against the targets of issue 27: fine-tuning >= 80 % of the raw
(augmented) step rate; feature pass and prediction >= 80 % of the machine's decode rate
(on a CPU, where the model and not the decoding is the bound, also against raw inference).

Every stage runs in a process of its own with a time limit and fails soft: a failed stage
is recorded as "failed: <its last error line>" and the others go on. The results file
(docs/measurements/gpu_bench_<machine>_<backend>.md and its .json twin, through
bench/measurements.py) is rewritten after every stage, and copied into $OUT when that is
set (the device tool brings back only $OUT), with the stages' logs.

    python bench/gpu.py                       # the GPU run: 10,000 frames, 8 minutes at most
    python bench/gpu.py --quick               # a CPU check: 400 frames, batch 32
    KERAS_BACKEND=jax python bench/gpu.py --quick --stages decode,raw

docs/gpu.md has the exact command for the device tool.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import decode_speed  # noqa: E402  (bench/decode_speed.py)
import measurements  # noqa: E402  (bench/measurements.py)

HEIGHT, WIDTH = 224, 384  # the tool's input for 16:9 frames at --image-size 224
SYMBOLS = ["star", "disc"]
TARGET = 0.80
STAGES = ["frames", "decode", "raw", "ours_train", "ours_predict", "nvjpeg",
          "ours_features_processes", "ours_predict_processes"]
# The most seconds each stage may take (scaled by --quick's smaller sizes is not needed:
# the time limit of the whole run, --budget, cuts every stage to what is left).
STAGE_LIMITS = {"frames": 120, "decode": 90, "raw": 200, "ours_train": 300, "ours_predict": 150,
                "nvjpeg": 60, "ours_features_processes": 150, "ours_predict_processes": 120}
RESULT_PREFIX = "RESULT "
MIN_STAGE_SECONDS = 15  # a stage with less of the budget left is skipped
SCRIPT = Path(__file__).resolve()  # what each stage's process runs


# ---------------------------------------------------------------------------------------------
# Stages (each runs in its own process: `--stage NAME`; prints RESULT lines of JSON)


def emit(**values) -> None:
    """One result line for the parent; a stage may print several, and each counts even if
    the stage dies later."""
    print(RESULT_PREFIX + json.dumps(values), flush=True)


def frame_dir(args) -> Path:
    return Path(args.work) / "frames"


def stage_decode(args) -> None:
    rates = decode_speed.decode_rates(Path(args.work) / "decode", args.decode_seconds,
                                      frames_per_size=64,
                                      log=lambda line: print(line, file=sys.stderr, flush=True))
    emit(decode=rates, usable_cores=decode_speed.usable_cores())


def timed_rate(step, batch: int, seconds: float, least: int = 3) -> float:
    """Images/s of `step` (one batch per call, each call synchronous), after two warm-up calls
    (compilation), over at least `seconds` and `least` calls."""
    step()
    step()
    count, start = 0, time.perf_counter()
    while count < least or time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * batch / (time.perf_counter() - start)


def stage_raw(args) -> None:
    """The model's ceilings on in-memory uint8 batches, each measured and emitted on its own
    (one that fails is recorded, the next still runs)."""
    import dataclasses

    from symbol_trainer import augmentation, training
    from symbol_trainer.backend import BACKEND, keras
    from symbol_trainer.images import ImageGeometry
    from symbol_trainer.model import build_model, unfreeze_top
    from symbol_trainer.settings import TrainingConfig
    emit(backend=measurements.backend_description())
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch = args.batch
    images = rng.integers(0, 256, (batch, HEIGHT, WIDTH, 3)).astype(np.uint8)
    targets = training.fused_targets(rng.integers(0, 2, (batch, len(SYMBOLS))).astype(np.float32),
                                     np.ones((batch, len(SYMBOLS)), np.float32))
    geometry = ImageGeometry(HEIGHT, WIDTH, "letterbox")
    base = TrainingConfig(weights="none", batch_size=batch, fine_tune_fraction=0.3,
                          fine_tune_schedule="constant")

    def inference(alpha: float):
        parts = build_model(SYMBOLS, dataclasses.replace(base, alpha=alpha), geometry)
        return lambda: parts.features.predict_on_batch(images)

    def fine_tuning_step(alpha: float, augment: str):
        config = dataclasses.replace(base, alpha=alpha, augment=augment)
        parts = build_model(SYMBOLS, config, geometry)
        unfreeze_top(parts.backbone, config.fine_tune_fraction)
        model = training.training_model(parts, training.fused_head(parts, SYMBOLS, config.dropout),
                                        config)
        # As training.compiled_fine_tuning compiles it: under TensorFlow, 'auto' leaves an
        # augmented step to TensorFlow's own kernels; under JAX every step is jitted.
        xla = config.xla
        if BACKEND == "tensorflow" and augmentation.augments(augment, config.flip) and xla == "auto":
            xla = "off"
        training.compile_fused(model, config.fine_tune_learning_rate, xla)
        return lambda: model.train_on_batch(images, targets)

    variants = {
        "inference": lambda: inference(1.0),
        "fine_tune_step": lambda: fine_tuning_step(1.0, "none"),
        "fine_tune_step_augmented": lambda: fine_tuning_step(1.0, "default"),
        "fine_tune_step_035": lambda: fine_tuning_step(0.35, "none"),
    }
    chosen = [v for v in args.raw_variants.split(",") if v]
    for name in chosen:
        started = time.monotonic()
        try:
            rate = timed_rate(variants[name](), batch, args.raw_seconds)
            emit(**{name: rate, f"{name}_seconds": time.monotonic() - started})
        except Exception as error:  # recorded, and the next variant runs
            emit(**{name: f"failed: {one_line(error)}"})
        keras.backend.clear_session()
    print(f"raw stage done under {BACKEND}", file=sys.stderr)


class LogTimes(logging.Handler):
    """Keeps (time, logger, message) of every record, for the stages that time our runs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[tuple[float, str, str]] = []

    def emit(self, record):
        self.records.append((record.created, record.name, record.getMessage()))

    def last(self, pattern: str):
        found = [(t, m) for t, _, m in self.records if re.search(pattern, m)]
        return found[-1] if found else None

    def first(self, pattern: str):
        found = [(t, m) for t, _, m in self.records if re.search(pattern, m)]
        return found[0] if found else None


def watch_logs(pool_kind: str) -> LogTimes:
    """Capture the library's records, the feature pass's per-chunk DEBUG lines included, and
    set the decoding pool's kind for this process."""
    from symbol_trainer import decoding
    decoding.POOL_KIND = pool_kind
    handler = LogTimes()
    logging.getLogger().addHandler(handler)
    for name in ("symbol_trainer.features", "symbol_trainer.prediction"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    return handler


def feature_pass_rates(handler: LogTimes, images: int, phase_seconds: float) -> dict:
    """The feature pass: over the whole phase (what a user waits), and after its first chunk
    (model tracing and compilation excluded: the steady rate)."""
    result = {"features_images": images, "features_seconds": phase_seconds,
              "features_images_per_s": images / phase_seconds}
    second = handler.first(r"^Decoded chunk 1 \(images (\d+) to")
    end = handler.last(r"^Computed backbone features of")
    if second and end:
        first_images = int(re.search(r"images (\d+) to", second[1]).group(1))
        result["features_steady_images_per_s"] = (images - first_images) / max(1e-9, end[0] - second[0])
    return result


def training_command(args, output: Path, extra: list[str]) -> list[str]:
    frames = frame_dir(args)
    return [str(frames), str(frames / "labels.csv"), str(output), "--weights", "none",
            "--batch-size", str(args.batch), "--fine-tune-fraction", "0.3",
            "--epochs", "3", "--fine-tune-epochs", str(args.fine_tune_epochs),
            "--seed", "0", *extra]


def stage_ours_train(args, pool_kind: str = "threads", fine_tune: bool = True) -> None:
    """The training program as a user runs it; its feature pass and fine-tuning phase."""
    import pandas as pd

    from symbol_trainer.programs import build_multi_hot_model
    handler = watch_logs(pool_kind)
    output = Path(args.work) / ("model" if fine_tune else f"model_{pool_kind}")
    shutil.rmtree(output, ignore_errors=True)
    extra = [] if fine_tune else ["--fine-tune-epochs", "0"]
    started = time.monotonic()
    code = build_multi_hot_model.main(training_command(args, output, extra))
    wall = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"build_multi_hot_model exited with {code}")
    emit(backend=measurements.backend_description())
    metadata = json.loads((output / "metadata.json").read_text())
    phases = metadata["training"]["phase_seconds"]
    split = pd.read_csv(output / "split.csv")
    images = len(split)
    result = {"train_wall_seconds": wall, "pool_kind": pool_kind,
              **feature_pass_rates(handler, images, phases["features"])}
    if fine_tune:
        history = pd.read_csv(output / "history.csv")
        tuning = history[history.phase == "fine_tune"]
        train_images = int((split.split == "train").sum())
        result.update({
            "fine_tune_epochs": len(tuning), "train_images": train_images,
            "fine_tune_seconds": phases.get("fine_tune"),
            "fine_tune_images_per_s": train_images * len(tuning) / phases["fine_tune"],
            # Epochs after the first: the steps alone (no validation pass, no compilation).
            "fine_tune_steady_images_per_s": (
                train_images * (len(tuning) - 1) / tuning.train_seconds.iloc[1:].sum()
                if len(tuning) > 1 else None),
            "fine_tune_epoch_train_seconds": tuning.train_seconds.round(3).tolist()})
    emit(**{("ours" if fine_tune else f"ours_{pool_kind}"): result})


def stage_ours_predict(args, pool_kind: str = "threads") -> None:
    """predict.py on the folder of frames, with the model the training stage wrote."""
    from symbol_trainer.programs import predict
    handler = watch_logs(pool_kind)
    model = Path(args.work) / "model"
    if not (model / "metadata.json").is_file():
        raise SystemExit(f"no model in {model}: the ours_train stage did not finish")
    output = Path(args.work) / f"predictions_{pool_kind}.csv"
    started = time.monotonic()
    code = predict.main([str(model), str(frame_dir(args)), "-o", str(output),
                         "--batch-size", str(args.batch)])
    wall = time.monotonic() - started
    if code not in (0,):
        raise SystemExit(f"predict.py exited with {code}")
    done = handler.last(r"^Predicted ([\d,]+) frames in ([\d.]+) s")
    first = handler.first(r"^First batch of (\d+) frames predicted")
    frames = int(re.search(r"Predicted ([\d,]+) frames", done[1]).group(1).replace(",", ""))
    seconds = float(re.search(r"frames in ([\d.]+) s", done[1]).group(1))
    result = {"predict_frames": frames, "predict_seconds": seconds,
              "predict_wall_seconds": wall, "predict_images_per_s": frames / seconds,
              "pool_kind": pool_kind}
    if first:
        first_frames = int(re.search(r"First batch of (\d+)", first[1]).group(1))
        result["predict_steady_images_per_s"] = (frames - first_frames) / max(1e-9, done[0] - first[0])
    emit(**{("predict" if pool_kind == "threads" else f"predict_{pool_kind}"): result})


def stage_nvjpeg(args) -> None:
    """Decode + letterbox on the GPU with torchvision's nvJPEG, batch by batch."""
    try:
        import torch
        import torchvision
        from torchvision.io import decode_jpeg, read_file
    except ImportError as error:
        emit(nvjpeg=f"not measured: {one_line(error)}")
        return
    if not torch.cuda.is_available():
        emit(nvjpeg="not measured: no CUDA GPU")
        return
    rates = {}
    for name, size in decode_speed.SIZES.items():
        paths = decode_speed.make_frames(Path(args.work) / "nvjpeg" / name, 64, size)
        data = [read_file(str(p)) for p in paths]
        scale = min(WIDTH / size[0], HEIGHT / size[1])
        inner = (round(size[1] * scale), round(size[0] * scale))
        top, left = (HEIGHT - inner[0]) // 2, (WIDTH - inner[1]) // 2

        def step():
            decoded = decode_jpeg(data, device="cuda")
            batch = torch.stack(decoded).float()
            resized = torch.nn.functional.interpolate(batch, size=inner, mode="bilinear",
                                                      antialias=True)
            canvas = torch.zeros((len(data), 3, HEIGHT, WIDTH), device="cuda", dtype=torch.uint8)
            canvas[:, :, top:top + inner[0], left:left + inner[1]] = resized.clamp(0, 255).byte()
            torch.cuda.synchronize()
        rates[name] = timed_rate(step, len(data), args.decode_seconds)
    emit(nvjpeg=rates, torchvision=torchvision.__version__)


def stage_frames(args) -> None:
    started = time.monotonic()
    paths = decode_speed.make_frames(frame_dir(args), args.frames, decode_speed.SIZES["720p"])
    emit(frames=len(paths), frames_seconds=time.monotonic() - started)


STAGE_FUNCTIONS = {
    "frames": stage_frames, "decode": stage_decode, "raw": stage_raw,
    "ours_train": stage_ours_train, "ours_predict": stage_ours_predict, "nvjpeg": stage_nvjpeg,
    "ours_features_processes": lambda args: stage_ours_train(args, "processes", fine_tune=False),
    "ours_predict_processes": lambda args: stage_ours_predict(args, "processes"),
}


def one_line(error) -> str:
    text = str(error).strip().splitlines()
    line = text[-1] if text else type(error).__name__
    return f"{type(error).__name__}: {line}"[:240] if isinstance(error, BaseException) else line[:240]


# ---------------------------------------------------------------------------------------------
# The parent: stages in order within the budget, the results file after each


def run_stage(name: str, args, deadline: float) -> dict:
    """Run one stage in its own process within what is left of the budget; its RESULT lines
    merged, or {"failed": "<one line>"}."""
    left = deadline - time.monotonic()
    # Limits are set for the GPU run's 480 s; a longer budget (a CPU run) stretches them.
    limit = min(STAGE_LIMITS[name] * max(1.0, args.budget / 480), left)
    if limit < MIN_STAGE_SECONDS:
        return {"failed": f"skipped: {left:.0f} s of the budget left"}
    logs = Path(args.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPT), "--stage", name, *args.passed]
    started = time.monotonic()
    with open(logs / f"{name}.log", "w") as log_file:
        # A process group of its own, so that a stage out of time is stopped with its
        # decoding processes (which would otherwise hold its output open).
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                   cwd=ROOT, process_group=0)
        try:
            stdout, _ = process.communicate(timeout=limit)
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, _ = process.communicate()
            code = f"timed out after {limit:.0f} s"
    result: dict = {}
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result.update(json.loads(line[len(RESULT_PREFIX):]))
    result["stage_seconds"] = time.monotonic() - started
    if code != 0:
        lines = [l.strip() for l in (logs / f"{name}.log").read_text(errors="replace").splitlines()
                 if l.strip()]
        # The program's own one error line says more than the stage's last line.
        errors = [l for l in lines if l.startswith("ERROR:")]
        reason = code if isinstance(code, str) else f"exit code {code}"
        last = (errors or lines or ["no output"])[-1]
        result["failed"] = f"{reason}: {last[:240]}"
    return result


def value(results: dict, stage: str, *keys):
    """A number from a stage's results, or the stage's failure line, or None."""
    item = results.get(stage, {})
    for key in keys:
        if not isinstance(item, dict) or key not in item:
            return (results.get(stage, {}).get("failed") or None)
        item = item[key]
    return item


def cell(x) -> str:
    if x is None:
        return "not run"
    if isinstance(x, (int, float)):
        return f"{x:,.1f}"
    return str(x)


def ratio(ours, raw) -> str:
    if isinstance(ours, (int, float)) and isinstance(raw, (int, float)) and raw > 0:
        return f"{ours / raw:.0%}"
    return "-"


def best_decode(results: dict, size: str = "720p"):
    """The machine's decode rate: the better of N threads and N processes."""
    rates = value(results, "decode", "decode", size)
    if not isinstance(rates, dict):
        return rates
    top = [max(by_count.items(), key=lambda kv: int(kv[0]))[1] for by_count in rates.values()]
    return max(top) if top else None


def report(results: dict, args, facts: dict) -> str:
    lines = []
    n = value(results, "decode", "usable_cores") or decode_speed.usable_cores()
    lines.append(f"Batch {args.batch}, input {WIDTH}x{HEIGHT} letterbox, random weights; "
                 f"{args.frames:,} synthetic 1280x720 frames; {n} usable cores; "
                 f"budget {args.budget:.0f} s.")
    lines += ["", "## Raw rates (images/s)", "", "| | images/s |", "|---|---:|"]
    raw_rows = [("MobileNetV2 1.0 inference", "inference"),
                ("MobileNetV2 1.0 fine-tuning step (top 30 % trainable, BatchNorm frozen)",
                 "fine_tune_step"),
                ("the same with this project's SymbolAugmentation in the step",
                 "fine_tune_step_augmented"),
                ("MobileNetV2 0.35 fine-tuning step", "fine_tune_step_035")]
    for label, key in raw_rows:
        lines.append(f"| {label} | {cell(value(results, 'raw', key))} |")
    for size, label in (("1080p", "1920x1080"), ("720p", "1280x720")):
        rates = value(results, "decode", "decode", size)
        if isinstance(rates, dict):
            for kind, by_count in rates.items():
                counts = sorted(by_count, key=int)
                lines.append(f"| {label} JPEG decode + letterbox (Pillow draft), "
                             f"{' / '.join(str(c) for c in counts)} {kind} | "
                             f"{' / '.join(f'{by_count[c]:,.1f}' for c in counts)} |")
        else:
            lines.append(f"| {label} JPEG decode + letterbox | {cell(rates)} |")
    nv = value(results, "nvjpeg", "nvjpeg")
    lines.append("| nvJPEG on the GPU (torchvision), 720p / 1080p | " + (
        f"{nv['720p']:,.1f} / {nv['1080p']:,.1f}" if isinstance(nv, dict) else cell(nv)) + " |")

    decode = best_decode(results)
    inference = value(results, "raw", "inference")
    step = value(results, "raw", "fine_tune_step_augmented")
    bound = min([x for x in (decode, inference) if isinstance(x, (int, float))], default=None)
    lines += ["", "## Ours against raw", "",
              "| | ours, images/s | raw, images/s | ours / raw | target |", "|---|---:|---:|---:|---:|"]

    def row(label, ours, raw_label, raw, target=f">= {TARGET:.0%}"):
        if isinstance(ours, str):  # the stage's failure line is in the Stages table
            ours = "failed (see Stages)"
        lines.append(f"| {label} | {cell(ours)} | {raw_label} {cell(raw)} | {ratio(ours, raw)} | {target} |")

    features = value(results, "ours_train", "ours", "features_images_per_s")
    features_steady = value(results, "ours_train", "ours", "features_steady_images_per_s")
    row("feature pass, whole phase", features, "decode (best of N)", decode)
    row("feature pass, after the first chunk", features_steady, "decode (best of N)", decode)
    row("feature pass, after the first chunk", features_steady, "inference", inference, "(CPU: 77-78 %)")
    row("feature pass, after the first chunk", features_steady, "the slower of the two", bound, "")
    tuning = value(results, "ours_train", "ours", "fine_tune_images_per_s")
    tuning_steady = value(results, "ours_train", "ours", "fine_tune_steady_images_per_s")
    row("fine-tuning, whole phase (validation, compilation)", tuning, "augmented step", step, "")
    row("fine-tuning, epochs after the first, steps alone", tuning_steady, "augmented step", step,
        f">= {TARGET:.0%} (CPU: 93-97 %)")
    predicted = value(results, "ours_predict", "predict", "predict_images_per_s")
    predicted_steady = value(results, "ours_predict", "predict", "predict_steady_images_per_s")
    row("prediction of a folder (predict.py)", predicted, "decode (best of N)", decode)
    row("prediction, after the first batch", predicted_steady, "decode (best of N)", decode)
    row("prediction, after the first batch", predicted_steady, "the slower of the two", bound, "")
    for kind in ("processes",):
        f = value(results, f"ours_features_{kind}", f"ours_{kind}", "features_steady_images_per_s")
        p = value(results, f"ours_predict_{kind}", f"predict_{kind}", "predict_steady_images_per_s")
        row(f"feature pass with decoding {kind}, after the first chunk", f, "decode (best of N)", decode, "")
        row(f"prediction with decoding {kind}, after the first batch", p, "decode (best of N)", decode, "")

    lines += ["", "## Stages", "", "| stage | seconds | outcome |", "|---|---:|---|"]
    for name in args.stage_list:
        item = results.get(name, {})
        outcome = item.get("failed") or "done"
        lines.append(f"| {name} | {item.get('stage_seconds', 0):,.1f} | {outcome} |")
    return "\n".join(lines)


def results_name(backend: dict) -> str:
    gpus = measurements.gpus()
    if gpus:
        machine = re.sub(r"[^a-z0-9]+", "_", gpus[0].lower().replace("nvidia", "")).strip("_")
    else:
        machine = "cpu"
    return f"gpu_bench_{machine}_{backend.get('keras_backend', 'unknown')}"


def write_results(results: dict, args, started, facts_backend: dict,
                  facts: dict | None = None) -> tuple[Path, Path]:
    """The results file and its twin, from `results` so far (and into $OUT when set).
    `facts`: the header of the run that measured (--render), else this run's."""
    if facts is None:
        facts = measurements.header("Raw rates and ours on one machine (bench/gpu.py)",
                                    started, facts_backend)
        if args.commit:
            facts["commit"] = f"{args.commit} (given with --commit)"
    text = measurements.header_markdown(facts) + "\n" + report(results, args, facts)
    name = results_name(facts_backend)
    path = Path(args.results) if args.results else ROOT / "docs" / "measurements" / f"{name}.md"
    data = {**facts, "settings": {k: v for k, v in vars(args).items()
                                  if k not in ("passed", "render")},
            "results": results}
    written = measurements.write(path, text, data)
    out = os.environ.get("OUT")
    if out:
        for file in written:
            shutil.copy(file, Path(out) / file.name)
        logs = Path(args.work) / "logs"
        if logs.is_dir():  # one file of every stage's log tail (the tool brings back 8 files)
            tails = [f"==== {log.name}\n" + "\n".join(log.read_text(errors="replace")
                                                       .splitlines()[-60:])
                     for log in sorted(logs.glob("*.log"))]
            (Path(out) / "gpu_bench_logs.txt").write_text("\n\n".join(tails) + "\n")
    return written


def render(twin: Path) -> int:
    """The markdown of a finished run again, from its JSON twin: after a change of the
    report's form, without measuring again."""
    data = json.loads(twin.read_text())
    args = argparse.Namespace(**{**data["settings"], "results": str(twin.with_suffix(".md"))})
    facts = {k: data[k] for k in ("title", "command", "commit", "date", "machine", "backend")}
    path, _ = write_results(data["results"], args, None, facts["backend"], facts)
    print(f"Wrote {path} again from {twin}")
    return 0


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="A CPU check: 400 frames, batch 32, 2 fine-tuning epochs, short "
                             "timings, a 20-minute budget (each explicit flag wins).")
    parser.add_argument("--frames", type=int, help="Synthetic 1280x720 frames for our runs. "
                        "Default: 10,000 (--quick: 400).")
    parser.add_argument("--batch", type=int, help="Batch size everywhere. Default: 128 (--quick: 32).")
    parser.add_argument("--fine-tune-epochs", type=int, default=3,
                        help="Fine-tuning epochs of our run; the first is compilation, the "
                             "rest give the steady rate. Default: %(default)s.")
    parser.add_argument("--raw-seconds", type=float, help="Seconds each raw model rate is "
                        "timed. Default: 5 (--quick: 8).")
    parser.add_argument("--decode-seconds", type=float, help="Seconds each decode rate is "
                        "timed. Default: 2 (--quick: 3).")
    parser.add_argument("--raw-variants", default="inference,fine_tune_step,"
                        "fine_tune_step_augmented,fine_tune_step_035")
    parser.add_argument("--budget", type=float, help="Seconds for the whole run; stages that "
                        "would start later are skipped. Default: 480 (--quick: 1200).")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="Comma-separated stages, run in this order. Default: all.")
    parser.add_argument("--work", help="Work folder (frames, models, logs). Default: a new "
                        "temporary folder.")
    parser.add_argument("--results", help="Markdown results file. Default: "
                        "docs/measurements/gpu_bench_<machine>_<backend>.md.")
    parser.add_argument("--commit", help="The commit to record, for a copy of the checkout "
                        "without its .git folder (the device tool sends none). Default: from git.")
    parser.add_argument("--render", metavar="JSON",
                        help="Write the markdown of an earlier run again from its JSON twin "
                             "(the same file names, that run's header), measuring nothing.")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"frames": 400 if quick else 10_000, "batch": 32 if quick else 128,
                "raw_seconds": 8.0 if quick else 5.0, "decode_seconds": 3.0 if quick else 2.0,
                "budget": 1200.0 if quick else 480.0}
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    args.stage_list = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(args.stage_list) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return args


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.stage:
        from symbol_trainer.command import configure_logging
        configure_logging()
        STAGE_FUNCTIONS[args.stage](args)
        return 0
    if args.render:
        return render(Path(args.render))
    started = datetime.datetime.now(datetime.timezone.utc)
    deadline = time.monotonic() + args.budget
    args.work = args.work or tempfile.mkdtemp(prefix="gpu_bench_")
    # What every stage process is given: the resolved sizes, not --quick.
    args.passed = ["--work", args.work, "--frames", str(args.frames), "--batch", str(args.batch),
                   "--fine-tune-epochs", str(args.fine_tune_epochs),
                   "--raw-seconds", str(args.raw_seconds), "--decode-seconds", str(args.decode_seconds),
                   "--raw-variants", args.raw_variants]
    backend = measurements.backend_description(import_keras=False)
    print(f"bench/gpu.py: work folder {args.work}; backend {backend['keras_backend']}; "
          f"{decode_speed.usable_cores()} usable cores; budget {args.budget:.0f} s", flush=True)
    results: dict = {}
    for name in args.stage_list:
        print(f"[{time.monotonic() - deadline + args.budget:6.1f} s] {name} ...", flush=True)
        results[name] = run_stage(name, args, deadline)
        for stage_result in results.values():  # the backend as a model stage saw it
            if isinstance(stage_result.get("backend"), dict):
                backend = stage_result["backend"]
        short = {k: v for k, v in results[name].items() if k != "backend"}
        print(f"    {json.dumps(short)[:600]}", flush=True)
        path, _ = write_results(results, args, started, backend)
    print()
    print(path.read_text())
    print(f"Wrote {path} and its .json twin" + (f"; copied to {os.environ['OUT']}"
                                                 if os.environ.get("OUT") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
