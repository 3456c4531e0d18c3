"""One image counted once: files reached by several paths, and pictures stored in several files.

Two kinds of duplicates make a model train on the wrong thing without any error:

- The same file reached by several paths. A symbolic link back to a parent folder
  (`loop -> .`) made a folder of 20 frames count as 820 images; links and hard links to one
  file list it twice. `walk_image_files` searches every real folder once and lists every file
  once, by its (device, inode) identity.
- The same picture in two files (a copy, or a link across folders). `identical_content`
  groups frames by the content hash the scan computes; copies with different labels are a
  labelling mistake, copies with the same labels weigh the picture twice, and a copy on each
  side of the split makes validation score a training frame. `split_groups` keeps copies on
  one side.

No TensorFlow here, and no errors raised: the callers (images, labelled_images, preparation)
decide what is an error.
"""

from __future__ import annotations

import os
import stat as stat_mode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

from symbol_trainer import errors


@dataclass
class Walk:
    """What `walk_image_files` found below one folder."""

    files: list[Path]                                   # image files, each listed once
    # (link, the path by which that folder was searched already) for folder links not followed
    repeated_folders: list[tuple[Path, Path]] = field(default_factory=list)
    # (path, the path by which that file was listed already) for files not listed again
    repeated_files: list[tuple[Path, Path]] = field(default_factory=list)
    unsearchable: list[tuple[Path, str]] = field(default_factory=list)  # (folder, reason)


def _identity(stat: os.stat_result) -> tuple[int, int] | None:
    # Some file systems (and some network mounts) report inode 0 for every file: no identity.
    return (stat.st_dev, stat.st_ino) if stat.st_ino else None


def _walk_order(root: Path, path: Path) -> tuple:
    """Sort key: each folder's files by name, then its subfolders by name, depth first (the
    order of a sorted os.walk)."""
    parts = path.relative_to(root).parts
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def walk_image_files(root: Path, extensions: Collection[str]) -> Walk:
    """Files below `root` whose suffix (lower case) is in `extensions`, recursively, skipping
    hidden files and folders (names starting with '.').

    Symbolic links are followed, also out of `root`, but every real folder is searched once
    and every file listed once: the folders and files without links in their path come
    first, so a file keeps its plain path; links are then followed in walk order, and one
    that leads to a folder searched already (a loop such as `loop -> .`) or a file listed
    already (a link, or a hard link) is recorded in the result instead. A link that leads
    nowhere is listed, so that the scan reports it as missing."""
    walk = Walk([])
    seen_folders: dict[tuple[int, int], Path] = {}
    seen_files: dict[tuple[int, int], Path] = {}
    links: list[Path] = []

    def add_file(path: Path, stat: os.stat_result | None) -> None:
        key = _identity(stat) if stat is not None else None
        if key is not None and key in seen_files:
            walk.repeated_files.append((path, seen_files[key]))
            return
        if key is not None:
            seen_files[key] = path
        walk.files.append(path)

    def search(top: Path) -> None:
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                key = _identity(os.stat(folder))
                if key is not None and key in seen_folders:
                    walk.repeated_folders.append((folder, seen_folders[key]))
                    continue
                if key is not None:
                    seen_folders[key] = folder
                with os.scandir(folder) as scanned:
                    entries = sorted(scanned, key=lambda entry: entry.name)
            except OSError as error:
                walk.unsearchable.append((folder, error.strerror or type(error).__name__))
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                path = folder / entry.name
                try:
                    if entry.is_symlink():
                        if entry.is_dir() or Path(entry.name).suffix.lower() in extensions:
                            links.append(path)
                    elif entry.is_dir(follow_symlinks=False):
                        subfolders.append(path)
                    elif Path(entry.name).suffix.lower() in extensions:
                        add_file(path, entry.stat(follow_symlinks=False))
                except OSError:  # vanished while we looked, or no permission: the scan says
                    walk.files.append(path)
            stack.extend(reversed(subfolders))

    search(root)
    while links:  # links found while following links are appended, and followed in turn
        link = links.pop(0)
        try:
            stat = os.stat(link)
        except OSError:  # a dangling link, or one we may not follow
            walk.files.append(link)
            continue
        if stat_mode.S_ISDIR(stat.st_mode):
            search(link)
        else:
            add_file(link, stat)
    walk.files.sort(key=lambda path: _walk_order(root, path))
    return walk


def describe_repeats(walk: Walk, root: Path) -> str | None:
    """One sentence on the paths `walk` did not count, or None when there were none."""
    def shown(path: Path) -> str:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return str(path)

    parts = []
    if walk.repeated_folders:
        loops = [(link, first) for link, first in walk.repeated_folders
                 if first in link.parents]
        link, first = (loops or walk.repeated_folders)[0]
        example = (f"{shown(link)!r} leads back to {shown(first)!r}, a loop" if loops else
                   f"{shown(link)!r} leads to {shown(first)!r}")
        parts.append(f"{len(walk.repeated_folders):,} folder link(s) lead to a folder searched "
                     f"already (for example {example})")
    if walk.repeated_files:
        path, first = walk.repeated_files[0]
        parts.append(f"{len(walk.repeated_files):,} path(s) lead to an image found already "
                     f"(a link or hard link: for example {shown(path)!r} is {shown(first)!r})")
    if not parts:
        return None
    return (f"{root}: " + "; ".join(parts) + ". Each folder is searched once and each image "
            "used once.")


# --------------------------------------------------------------------------------------------
# Identical content


@dataclass
class IdenticalContent:
    """Frames whose files have the same content hash, by row of the table."""

    sets: list[np.ndarray]  # row indices of each set of two or more identical frames
    # per symbol, the sets in which that symbol is labelled both 1 and 0
    conflicts: dict[str, list[np.ndarray]]

    @property
    def conflicting_rows(self) -> set[int]:
        return {int(i) for found in self.conflicts.values() for rows in found for i in rows}

    def agreeing_sets(self) -> list[np.ndarray]:
        """The sets whose labels agree for every symbol: plain duplicates."""
        conflicting = self.conflicting_rows
        return [rows for rows in self.sets if int(rows[0]) not in conflicting]


def identical_content(sha1: Sequence[str], labels: np.ndarray,
                      symbols: Sequence[str]) -> IdenticalContent:
    """The sets of frames with identical content, and those whose labels disagree (one 1 and
    one 0 for a symbol; a frame not annotated for the symbol disagrees with neither)."""
    rows_of: dict[str, list[int]] = {}
    for index, digest in enumerate(sha1):
        rows_of.setdefault(digest, []).append(index)
    sets = [np.array(rows) for rows in rows_of.values() if len(rows) > 1]
    conflicts: dict[str, list[np.ndarray]] = {}
    for column, symbol in enumerate(symbols):
        found = [rows for rows in sets if (labels[rows, column] == 1).any()
                 and (labels[rows, column] == 0).any()]
        if found:
            conflicts[symbol] = found
    return IdenticalContent(sets, conflicts)


def listing(items: Sequence[str], shown: int = 5) -> str:
    """The first `shown` items joined by '; ', and how many more there are."""
    return errors.listing(items, shown, "; ")


def split_groups(groups: np.ndarray | None, sha1: Sequence[str]) -> np.ndarray | None:
    """The groups the split keeps together, extended so that frames of identical content are
    on one side: `groups` (None: each frame alone) with every two groups that share a picture
    joined. Unchanged, so the split is too, when no picture is in two frames."""
    sha1 = list(sha1)
    if len(set(sha1)) == len(sha1):
        return groups
    if groups is None:
        # Each frame alone, except copies: a copy takes the first copy's row number,
        # zero-padded so that the split's sorting of the groups keeps the row order.
        first: dict[str, int] = {}
        width = len(str(len(sha1)))
        return np.array([f"{first.setdefault(digest, index):0{width}d}"
                         for index, digest in enumerate(sha1)])
    parent: dict[str, str] = {}

    def root_of(group: str) -> str:
        while parent.get(group, group) != group:
            group = parent[group]
        return group

    group_of_content: dict[str, str] = {}
    for group, digest in zip(map(str, groups), sha1):
        other = group_of_content.setdefault(digest, group)
        a, b = root_of(group), root_of(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([root_of(str(group)) for group in groups])


@dataclass
class ContentReport:
    """What `report_identical` found: an error that stops the run (None: none), warnings to
    log, and counts for metadata.json."""

    error: str | None
    warnings: list[str]
    counts: dict


def _copies_text(rows: np.ndarray, names: np.ndarray) -> str:
    return " = ".join(repr(str(names[i])) for i in rows[:3]) + (" = ..." if len(rows) > 3 else "")


def report_identical(found: IdenticalContent, names: np.ndarray, labels: np.ndarray,
                     symbols: Sequence[str], labels_from_folders: bool) -> ContentReport:
    """The messages for the identical frames `found` (names: how the user knows each row).

    Copies with labels that disagree are an error where the labels come from folders (a copy
    or a link in the wrong folder), else a warning per symbol naming them; copies whose
    labels agree are a warning with a count and examples."""
    error, warnings = None, []
    if found.conflicts and labels_from_folders:
        pairs = []
        for symbol, sets in found.conflicts.items():
            column = list(symbols).index(symbol)
            for rows in sets:
                with_rows = rows[labels[rows, column] == 1]
                without_rows = rows[labels[rows, column] == 0]
                pairs.append(f"{str(names[with_rows[0]])!r} (with {symbol}) = "
                             f"{str(names[without_rows[0]])!r} (without)")
        error = (f"{len(pairs):,} picture(s) are both among the frames with the symbol and "
                 "among the frames without it (identical file content: a copy, or a link), so "
                 f"each would be labelled both ways: {listing(pairs)}. Delete the copy or link "
                 "that is in the wrong folder, and run again.")
    elif found.conflicts:
        for symbol, sets in found.conflicts.items():
            column = list(symbols).index(symbol)
            pairs = []
            for rows in sets:
                yes = rows[labels[rows, column] == 1][0]
                no = rows[labels[rows, column] == 0][0]
                pairs.append(f"{str(names[yes])!r} (1) = {str(names[no])!r} (0)")
            warnings.append(
                f"{len(sets):,} set(s) of frames with identical content (copies) have different "
                f"labels for {symbol}: {listing(pairs)}. They train against each other; correct "
                "the rows of the copies (the same picture shows the same symbols), or delete a "
                "copy.")
    agreeing = found.agreeing_sets()
    if agreeing:
        copies = sum(len(rows) - 1 for rows in agreeing)
        examples = [_copies_text(rows, names) for rows in agreeing]
        warnings.append(
            f"{copies:,} frame(s) are copies of another frame with the same labels (identical "
            f"file content; {len(agreeing):,} picture(s) in all): {listing(examples, 3)}. Each "
            "copy gives its picture more weight in training. Copies stay on one side of the "
            "split; delete the ones you did not mean to have.")
    counts = {"pictures_in_several_frames": len(found.sets),
              "copies": sum(len(rows) - 1 for rows in found.sets),
              "conflicting": {s: len(sets) for s, sets in found.conflicts.items()}}
    return ContentReport(error, warnings, counts)


def copies_across_split(found: IdenticalContent, is_validation: np.ndarray,
                        names: np.ndarray) -> tuple[int, str | None]:
    """Validation frames with the content of a training frame, for a validation set the
    user gave: how many, and a warning naming some (None when there are none)."""
    pairs = []
    count = 0
    for rows in found.sets:
        validation, train = rows[is_validation[rows]], rows[~is_validation[rows]]
        if len(validation) and len(train):
            count += len(validation)
            pairs.append(f"{str(names[validation[0]])!r} = {str(names[train[0]])!r}")
    if not count:
        return 0, None
    return count, (
        f"{count:,} validation frame(s) have the same content as a training frame (copies): "
        f"{listing(pairs)}. Validation then scores pictures the model trained on, which "
        "flatters it; delete one of each pair.")
