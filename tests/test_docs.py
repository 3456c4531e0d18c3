"""The documentation holds together: every relative link in README.md and docs/*.md leads to a
file that exists (and an #anchor into a markdown file to one of its headings), the README
stays short, and docs/reference.md is what docs/make_reference.py writes from the parsers.

Standard library only, and fast: nothing here imports TensorFlow.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 400
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and [text](target "title"); images ![..](..) too. Not reference-style links.
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")


def prose_lines(path: Path):
    """(line number, text) of the lines outside fenced code blocks, code spans removed."""
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces
    to hyphens. `--pooling` in 'The head: --pooling' gives 'the-head---pooling'."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for _, line in prose_lines(path):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(2))
        name, n = base, 0
        while name in found:  # GitHub numbers repeated headings: name, name-1, name-2
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def links(path: Path):
    """(line number, target) of every link outside code, in the order they appear."""
    for number, line in prose_lines(path):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, match.group(1)


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: ({target})"
        if not destination.exists():
            problems.append(f"{where} leads to {file_part}, which does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            problems.append(f"{where}: {destination.relative_to(ROOT)} has no heading "
                            f"#{anchor}")
    return problems


def test_the_pages_exist():
    """A user looks for these pages; the README links to them."""
    for name in ("training", "grouped-splits", "batch-jobs", "offline", "exports",
                 "prediction", "report", "development", "measurements", "reference"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(page):
    assert broken_links(page) == []


def test_the_link_check_catches_a_broken_file_and_anchor(tmp_path, monkeypatch):
    """The check itself can fail: a missing file, a missing heading, a code span ignored."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## The head: --pooling\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#the-head---pooling) [self](#page)\n"
                    "[gone](missing.md) [no heading](other.md#nothing) [here](#nowhere)\n"
                    "`[code](ignored.md)` [web](https://example.com/x)\n"
                    "```\n[fenced](ignored.md)\n# not a heading\n```\n")
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert "missing.md, which does not exist" in problems[0]
    assert "other.md has no heading #nothing" in problems[1]
    assert "page.md has no heading #nowhere" in problems[2]


def test_slugs_match_githubs():
    assert slug("Grouped splits: keeping episodes apart") == "grouped-splits-keeping-episodes-apart"
    assert slug("What a random split hides: bench/leak.py") == "what-a-random-split-hides-benchleakpy"
    assert slug("One run at a time per OUTPUT_MODEL_DIR") == "one-run-at-a-time-per-output_model_dir"
    assert slug("Scripting: --json and progress") == "scripting---json-and-progress"
    assert slug("`build_binary_classifier.py`") == "build_binary_classifierpy"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, more than {README_MAX_LINES}: move the details into a "
        "page under docs/ and link to it")


def test_readme_keeps_the_quick_start_commands():
    """The two Quick start commands, word for word (CI runs the second)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ("python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt && "
            ".venv/bin/python build_multi_hot_model.py examples/symbols "
            "examples/symbols/labels.csv demo_model --weights none --image-size 64 "
            "--overwrite") in readme
    assert ("python3.11 -m venv .venv && .venv/bin/pip install -r requirements-dev.txt && "
            ".venv/bin/python -m pytest -q -n 2 tests") in readme


def make_reference():
    spec = importlib.util.spec_from_file_location("make_reference",
                                                  ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_up_to_date():
    committed = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert make_reference().reference() == committed, (
        "docs/reference.md is out of date: run `python docs/make_reference.py`")


def test_reference_documents_every_flag_of_the_three_programs():
    """Every option string of every parser appears in the reference, in its flag column."""
    module = make_reference()
    found, _ = module.programs()
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    flags = {option for _, _, parser in found for action in parser._actions
             for option in action.option_strings if option not in ("-h", "--help")}
    assert len(flags) > 40
    missing = sorted(f for f in flags if not re.search(rf"\| `{re.escape(f)}[ `]", text)
                     and not re.search(rf", `{re.escape(f)}[ `]", text))
    assert missing == []


def test_reference_check_mode_reports_a_stale_file(tmp_path, monkeypatch):
    module = make_reference()
    stale = tmp_path / "reference.md"
    stale.write_text("old\n")
    monkeypatch.setattr(module, "OUTPUT", stale)
    assert module.main(["--check"]) == 1
    assert stale.read_text() == "old\n"
    assert module.main([]) == 0
    assert module.main(["--check"]) == 0


def test_reference_imports_no_tensorflow():
    """Building the parsers runs no program and loads no TensorFlow."""
    code = ("import sys, importlib.util as u; s = u.spec_from_file_location('m', "
            f"{str(ROOT / 'docs' / 'make_reference.py')!r}); m = u.module_from_spec(s); "
            "s.loader.exec_module(m); m.reference(); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=ROOT)
    assert completed.returncode == 0, completed.stderr


def modules_missing_from_layout(root: Path) -> list[str]:
    """The modules of symbol_trainer/ (and programs/) that docs/layout.md's tree does not name
    on a line of their own."""
    text = (root / "docs" / "layout.md").read_text(encoding="utf-8")
    named = {match.group(1) for match in re.finditer(r"^\s+(\S+\.py)\s", text, re.MULTILINE)}
    package = root / "symbol_trainer"
    modules = [*sorted(package.glob("*.py")), *sorted((package / "programs").glob("*.py"))]
    return [str(module.relative_to(root)) for module in modules if module.name not in named]


def test_layout_names_every_module_of_the_package():
    """docs/layout.md is the map of the code: a new module without its line there fails here."""
    assert modules_missing_from_layout(ROOT) == [], (
        "add a line for each of these modules to docs/layout.md (name, lines, what it holds)")


def test_the_layout_check_catches_a_missing_module(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "symbol_trainer" / "programs").mkdir(parents=True)
    for name in ("symbol_trainer/settings.py", "symbol_trainer/new_stage.py",
                 "symbol_trainer/programs/predict.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "docs" / "layout.md").write_text(
        "# Layout\n\nSee new_stage.py in prose.\n\n```\nsymbol_trainer/\n"
        "  settings.py   591  every setting\n  programs/\n    predict.py   274  main()\n```\n")
    assert modules_missing_from_layout(tmp_path) == ["symbol_trainer/new_stage.py"]


def measurement_index_problems(root: Path) -> list[str]:
    """docs/measurements.md indexes every results file under docs/measurements/, and every
    number in a file's one-line result appears in that file (copied, not retyped)."""
    index = (root / "docs" / "measurements.md").read_text(encoding="utf-8")
    results = root / "docs" / "measurements"
    problems, indexed = [], set()
    for line in index.splitlines():
        match = re.match(r"^\| \[[^\]]*\]\(measurements/([^)#]+)\) \|[^|]*\|(.*)\|\s*$", line)
        if not match:
            continue
        name, result = match.group(1), match.group(2)
        indexed.add(name)
        if not (results / name).is_file():
            continue  # the link check reports it
        text = (results / name).read_text(encoding="utf-8")
        problems += [f"{name}: {number} is not in the file"
                     for number in re.findall(r"(?<![\w.])[+-]?\d+\.\d+", result)
                     if number not in text]
    problems += [f"{path.name} is not indexed" for path in sorted(results.glob("*.md"))
                 if path.name not in indexed]
    return problems


def test_the_measurements_index_is_complete_and_copied():
    assert measurement_index_problems(ROOT) == []


def test_the_measurements_check_catches_a_retyped_number_and_a_missing_file(tmp_path):
    (tmp_path / "docs" / "measurements").mkdir(parents=True)
    (tmp_path / "docs" / "measurements" / "a.md").write_text("| b - a | +0.044 (-0.000 to +0.092) |\n")
    (tmp_path / "docs" / "measurements" / "new.md").write_text("# new\n")
    (tmp_path / "docs" / "measurements.md").write_text(
        "| file | by | result |\n|---|---|---|\n"
        "| [a.md](measurements/a.md) | `bench/x.py` | b - a +0.044 (-0.000 to +0.091) |\n")
    assert measurement_index_problems(tmp_path) == [
        "a.md: +0.091 is not in the file", "new.md is not indexed"]


def test_help_texts_point_to_pages_that_exist():
    """A help text sends the reader to a page under docs/ that exists, not to the README, which
    no longer holds the details (and is not shipped with `pip install .`)."""
    found, _ = make_reference().programs()
    helps = [(script, action.option_strings, action.help or "")
             for script, _, parser in found for action in parser._actions]
    assert [(s, o) for s, o, text in helps if "README" in text] == []
    named = [(s, o, page) for s, o, text in helps for page in re.findall(r"docs/[\w.-]+\.md", text)]
    assert len(named) >= 4  # --devices, --pooling, --download-weights-only, --refit at least
    assert [(s, o, page) for s, o, page in named if not (ROOT / page).is_file()] == []
