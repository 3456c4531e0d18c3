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


def build_parser() -> argparse.ArgumentParser:
    import common

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # a prefix that works today would break when a flag is added
    parser.add_argument("image_dir", metavar="IMAGE_DIR",
                        help="Folder the file names in LABELS_CSV are relative to.")
    parser.add_argument("labels_csv", metavar="LABELS_CSV",
                        help="CSV with a filename column and one <symbol>_visible column per symbol.")
    parser.add_argument("output_dir", metavar="OUTPUT_MODEL_DIR",
                        help="Folder to write the model directory to.")
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
    common.add_training_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    import common

    args = build_parser().parse_args(argv)
    common.configure_logging(quiet=args.quiet, debug=args.debug)

    def run() -> int:
        config = common.config_from_args(args)
        images = common.images_from_csv(args.image_dir, args.labels_csv, args.symbols)
        is_validation = None
        if args.validation_csv:
            validation = common.images_from_csv(
                args.image_dir, args.validation_csv, images.symbols,
                symbols_from=f"--validation-csv needs every trained symbol ({args.labels_csv})")
            images, is_validation = common.with_validation_set(
                images, validation, f"--validation-csv {args.validation_csv}")
        print(common.check_or_train(images, config, args.output_dir, overwrite=args.overwrite,
                                    dry_run=args.dry_run, is_validation=is_validation))
        return 0

    return common.run_command(run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
