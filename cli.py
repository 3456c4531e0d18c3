"""The body of both training scripts: what they do with their parsed flags, and what they print.

Standard output carries the summary for people, or with --json one line for programs;
everything else (logs, progress, errors) goes to standard error through `logging`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import numpy as np

import common
import run_warnings


def print_json_line(record: dict) -> None:
    """One line of strict JSON on standard output (NaN written as null)."""
    sys.stdout.write(json.dumps(common.finite_json(record), default=common.json_default) + "\n")
    sys.stdout.flush()


def training_main(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  labelled_images: Callable[[], tuple[common.LabelledImages, np.ndarray | None]],
                  positionals: dict[str, str]) -> int:
    """The body of both training scripts once their flags are parsed: logging, the
    --download-weights-only mode, then the checks or the training of `labelled_images()`
    (images and the given validation mask, or None), with the summary or the --json line.
    `positionals` maps the destinations of the positional arguments, which only
    --download-weights-only may leave out, to their names in the usage line."""
    common.configure_logging(quiet=args.quiet, debug=args.debug)
    if args.json:
        # Keras's progress bar writes to standard output, which --json keeps for its one line.
        common.keras.config.disable_interactive_logging()
    if not args.download_weights_only:
        missing = [shown for name, shown in positionals.items() if getattr(args, name) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")

    @run_warnings.collected  # from the first read of the labels on, for the report
    def run() -> int:
        config = common.config_from_args(args)
        if args.download_weights_only:
            cache, gained = common.download_weights(config)
            summary = (f"Downloaded {', '.join(gained)} into {cache}." if gained else
                       f"The weights were already in {cache}; nothing was downloaded.")
            summary += (" Copy that folder to $KERAS_HOME/models (by default ~/.keras/models) "
                        "on the offline machine, or pass one file with --weights PATH.")
            outcome = common.CommandOutcome(summary, {"status": "ok", "exit_code": 0,
                                                      "weights_dir": str(cache),
                                                      "downloaded": gained})
        else:
            images, is_validation = labelled_images()
            outcome = common.check_or_train(
                images, config, args.output_dir, overwrite=args.overwrite, dry_run=args.dry_run,
                is_validation=is_validation, resume=not args.no_resume, exports=args.export)
        if args.json:
            print(outcome.summary, file=sys.stderr)
            print_json_line(outcome.record)
        else:
            print(outcome.summary)
        return 0

    def report_failure(code: int, message: str) -> None:
        if args.json:
            print_json_line({"status": "error", "exit_code": code, "error": message})

    return common.run_command(run, debug=args.debug, on_failure=report_failure)
