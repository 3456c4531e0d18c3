#!/usr/bin/env python3
"""Train one model that tells, for every symbol at once, whether it is visible in a frame.

LABELS_CSV lists the frames: a `filename` column (the path relative to IMAGE_DIR, which may
have subfolders; '/' works on every platform) and one column per symbol named
`<symbol>_visible`, holding 0 or 1. The model gets one sigmoid output per symbol, named after
it, in the CSV's column order: columns pentagram_visible, star_visible give outputs pentagram
and star. Other columns are reported and kept with the data. The CSV may be comma-, semicolon-
or tab-separated, UTF-8 with or without a byte-order mark, or UTF-16 with one.

Example:
  python build_multi_hot_model.py frames labels.csv models/symbols
  python build_multi_hot_model.py frames labels.csv models/symbols --dry-run
"""

from __future__ import annotations

import argparse
import sys

# The positional arguments (usage name, help), which --download-weights-only alone may leave out.
POSITIONALS = {
    "image_dir": ("IMAGE_DIR", "Folder the file names in LABELS_CSV are relative to."),
    "labels_csv": ("LABELS_CSV",
                   "CSV with a filename column and one <symbol>_visible column per symbol."),
    "output_dir": ("OUTPUT_MODEL_DIR", "Folder to write the model directory to."),
}


def build_parser() -> argparse.ArgumentParser:
    # The standard library only: --help never waits for TensorFlow.
    from symbol_trainer import cli, settings

    parser = cli.training_parser(__doc__, POSITIONALS)
    parser.add_argument(
        "--symbols", metavar="A,B", type=lambda text: text.split(","),
        help="Train only on these symbols, given by name (star) or column (star_visible), "
             "separated by commas. The outputs keep the CSV's column order. Default: every "
             "<symbol>_visible column.")
    parser.add_argument(
        "--validation-csv", metavar="CSV",
        help="Validate on the frames this CSV lists (same format, file names relative to "
             "IMAGE_DIR) instead of splitting LABELS_CSV; LABELS_CSV is then all training. "
             "Default: a split of LABELS_CSV (see --validation-split and --group-by).")
    parser.add_argument(
        "--groups-csv", metavar="CSV",
        help="Group the split by a column of this CSV, for groups kept apart from the labels "
             "(e.g. a splits.csv with filename,source_image): frames with the same value stay "
             "on one side of the train/validation split. Its filename column names the frames "
             "as LABELS_CSV does (relative to IMAGE_DIR); every labelled frame needs a row, and "
             "rows of other files are ignored. With several columns besides filename, "
             "--group-by names the one to use. Default: groups from LABELS_CSV (see --group-by).")
    settings.add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from symbol_trainer import cli

    parser = build_parser()
    args = parser.parse_args(argv)

    def labelled_images():
        from symbol_trainer.labelled_images import with_validation_set
        from symbol_trainer.labels_csv import images_from_csv

        grouping = {"group_by": args.group_by, "groups_csv": args.groups_csv}
        images = images_from_csv(args.image_dir, args.labels_csv, args.symbols, **grouping)
        if not args.validation_csv:
            return images, None
        validation = images_from_csv(
            args.image_dir, args.validation_csv, images.symbols,
            symbols_from=f"--validation-csv needs every trained symbol ({args.labels_csv})",
            **grouping)
        return with_validation_set(images, validation,
                                   f"--validation-csv {args.validation_csv}")

    return cli.training_main(
        parser, args, labelled_images, POSITIONALS, inputs={"IMAGE_DIR": args.image_dir},
        input_files={"LABELS_CSV": args.labels_csv, "--validation-csv": args.validation_csv,
                     "--groups-csv": args.groups_csv})


if __name__ == "__main__":
    sys.exit(main())
