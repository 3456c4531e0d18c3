"""The labelled images a run trains on (LabelledImages), the rules for symbol names, and the
checks and edits of a whole table: a given validation set, unreadable images dropped,
identical content across labels, something to learn.

No TensorFlow here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from symbol_trainer import duplicates
from symbol_trainer.errors import InputError
from symbol_trainer.images import ScanResult

log = logging.getLogger(__name__)


# Layer names the model uses itself; a symbol may not take one of them.
RESERVED_LAYER_NAMES = frozenset({"image", "preprocessing", "backbone", "pooling", "head_dropout",
                                  "score_map", "attention_map"})
# Columns of LabelledImages.table that the tool fills in itself; no symbol may take these names.
TABLE_COLUMNS = frozenset({"path", "filename", "folder", "image_sha1", "image_width", "image_height"})
SYMBOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*$")


@dataclass
class LabelledImages:
    """Images with their labels, as both scripts produce them before training.

    `table` has a `path` column (the file to read), a `filename` column (how the user names
    the file in messages and outputs), one float column per symbol holding 1, 0 or NaN (not
    annotated), and any other columns the source had (kept for grouping and reports).
    """

    table: pd.DataFrame
    symbols: list[str]
    source: str  # where the labels came from, for metadata.json
    details: dict = field(default_factory=dict)  # how the source was read, for metadata.json
    # True where each label is the folder a file is in (the binary task): identical pictures
    # with different labels are then a copy in the wrong folder, an error rather than a warning.
    labels_from_folders: bool = False

    def labels(self) -> np.ndarray:
        return self.table[self.symbols].to_numpy(dtype=np.float32)


def clean_symbol_name(raw: str) -> str:
    """The output name for a symbol: runs of characters other than letters, digits and '_'
    become one '_', and leading/trailing '_' are dropped."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", raw.strip()).strip("_")


def check_symbol_names(names: Sequence[str], origin: str) -> None:
    """Raise InputError unless every name is a usable, unique output name."""
    for name in names:
        if not SYMBOL_NAME_PATTERN.match(name):
            raise InputError(
                f"{origin}: symbol name {name!r} is not a valid output name; use letters, digits "
                "and '_', starting with a letter or digit.")
        if name in RESERVED_LAYER_NAMES | TABLE_COLUMNS:
            raise InputError(
                f"{origin}: symbol name {name!r} is reserved for the tool's own use; rename it "
                f"(reserved: {', '.join(sorted(RESERVED_LAYER_NAMES | TABLE_COLUMNS))}).")
    seen = {}
    for name in names:
        if name in seen:
            raise InputError(f"{origin}: symbol name {name!r} appears twice.")
        seen[name] = True


def symbol_from_directory(with_dir: str | os.PathLike) -> str:
    """`with_pentagram/` or `pentagram/` gives `pentagram`."""
    name = Path(os.path.abspath(with_dir)).name
    name = re.sub(r"^(with)[_\- ]+", "", name, flags=re.IGNORECASE)
    return clean_symbol_name(name)


def with_validation_set(train: LabelledImages, validation: LabelledImages,
                        validation_origin: str) -> tuple[LabelledImages, np.ndarray]:
    """Training and given validation images in one table, and the mask of the validation
    rows, for a split chosen by the user rather than drawn. The validation images must have
    the training symbols (in any order) and no file in common with the training images."""
    missing = [s for s in train.symbols if s not in validation.symbols]
    if missing:
        raise InputError(f"{validation_origin}: has no labels for {', '.join(missing)}, which "
                         "the training labels have; validation needs every trained symbol.")
    extra = [s for s in validation.symbols if s not in train.symbols]
    if extra:
        log.info("%s: not validating %s (not in the training labels).", validation_origin,
                 ", ".join(extra))
    def identities(path: str) -> set:
        """The file's real path and, where the file exists, its (device, inode): a hard link
        is the same file under another real path."""
        found = {os.path.realpath(path)}
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            found |= {(stat.st_dev, stat.st_ino)} if stat.st_ino else set()
        return found

    resolved = set().union(*map(identities, train.table["path"]))
    shared = [name for name, path in zip(validation.table["filename"], validation.table["path"])
              if identities(path) & resolved]
    if shared:
        raise InputError(
            f"{validation_origin}: {len(shared):,} image(s) are also training images (for "
            f"example {shared[0]!r}); a validation image must not be trained on. Remove them "
            "from one of the two.")
    table = pd.concat([train.table, validation.table.drop(columns=extra)], ignore_index=True)
    is_validation = np.r_[np.zeros(len(train.table), bool), np.ones(len(validation.table), bool)]
    details = {**train.details, "validation": {"source": validation.source, **validation.details}}
    combined = LabelledImages(table, list(train.symbols), train.source, details,
                              labels_from_folders=train.labels_from_folders)
    log.info("Validating on the %s images of %s instead of a split.",
             f"{len(validation.table):,}", validation_origin)
    return combined, is_validation


def drop_unreadable(images: LabelledImages, scan: ScanResult, max_unreadable: float) -> LabelledImages:
    """Remove the files the scan could not read, or raise if there are too many."""
    if scan.errors:
        for path, reason in scan.errors[:20]:
            log.warning("Skipping %s: %s", path, reason)
        if len(scan.errors) > 20:
            log.warning("... and %d more unreadable files", len(scan.errors) - 20)
    share = len(scan.errors) / max(1, len(images.table))
    if share > max_unreadable:
        first = "; ".join(f"{p}: {r}" for p, r in scan.errors[:3])
        raise InputError(
            f"{len(scan.errors):,} of {len(images.table):,} images ({share:.1%}) cannot be read, "
            f"more than --max-unreadable {max_unreadable}. First: {first}. Fix or remove them, "
            "or raise --max-unreadable.")
    keep = scan.readable
    table = images.table.loc[keep].copy()
    table["image_sha1"] = [h for h in scan.sha1 if h is not None]
    table["image_width"] = [s[0] for s in scan.size if s is not None]
    table["image_height"] = [s[1] for s in scan.size if s is not None]
    return dataclasses.replace(images, table=table.reset_index(drop=True))


def check_identical_content(images: LabelledImages) -> tuple[duplicates.IdenticalContent, dict]:
    """Frames whose files have the same content (by the scan's `image_sha1`; see
    duplicates.py): labels that disagree are an InputError where they come from folders and
    a warning naming the frames where they come from CSV rows; copies with the same labels
    are a warning. Returns what was found and its counts for metadata.json."""
    names = images.table["filename"].astype(str).to_numpy()
    labels = images.labels()
    found = duplicates.identical_content(images.table["image_sha1"].tolist(), labels,
                                         images.symbols)
    outcome = duplicates.report_identical(found, names, labels, images.symbols,
                                          images.labels_from_folders)
    if outcome.error:
        raise InputError(outcome.error)
    for warning in outcome.warnings:
        log.warning("%s", warning)
    return found, outcome.counts


def check_learnable(images: LabelledImages) -> None:
    """Every symbol needs two positives and two negatives: one of each for both splits."""
    labels = images.labels()
    problems = []
    for column, symbol in enumerate(images.symbols):
        positives = int(np.nansum(labels[:, column] == 1))
        negatives = int(np.nansum(labels[:, column] == 0))
        if positives < 2 or negatives < 2:
            problems.append(f"{symbol} ({positives} positive, {negatives} negative)")
    if problems:
        raise InputError(
            "cannot learn " + ", ".join(problems) + ": each symbol needs at least 2 readable "
            "images where it is visible and 2 where it is not, so both the training and the "
            "validation split have one of each. Add images or drop the symbol.")
