#!/usr/bin/env python3
"""Find the symbols a trained model knows in new frames and videos.

INPUT is an image, a folder (searched recursively for images), a .txt file listing image
paths (one per line) or a .csv file with a `filename` column, a glob pattern (quote it:
'frames/**/*.jpg'), or a video (mp4, mkv, avi, mov, webm, ts, m4v, mpg). Several may be
given; rows come out in the order of the INPUTs, and within a folder or pattern in path
order.

The output has a `filename` column and, per symbol, `<symbol>_probability` and
`<symbol>_visible` (1 where the probability is at or above the symbol's threshold, chosen
at training and stored in the model directory). `filename` and the `_visible` columns have
the labels CSV's format: correct the predictions in a spreadsheet and train on them again.
Video frames also get `video`, `frame_index`, `timestamp` (seconds) and `timecode`
(HH:MM:SS.mmm) columns. --heatmaps DIR also writes, per frame and symbol found, a PNG of
the frame with the symbol's heatmap (where the model sees it) laid over it.

Examples:
  python predict.py models/symbols new_frames/ -o predictions.csv
  python predict.py models/symbols episode7.mp4 --fps 2 --segments segments.csv \\
      --save-frames episode7_frames -o episode7_frames/labels.csv
  python predict.py models/symbols new_frames/ -o predictions.csv --heatmaps heatmaps/
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from pathlib import Path


def _threshold(text: str):
    """--threshold 0.7 or --threshold star=0.7."""
    name, _, value = text.rpartition("=")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write a probability (0.7) or symbol=probability (star=0.7)") from None
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a threshold is between 0 and 1")
    return (name.strip() or None, number)


def _shard(text: str) -> tuple[int, int]:
    """--shard K/N: the K-th of N parts, 1 <= K <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        hint = (" (empty numbers: are $SLURM_ARRAY_TASK_ID and $SLURM_ARRAY_TASK_COUNT set? "
                "Submit with sbatch --array=1-N)" if re.fullmatch(r"\s*\d*\s*/\s*\d*\s*", text)
                else "")
        raise argparse.ArgumentTypeError(
            f"{text!r}: write K/N, this run's part K of N parts (e.g. 2/8){hint}")
    part, parts = int(match[1]), int(match[2])
    if parts < 1 or not 1 <= part <= parts:
        raise argparse.ArgumentTypeError(
            f"{text!r}: K counts from 1 to N and N is 1 or more (e.g. 1/8 ... 8/8); with SLURM "
            "submit with sbatch --array=1-N")
    return part, parts


def _number(kind, minimum: float, inclusive: bool):
    """An argparse type: a `kind` number above `minimum` (or equal to it, if `inclusive`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be {minimum} or more; got {text}" if inclusive
                else f"must be greater than {minimum}; got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from symbol_trainer import video

    defaults = video.SegmentSettings()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="A model directory written by "
                        "build_binary_classifier.py or build_multi_hot_model.py.")
    parser.add_argument("inputs", metavar="INPUT", nargs="+",
                        help="Images, folders, lists of paths, glob patterns or videos.")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="Write the predictions here (written to FILE.partial and renamed "
                             "when complete; refused if that would overwrite an INPUT or write "
                             "into MODEL_DIR). Default: standard output.")
    parser.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                        help="Output format: CSV with a header, or one JSON object per line. "
                             "Default: %(default)s.")
    parser.add_argument("--image-dir", metavar="DIR",
                        help="Folder that relative paths in .txt/.csv lists are resolved "
                             "against, and that every `filename` is written relative to. "
                             "Default: each list's own folder; names relative to a folder "
                             "INPUT, else as given.")
    parser.add_argument("--threshold", metavar="[SYMBOL=]P", type=_threshold, action="append",
                        help="Override the stored decision threshold: a probability for every "
                             "symbol (0.7), or for one (star=0.7); repeat for several.")
    parser.add_argument("--batch-size", type=_number(int, 0, inclusive=False), default=32,
                        help="Frames per model call. Default: %(default)s.")
    parser.add_argument("--skip-errors", action="store_true",
                        help="Leave unreadable images and videos out of the output instead of "
                             "writing a row with an `error` for them (they are reported on "
                             "standard error either way).")
    parser.add_argument("--shard", metavar="K/N", type=_shard,
                        help="Predict only part K of N (1 <= K <= N) of the inputs: images and "
                             "whole videos number K, K+N, K+2N, ... in input order, so N runs "
                             "(a SLURM array job) share an archive and their outputs, each with "
                             "the same columns and header, concatenate into one (see "
                             "docs/prediction.md). A part with no inputs writes only the header "
                             "and exits 0. Default: all inputs.")
    group = parser.add_argument_group("video")
    sampling = group.add_mutually_exclusive_group()
    sampling.add_argument("--fps", type=_number(float, 0, inclusive=False), default=1.0,
                          help="Frames taken per second of video. Default: %(default)s.")
    sampling.add_argument("--every-frame", action="store_true",
                          help="Take every frame of the video instead.")
    group.add_argument("--segments", metavar="CSV",
                       help="Also write, per video and symbol, the intervals in which the "
                            "symbol is visible: start, end, duration (seconds and timecode), "
                            "frames, mean and peak probability.")
    group.add_argument("--hysteresis", type=_number(float, 0, inclusive=True),
                       default=defaults.hysteresis,
                       help="A segment starts at a frame at or above the symbol's threshold "
                            "and goes on while frames stay at or above threshold minus this. "
                            "Default: %(default)s.")
    group.add_argument("--merge-gap", type=_number(float, 0, inclusive=True),
                       default=defaults.merge_gap,
                       metavar="SECONDS",
                       help="Join segments separated by less than this many seconds, so one "
                            "flickering frame does not split an interval. Default: %(default)s.")
    group.add_argument("--min-duration", type=_number(float, 0, inclusive=True),
                       default=defaults.min_duration,
                       metavar="SECONDS",
                       help="Drop segments shorter than this. Default: %(default)s.")
    group.add_argument("--save-frames", metavar="DIR",
                       help="Save the sampled video frames as JPEGs below DIR, named as their "
                            "rows' `filename`, so the predictions are a labels CSV for "
                            "IMAGE_DIR=DIR.")
    group = parser.add_argument_group("heatmaps")
    group.add_argument("--heatmaps", metavar="DIR",
                       help="Also write, for every predicted frame and every symbol at or above "
                            "its threshold, a PNG of the frame with the symbol's heatmap (where "
                            "the model sees it) laid over it: DIR/<filename>.<symbol>.png, "
                            "<filename> being the row's `filename` (its folders are created). "
                            "DIR may not be or lie inside an INPUT folder, MODEL_DIR or "
                            "--save-frames.")
    group.add_argument("--heatmaps-all", action="store_true",
                       help="With --heatmaps: write every symbol's heatmap of every frame, "
                            "not only those at or above the threshold.")
    logging_group = parser.add_argument_group("logging")
    logging_group.add_argument("--progress-every", type=_number(float, 0, inclusive=False),
                               default=30.0,
                               metavar="SECONDS",
                               help="When standard error is not a terminal, log progress this "
                                    "often. Default: %(default)s.")
    logging_group.add_argument("--quiet", action="store_true", help="Only print warnings and errors.")
    logging_group.add_argument("--debug", action="store_true",
                               help="Print full tracebacks and debug messages.")
    return parser


@contextlib.contextmanager
def _output(path: str | None):
    """Standard output, or FILE.partial renamed to FILE on success and removed on failure."""
    if path is None:
        yield sys.stdout
        return
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".partial")
    try:
        with open(partial, "w", newline="", encoding="utf-8") as handle:
            yield handle
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    from symbol_trainer import dependencies
    from symbol_trainer.errors import InputError

    try:  # before the first import of NumPy or PyAV, so a Python without them gets one line
        dependencies.require({**dependencies.required_packages(), "av": "av"})
    except InputError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    from symbol_trainer import video

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.segments and not any(Path(i).suffix.lower() in video.VIDEO_EXTENSIONS
                                 or set("*?[") & set(i) for i in args.inputs):
        parser.error("--segments needs a video INPUT")
    if args.heatmaps_all and not args.heatmaps:
        parser.error("--heatmaps-all needs --heatmaps DIR")
    from symbol_trainer.command import configure_logging, run_command
    from symbol_trainer.model_dir import decision_thresholds, load_model_dir
    from symbol_trainer import prediction

    configure_logging(quiet=args.quiet, debug=args.debug)
    log = logging.getLogger("predict")

    def run() -> int:
        # Every check and the columns come from all the inputs, so that every part of a
        # --shard run refuses or accepts alike and writes the same header.
        inputs = prediction.collect_inputs(args.inputs, args.image_dir)
        prediction.check_outputs([("-o", args.output), ("--segments", args.segments)],
                                 args.inputs, inputs, args.model_dir, args.save_frames)
        loaded = load_model_dir(args.model_dir)
        cut = _thresholds(loaded.metadata, args.threshold)
        columns = prediction.output_columns(loaded.metadata["symbols"], bool(inputs.videos))
        part = _part(inputs, args.shard, log)
        settings = video.SegmentSettings(args.hysteresis, args.merge_gap, args.min_duration)
        save = Path(args.save_frames) if args.save_frames else None
        prefix = ""
        if save is not None and args.image_dir:
            # Saved frames named relative to --image-dir, so their rows can join a labels
            # CSV of that folder.
            try:
                prefix = save.resolve().relative_to(Path(args.image_dir).resolve()).as_posix() + "/"
            except ValueError:
                raise InputError(
                    f"--save-frames {args.save_frames} is not inside --image-dir "
                    f"{args.image_dir}; save the frames into a folder below it.") from None
            prefix = "" if prefix == "./" else prefix
        heatmap_writer = None
        if args.heatmaps:
            from symbol_trainer import heatmaps

            heatmaps.check_directory(
                args.heatmaps, folders={**{a: "the INPUT folder" for a in args.inputs
                                           if os.path.isdir(a)},
                                        args.model_dir: "the model directory",
                                        **({args.save_frames: "the --save-frames folder"}
                                           if args.save_frames else {})},
                images=[(item.path, item.filename) for source in inputs.sources
                        if isinstance(source, list) for item in source],
                videos=[prefix + v.name for v in inputs.videos])
            heatmap_writer = heatmaps.HeatmapWriter(
                args.heatmaps, decision_thresholds(loaded.metadata, cut),
                every_symbol=args.heatmaps_all)
        with _output(args.output) as handle, _output(args.segments) if args.segments \
                else contextlib.nullcontext() as segments_handle, \
                heatmap_writer or contextlib.nullcontext():
            writer = prediction.RowWriter(handle, columns, args.format)
            segments = (prediction.RowWriter(segments_handle, prediction.SEGMENT_COLUMNS, "csv")
                        if segments_handle else None)
            progress = prediction.Progress(part.images or None, args.progress_every)
            summary = prediction.predict_inputs(
                loaded, part, writer, batch_size=args.batch_size, thresholds=cut,
                fps=None if args.every_frame else args.fps, skip_errors=args.skip_errors,
                save_frames=save, frame_prefix=prefix, segments=segments,
                segment_settings=settings,
                progress=progress if not args.quiet else None, heatmap_writer=heatmap_writer)
        rate = summary.frames / max(1e-9, summary.seconds)
        log.info("Predicted %s frames in %.1f s (%.1f frames/s)%s%s.", f"{summary.frames:,}",
                 summary.seconds, rate, f"; {summary.segments:,} segments" if args.segments else "",
                 f"; {heatmap_writer.written:,} heatmaps in {args.heatmaps}"
                 if heatmap_writer else "")
        if summary.failed:
            log.error("%s input(s) could not be read, e.g. %s", f"{len(summary.failed):,}",
                      summary.failed[0][1])
            return 3
        return 0

    def run_to_a_closed_pipe() -> int:
        try:
            return run()
        except BrokenPipeError:
            # The reader of standard output stopped (`predict.py ... | head`): stop quietly,
            # as Unix tools do, with the shell's code for SIGPIPE.
            with contextlib.suppress(OSError, ValueError, AttributeError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141

    return run_command(run_to_a_closed_pipe, debug=args.debug,
                       interrupted="Interrupted; no output file was completed.")


def _part(inputs, shard: tuple[int, int] | None, log: logging.Logger):
    """The inputs this run predicts: all, or its --shard part, logged (warned when empty)."""
    from symbol_trainer import prediction

    if shard is None:
        return inputs
    part = prediction.shard_of(inputs, *shard)
    total = inputs.images + len(inputs.videos)
    count = part.images + len(part.videos)
    if count:
        log.info("--shard %d/%d: predicting %s of %s inputs (%s images, %s videos).", *shard,
                 f"{count:,}", f"{total:,}", f"{part.images:,}", f"{len(part.videos):,}")
    else:
        log.warning("--shard %d/%d: this part has no inputs (there are %s inputs for %d parts); "
                    "writing an output with only its header, and exiting 0.", *shard,
                    f"{total:,}", shard[1])
    return part


def _thresholds(metadata: dict, given) -> dict | None:
    """--threshold values as model_dir.decision_thresholds takes them: the last bare value for
    every symbol, then symbol=value for single symbols."""
    if not given:
        return None
    everyone = [value for name, value in given if name is None]
    thresholds = {s: everyone[-1] for s in metadata["symbols"]} if everyone else {}
    thresholds.update({name: value for name, value in given if name is not None})
    return thresholds


if __name__ == "__main__":
    sys.exit(main())
