"""The body of both training scripts: what they do with their parsed flags, and what they print.

Standard output carries the summary for people, or with --json one line for programs;
everything else (logs, progress, errors) goes to standard error through `logging`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from typing import Callable, Mapping

from symbol_trainer import command
from symbol_trainer import dependencies
from symbol_trainer import output_dir
from symbol_trainer import run_warnings
from symbol_trainer import settings


def print_json_line(record: dict) -> None:
    """One line of strict JSON on standard output (NaN written as null)."""
    if "symbol_trainer.json_files" in sys.modules:  # a run's records hold NumPy numbers
        from symbol_trainer.json_files import finite_json, json_default
        text = json.dumps(finite_json(record), default=json_default)
    else:  # an error found before the library was imported: plain strings and numbers
        text = json.dumps(record, default=str)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def training_parser(description: str,
                    positionals: Mapping[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """The parser of a training program, before its own flags and the training flags are
    added: `positionals` maps each positional argument's destination to its name in the
    usage line and its help. They are optional to argparse because --download-weights-only
    alone may leave them out; `training_main` requires them otherwise."""
    names = " ".join(metavar for metavar, _ in positionals.values())
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=f"%(prog)s {names} [options]\n"
              "       %(prog)s --download-weights-only [--backbone NAME] [--alpha A]",
        allow_abbrev=False)  # a prefix that works today would break when a flag is added
    for destination, (metavar, help_text) in positionals.items():
        parser.add_argument(destination, nargs="?", metavar=metavar, help=help_text)
    return parser


def training_main(parser: argparse.ArgumentParser, args: argparse.Namespace,
                  labelled_images: Callable[[], tuple],
                  positionals: Mapping[str, tuple[str, str]],
                  inputs: Mapping[str, str | None] = {},
                  input_files: Mapping[str, str | None] = {}) -> int:
    """The body of both training scripts once their flags are parsed: logging, the
    --download-weights-only mode, then the checks or the training of `labelled_images()`
    (images and the given validation mask, or None), with the summary or the --json line.
    `positionals` is what `training_parser` was given: the positional arguments, which only
    --download-weights-only may leave out, with their names in the usage line; `inputs` maps
    how the user named each input folder (IMAGE_DIR, WITH_DIR, ...) to the path, which
    OUTPUT_MODEL_DIR must stay out of, and `input_files` each input file (LABELS_CSV, ...),
    whose folder OUTPUT_MODEL_DIR must not be or contain.

    The flags, the output folder and the installed packages are checked before TensorFlow is
    imported, so a mistake there is answered at once (exit code 2)."""
    command.configure_logging(quiet=args.quiet, debug=args.debug)
    if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict":
        # A file name that is not valid UTF-8 (in the list of unreadable files) is shown
        # with its bytes escaped, as the log on standard error shows it, instead of crashing.
        sys.stdout.reconfigure(errors="backslashreplace")
    if not args.download_weights_only:
        missing = [metavar for name, (metavar, _) in positionals.items()
                   if getattr(args, name) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")

    @run_warnings.collected  # from the first read of the labels on, for the report
    def run() -> int:
        config = settings.config_from_args(args)
        # What only TensorFlow does here fails now, before the images are read (exit 2).
        dependencies.require_backend_features(config.devices, config.tensorboard)
        if not args.download_weights_only:
            output_dir.check_outside_inputs(args.output_dir, {
                **inputs, "--cache-dir": config.cache_dir, "--tensorboard": config.tensorboard},
                {**input_files, **{f"--symbol-image {name}": path
                                   for name, path in config.symbol_images}})
            if not args.dry_run:  # a dry run only notes an existing model directory
                output_dir.check_output_dir(args.output_dir, args.overwrite, create_parent=False)
        dependencies.require()
        from symbol_trainer.backend import keras
        from symbol_trainer.pipeline import CommandOutcome, check_or_train
        from symbol_trainer.weights_download import download_weights
        if args.json:
            # Keras's progress bar writes to standard output, which --json keeps for its line.
            keras.config.disable_interactive_logging()
        if args.download_weights_only:
            cache, gained = download_weights(config)
            summary = (f"Downloaded {', '.join(gained)} into {cache}." if gained else
                       f"The weights were already in {cache}; nothing was downloaded.")
            summary += (" Copy that folder to $KERAS_HOME/models (by default ~/.keras/models) "
                        "on the offline machine, or pass one file with --weights PATH.")
            outcome = CommandOutcome(summary, {"status": "ok", "exit_code": 0,
                                               "weights_dir": str(cache),
                                               "downloaded": gained})
        else:
            images, is_validation = labelled_images()
            outcome = check_or_train(
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

    return command.run_command(run, debug=args.debug, on_failure=report_failure)
