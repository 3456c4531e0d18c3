"""Reading a CSV the way spreadsheets write them: UTF-8 with or without a byte-order mark or
UTF-16, comma, semicolon or tab, and row numbers as a spreadsheet shows them.

Standard library only: the labels CSV, --groups-csv and predict.py's CSV inputs read here.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from symbol_trainer.errors import InputError


CSV_DELIMITERS = {",": "','", ";": "';'", "\t": "tab"}


@dataclass(frozen=True)
class CsvFormat:
    """How a labels CSV was read: its text encoding and its separator."""

    encoding: str  # a Python codec name
    delimiter: str
    bom: bool = False

    def describe(self) -> str:
        encoding = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8", "utf-16": "UTF-16"}[self.encoding]
        bom = " with a byte-order mark" if self.bom else ""
        return f"{encoding}{bom}, separator {CSV_DELIMITERS[self.delimiter]}"


def spreadsheet_rows(rows: Sequence[int], shown: int = 5, values: Sequence[str] | None = None) -> str:
    """'rows 3, 7 ('yes'), ...' as a user finds them in a spreadsheet: the first few and a count."""
    items = [f"{r} ({v!r})" if values is not None else str(r)
             for r, v in zip(rows, values if values is not None else rows)]
    word = "row" if len(rows) == 1 else "rows"
    text = f"{word} {', '.join(items[:shown])}"
    if len(rows) > shown:
        text += f" and {len(rows) - shown:,} more ({len(rows):,} rows)"
    return text


def _csv_text(csv_path: Path, role: str = "LABELS_CSV") -> tuple[str, str, bool]:
    """The CSV's text, its encoding and whether it had a byte-order mark; InputError if it is
    not readable text in UTF-8 (with or without BOM) or UTF-16 with a BOM. `role` names the
    file in messages (LABELS_CSV, --groups-csv)."""
    try:
        data = csv_path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{role} {csv_path}: no such file.") from None
    except IsADirectoryError:
        raise InputError(f"{role} {csv_path} is a directory; give the path of the CSV file.") from None
    except OSError as error:
        raise InputError(f"{role} {csv_path}: cannot be read ({error.strerror}).") from None
    if data.startswith(b"PK\x03\x04") or data.startswith(b"\xd0\xcf\x11\xe0"):
        raise InputError(
            f"{csv_path} is a spreadsheet workbook (Excel .xlsx/.xls), not CSV text. Save it as "
            "CSV: in Excel, File > Save As > 'CSV UTF-8 (Comma delimited)'.")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # Excel's "Unicode Text" export: UTF-16 with a BOM (and tabs between cells).
        try:
            return data.decode("utf-16"), "utf-16", True
        except UnicodeDecodeError as error:
            raise InputError(f"{csv_path}: starts with a UTF-16 byte-order mark but is not valid "
                             f"UTF-16 ({error.reason}). Save it again as 'CSV UTF-8'.") from None
    bom = data.startswith(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        byte = data[error.start:error.start + 1]
        raise InputError(
            f"{csv_path}: not UTF-8 text: byte 0x{byte.hex()} on line {line} is not valid "
            "UTF-8. The file is probably in a legacy encoding such as Windows-1252 (older Excel "
            "versions save CSV that way). Save it as 'CSV UTF-8 (Comma delimited)', or convert "
            f"it: iconv -f WINDOWS-1252 -t UTF-8 {csv_path.name} > labels-utf8.csv") from None
    if "\x00" in text:
        raise InputError(f"{csv_path}: contains NUL characters, so it is not a CSV text file. "
                         f"Check that {role} names the right file.")
    return text, "utf-8-sig" if bom else "utf-8", bom


def _csv_delimiter(text: str) -> str:
    """The separator: the candidate that makes `filename` a header cell, else the one that
    splits the header into the most cells (comma on a tie)."""
    header_line = re.split(r"\r\n|\r|\n", text.lstrip("\r\n"), maxsplit=1)[0]
    best, best_cells = ",", 0
    for delimiter in CSV_DELIMITERS:
        try:
            cells = [c.strip() for c in next(csv.reader([header_line], delimiter=delimiter), [])]
        except csv.Error:  # a malformed header is reported by the full read, with its line
            continue
        if "filename" in cells:
            return delimiter
        if len(cells) > best_cells:
            best, best_cells = delimiter, len(cells)
    return best


def read_csv_rows(csv_path: str | os.PathLike, role: str = "LABELS_CSV",
                  example_header: str = "filename,pentagram_visible,star_visible",
                  ) -> tuple[list[str], list[tuple[int, list[str]]], CsvFormat]:
    """The header cells (the first non-blank row) and the non-blank rows after it, each with
    its spreadsheet row number (the first line is row 1), detecting a BOM, UTF-16 and the
    separator (',', ';' or tab). `role` and `example_header` are for the messages."""
    csv_path = Path(csv_path)
    text, encoding, bom = _csv_text(csv_path, role)
    delimiter = _csv_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[tuple[int, list[str]]] = []
    try:
        for number, cells in enumerate(reader, start=1):
            if any(c.strip() for c in cells):
                rows.append((number, cells))
    except csv.Error as error:
        raise InputError(
            f"{csv_path}: malformed CSV near line {reader.line_num}: {error}. Usually an unclosed "
            "quote (\"); open the file in a text editor at that line.") from None
    fmt = CsvFormat(encoding, delimiter, bom)
    if not rows:
        raise InputError(f"{csv_path}: empty; expected a header row such as "
                         f"'{example_header}' and one row per image.")
    (_, header), body = rows[0], rows[1:]
    return [c.strip() for c in header], body, fmt
