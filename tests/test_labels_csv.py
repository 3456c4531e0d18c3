"""The labels CSV loader: columns to outputs, every user mistake the issue lists, and a
property test that nothing but InputError ever escapes it."""

from __future__ import annotations

import csv
import io

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from symbol_trainer import errors, labelled_images, labels_csv, model_dir


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six tiny frames, some in episode subfolders, plus one that no test CSV lists."""
    root = tmp_path_factory.mktemp("frames")
    for name in ["a.jpg", "b.jpg", "ep1/c.jpg", "ep1/d.jpg", "ep2/e.png", "ep2/f.png", "unlisted.jpg"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return root


def write(tmp_path, text: str | bytes, name="labels.csv"):
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", newline="")
    else:
        path.write_bytes(text)
    return path


GOOD = ("filename,pentagram_visible,episode,star_visible,notes\n"
        "a.jpg,1,1,0,first\n"
        "b.jpg,0,1,1,\n"
        "ep1/c.jpg,1,2,1,both\n"
        "ep1/d.jpg,0,2,0,\n")


def load(image_dir, csv_path, symbols=None) -> labelled_images.LabelledImages:
    return labels_csv.images_from_csv(image_dir, csv_path, symbols)


def error_of(image_dir, csv_path, symbols=None) -> str:
    with pytest.raises(errors.InputError) as caught:
        load(image_dir, csv_path, symbols)
    return str(caught.value)


def test_columns_become_outputs_in_csv_order_and_other_columns_are_kept(image_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    images = load(image_dir, write(tmp_path, GOOD))
    assert images.symbols == ["pentagram", "star"]
    table = images.table
    assert table["filename"].tolist() == ["a.jpg", "b.jpg", "ep1/c.jpg", "ep1/d.jpg"]
    assert table["pentagram"].tolist() == [1, 0, 1, 0] and table["star"].tolist() == [0, 1, 1, 0]
    assert table["episode"].tolist() == ["1", "1", "2", "2"]
    assert table["notes"].tolist() == ["first", "", "both", ""]
    assert (table["path"] == [str(image_dir / n) for n in table["filename"]]).all()
    assert table["folder"].tolist() == ["", "", "ep1", "ep1"]
    # episode groups the split (found automatically), so it is not reported as ignored.
    assert "Ignoring columns: notes (kept" in caplog.text
    assert images.details["ignored_columns"] == ["notes"]
    assert "3 images in IMAGE_DIR" in caplog.text  # ep2/e.png, ep2/f.png, unlisted.jpg


def test_symbols_subset_by_name_or_column_keeps_csv_order(image_dir, tmp_path):
    path = write(tmp_path, GOOD)
    assert load(image_dir, path, ["star"]).symbols == ["star"]
    assert load(image_dir, path, ["star_visible", "pentagram"]).symbols == ["pentagram", "star"]
    message = error_of(image_dir, path, ["star", "hexagram"])
    assert "--symbols" in message and "'hexagram'" in message and "pentagram, star" in message


def test_a_reserved_name_in_a_column_left_out_by_symbols_is_no_error(image_dir, tmp_path):
    path = write(tmp_path, "filename,image_visible,star_visible\na.jpg,1,1\nb.jpg,0,0\n")
    assert "'image' is reserved" in error_of(image_dir, path)
    assert load(image_dir, path, ["star"]).symbols == ["star"]


def test_seed_example_header(image_dir, tmp_path):
    images = load(image_dir, write(tmp_path, "filename,pentagram_visible,star_visible\n"
                                             "a.jpg,1,0\nb.jpg,0,1\nep1/c.jpg,0,0\n"))
    assert images.symbols == ["pentagram", "star"]


def test_symbol_names_are_cleaned_and_the_cleaning_is_reported(image_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    images = load(image_dir, write(tmp_path, "filename,Red Square_visible,blue-circle_VISIBLE\n"
                                             "a.jpg,1,0\nb.jpg,0,1\n"))
    assert images.symbols == ["Red_Square", "blue_circle"]
    assert "'Red Square_visible' gives the output name 'Red_Square'" in caplog.text


def test_bom_semicolon_crlf_and_subfolders_with_backslashes(image_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    text = "filename;star_visible\r\nep1\\c.jpg;1\r\n./ep1/d.jpg;0\r\n"
    images = load(image_dir, write(tmp_path, b"\xef\xbb\xbf" + text.encode()))
    assert images.table["filename"].tolist() == ["ep1/c.jpg", "ep1/d.jpg"]
    assert "UTF-8 with a byte-order mark, separator ';'" in caplog.text


def test_utf16_tab_separated_excel_unicode_text(image_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    text = "filename\tstar_visible\r\na.jpg\tTRUE\r\nb.jpg\tFALSE\r\n"
    images = load(image_dir, write(tmp_path, text.encode("utf-16")))
    assert images.table["star"].tolist() == [1, 0]
    assert "UTF-16 with a byte-order mark, separator tab" in caplog.text


@pytest.mark.parametrize("spelling, value", [("1", 1), ("0", 0), ("1.0", 1), ("0.0", 0), ("TRUE", 1),
                                             ("false", 0), (" 1 ", 1), ("True", 1)])
def test_accepted_label_spellings(image_dir, tmp_path, spelling, value):
    other = 1 - value
    images = load(image_dir, write(tmp_path, f"filename,star_visible\na.jpg,{spelling}\nb.jpg,{other}\n"))
    assert images.table["star"].tolist() == [value, other]


@pytest.mark.parametrize("csv_text, expected", [
    ("name,star_visible\na.jpg,1\n", ["no 'filename' column", "name, star_visible"]),
    ("file,star_visible\na.jpg,1\n", ["no 'filename' column", "Rename 'file' to filename"]),
    ("filename,star\na.jpg,1\n", ["no column whose name ends in '_visible'", "pentagram_visible"]),
    ("filename,!!_visible\na.jpg,1\n", ["column '!!_visible'", "''"]),
    ("filename,image_visible\na.jpg,1\nb.jpg,0\n", ["'image' is reserved"]),
    ("filename,red square_visible,red_square_visible\na.jpg,1,1\n", ["both give the symbol name 'red_square'"]),
    ("filename,star_visible,star_visible\na.jpg,1,1\n", ["names 'star_visible' more than once"]),
    ("filename,star_visible\n", ["header row but no rows"]),
    ("", ["empty"]),
    ("\n\n", ["empty"]),
    ("filename,star_visible\na.jpg,yes\nb.jpg,2\nep1/c.jpg,0.5\nep1/d.jpg,0\n",
     ["column star_visible: rows 2 ('yes'), 3 ('2'), 4 ('0.5') are not a label",
      "write 0 or 1 (also written 0.0/1.0, or false/true in any case)"]),
    ("filename,star_visible,pentagram_visible\na.jpg,1,\nb.jpg,0,-1\n",
     ["cannot learn pentagram (not annotated in any row)"]),
    ("filename,star_visible\na.jpg,1\nmissing.jpg,0\nep1/C.jpg,0\n",
     ["2 listed file(s) do not exist", "rows 3 ('missing.jpg'), 4 ('ep1/C.jpg')",
      "'ep1/C.jpg' exists as 'ep1/c.jpg'"]),
    ("filename,star_visible\na.jpg,1\nc.jpg,0\n", ["'c.jpg' exists as 'ep1/c.jpg'"]),
    ("filename,star_visible\na.jpg,1\n../a.jpg,0\nep1/../../b.jpg,0\n",
     ["outside IMAGE_DIR in rows 3 ('../a.jpg'), 4 ('ep1/../../b.jpg')"]),
    ("filename,star_visible\na.jpg,1\n/etc/passwd,0\nC:\\frames\\b.jpg,0\n",
     ["absolute path in rows 3 ('/etc/passwd'), 4 ('C:\\\\frames\\\\b.jpg')"]),
    ("filename,star_visible\na.jpg,1\n,0\n", ["column filename: empty in row 3"]),
    ("filename,star_visible\na.jpg,1\nb.jpg,0\na.jpg,0\n",
     ["'a.jpg' in rows 2 and 4", "listed twice with different labels"]),
    ("filename,star_visible,pentagram_visible\na.jpg,1,0\nb.jpg,1,0\n",
     ["cannot learn star (no row with 0), pentagram (no row with 1)"]),
    ("filename,star_visible\na.jpg,1,extra\nb.jpg,0\n", ["row 2: more cells than the header's 2 columns"]),
    ('filename,star_visible\n"a.jpg,1\nb.jpg,0\n', ["malformed CSV", "unclosed quote"]),
    ("filename,,star_visible\na.jpg,x,1\n", ["column 2 has values but no name"]),
])
def test_csv_mistakes_name_file_rows_and_fix(image_dir, tmp_path, csv_text, expected):
    path = write(tmp_path, csv_text)
    message = error_of(image_dir, path)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_many_bad_rows_are_shown_first_few_with_a_count(image_dir, tmp_path):
    rows = "".join(f"a{i}.jpg,1\n" for i in range(40))
    message = error_of(image_dir, write(tmp_path, "filename,star_visible\na.jpg,0\n" + rows))
    assert "40 listed file(s) do not exist" in message
    assert "rows 3 ('a0.jpg'), 4 ('a1.jpg'), 5 ('a2.jpg'), 6 ('a3.jpg'), 7 ('a4.jpg') and 35 more (40 rows)" in message


def test_all_cell_problems_come_in_one_message(image_dir, tmp_path):
    message = error_of(image_dir, write(tmp_path, "filename,star_visible\na.jpg,yes\nnope.jpg,1\nb.jpg,1,x\n"))
    assert "3 problem(s)" in message
    assert "'yes'" in message and "'nope.jpg'" in message and "row 4: more cells" in message


def test_empty_cells_and_minus_one_mean_not_annotated(image_dir, tmp_path, caplog):
    caplog.set_level("INFO")
    text = ("filename,star_visible,pentagram_visible\n"
            "a.jpg,1,\nb.jpg,0,-1\nep1/c.jpg,,1\nep1/d.jpg,1,0\nb.jpg,0,\n")
    images = labels_csv.images_from_csv(image_dir, write(tmp_path, text))
    labels = images.labels()
    np.testing.assert_array_equal(np.isnan(labels), [[0, 1], [0, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(np.nan_to_num(labels, nan=9), [[1, 9], [0, 9], [9, 1], [1, 0]])
    assert images.details["not_annotated"] == {"star": 1, "pentagram": 2}
    assert images.details["duplicate_rows_dropped"] == 1  # b.jpg again, same labels
    assert "Not annotated (empty cell or -1)" in caplog.text and "star 1, pentagram 2 of 4" in caplog.text


def test_same_file_twice_with_same_labels_warns_and_keeps_one(image_dir, tmp_path, caplog):
    images = load(image_dir, write(tmp_path, "filename,star_visible\na.jpg,1\nb.jpg,0\n./a.jpg,1\n"))
    assert images.table["filename"].tolist() == ["a.jpg", "b.jpg"]
    assert "row 4: same file and labels as an earlier row" in caplog.text


def test_not_utf8_says_what_was_detected_and_how_to_fix(image_dir, tmp_path):
    path = write(tmp_path, "filename,star_visible\na.jpg,1\nété.jpg,0\n".encode("cp1252"))
    message = error_of(image_dir, path)
    assert "not UTF-8" in message and "line 3" in message and "CSV UTF-8" in message


def test_excel_workbook_is_recognised(image_dir, tmp_path):
    message = error_of(image_dir, write(tmp_path, b"PK\x03\x04" + bytes(100), "labels.xlsx"))
    assert "spreadsheet workbook" in message and "Save As" in message


def test_missing_csv_and_image_dir(image_dir, tmp_path):
    assert "no such file" in error_of(image_dir, tmp_path / "nope.csv")
    assert "IMAGE_DIR" in error_of(tmp_path / "nope", write(tmp_path, GOOD))


def test_blank_lines_before_the_header_keep_spreadsheet_row_numbers(image_dir, tmp_path):
    message = error_of(image_dir, write(tmp_path, "\n\nfilename,star_visible\na.jpg,1\nb.jpg,maybe\n"))
    assert "row 5 ('maybe')" in message


def test_empty_trailing_columns_and_blank_lines_are_tolerated(image_dir, tmp_path):
    images = load(image_dir, write(tmp_path, "filename,star_visible,,\na.jpg,1,,\n\n,,,\nb.jpg,0,,\n"))
    assert images.table["filename"].tolist() == ["a.jpg", "b.jpg"]


def test_an_extra_column_named_like_an_internal_one_is_kept_under_another_name(image_dir, tmp_path):
    images = load(image_dir, write(tmp_path, "filename,star_visible,path\na.jpg,1,x\nb.jpg,0,y\n"))
    assert images.table["csv_path"].tolist() == ["x", "y"]
    assert images.table["path"].tolist() == [str(image_dir / "a.jpg"), str(image_dir / "b.jpg")]


# --- columns that are nearly a symbol column ------------------------------------------------

TWO_LOGOS = "a.jpg,1,0\nb.jpg,0,1\nep1/c.jpg,1,1\nep1/d.jpg,0,0\n"


@pytest.mark.parametrize("column", ["puma_visable", "puma visible", "puma_vis", "puma-visible",
                                    "pumaVisible", "puma_visble", "puma.visible", "PUMA VISIBLE",
                                    "puma_visibility", "puma_Visibel"])
def test_a_column_nearly_named_like_a_symbol_column_is_an_error(image_dir, tmp_path, column):
    """Such a column used to be kept as an ordinary one: the model trained on adidas alone."""
    path = write(tmp_path, f"filename,adidas_visible,{column}\n" + TWO_LOGOS)
    message = error_of(image_dir, path)
    meant = "PUMA_visible" if column.startswith("PUMA") else "puma_visible"
    assert f"{path}: column {column!r} (did you mean {meant!r}?) looks like a symbol column" in message
    assert "--symbols adidas" in message  # the way out when it holds no labels


def test_several_near_columns_are_named_in_one_message(image_dir, tmp_path):
    path = write(tmp_path, "filename,puma_visable,adidas visible\n" + TWO_LOGOS)
    message = error_of(image_dir, path)
    assert ("columns 'puma_visable' (did you mean 'puma_visible'?), 'adidas visible' (did you mean "
            "'adidas_visible'?) look like symbol columns") in message
    assert "--symbols" not in message  # no symbol column is left to train on


def test_symbols_leave_a_near_column_as_an_ordinary_one_unless_it_names_its_symbol(image_dir, tmp_path):
    path = write(tmp_path, "filename,adidas_visible,puma_visable\n" + TWO_LOGOS)
    images = load(image_dir, path, ["adidas"])
    assert images.symbols == ["adidas"] and images.table["puma_visable"].tolist() == ["0", "1", "1", "0"]
    message = error_of(image_dir, path, ["adidas", "puma"])
    assert "--symbols: 'puma' not found" in message
    assert "'puma_visable' (did you mean 'puma_visible'?)" in message


def test_the_suffix_in_another_letter_case_or_with_spaces_around_is_a_symbol_column(image_dir, tmp_path):
    """Not a near miss: the symbol is trained, named as written (the README promises any case)."""
    images = load(image_dir, write(tmp_path, "filename, adidas_visible ,Puma_Visible \n" + TWO_LOGOS))
    assert images.symbols == ["adidas", "Puma"]


ORDINARY_COLUMNS = ["episode", "shot", "group", "video", "notes", "source_image", "frame", "timestamp",
                    "width", "height", "split", "original_split", "annotator", "comment", "visible",
                    "visibility", "Visible", "vis", "television", "revision", "preview", "division",
                    "n_visits", "visual_check", "tv_vision", "frame_index", "timecode", "error",
                    "logo_probability", "device", "is_disabled", "invisible"]


def test_ordinary_extra_columns_are_no_near_symbol_columns(image_dir, tmp_path):
    assert labels_csv.near_symbol_columns(ORDINARY_COLUMNS) == {}
    header = ",".join(["filename", "star_visible", *ORDINARY_COLUMNS])
    cells = ",".join(["x"] * len(ORDINARY_COLUMNS))
    images = load(image_dir, write(tmp_path, f"{header}\na.jpg,1,{cells}\nb.jpg,0,{cells}\n"))
    assert images.symbols == ["star"]
    assert images.details["ignored_columns"] == [c for c in ORDINARY_COLUMNS if c != "episode"]


def test_a_csv_with_ordinary_extra_columns_still_trains(small_two_symbol_csv, tmp_path):
    import build_multi_hot_model
    from conftest import FAST, run_script

    root, csv_path = small_two_symbol_csv
    frames = pd.read_csv(csv_path)
    for column in ORDINARY_COLUMNS:
        if column not in frames.columns:
            frames[column] = "x"
    frames.to_csv(csv_path, index=False)
    out = tmp_path / "model"
    assert run_script(build_multi_hot_model, [root, csv_path, out, "--weights", "none", *FAST,
                                              "--epochs", "1", "--fine-tune-epochs", "0"]) == 0
    assert model_dir.load_model_dir(out).metadata["symbols"] == ["red_square", "blue_circle"]


def test_dry_run_refuses_a_near_column_and_a_validation_csv_names_its_own(small_two_symbol_csv,
                                                                           tmp_path, capsys):
    """The reported case: `--dry-run` exited 0 for adidas_visible,puma_visable."""
    import build_multi_hot_model

    root, csv_path = small_two_symbol_csv
    frames = pd.read_csv(csv_path)
    frames.rename(columns={"blue_circle_visible": "blue_circle_visable"}).to_csv(
        tmp_path / "typo.csv", index=False)
    out = tmp_path / "m"
    assert build_multi_hot_model.main([str(root), str(tmp_path / "typo.csv"), str(out), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert (f"{tmp_path / 'typo.csv'}: column 'blue_circle_visable' (did you mean "
            "'blue_circle_visible'?)") in error
    assert not out.exists()

    # The misspelt column in --validation-csv: validation needs the trained symbol.
    held_out = frames["episode"] == 3
    frames[~held_out].to_csv(tmp_path / "train.csv", index=False)
    frames[held_out].rename(columns={"blue_circle_visible": "blue circle visible"}).to_csv(
        tmp_path / "valid.csv", index=False)
    assert build_multi_hot_model.main([str(root), str(tmp_path / "train.csv"), str(out), "--dry-run",
                                       "--validation-csv", str(tmp_path / "valid.csv")]) == 2
    error = capsys.readouterr().err
    assert f"'blue_circle' not found in {tmp_path / 'valid.csv'}" in error
    assert "'blue circle visible' (did you mean 'blue_circle_visible'?)" in error


@pytest.mark.parametrize("column", ["é_visible", "_visible", "!!_visible", "__visible"])
def test_a_visible_column_without_a_usable_symbol_name(image_dir, tmp_path, column):
    """An error that names the column, unless --symbols leaves it out; naming it is an error."""
    path = write(tmp_path, f"filename,star_visible,{column}\na.jpg,1,1\nb.jpg,0,0\n")
    message = error_of(image_dir, path)
    assert f"{path}: column {column!r} gives no usable symbol name" in message
    assert "leave it out with --symbols" in message
    assert load(image_dir, path, ["star"]).symbols == ["star"]
    assert f"column {column!r} gives no usable symbol name" in error_of(image_dir, path, ["star", column])


# --- property test ------------------------------------------------------------------------

NAMES = ["a.jpg", "b.jpg", "ep1/c.jpg", "ep1\\d.jpg", "ep2/e.png", "../a.jpg", "/abs.jpg", "",
         "C:\\x.jpg", "missing.jpg", "a,b.jpg", 'quo"te.jpg', "é.jpg", "x\x00y", " a.jpg ", "."]
CELLS = ["0", "1", "", "yes", "2", "0.5", "TRUE", "false", "-1", " 1", "nan", '"', "1;0", "\n"]
HEADERS = ["filename", "star_visible", "pentagram_visible", "episode", "", "Filename", "x_visible",
           "_visible", "image_visible", "a b_visible", "é_visible", "filename", "star visible",
           "pentagram_visable"]


@st.composite
def structured_csv(draw) -> bytes:
    header = draw(st.lists(st.sampled_from(HEADERS) | st.text(max_size=8), min_size=0, max_size=5))
    rows = draw(st.lists(st.lists(st.sampled_from(NAMES) | st.sampled_from(CELLS) | st.text(max_size=6),
                                  min_size=0, max_size=6), max_size=8))
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    quote_all = draw(st.booleans())

    def line(cells):
        if quote_all:
            return delimiter.join('"' + c.replace('"', '""') + '"' for c in cells)
        return delimiter.join(cells)

    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = newline.join(line(r) for r in [header, *rows]) + draw(st.sampled_from(["", newline]))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252", "latin-1"]))
    return text.encode(encoding, errors="replace")


@st.composite
def plausible_csv(draw) -> bytes:
    """Mostly well-formed CSVs with a few wrong cells, so the deeper checks get exercised."""
    good = st.sampled_from(["star_visible", "pentagram_visible", "episode"])
    columns = ["filename", *draw(st.one_of(*[st.lists(good, min_size=1, max_size=3, unique=True)] * 4,
                                           st.lists(st.sampled_from(HEADERS[1:]), min_size=1, max_size=3)))]
    if draw(st.booleans()):
        columns = draw(st.permutations(columns))
    names = draw(st.permutations(["a.jpg", "b.jpg", "ep1/c.jpg", "ep1\\d.jpg", "./ep2/e.png", "ep2/f.png"]))
    names = names[:draw(st.integers(1, 6))]
    width = len(columns) - 1
    rows = [(n, draw(st.lists(st.sampled_from(["0", "1", "TRUE", "false", "1.0"]),
                              min_size=width, max_size=width))) for n in names]
    for _ in range(draw(st.integers(0, 2))):  # a few mistakes: a bad name, cell or a repeat
        i = draw(st.integers(0, len(rows) - 1))
        kind = draw(st.sampled_from(["name", "cell", "repeat"]))
        if kind == "name":
            rows[i] = (draw(st.sampled_from(NAMES)), rows[i][1])
        elif kind == "cell" and width:
            cells = list(rows[i][1])
            cells[draw(st.integers(0, width - 1))] = draw(st.sampled_from(CELLS))
            rows[i] = (rows[i][0], cells)
        else:
            rows.append(rows[i])
    delimiter = draw(st.sampled_from([",", ";", "\t"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(columns)
    for filename, cells in rows:
        cells = list(cells)
        cells.insert(columns.index("filename"), filename)
        writer.writerow(cells)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16"]))
    return buffer.getvalue().encode(encoding, errors="replace")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300), structured_csv(), plausible_csv(), plausible_csv()),
       symbols=st.none() | st.none() | st.none() | st.lists(st.sampled_from(["star", "pentagram_visible", "x", " ", ""]),
                                    max_size=3))
def test_any_csv_either_loads_or_raises_input_error(image_dir, tmp_path, data, symbols):
    path = tmp_path / "fuzz.csv"
    path.write_bytes(data)
    try:
        images = labels_csv.images_from_csv(image_dir, path, symbols)
    except errors.InputError as error:
        assert str(error).strip()
        event(f"InputError: {str(error).split(':')[1].strip()[:30]}")
        return
    event("loaded")
    assert images.symbols and len(images.table) >= 2
    labels = images.labels()
    assert set(np.unique(labels[~np.isnan(labels)])) <= {0.0, 1.0}  # NaN: not annotated
    for j in range(labels.shape[1]):
        assert (labels[:, j] == 1).any() and (labels[:, j] == 0).any()
    assert images.table["filename"].is_unique
    assert all(not name.startswith(("/", "..")) for name in images.table["filename"])
