"""Labelled images from two folders (build_binary_classifier.py): WITH_DIR shows the symbol,
WITHOUT_DIR does not.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from symbol_trainer.errors import InputError
from symbol_trainer.images import IMAGE_EXTENSIONS, find_images
from symbol_trainer.labelled_images import LabelledImages, check_symbol_names, symbol_from_directory

log = logging.getLogger(__name__)


def images_from_directories(with_dir: str | os.PathLike, without_dir: str | os.PathLike,
                            symbol: str | None = None, *, group_by: str | None = None,
                            groups_csv: str | os.PathLike | None = None) -> LabelledImages:
    """The labelled table of a binary task: images in `with_dir` are positives.

    `groups_csv` (--groups-csv) adds the column of a CSV that groups the split, its file
    names relative to the CSV's own folder (or absolute), matched by real path; `group_by`
    (--group-by) names that column when it has several (see split_groups.add_groups)."""
    with_path, without_path = Path(with_dir).resolve(), Path(without_dir).resolve()
    for path, role in ((with_dir, "WITH_DIR"), (without_dir, "WITHOUT_DIR")):
        if not Path(path).is_dir():
            raise InputError(f"{role} {path}: no such directory.")
    if with_path == without_path or with_path in without_path.parents \
            or without_path in with_path.parents:
        raise InputError(
            f"WITH_DIR {with_dir} and WITHOUT_DIR {without_dir} overlap; the images of the "
            "two classes must be in separate folders, neither inside the other.")
    if symbol is None:
        symbol = symbol_from_directory(with_dir)
        origin = f"symbol name derived from WITH_DIR {with_dir} (pass --symbol NAME to choose)"
    else:
        origin = "--symbol"
    check_symbol_names([symbol], origin)
    positives, negatives = find_images(with_dir), find_images(without_dir)
    log.info("Found %s images with the symbol, %s without", f"{len(positives):,}",
             f"{len(negatives):,}")
    for found, role, path in ((positives, "WITH_DIR", with_dir),
                              (negatives, "WITHOUT_DIR", without_dir)):
        if not found:
            raise InputError(
                f"{role} {path}: no images found (looked recursively for "
                f"{', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}).")
    paths = positives + negatives
    # The folder below WITH_DIR or WITHOUT_DIR, so that ep1/ of both is one episode.
    folders = [Path(os.path.relpath(p.parent, root)).as_posix()
               for found, root in ((positives, with_dir), (negatives, without_dir)) for p in found]
    table = pd.DataFrame({
        "path": [str(p) for p in paths],
        "filename": [str(p) for p in paths],
        symbol: np.r_[np.ones(len(positives)), np.zeros(len(negatives))].astype(np.float32),
        "folder": ["" if f == "." else f for f in folders],
    })
    details = {}
    if groups_csv is not None:
        from symbol_trainer import split_groups
        base = os.path.dirname(os.path.abspath(groups_csv))
        details["groups_csv"] = {"path": str(groups_csv), "column": split_groups.add_groups(
            table, groups_csv, group_by, keys=[os.path.realpath(p) for p in paths],
            key_of=lambda raw: os.path.realpath(os.path.join(base, raw.strip().replace("\\", "/"))),
            labels_from=f"WITH_DIR {with_dir} and WITHOUT_DIR {without_dir}",
            names_are=f"relative to the folder of the groups CSV ({base}), or absolute")}
    return LabelledImages(table, [symbol], f"directories {with_dir} (with) and {without_dir} (without)",
                          details, labels_from_folders=True)
