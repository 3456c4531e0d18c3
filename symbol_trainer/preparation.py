"""Preparing the labelled images for training: the scan, unreadable images dropped, the
checks, the groups and the split, the counts per symbol, and the summary a --dry-run prints.

No TensorFlow here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from symbol_trainer import decoding
from symbol_trainer import duplicates
from symbol_trainer import symbol_paste
from symbol_trainer.errors import InputError, printable
from symbol_trainer.images import scan_images
from symbol_trainer.labelled_images import (
    LabelledImages, check_identical_content, check_learnable, drop_unreadable)
from symbol_trainer.settings import TrainingConfig
from symbol_trainer.splitting import (
    NEAR_DUPLICATE_BITS, NEAR_DUPLICATE_WARNING_SHARE, frame_groups, near_duplicates, split_train_validation)

log = logging.getLogger(__name__)


def split_counts(labels: np.ndarray, is_validation: np.ndarray, symbols: Sequence[str],
                 groups: np.ndarray | None = None) -> dict:
    """Images (and groups), positives and negatives per symbol and split."""
    counts = {}
    for name, mask in (("train", ~is_validation), ("validation", is_validation)):
        part = labels[mask]
        counts[name] = {
            "images": int(mask.sum()),
            "groups": int(len(set(groups[mask]))) if groups is not None else int(mask.sum()),
            "positives": {s: int(np.nansum(part[:, i] == 1)) for i, s in enumerate(symbols)},
            "negatives": {s: int(np.nansum(part[:, i] == 0)) for i, s in enumerate(symbols)},
        }
    return counts


# Fewer validation positives than this make a symbol's validation metrics too noisy to trust.
MIN_VALIDATION_POSITIVES = 10


@dataclass
class PreparedData:
    """Everything decided before training: the readable images and their split."""

    images: LabelledImages         # readable images only, with image_sha1/width/height columns
    is_validation: np.ndarray      # bool per row of images.table
    counts: dict                   # split_counts plus "listed", "unreadable", "grouping"
    unreadable: list[tuple[str, str]]  # (path, reason) of skipped files
    config: TrainingConfig
    groups: np.ndarray | None = None  # the split's group per row; None: frame by frame
    symbol_images: tuple = ()  # symbol_paste.SymbolImage of each --symbol-image, decoded

    def split_table(self) -> pd.DataFrame:
        """split.csv: filename, group and split of every readable frame, in table order."""
        filenames = self.images.table["filename"].astype(str).to_numpy()
        return pd.DataFrame({
            "filename": filenames,
            "group": self.groups if self.groups is not None else filenames,
            "split": np.where(self.is_validation, "validation", "train")})


def prepare_training_data(images: LabelledImages, config: TrainingConfig,
                          is_validation: np.ndarray | None = None) -> PreparedData:
    """Scan the images, drop unreadable ones, check every symbol can be learned, and split
    (unless `is_validation`, one bool per row of `images.table`, gives the split).

    This is everything before training, and all that `--dry-run` does."""
    start = time.monotonic()
    scan = scan_images(images.table["path"].tolist(), workers=decoding.decode_workers())
    log.info("Checked %s images in %.1f s: %s unreadable", f"{len(images.table):,}",
             time.monotonic() - start, f"{len(scan.errors):,}")
    readable = drop_unreadable(images, scan, config.max_unreadable)
    identical, identical_counts = check_identical_content(readable)
    check_learnable(readable)
    symbol_images = symbol_paste.load_symbol_images(config.symbol_images, readable.symbols)
    labels = readable.labels()
    grouping = frame_groups(readable, config.group_by)
    groups = grouping.groups
    given_split = is_validation is not None
    if is_validation is None:
        # Copies of one picture are one group, so that validation never scores a copy of a
        # training frame; with no copies this is `groups` itself.
        split_by = duplicates.split_groups(groups, readable.table["image_sha1"])
        is_validation = split_train_validation(labels, config.validation_split, config.seed,
                                               split_by)
        n_groups = len(set(split_by)) if split_by is not None else len(labels)
        for name, mask in (("training", ~is_validation), ("validation", is_validation)):
            if not mask.any():
                raise InputError(
                    f"the split by {grouping.description} leaves no {name} images: there are "
                    f"too few groups ({n_groups:,}). Choose a finer --group-by, or "
                    "--group-by none.")
        share = is_validation.mean()
        if groups is not None and not (0.5 <= share / config.validation_split <= 2):
            # Few, large groups cannot be cut to the asked share; keeping every symbol
            # validated wins, and the user should know what it cost.
            log.warning("The split by %s puts %.0f %% of the frames in validation, not the "
                        "%.0f %% asked for by --validation-split: the groups are large next to "
                        "the data (%s groups). A finer --group-by or more labelled episodes "
                        "gives a closer split.", grouping.description, 100 * share,
                        100 * config.validation_split, f"{len(set(groups)):,}")
    else:
        if len(is_validation) != len(images.table):
            raise ValueError(f"is_validation has {len(is_validation)} values for "
                             f"{len(images.table)} images")
        is_validation = np.asarray(is_validation, bool)[scan.readable]
        for name, mask in (("training", ~is_validation), ("validation", is_validation)):
            if not mask.any():
                raise InputError(f"the given split has no readable {name} images.")
        names = readable.table["filename"].astype(str).to_numpy()
        copies, warning = duplicates.copies_across_split(identical, is_validation, names)
        identical_counts["validation_copies_of_training"] = copies
        if warning:
            log.warning("%s", warning)
        if groups is not None:
            both = set(groups[is_validation]) & set(groups[~is_validation])
            if both:
                log.warning("%s groups (by %s) have frames in both training and the given "
                            "validation set, for example %r: their validation scores will "
                            "flatter the model.", f"{len(both):,}", grouping.description,
                            sorted(both)[0])
    counts = split_counts(labels, is_validation, readable.symbols, groups)
    counts["listed"] = len(images.table)
    counts["unreadable"] = len(scan.errors)
    counts["grouping"] = grouping.description
    counts["validation_set"] = "given" if given_split else "split"
    counts["identical_content"] = identical_counts
    if groups is None:
        log.info("Split frame by frame: grouping %s.", grouping.description)
    else:
        log.info("Split grouped by %s.", grouping.description)
    for split in ("train", "validation"):
        log.info("%s: %s images%s; positives %s", split.capitalize(),
                 f"{counts[split]['images']:,}",
                 f" in {counts[split]['groups']:,} groups" if groups is not None else "",
                 ", ".join(f"{s} {counts[split]['positives'][s]}" for s in readable.symbols))
    if groups is None:
        looks = [look for look, ok in zip(scan.look, scan.readable) if ok]
        duplicated = int(near_duplicates(looks, is_validation).sum())
        counts["validation"]["near_duplicates_in_train"] = duplicated
        share = duplicated / max(1, int(is_validation.sum()))
        (log.warning if share > NEAR_DUPLICATE_WARNING_SHARE else log.info)(
            "%s of %s validation frames (%.0f %%) look nearly identical to a training frame "
            "(perceptual hash within %d bits)%s", f"{duplicated:,}",
            f"{int(is_validation.sum()):,}", 100 * share, NEAR_DUPLICATE_BITS,
            ": validation scores will flatter the model on new episodes. Keep shots and "
            "episodes together with --group-by (a CSV column, 'folder', or a file-name pattern "
            "such as 'ep(\\d+)_')." if share > NEAR_DUPLICATE_WARNING_SHARE else ".")
    few = {s: n for s, n in counts["validation"]["positives"].items() if n < MIN_VALIDATION_POSITIVES}
    if few:
        log.warning(
            "Fewer than %d positives in validation for %s: their validation metrics are noisy "
            "(one frame moves recall by 10 %% or more). Label more frames that show them.",
            MIN_VALIDATION_POSITIVES, ", ".join(f"{s} ({n})" for s, n in few.items()))
    return PreparedData(readable, is_validation, counts, list(scan.errors), config, groups,
                        symbol_images)


def format_data_summary(prepared: PreparedData, shown_unreadable: int = 20) -> str:
    """A plain-text table of images, positives and negatives per symbol and split."""
    counts, symbols = prepared.counts, prepared.images.symbols
    total = counts["train"]["images"] + counts["validation"]["images"]
    lines = [
        f"Images: {counts['listed']:,} listed, {total:,} readable, {counts['unreadable']:,} skipped "
        f"as unreadable.",
        f"Split: {counts['train']['images']:,} train, {counts['validation']['images']:,} validation "
        + ("(the given validation set)." if counts.get("validation_set") == "given" else
           f"(--validation-split {prepared.config.validation_split}, --seed {prepared.config.seed})."),
    ]
    if prepared.groups is not None:
        lines.append(f"Grouped by {counts['grouping']}: {counts['train']['groups']:,} groups in "
                     f"train, {counts['validation']['groups']:,} in validation; no group is in both.")
    else:
        lines.append(f"Frames split one by one ({counts['grouping']}); "
                     f"{counts['validation'].get('near_duplicates_in_train', 0):,} validation frames "
                     "look nearly identical to a training frame.")
    lines.append("")
    width = max(len("symbol"), *(len(s) for s in symbols))
    head = (f"{'symbol':<{width}}  {'positives':>9}  {'share':>6}  {'train':>6}  {'valid':>6}  "
            f"{'negatives':>9}  {'train':>6}  {'valid':>6}")
    lines += [head, "-" * len(head)]
    for s in symbols:
        tp, vp = counts["train"]["positives"][s], counts["validation"]["positives"][s]
        tn, vn = counts["train"]["negatives"][s], counts["validation"]["negatives"][s]
        share = (tp + vp) / max(1, tp + vp + tn + vn)
        flag = "  <- few validation positives" if vp < MIN_VALIDATION_POSITIVES else ""
        lines.append(f"{s:<{width}}  {tp + vp:>9,}  {share:>6.1%}  {tp:>6,}  {vp:>6,}  "
                     f"{tn + vn:>9,}  {tn:>6,}  {vn:>6,}{flag}")
    if prepared.unreadable:
        lines += ["", "Skipped (unreadable):"]
        lines += [f"  {printable(path)}: {reason}"
                  for path, reason in prepared.unreadable[:shown_unreadable]]
        if len(prepared.unreadable) > shown_unreadable:
            lines.append(f"  ... and {len(prepared.unreadable) - shown_unreadable:,} more")
    return "\n".join(lines)
