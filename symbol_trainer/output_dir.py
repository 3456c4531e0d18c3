"""Where a training run may write: checks of OUTPUT_MODEL_DIR made before any work.

Two rules keep a user's files safe:

- OUTPUT_MODEL_DIR must not be, contain, or lie inside an input folder of the run (the image
  folders, the feature cache, the TensorBoard folder), and must not be or contain the folder
  of an input file (the labels and validation CSVs) or the checkout of the scripts. A model
  written into the frames' folder would otherwise feed its own plots back as frames, and
  `--overwrite` would delete the frames. A model folder beside a labels CSV (`work/labels.csv`,
  `work/model/`) is fine: nothing there is read as a frame, and nothing is replaced.
  Paths are compared as the filesystem sees them: symlinks and `..` resolved, and two names
  for one folder (a different case on a case-insensitive disk, a bind mount) caught by
  comparing device and inode.
- `--overwrite` replaces only a model directory this tool wrote (it has `model.keras` and
  `metadata.json`) that holds nothing else than what the tool writes; any other folder is
  refused with the entries that would have been lost.

Standard library only: the scripts run these checks before TensorFlow is imported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from symbol_trainer.errors import InputError, listing

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
# Everything a training run writes into a model directory (report.py's report.html and
# plots/, export.py's saved_model/, model.tflite and model.onnx included; tests/test_output_dir.py checks
# this list against those modules and a real run). --overwrite replaces a directory holding
# only these.
MODEL_DIRECTORY_ENTRIES = frozenset({
    MODEL_FILE, METADATA_FILE, "history.csv", "metrics.json", "split.csv", "evaluation.csv",
    "report.html", "plots", "saved_model", "model.tflite", "model.onnx"})
SHOWN_ENTRIES = 5


def real_path(path: str | os.PathLike) -> Path:
    """`path` absolute, with `~`, symlinks and `..` resolved (missing parts kept as given)."""
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _same(a: Path, b: Path) -> bool:
    """Whether two resolved paths name one file or folder: equal, or the same device and
    inode (which also catches another spelling on a case-insensitive filesystem)."""
    if a == b or os.path.normcase(a) == os.path.normcase(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _within(inner: Path, outer: Path) -> bool:
    """Whether resolved `inner` is `outer` or lies below it."""
    return any(_same(candidate, outer) for candidate in (inner, *inner.parents))


def file_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """The file's device and inode (following symbolic links), or None where there is none.
    `a/missing/../b` is `a/b`, as it becomes once the output's folders are created."""
    for candidate in (path, os.path.realpath(path)):
        try:
            status = os.stat(candidate)
        except (OSError, ValueError):
            continue
        return status.st_dev, status.st_ino
    return None


def within(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether `path` (existing or not) is `directory` or lies below it, after symbolic links
    and `..`, comparing each existing ancestor by device and inode (which also holds on
    case-insensitive file systems and for bind mounts). False when `directory` is missing."""
    return file_identity(directory) is not None and _within(real_path(path), real_path(directory))


def overlap(output: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `output` relates to `other`: 'is', 'lies inside', 'contains', or None."""
    out, inp = real_path(output), real_path(other)
    if _same(out, inp):
        return "is"
    if _within(out, inp):
        return "lies inside"
    if _within(inp, out):
        return "contains"
    return None


def scripts_checkout() -> Path:
    """The folder that holds this tool's scripts and its package (a checkout, or an
    installed copy's site-packages)."""
    return Path(__file__).resolve().parents[1]


def check_outside_inputs(output_dir: str | os.PathLike,
                         inputs: Mapping[str, str | os.PathLike | None]
                         | Iterable[tuple[str, str | os.PathLike | None]],
                         files: Mapping[str, str | os.PathLike | None] = {},
                         name: str = "OUTPUT_MODEL_DIR") -> None:
    """Refuse an `output_dir` that is, contains or lies inside one of the folders `inputs` (a
    mapping from how the user gave it, such as 'IMAGE_DIR' or '--cache-dir', to the path; None
    entries are skipped); that is or contains the folder of one of the `files` (a labels CSV:
    a model folder beside it is fine, but replacing its folder would delete it); or that is
    or contains the scripts' checkout. `inputs` may also be (label, path) pairs, where one
    label names several folders. Raises InputError naming both paths."""
    for label, path in (inputs.items() if isinstance(inputs, Mapping) else inputs):
        if path is None:
            continue
        relation = overlap(output_dir, path)
        if relation is not None:
            raise InputError(
                f"{name} {output_dir} {relation} {label} {path}. The model directory must be "
                f"a folder of its own, outside every input folder: inside one, its report "
                "and plots would be read as frames by the next run, and --overwrite would "
                f"delete your files. Choose another {name}, for example one next to the "
                "folder of your frames.")
    for label, path in files.items():
        if path is None:
            continue
        relation = overlap(output_dir, os.path.dirname(real_path(path)))
        if relation in ("is", "contains"):
            raise InputError(
                f"{name} {output_dir} {'is the folder of' if relation == 'is' else 'contains'} "
                f"{label} {path}; replacing it would delete that file. Choose another {name}, "
                "for example a new folder next to it.")
    checkout = scripts_checkout()
    relation = overlap(output_dir, checkout)
    if relation in ("is", "contains"):
        raise InputError(
            f"{name} {output_dir} {relation} the folder of this tool's scripts ({checkout}); "
            f"writing or replacing it would destroy the tool. Choose another {name}.")


def _foreign_entries(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.name not in MODEL_DIRECTORY_ENTRIES)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool,
                     create_parent: bool = True) -> Path:
    """Refuse, before any work, an output that is a file, or a folder that is not empty
    (unless `overwrite`, and then only a model directory that holds nothing but what this
    tool writes). With `create_parent`, create the parent folder and check it is writable."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"OUTPUT_MODEL_DIR {output_dir} is a file; give a directory path.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise InputError(
                f"OUTPUT_MODEL_DIR {output_dir} exists and is not empty; pass --overwrite to "
                "replace it, or choose another directory.")
        if not ((path / MODEL_FILE).is_file() and (path / METADATA_FILE).is_file()):
            raise InputError(
                f"OUTPUT_MODEL_DIR {output_dir} is not a model directory written by this tool "
                f"(it has no {MODEL_FILE} and {METADATA_FILE}), so --overwrite will not replace "
                f"it: it holds {listing(sorted(entry.name for entry in path.iterdir()), SHOWN_ENTRIES)}. "
                "Choose another OUTPUT_MODEL_DIR, or move those files away yourself.")
        foreign = _foreign_entries(path)
        if foreign:
            raise InputError(
                f"OUTPUT_MODEL_DIR {output_dir} holds files this tool did not write "
                f"({listing(foreign, SHOWN_ENTRIES)}), which --overwrite would delete. Move them out of "
                "the folder, or choose another OUTPUT_MODEL_DIR.")
    if not create_parent:
        return path
    parent = path.resolve().parent
    if not parent.exists():
        parent.mkdir(parents=True)
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot write into {parent}; choose an OUTPUT_MODEL_DIR you can write.")
    return path

