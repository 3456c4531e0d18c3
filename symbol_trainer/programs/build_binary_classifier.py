#!/usr/bin/env python3
"""Train a model that tells whether one symbol is visible in a frame.

Images in WITH_DIR show the symbol, images in WITHOUT_DIR do not; both folders are searched
recursively. The trained model, its metadata, training history and validation metrics are
written to OUTPUT_MODEL_DIR.

Example:
  python build_binary_classifier.py frames/with_pentagram frames/without_pentagram models/pentagram
"""

from __future__ import annotations

import argparse
import sys

# The positional arguments (usage name, help), which --download-weights-only alone may leave out.
POSITIONALS = {
    "with_dir": ("WITH_DIR", "Folder of frames in which the symbol is visible."),
    "without_dir": ("WITHOUT_DIR", "Folder of frames in which the symbol is not visible."),
    "output_dir": ("OUTPUT_MODEL_DIR", "Folder to write the model directory to."),
}


def build_parser() -> argparse.ArgumentParser:
    # The standard library only: --help never waits for TensorFlow.
    from symbol_trainer import cli, settings

    parser = cli.training_parser(__doc__, POSITIONALS)
    parser.add_argument(
        "--symbol", metavar="NAME",
        help="Name of the model's output. Default: WITH_DIR's folder name without a 'with_' "
             "prefix (with_pentagram/ gives pentagram).")
    parser.add_argument(
        "--validation-dirs", nargs=2, metavar=("WITH", "WITHOUT"),
        help="Validate on the frames of these two folders (with and without the symbol) instead "
             "of splitting WITH_DIR and WITHOUT_DIR, which are then all training. Default: a "
             "split (see --validation-split and --group-by).")
    parser.add_argument(
        "--groups-csv", metavar="CSV",
        help="Group the split by a column of this CSV: frames with the same value stay on one "
             "side of the train/validation split. Its filename column names the images "
             "relative to the CSV's own folder (or by absolute path); every image of WITH_DIR "
             "and WITHOUT_DIR needs a row, and rows of other files are ignored. With several "
             "columns besides filename, --group-by names the one to use. Default: no groups "
             "file (see --group-by).")
    settings.add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from symbol_trainer import cli

    parser = build_parser()
    args = parser.parse_args(argv)

    def labelled_images():
        from symbol_trainer.image_folders import images_from_directories
        from symbol_trainer.labelled_images import with_validation_set

        grouping = {"group_by": args.group_by, "groups_csv": args.groups_csv}
        images = images_from_directories(args.with_dir, args.without_dir, args.symbol,
                                         **grouping)
        if not args.validation_dirs:
            return images, None
        validation = images_from_directories(*args.validation_dirs, images.symbols[0],
                                             **grouping)
        return with_validation_set(
            images, validation, "--validation-dirs " + " ".join(args.validation_dirs))

    validation = args.validation_dirs or (None, None)
    inputs = {"WITH_DIR": args.with_dir, "WITHOUT_DIR": args.without_dir,
              "--validation-dirs WITH": validation[0], "--validation-dirs WITHOUT": validation[1]}
    return cli.training_main(parser, args, labelled_images, POSITIONALS, inputs,
                             input_files={"--groups-csv": args.groups_csv})


if __name__ == "__main__":
    sys.exit(main())
