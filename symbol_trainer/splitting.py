"""The train/validation split: groups of frames (an episode column, --group-by or
--groups-csv), near-duplicate frames across the split, and the seeded, stratified split
itself (iterative stratification over groups).

No TensorFlow here.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from symbol_trainer.errors import InputError
from symbol_trainer.labelled_images import LabelledImages, TABLE_COLUMNS

log = logging.getLogger(__name__)


# Columns that name a frame's episode or shot; the first present groups the split by default.
AUTOMATIC_GROUP_COLUMNS = ("episode", "group", "video", "shot")


def automatic_group_column(columns: Sequence[str]) -> str | None:
    """The column that groups the split when --group-by is not given, if any."""
    return next((c for name in AUTOMATIC_GROUP_COLUMNS for c in columns if c.lower() == name), None)


@dataclass(frozen=True)
class FrameGroups:
    """The group of every frame (None: each frame alone) and how it was chosen."""

    groups: np.ndarray | None
    description: str


def frame_groups(images: LabelledImages, group_by: str | None) -> FrameGroups:
    """The groups that the split keeps together, from --group-by (see TrainingConfig), or
    without it from the column that --groups-csv added."""
    table = images.table
    columns = [c for c in table.columns if c not in TABLE_COLUMNS and c not in images.symbols]
    from_file = images.details.get("groups_csv")
    if group_by is None and from_file:
        group_by = from_file["column"]
    if group_by is None:
        automatic = automatic_group_column(columns)
        if automatic is None:
            return FrameGroups(None, "none (each frame alone)")
        group_by = automatic
        how = f"the column {group_by!r} (found automatically; --group-by none splits frames one by one)"
    elif group_by == "none":
        return FrameGroups(None, "none (--group-by none)")
    else:
        how = None
    if group_by == "folder":
        groups = table["folder"].astype(str).to_numpy()
        description = "folder"
    elif group_by in columns:
        values = table[group_by].astype(str).str.strip()
        empty = values == ""
        if empty.any():
            log.warning("--group-by %s: %s frames have no value (for example %s); each of them is "
                        "its own group.", group_by, f"{int(empty.sum()):,}",
                        table.loc[empty, "filename"].iloc[0])
            values = values.where(~empty, "(no group) " + table["filename"])
        groups = values.to_numpy()
        description = how or f"the column {group_by!r}" + (
            f" of --groups-csv {from_file['path']}" if from_file and from_file["column"] == group_by else "")
    else:
        try:
            pattern = re.compile(group_by)
        except re.error as error:
            pattern = None
            reason = f"not a valid regular expression ({error})"
        if pattern is not None and pattern.groups >= 1:
            found = [pattern.search(name) for name in table["filename"]]
            unmatched = [name for name, match in zip(table["filename"], found)
                         if match is None or match.group(1) is None]
            if unmatched:
                raise InputError(
                    f"--group-by {group_by!r}: the pattern does not match {len(unmatched):,} of "
                    f"{len(table):,} file names (for example {unmatched[0]!r}); every file "
                    "name needs a group. Adjust the pattern.")
            groups = np.array([match.group(1) for match in found], dtype=object)
            description = f"the pattern {group_by!r} on file names"
        else:
            if pattern is not None:
                reason = "a regular expression needs a group in parentheses, e.g. 'ep(\\d+)_'"
            available = ", ".join(columns) if columns else "none"
            raise InputError(
                f"--group-by {group_by!r}: not a column of the labels (other columns: "
                f"{available}), not 'folder' or 'none', and {reason}.")
    if len(set(groups)) < 2 and how is not None:
        log.warning("The column %r has the same value for every frame; splitting frames one by "
                    "one.", group_by)
        return FrameGroups(None, f"none (the column {group_by!r} has one value)")
    if len(set(groups)) < 2:
        raise InputError(
            f"--group-by {group_by!r}: every frame is in the same group ({groups[0]!r}), so "
            "no split can keep groups apart. Choose another grouping, or --group-by none.")
    return FrameGroups(np.asarray(groups, dtype=str), description)


# Hamming distance between two frames' perceptual hashes up to which they count as
# near-duplicates. On 3,000 make_symbol_frames.py frames, 98 % of frames have a frame of their
# own shot within 4 bits; 31 % have one in another episode that close (the generator reuses
# a few background photographs, so some of those are near-duplicates too).
NEAR_DUPLICATE_BITS = 4
# Warn about a frame-by-frame split when more of the validation frames than this have one.
NEAR_DUPLICATE_WARNING_SHARE = 0.05


def near_duplicates(hashes: Sequence[int], is_validation: np.ndarray,
                    max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Which validation frames have a training frame within `max_bits` of their perceptual
    hash: a bool per validation frame."""
    as_array = np.array([int(h) for h in hashes], dtype=np.uint64)
    validation, train = as_array[is_validation], as_array[~is_validation]
    found = np.zeros(len(validation), bool)
    if not len(train):
        return found
    for start in range(0, len(validation), 512):  # 512 x 20,000 comparisons at a time
        chunk = validation[start:start + 512, None] ^ train[None, :]
        found[start:start + 512] = (np.bitwise_count(chunk) <= max_bits).any(axis=1)
    return found


def split_train_validation(labels: np.ndarray, validation_fraction: float, seed: int,
                           groups: Sequence | None = None) -> np.ndarray:
    """A seeded, stratified split; returns a boolean array, True for validation rows.

    `labels` is (frames, symbols) with 1, 0 or NaN. Frames of one group always land in the same
    split (with no groups every frame is its own group). Groups are assigned by iterative
    stratification (Sechidis et al., 2011): the symbol with the fewest positives left is
    placed first, each group going to the split that most lacks that symbol's positives, so
    every symbol gets positives in validation in proportion. Negatives of each symbol are then
    balanced the same way, and the remaining groups fill the validation size.

    When groups are as large as a symbol's validation target (a sign seen in two episodes of
    30 frames), the paper's rule sends every group to training, which always lacks more
    frames, and the symbol is never validated. So the last group holding a symbol's
    positives (or negatives) goes to the split that has none of them yet, if one has none.
    """
    labels = np.asarray(labels, dtype=np.float32)
    n = len(labels)
    if groups is None:
        group_ids = np.arange(n)
    else:
        _, group_ids = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(group_ids.max()) + 1 if n else 0
    # Per group: frames, positives and negatives per symbol.
    frames = np.bincount(group_ids, minlength=n_groups).astype(float)
    pos = np.zeros((n_groups, labels.shape[1]))
    neg = np.zeros((n_groups, labels.shape[1]))
    np.add.at(pos, group_ids, np.nan_to_num(labels == 1).astype(float))
    np.add.at(neg, group_ids, np.nan_to_num(labels == 0).astype(float))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)  # random tie-breaking, repeatable by seed
    fractions = np.array([1 - validation_fraction, validation_fraction])
    # Desired counts per split: rows (train, validation), columns the count kinds.
    counts = np.concatenate([frames[:, None], pos, neg], axis=1)
    totals = counts.sum(axis=0)
    desired = fractions[:, None] * totals[None, :]
    # A class with two or more frames puts at least one in validation, so small symbols are
    # still validated on both classes (plain proportions would give a 2-positive symbol 0.4).
    at_least_one = (totals >= 2) & (np.arange(len(totals)) > 0)
    desired[1, at_least_one] = np.maximum(desired[1, at_least_one], 1.0)
    desired[0] = totals - desired[1]
    initial = desired.copy()
    holders = (counts > 0).sum(axis=0)  # groups with frames of each count kind
    assigned = np.full(n_groups, -1)
    unassigned = set(order.tolist())

    def place(group: int, split: int) -> None:
        assigned[group] = split
        desired[split] -= counts[group]
        unassigned.discard(group)

    n_symbols = labels.shape[1]
    # Positives first (rarest symbol first), then negatives; columns 1.. of counts.
    for kind_offset in (1, 1 + n_symbols):
        while True:
            remaining = [g for g in order if g in unassigned]
            if not remaining:
                break
            rem = np.array(remaining)
            totals = counts[rem, kind_offset:kind_offset + n_symbols].sum(axis=0)
            candidates = np.flatnonzero(totals > 0)
            if len(candidates) == 0:
                break
            column = kind_offset + candidates[np.argmin(totals[candidates])]
            remaining_holders = rem[counts[rem, column] > 0]
            for i, group in enumerate(remaining_holders):
                need = desired[:, column]
                untouched = need == initial[:, column]  # splits with none of this kind yet
                if (i == len(remaining_holders) - 1 and holders[column] >= 2
                        and untouched.sum() == 1):
                    split = int(np.flatnonzero(untouched)[0])
                elif need[0] != need[1]:
                    split = int(np.argmax(need))
                else:
                    split = int(np.argmax(desired[:, 0]))
                place(int(group), split)
    for group in [g for g in order if g in unassigned]:
        place(int(group), int(np.argmax(desired[:, 0])))
    return assigned[group_ids] == 1
