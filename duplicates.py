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

No TensorFlow here, and no errors raised: the callers in common.py decide what is an error.
"""

from __future__ import annotations

import os
import stat as stat_mode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection


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
