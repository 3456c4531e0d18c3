"""Labelled images from a labels CSV (build_multi_hot_model.py): the filename column, one
<symbol>_visible column per symbol, and every check of its header, names and labels, each
answered with one message that names the file, the rows and what to do.

No TensorFlow here.
"""

from __future__ import annotations

import difflib
import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from symbol_trainer.csv_rows import CSV_DELIMITERS, CsvFormat, read_csv_rows, spreadsheet_rows
from symbol_trainer.errors import InputError, listing
from symbol_trainer.images import find_images
from symbol_trainer.labelled_images import (
    LabelledImages, SYMBOL_NAME_PATTERN, check_symbol_names, clean_symbol_name)
from symbol_trainer.splitting import automatic_group_column

log = logging.getLogger(__name__)


VISIBLE_SUFFIX = "_visible"
# Spellings of a label. TRUE/FALSE are accepted because Excel writes boolean cells that way and
# pandas writes True/False; 1.0/0.0 because spreadsheets export numbers in that form. Words
# such as yes/no are refused: they come in too many languages and forms to guess safely.
LABEL_SPELLINGS = {"1": 1.0, "1.0": 1.0, "true": 1.0, "0": 0.0, "0.0": 0.0, "false": 0.0}
# A frame not annotated for a symbol: it trains the other symbols, and this one's loss and
# metrics leave it out.
NOT_ANNOTATED_SPELLINGS = frozenset({"", "-1", "-1.0"})
ALLOWED_LABELS_TEXT = "0 or 1 (also written 0.0/1.0, or false/true in any case)"
_VISIBLE_COLUMN = re.compile(r"^(?P<symbol>.*)_visible$", re.IGNORECASE)
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _csv_filename(raw: str) -> tuple[str | None, str | None]:
    """The normalised relative path of a `filename` cell, or None and what is wrong with it."""
    name = raw.strip().replace("\\", "/")
    if not name:
        return None, "empty"
    if "\x00" in name:
        return None, "contains a NUL character"
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        return None, "absolute path"
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        return None, "outside IMAGE_DIR"
    if normal == ".":
        return None, "empty"
    return normal, None


# A name like a symbol column's written another way: the symbol, then a word like 'visible'
# that is not the suffix '_visible' (puma_visable, puma visible, pumaVisible, puma_vis).
_LAST_WORD = re.compile(r"^(?P<symbol>.*?[^\W_])[\W_]*(?P<word>[A-Z]?[a-z]+|[A-Z]+)$")


def _looks_like_visible(word: str) -> bool:
    """'visible' misspelt (visable, visble), shortened (vis) or extended (visibility)."""
    word = word.lower()
    return ((len(word) >= 3 and "visible".startswith(word)) or word.startswith("visib")
            or (word.startswith("v") and difflib.SequenceMatcher(None, word, "visible").ratio() >= 0.8))


def near_symbol_columns(header: Sequence[str]) -> dict[str, str]:
    """The columns that look like a `<symbol>_visible` column with a typo or written another
    way, each with the name it probably means. They would otherwise be kept as ordinary
    columns, and their symbol silently not trained."""
    found = {}
    for column in header:
        if not column or column == "filename" or _VISIBLE_COLUMN.match(column):
            continue
        match = _LAST_WORD.match(column)
        if match and _looks_like_visible(match.group("word")):
            found[column] = re.sub(r"[\W_]+", "_", match.group("symbol")).strip("_") + VISIBLE_SUFFIX
    return found


def _near_columns_text(near: dict[str, str]) -> str:
    return ", ".join(f"{column!r} (did you mean {meant!r}?)" for column, meant in near.items())


def _symbol_columns(header: list[str], csv_path: Path, wanted: Sequence[str] | None,
                    wanted_from: str = "--symbols") -> dict[str, str]:
    """Map each `<symbol>_visible` column to its output name, in the CSV's column order;
    `wanted` (symbol or column names, which came from `wanted_from`) keeps a subset. Without
    `wanted`, a column that looks like a misspelt symbol column is an error; with it, only the
    wanted columns must be usable."""
    columns: dict[str, str] = {}
    unusable: dict[str, str] = {}  # column: what its symbol part cleans to
    for column in header:
        match = _VISIBLE_COLUMN.match(column)
        if match is None:
            continue
        symbol = clean_symbol_name(match.group("symbol"))
        if not symbol or not SYMBOL_NAME_PATTERN.match(symbol):
            unusable[column] = symbol
            continue
        if symbol != match.group("symbol"):
            log.info("Column %r gives the output name %r (characters other than letters, digits "
                     "and '_' become '_').", column, symbol)
        clash = [c for c, s in columns.items() if s == symbol]
        if clash:
            raise InputError(f"{csv_path}: columns {clash[0]!r} and {column!r} both give the symbol "
                             f"name {symbol!r}; rename one of them.")
        columns[column] = symbol

    def unusable_error(column: str) -> InputError:
        return InputError(
            f"{csv_path}: column {column!r} gives no usable symbol name (after replacing "
            f"characters other than A-Z, a-z, 0-9 and '_' by '_' it is {unusable[column]!r}). "
            "Name the column <symbol>_visible, for example pentagram_visible"
            + ("." if wanted is not None else ", or leave it out with --symbols."))

    near = near_symbol_columns(header)
    if wanted is None and unusable:
        raise unusable_error(next(iter(unusable)))
    if wanted is None and near:
        one = len(near) == 1
        raise InputError(
            f"{csv_path}: {'column' if one else 'columns'} {_near_columns_text(near)} "
            f"{'looks like a symbol column' if one else 'look like symbol columns'} written "
            f"another way, so {'its symbol' if one else 'their symbols'} would not be trained: a "
            f"symbol column's name is the symbol followed by '{VISIBLE_SUFFIX}'. Rename "
            f"{'it' if one else 'them'}"
            + (f"; or, if {'it holds' if one else 'they hold'} no labels, pass --symbols "
               f"{','.join(columns.values())} to train only on the other columns' symbols."
               if columns else "."))
    if not columns and not (wanted is not None and any(w in unusable for w in wanted)):
        raise InputError(
            f"{csv_path}: no column whose name ends in '{VISIBLE_SUFFIX}' (the header has: "
            f"{', '.join(header)}). Each symbol needs a column <symbol>_visible holding 0 or 1, "
            "for example pentagram_visible."
            + (f" Look at {_near_columns_text(near)}." if near else ""))
    if wanted is not None:
        named_unusable = [w for w in wanted if w in unusable]
        if named_unusable:
            raise unusable_error(named_unusable[0])
        by_name = {**{s: c for c, s in columns.items()}, **{c: c for c in columns}}
        unknown = [w for w in wanted if w not in by_name]
        if unknown:
            raise InputError(
                f"{wanted_from}: {', '.join(map(repr, unknown))} not found in {csv_path}; its "
                f"symbols are {', '.join(columns.values()) or 'none'}."
                + (f" Columns that look like misspelt symbol columns: {_near_columns_text(near)}."
                   if near else ""))
        chosen = {by_name[w] for w in wanted}
        columns = {c: s for c, s in columns.items() if c in chosen}
    check_symbol_names(list(columns.values()), f"{csv_path}")
    return columns


def _check_csv_header(header: list[str], rows: list[tuple[int, list[str]]], csv_path: Path,
                      fmt: CsvFormat) -> None:
    """Raise InputError for a header that cannot be read as labels: a named column missing,
    repeated, or values under an empty header cell."""
    for index, name in enumerate(header):
        if not name and any(index < len(cells) and cells[index].strip() for _, cells in rows):
            raise InputError(f"{csv_path}: column {index + 1} has values but no name in the header "
                             "row; name it or delete it.")
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise InputError(f"{csv_path}: the header names {', '.join(map(repr, repeated))} more than "
                         "once; every column needs its own name.")
    if "filename" not in header:
        similar = [c for c in header if c.lower().replace(" ", "").replace("_", "") in
                   ("filename", "file", "path", "image", "filepath", "imagepath")]
        hint = f" Rename {similar[0]!r} to filename." if similar else ""
        raise InputError(
            f"{csv_path}: no 'filename' column (read as {fmt.describe()}; the header has: "
            f"{', '.join(header) or 'nothing'}). Add a column named filename holding each image's "
            f"path relative to IMAGE_DIR.{hint}")


def _filenames_and_problems(values: list[tuple[int, str]], image_dir: Path) -> tuple[list[str | None], list[str]]:
    """Each (row, filename cell) normalised, None where unusable, and what is wrong."""
    names: list[str | None] = []
    bad: dict[str, list[tuple[int, str]]] = {}
    for number, raw in values:
        name, trouble = _csv_filename(raw)
        names.append(name)
        if trouble:
            bad.setdefault(trouble, []).append((number, raw))
    problems = []
    for trouble, found in bad.items():
        numbers = [n for n, _ in found]
        if trouble == "empty":
            problems.append(f"column filename: empty in {spreadsheet_rows(numbers)}; every row needs "
                            "the image's path relative to IMAGE_DIR.")
        else:
            problems.append(
                f"column filename: {trouble} in {spreadsheet_rows(numbers, values=[v for _, v in found])}; "
                f"file names must be relative paths inside IMAGE_DIR {image_dir} (e.g. "
                "episode1/frame0001.jpg).")
    return names, problems


def _labels_and_problems(column: str, values: list[tuple[int, str]]) -> tuple[np.ndarray, list[str]]:
    """One `_visible` column's labels as 1, 0 or NaN (not annotated: an empty cell or -1),
    and what is wrong with it."""
    labels = np.zeros(len(values), np.float32)
    invalid, invalid_values = [], []
    for i, (number, raw) in enumerate(values):
        raw = raw.strip()
        value = LABEL_SPELLINGS.get(raw.lower())
        if value is not None:
            labels[i] = value
        elif raw in NOT_ANNOTATED_SPELLINGS:
            labels[i] = np.nan
        else:
            invalid.append(number)
            invalid_values.append(raw)
    problems = []
    if invalid:
        problems.append(
            f"column {column}: {spreadsheet_rows(invalid, values=invalid_values)} "
            f"{'is not' if len(invalid) == 1 else 'are not'} a label; write {ALLOWED_LABELS_TEXT}, "
            "or leave the cell empty (or write -1) where the symbol was not annotated.")
    return labels, problems


def _first_listings(names: list[str | None], labels: np.ndarray,
                    row_numbers: list[int]) -> tuple[np.ndarray, list[str], list[int]]:
    """Which rows to keep (the first row of each file), the files listed again with other
    labels, and the rows that repeat a file with the same labels."""
    first_row_of: dict[str, int] = {}
    conflicts, repeats, keep = [], [], np.ones(len(names), bool)
    for i, name in enumerate(names):
        if name is None:
            continue
        if name not in first_row_of:
            first_row_of[name] = i
            continue
        first = first_row_of[name]
        keep[i] = False
        if np.array_equal(labels[first], labels[i], equal_nan=True):
            repeats.append(row_numbers[i])
        else:
            conflicts.append(f"{name!r} in rows {row_numbers[first]} and {row_numbers[i]}")
    return keep, conflicts, repeats


def images_from_csv(image_dir: str | os.PathLike, csv_path: str | os.PathLike,
                    symbols: Sequence[str] | None = None, *,
                    symbols_from: str = "--symbols", group_by: str | None = None,
                    groups_csv: str | os.PathLike | None = None) -> LabelledImages:
    """The labelled table of a multi-label task from a labels CSV.

    The CSV has a `filename` column (a path relative to `image_dir`, '/' or '\\\\' between
    folders) and one `<symbol>_visible` column per symbol holding 0 or 1. Symbols keep the
    CSV's column order; `symbols` (names, or column names) keeps a subset. Other columns are
    kept in the table. Every problem in the cells is collected and raised as one InputError
    that names the rows as a spreadsheet numbers them. `symbols_from` says where `symbols`
    came from, for the error when one is missing from the CSV.

    `groups_csv` (--groups-csv) adds the column of another CSV that groups the split, with
    the same file names (see split_groups.add_groups); `frame_groups` then groups by it
    unless --group-by says otherwise. `group_by` (--group-by) says which column groups the
    split, so that it is not reported as an ignored column.
    """
    image_dir, csv_path = Path(image_dir), Path(csv_path)
    if not image_dir.is_dir():
        raise InputError(f"IMAGE_DIR {image_dir}: no such directory.")
    if symbols is not None and not [s for s in symbols if s.strip()]:
        raise InputError("--symbols: empty; give symbol names separated by commas, e.g. pentagram,star.")
    header, rows, fmt = read_csv_rows(csv_path)
    if not rows:
        raise InputError(f"{csv_path}: has a header row but no rows of labels; add one row per image.")
    log.info("Read %s: %s, %s rows", csv_path, fmt.describe(), f"{len(rows):,}")
    _check_csv_header(header, rows, csv_path, fmt)
    wanted = None if symbols is None else list(dict.fromkeys(s.strip() for s in symbols if s.strip()))
    columns = _symbol_columns(header, csv_path, wanted, symbols_from)
    all_visible = [c for c in header if c and _VISIBLE_COLUMN.match(c)]
    extra = [c for c in header if c and c != "filename" and c not in all_visible]
    if groups_csv is not None:
        grouping = None
    else:
        grouping = automatic_group_column(extra) if group_by is None else group_by
    ignored = [c for c in extra if c != grouping]
    if ignored:
        log.info("Ignoring columns: %s (kept with the data for later use)", ", ".join(ignored))
    unused = [c for c in all_visible if c not in columns]
    if unused:
        log.info("Not training on: %s (left out by --symbols)", ", ".join(unused))

    index_of = {c: i for i, c in enumerate(header) if c}

    def column_values(column: str) -> list[tuple[int, str]]:
        i = index_of[column]
        return [(number, cells[i] if i < len(cells) else "") for number, cells in rows]

    problems: list[str] = []
    too_long = [n for n, cells in rows
                if len(cells) > len(header) and any(c.strip() for c in cells[len(header):])]
    if too_long:
        problems.append(
            f"{spreadsheet_rows(too_long)}: more cells than the header's {len(header)} columns. "
            f"A file name containing the separator {CSV_DELIMITERS[fmt.delimiter]} must be quoted.")
    names, found = _filenames_and_problems(column_values("filename"), image_dir)
    problems += found
    labels = np.zeros((len(rows), len(columns)), np.float32)
    for j, column in enumerate(columns):
        labels[:, j], found = _labels_and_problems(column, column_values(column))
        problems += found
    row_numbers = [number for number, _ in rows]
    keep, conflicts, repeats = _first_listings(names, labels, row_numbers)
    if conflicts:
        problems.append(f"{len(conflicts):,} file(s) listed twice with different labels: "
                        f"{listing(conflicts, separator='; ')}. "
                        "Keep one row per file, with the right labels.")
    if repeats:
        log.warning("%s: %s: same file and labels as an earlier row; each file is used once.",
                    csv_path, spreadsheet_rows(repeats))
    missing = [(row_numbers[i], name) for i, name in enumerate(names)
               if name is not None and keep[i] and not os.path.isfile(os.path.join(image_dir, name))]
    if missing:
        missing_names = [name for _, name in missing]
        problems.append(
            f"column filename: {len(missing):,} listed file(s) do not exist in IMAGE_DIR {image_dir}: "
            f"{spreadsheet_rows([n for n, _ in missing], values=missing_names)}."
            f"{_missing_file_hint(image_dir, missing_names)}")
    if problems:
        raise InputError(
            f"{csv_path} ({fmt.describe()}): {len(problems)} problem(s); fix them and run again "
            "(add --dry-run to check without training):\n  - " + "\n  - ".join(problems))

    labels = labels[keep]
    hopeless = []
    for j, symbol in enumerate(columns.values()):
        if np.isnan(labels[:, j]).all():
            hopeless.append(f"{symbol} (not annotated in any row)")
        elif not (labels[:, j] == 1).any():
            hopeless.append(f"{symbol} (no row with 1)")
        elif not (labels[:, j] == 0).any():
            hopeless.append(f"{symbol} (no row with 0)")
    if hopeless:
        raise InputError(
            f"{csv_path}: cannot learn {', '.join(hopeless)}: a symbol needs frames where it is "
            "visible (1) and frames where it is not (0). Label some, or leave it out with --symbols.")

    not_annotated = {symbol: int(np.isnan(labels[:, j]).sum())
                     for j, symbol in enumerate(columns.values())}
    if any(not_annotated.values()):
        log.info("Not annotated (empty cell or -1), so left out of that symbol's loss and "
                 "metrics but used for the others: %s of %s frames.",
                 ", ".join(f"{s} {n:,}" for s, n in not_annotated.items()), f"{len(labels):,}")
    kept_names = [names[i] for i in np.flatnonzero(keep)]
    table = pd.DataFrame({
        "path": [os.path.join(image_dir, n) for n in kept_names],
        "filename": kept_names,
        "folder": [posixpath.dirname(n) for n in kept_names],
    })
    for j, symbol in enumerate(columns.values()):
        table[symbol] = labels[:, j]
    for column in extra:
        values = [value for (_, value), kept in zip(column_values(column), keep) if kept]
        table[column if column not in table.columns else f"csv_{column}"] = values
    details = {}
    if groups_csv is not None:
        from symbol_trainer import split_groups
        details["groups_csv"] = {"path": str(groups_csv), "column": split_groups.add_groups(
            table, groups_csv, group_by, keys=kept_names, key_of=lambda raw: _csv_filename(raw)[0],
            labels_from=str(csv_path), names_are=f"relative to IMAGE_DIR {image_dir}, as in {csv_path}",
            rows=[row_numbers[i] for i in np.flatnonzero(keep)])}

    listed = {os.path.normpath(p) for p in table["path"]}
    unlisted = [p for p in find_images(image_dir, quiet=True) if os.path.normpath(p) not in listed]
    if unlisted:
        log.info("%s images in IMAGE_DIR %s are not listed in %s; they are not used (for example %s).",
                 f"{len(unlisted):,}", image_dir, csv_path.name,
                 Path(os.path.relpath(unlisted[0], image_dir)).as_posix())
    details = {"labels_csv": str(csv_path), "image_dir": str(image_dir), "csv_format": fmt.describe(),
               "rows": len(rows), "duplicate_rows_dropped": len(repeats),
               "not_annotated": not_annotated,
               "ignored_columns": ignored, "unlisted_images": len(unlisted), **details}
    return LabelledImages(table, list(columns.values()),
                          f"labels CSV {csv_path} with images in {image_dir}", details)


def _missing_file_hint(image_dir: Path, missing: Sequence[str]) -> str:
    """A hint when the missing names exist with other letter case, or under another folder."""
    by_lower, by_base = {}, {}
    for path in find_images(image_dir, quiet=True):
        relative = Path(os.path.relpath(path, image_dir)).as_posix()
        by_lower.setdefault(relative.lower(), relative)
        by_base.setdefault(posixpath.basename(relative), relative)
    for name in missing:
        if name.lower() in by_lower:
            return (f" Names are case-sensitive: {name!r} exists as {by_lower[name.lower()]!r}.")
        if posixpath.basename(name) in by_base:
            return (f" {name!r} exists as {by_base[posixpath.basename(name)]!r}: is IMAGE_DIR the "
                    "folder the file names are relative to?")
    return " Check IMAGE_DIR, and that the names are relative to it."
