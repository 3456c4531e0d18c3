"""--groups-csv: the group of every labelled frame, read from a CSV of its own.

A grouped split keeps the frames of one group (an episode, a shot, the photo that augmented
copies were made from) on one side of the train/validation split. The group usually is a
column of the labels CSV (--group-by COLUMN), but datasets often keep it in another file,
such as a splits.csv with `filename,source_image`. `add_groups` reads such a file, checks
that it gives every labelled frame exactly one group, and adds that column to the table.

`common` calls this module from its loaders (and this module uses `common`'s CSV reader),
so it imports `common` and is imported there inside the functions that use it.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import pandas as pd

from symbol_trainer.csv_rows import read_csv_rows, spreadsheet_rows
from symbol_trainer.errors import InputError
from symbol_trainer.labelled_images import TABLE_COLUMNS
from symbol_trainer.errors import listing

log = logging.getLogger(__name__)

FLAG = "--groups-csv"
SHOWN = 5  # frames or rows named in a message, before "and N more"


def _examples(names: Sequence[str], rows: Sequence[int] | None) -> str:
    """'rows 3 ('a.jpg'), 9 ('b.jpg') and 4 more' with row numbers, else the names alone."""
    if rows is not None:
        return spreadsheet_rows(rows, SHOWN, values=names)
    return listing([repr(name) for name in names], SHOWN)


def _group_column(header: list[str], csv_path: str, group_by: str | None) -> str:
    """The column that holds the groups: the only one besides `filename`, or the one that
    --group-by names."""
    if "filename" not in header:
        raise InputError(
            f"{FLAG} {csv_path}: no 'filename' column (the header has: {', '.join(header) or 'nothing'}). "
            "It needs a filename column naming each frame, and one column with its group, "
            "e.g. filename,episode.")
    repeated = sorted({c for c in header if c and header.count(c) > 1})
    if repeated:
        raise InputError(f"{FLAG} {csv_path}: the header names {', '.join(map(repr, repeated))} "
                                "more than once; every column needs its own name.")
    others = [c for c in header if c and c != "filename"]
    if group_by is not None and group_by in others:
        return group_by
    if group_by is not None:
        raise InputError(
            f"--group-by {group_by!r}: not a column of {FLAG} {csv_path} (its columns besides "
            f"filename: {', '.join(others) or 'none'}). With {FLAG}, --group-by names the column "
            "of that file that groups the split" + (", or is left out." if len(others) == 1 else "."))
    if len(others) == 1:
        return others[0]
    if not others:
        raise InputError(
            f"{FLAG} {csv_path}: no column besides filename; add one that holds each frame's "
            "group (e.g. its episode or source photo).")
    raise InputError(
        f"{FLAG} {csv_path}: {len(others)} columns besides filename ({', '.join(others)}); say "
        "which one groups the split with --group-by COLUMN.")


def add_groups(table: pd.DataFrame, groups_csv: str | os.PathLike, group_by: str | None, *,
               keys: Sequence[str], key_of: Callable[[str], str | None], labels_from: str,
               names_are: str, rows: Sequence[int] | None = None) -> str:
    """Add to `table` the column of `groups_csv` that groups the split, and return its name.

    `keys` identify the table's frames, in its order, as `key_of` turns a filename cell of
    the groups CSV into a key (None for a cell that names no possible frame). `labels_from`
    names where the frames came from, `names_are` says how the groups CSV must name them
    (for messages), and `rows` are the frames' row numbers in a labels CSV, if any.
    `group_by` names the column when the file has several. Every frame needs one non-empty
    group; rows for other files are ignored (and counted in the log)."""
    header, body, fmt = read_csv_rows(groups_csv, role=FLAG, example_header="filename,episode")
    column = _group_column(header, str(groups_csv), group_by)
    taken = set(table.columns) | TABLE_COLUMNS
    if column in taken:
        raise InputError(
            f"{FLAG} {groups_csv}: its column {column!r} has the name of a column that the "
            f"labels ({labels_from}) or the tool itself already use; rename it in one of the files.")
    name_at, group_at = header.index("filename"), header.index(column)
    group_of: dict[str, tuple[int, str, str]] = {}  # key: (row, filename cell, group)
    conflicts, empty_names, unmatched = [], [], []
    for number, cells in body:
        raw = cells[name_at] if name_at < len(cells) else ""
        group = cells[group_at].strip() if group_at < len(cells) else ""
        if not raw.strip():
            empty_names.append(number)
            continue
        key = key_of(raw)
        if key is None:
            unmatched.append((number, raw.strip()))
            continue
        if key in group_of and group_of[key][2] != group:
            first, first_raw, first_group = group_of[key]
            conflicts.append(f"{first_raw.strip()!r} in rows {first} ({first_group!r}) and "
                             f"{number} ({group!r})")
        group_of.setdefault(key, (number, raw, group))

    problems = []
    if conflicts:
        problems.append(f"{len(conflicts):,} file(s) listed twice with different groups: "
                        f"{listing(conflicts, SHOWN, '; ')}. "
                        "A frame belongs to one group; keep one row per file.")
    if empty_names:
        problems.append(f"column filename: empty in {spreadsheet_rows(empty_names, SHOWN)}; "
                        "every row needs the frame's file name.")
    missing = [i for i, key in enumerate(keys) if key not in group_of]
    if missing:
        first_listed = next((c[name_at].strip() for _, c in body
                             if name_at < len(c) and c[name_at].strip()), None)
        shown = _examples([table["filename"].iloc[i] for i in missing],
                          None if rows is None else [rows[i] for i in missing])
        problems.append(
            f"{len(missing):,} of {len(keys):,} labelled frames have no row: {shown} of "
            f"{labels_from}. Every labelled frame needs a group; add a row for each, with "
            f"its file name {names_are}"
            + (f" (this file names e.g. {first_listed!r})."
               if first_listed and len(missing) == len(keys) else "."))
    blank = [i for i, key in enumerate(keys) if key in group_of and not group_of[key][2]]
    if blank:
        problems.append(
            f"column {column}: empty for {len(blank):,} labelled frame(s), in "
            f"{spreadsheet_rows([group_of[keys[i]][0] for i in blank], SHOWN)}; every "
            "labelled frame needs a group.")
    if problems:
        raise InputError(
            f"{FLAG} {groups_csv} ({fmt.describe()}): {len(problems)} problem(s); fix them and "
            "run again:\n  - " + "\n  - ".join(problems))

    labelled = set(keys)
    unused = sorted(unmatched + [(row, raw.strip()) for key, (row, raw, _) in group_of.items()
                                 if key not in labelled])
    log.info("Read %s %s: %s, %s rows; its column %r groups the split%s.", FLAG, groups_csv,
             fmt.describe(), f"{len(body):,}", column,
             "" if len(header) <= 2 else
             f" (not using {', '.join(c for c in header if c and c not in ('filename', column))})")
    if unused:
        log.info("%s %s: %s of its files are not labelled in %s; their rows are ignored "
                 "(for example row %d, %r).", FLAG, groups_csv, f"{len(unused):,}", labels_from,
                 *unused[0])
    table[column] = [group_of[key][2] for key in keys]
    return column
