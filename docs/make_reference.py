#!/usr/bin/env python3
"""Write docs/reference.md, every flag of the three programs, from their own argparse parsers.

    python docs/make_reference.py            # rewrite docs/reference.md
    python docs/make_reference.py --check    # exit 1 (and say so) if it is out of date

The parsers are built with each script's build_parser(), without running the program (nothing
here imports TensorFlow), so the reference cannot drift from `--help`: tests/test_docs.py
fails when the committed file differs from what this script writes. The flag column, the
synopsis and the defaults are formatted here rather than by argparse's help formatter, whose
layout changes between Python versions and terminal widths.

Hand-written here: the links from a flag to the page that explains it (SEE_ALSO), and the
few sentences around the tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
OUTPUT = DOCS / "reference.md"


# ==============================================================================================
# THE MODULES THE PARSERS COME FROM: the one place to change when they move. Each entry: the file name a user runs
# from a checkout, the console command `pip install .` installs, and the parser.


def programs():
    """[(script, console command, parser)], and the module holding add_training_arguments and
    BACKBONES."""
    sys.path.insert(0, str(ROOT))
    from symbol_trainer import settings
    from symbol_trainer.programs import build_binary_classifier, build_multi_hot_model, predict

    return [("build_binary_classifier.py", "build-binary-classifier",
             build_binary_classifier.build_parser()),
            ("build_multi_hot_model.py", "build-multi-hot-model",
             build_multi_hot_model.build_parser()),
            ("predict.py", "predict-symbols", predict.build_parser())], settings
# ==============================================================================================


TRAINING_SCRIPTS = ("build_binary_classifier.py", "build_multi_hot_model.py")

# A flag -> the page (relative to docs/) that explains what it does in more depth.
SEE_ALSO = {
    "--symbols": "../README.md#the-labels-csv",
    "--groups-csv": "grouped-splits.md#groups-kept-in-another-csv---groups-csv",
    "--validation-dirs": "checking-data.md#links-copies-and-unreadable-files",
    "--validation-csv": "checking-data.md#links-copies-and-unreadable-files",
    "--backbone": "#backbones",
    "--alpha": "#backbones",
    "--weights": "offline.md",
    "--image-size": "choosing-the-backbone.md",
    "--resize": "training.md#how-training-works",
    "--epochs": "training.md#early-stopping-on-validation-average-precision",
    "--fine-tune-epochs": "training.md#how-training-works",
    "--fine-tune-fraction": "training.md#how-training-works",
    "--fine-tune-schedule": "fine-tuning.md",
    "--fine-tune-warmup": "fine-tuning.md",
    "--refit": "refit.md",
    "--symbol-image": "symbol-image.md",
    "--symbol-image-rate": "symbol-image.md",
    "--symbol-image-size": "symbol-image.md",
    "--augment": "training.md#augmentation",
    "--flip": "training.md#augmentation",
    "--pooling": "training.md#the-head---pooling",
    "--patience": "training.md#early-stopping-on-validation-average-precision",
    "--fine-tune-patience": "training.md#early-stopping-on-validation-average-precision",
    "--positive-weighting": "training.md#rare-symbols---positive-weighting",
    "--group-by": "grouped-splits.md",
    "--max-unreadable": "checking-data.md#links-copies-and-unreadable-files",
    "--threshold-for": "report.md#thresholds",
    "--cache-dir": "training.md#the-feature-cache",
    "--decoded-cache-gb": "training.md#how-training-works",
    "--mixed-precision": "training.md#mixed-precision-and-xla",
    "--xla": "training.md#mixed-precision-and-xla",
    "--devices": "batch-jobs.md#several-gpus-and-several-machines",
    "--tensorboard": "report.md#tensorboard-and-progress",
    "--dry-run": "checking-data.md#checking-data-without-training---dry-run",
    "--overwrite": "checking-data.md#what-the-tool-refuses-to-keep-your-files-safe",
    "--no-resume": "batch-jobs.md#resuming-after-a-crash-a-kill-or-a-preemption",
    "--export": "exports.md",
    "--download-weights-only": "offline.md",
    "--json": "batch-jobs.md#scripting---json-and-progress",
    "--threshold": "prediction.md#the-output",
    "--segments": "prediction.md#video-segments",
    "--shard": "prediction.md#sharding-one-archive-across-many-jobs---shard",
    "--hysteresis": "prediction.md#video-segments",
    "--merge-gap": "prediction.md#video-segments",
    "--min-duration": "prediction.md#video-segments",
    "--save-frames": "prediction.md#the-annotation-loop-for-a-new-episode",
    "--heatmaps": "prediction.md#heatmaps-where-the-model-sees-a-symbol",
    "--heatmaps-all": "prediction.md#heatmaps-where-the-model-sees-a-symbol",
}


def cell(text: str) -> str:
    """Text safe inside a markdown table cell: one line, | escaped (also in code spans, as
    GitHub's tables need), and < outside code spans written &lt; so that `<symbol>` is not
    taken for an HTML tag."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if isinstance(action.metavar, tuple):
        return " ".join(action.metavar)
    if action.metavar is not None:
        return action.metavar
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return (action.dest if not action.option_strings else action.dest).upper()


def synopsis_of(action: argparse.Action) -> str:
    """How a positional argument appears in the synopsis."""
    name = metavar(action)
    return {"+": f"{name} [{name} ...]", "?": f"[{name}]", "*": f"[{name} ...]"}.get(
        action.nargs, name)


def flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{cell(metavar(action))}`"
    shown = metavar(action)
    return ", ".join(f"`{cell(option + (' ' + shown if shown else ''))}`"
                     for option in action.option_strings)


def default(action: argparse.Action) -> str:
    if not action.option_strings:
        return "required" if action.nargs not in ("?", "*") else "-"
    if action.nargs == 0:
        return "off"
    if action.default is None or action.default == []:
        return "-"  # no value; the help says what happens without the flag
    return f"`{cell(action.default)}`"


def help_text(action: argparse.Action, prog: str) -> str:
    """The help as --help prints it (%(default)s and the like filled in), one line."""
    if not action.help:
        return ""
    params = dict(vars(action), prog=prog)
    for name, value in list(params.items()):
        if hasattr(value, "__name__"):
            params[name] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    text = action.help % params
    see = next((SEE_ALSO[o] for o in action.option_strings if o in SEE_ALSO), None)
    return cell(text) + (f" See [more]({see})." if see else "")


def table(actions, prog: str) -> list[str]:
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for action in actions:
        if isinstance(action, argparse._HelpAction):
            continue
        lines.append(f"| {flag(action)} | {default(action)} | {help_text(action, prog)} |")
    return lines + [""]


def groups(parser: argparse.ArgumentParser):
    """[(title, actions)] in the order --help shows them; argparse's unnamed groups as
    'Arguments' (positional) and 'Options'."""
    found = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        title = group.title
        if group is parser._positionals:
            title = "Arguments"
        elif group is parser._optionals:
            title = "Options"
        found.append((title[0].upper() + title[1:], actions))
    return found


def usage(prog: str, parser: argparse.ArgumentParser) -> list[str]:
    if parser.usage:
        return (parser.usage % {"prog": prog}).splitlines()
    positional = [synopsis_of(a) for a in parser._actions if not a.option_strings]
    return [" ".join([prog, *positional, "[options]"])]


def program_section(script: str, command: str, parser: argparse.ArgumentParser,
                    training_dests: set[str]) -> list[str]:
    lines = [f"## {script}", "",
             f"Installed by `pip install .` as the command `{command}`; from a checkout, "
             f"`python {script}`.", "", "```text",
             *(line.strip() for line in usage(script, parser)), "```", ""]
    if parser.description:
        lines += ["What `--help` says first:", "", "```text",
                  *(line.rstrip() for line in parser.description.strip().splitlines()),
                  "```", ""]
    for title, actions in groups(parser):
        own = [a for a in actions if a.dest not in training_dests]
        if own:
            lines += [f"### {script}: {title.lower()}", "", *table(own, script)]
    if script in TRAINING_SCRIPTS:
        lines += ["And every option of [both training scripts](#options-of-both-training-scripts).",
                  ""]
    return lines


def training_section(settings) -> list[str]:
    bare = argparse.ArgumentParser(prog="TRAINING_SCRIPT", add_help=False)
    settings.add_training_arguments(bare)
    lines = ["## Options of both training scripts", "",
             "`settings.add_training_arguments` adds these to both training scripts; the "
             "defaults and ranges of the training settings live in one place, "
             "`settings.TrainingConfig`. Every value is checked before any work starts (the "
             "ranges are in [How training works](training.md#checking-the-values)), and flags "
             "must be written in full.", ""]
    for title, actions in groups(bare):
        lines += [f"### {title[0].upper() + title[1:]}", "", *table(actions, "TRAINING_SCRIPT")]
    lines += ["### Backbones", "",
              "What `--backbone` and `--alpha` accept, from `settings.BACKBONES`:", "",
              "| `--backbone` | Keras Applications model | `--alpha` (widths with ImageNet weights) "
              "| smallest `--image-size` |", "|---|---|---|---:|"]
    for name, spec in settings.BACKBONES.items():
        alphas = ", ".join(f"{a:g}" for a in spec.alphas) if spec.alphas else "1.0 only"
        lines.append(f"| `{name}` | `{spec.constructor}` | {alphas} | {spec.min_size} |")
    return lines + [""]


def reference() -> str:
    found, settings = programs()
    bare = argparse.ArgumentParser(add_help=False)
    settings.add_training_arguments(bare)
    training_dests = {a.dest for a in bare._actions}
    lines = ["# Command reference: every flag", "",
             "Generated from the programs' own argument parsers by `python docs/make_reference.py`; "
             "do not edit by hand (`tests/test_docs.py` fails when this file is out of date). "
             "The [README](../README.md#command-reference) has the short version; "
             "[exit codes](../README.md#exit-codes) are there too.", "",
             *(f"- [{script}](#{script.replace('.', '')})" for script, _, _ in found),
             "- [Options of both training scripts](#options-of-both-training-scripts)", ""]
    for script, command, parser in found:
        if script == "predict.py":
            lines += training_section(settings)
        lines += program_section(script, command, parser,
                                 training_dests if script in TRAINING_SCRIPTS else set())
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="Write nothing; exit 1 if docs/reference.md differs from what "
                             "would be written.")
    args = parser.parse_args(argv)
    text = reference()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print("docs/reference.md is out of date: run `python docs/make_reference.py`",
                  file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"Wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
