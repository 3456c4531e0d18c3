"""report.html: what a trained model gets right and wrong, for people who read a report and
not code. One self-contained file (plots and thumbnails embedded, nothing fetched), written
into the model directory with its plots also saved under plots/.

Plots use matplotlib's object API (`Figure`, no pyplot), so nothing global changes in the
process that trains, and no display is needed.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from symbol_trainer import evaluation
from symbol_trainer import heatmaps

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
CONTACT_SHEET_SIZE = 12  # thumbnails of false positives, and of false negatives, per symbol
HITS_SHOWN = 6  # thumbnails of the most confident true positives per symbol
THUMBNAIL_BOX = (192, 128)  # pixels; the frame's aspect ratio is kept inside it

_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #1d2330; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 2px solid #d8dce6; }
h3 { margin: 28px 0 8px; font-size: 18px; }
.lead { color: #4a5367; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 7px; text-align: right; border-bottom: 1px solid #e3e6ee; white-space: nowrap; }
th { background: #f2f4f8; position: sticky; top: 0; } td.name, th.name { text-align: left; }
td.weak { background: #fde8e6; } td.unmet { color: #b3261e; font-weight: 600; }
td.unstable, .unstable { color: #a35200; font-weight: 600; }
ul.warnings { background: #fff6e5; border-left: 4px solid #e0a030; padding: 8px 12px 8px 32px; }
ul.warnings li { margin: 4px 0; overflow-wrap: anywhere; }
.symbol { border-top: 1px solid #d8dce6; padding-top: 4px; }
.row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
.sheet { display: flex; flex-wrap: wrap; gap: 8px; margin: 4px 0 12px; }
figure { margin: 0; width: 192px; font-size: 12px; }
figure img { display: block; max-width: 192px; max-height: 128px; border: 1px solid #c9ced9; }
figcaption { overflow-wrap: anywhere; color: #333a48; }
.confusion td, .confusion th { text-align: center; min-width: 64px; }
.wide { overflow-x: auto; }
a.up { font-size: 12px; font-weight: normal; margin-left: 12px; }
.note { color: #4a5367; font-size: 13px; } .none { color: #6b7385; font-style: italic; }
code { background: #f2f4f8; padding: 0 3px; }
.scale { display: inline-block; width: 160px; height: 10px; vertical-align: middle;
         border: 1px solid #c9ced9; background: linear-gradient(to right, %s); }
""" % ", ".join("rgb(%d,%d,%d)" % tuple(colour) for colour in heatmaps.COLOURS.astype(int))


# --------------------------------------------------------------------------------------------
# Plots


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def kept_epoch(history: pd.DataFrame, phase: str) -> int | None:
    """The epoch of `phase` whose weights the run kept, by the rule of `training.fit_phase`:
    the highest validation AP, or the lowest validation loss where no AP was computed; 0 when
    fine-tuning kept the head phase's weights because none of its epochs beat them (only in
    histories with a val_ap column: earlier versions kept the best fine-tuning epoch
    whatever the head scored); None without validation scores."""
    rows = history[history["phase"] == phase]
    if "val_ap" in rows and rows["val_ap"].notna().any():
        scores, head, higher_is_better = rows["val_ap"], history["val_ap"], True
    elif "val_loss" in rows and rows["val_loss"].notna().any():
        scores, head, higher_is_better = rows["val_loss"], history["val_loss"], False
    else:
        return None
    best = scores.idxmax() if higher_is_better else scores.idxmin()
    head = head[history["phase"] == "head"].dropna()
    if phase == "fine_tune" and "val_ap" in history and len(head):
        start = head.max() if higher_is_better else head.min()
        if not (scores[best] > start if higher_is_better else scores[best] < start):
            return 0
    return int(rows.loc[best, "epoch"])


def training_curves_png(history: pd.DataFrame) -> bytes:
    """Loss per epoch of each phase, training and validation, the validation average
    precision on a second axis, and the epoch whose weights the phase kept marked."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    phases = [p for p in ("head", "fine_tune") if (history["phase"] == p).any()]
    figure = Figure(figsize=(5.6 * len(phases), 3.4))
    axes = np.atleast_1d(figure.subplots(1, len(phases)))
    titles = {"head": "Head phase (features computed once)",
              "fine_tune": "Fine-tuning phase (images streamed)"}
    for ax, phase in zip(axes, phases):
        rows = history[history["phase"] == phase]
        lines = ax.plot(rows["epoch"], rows["loss"], marker="o", ms=3, label="training loss")
        if "val_loss" in rows and rows["val_loss"].notna().any():
            lines += ax.plot(rows["epoch"], rows["val_loss"], marker="o", ms=3,
                             label="validation loss")
        if "val_ap" in rows and rows["val_ap"].notna().any():
            ap_axis = ax.twinx()
            lines += ap_axis.plot(rows["epoch"], rows["val_ap"], marker="s", ms=3, color="#2a7",
                                  label="validation AP (right)")
            ap_axis.set_ylabel("average precision, mean over symbols")
        kept = kept_epoch(history, phase)
        if kept == 0:
            ax.annotate("kept: the head phase's weights (no epoch scored higher)", (0, 1),
                        xycoords="axes fraction", textcoords="offset points", xytext=(4, -12),
                        fontsize=8, color="#444")
        elif kept is not None:
            ax.axvline(kept, color="#888", ls="--", lw=1)
            ax.annotate(f"kept: epoch {kept}", (kept, 1), xycoords=("data", "axes fraction"),
                        textcoords="offset points", xytext=(4, -12), fontsize=8, color="#444")
        ax.set_title(titles[phase], fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (weighted cross-entropy)")
        ax.grid(alpha=0.3)
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    figure.tight_layout()
    return _png(figure)


def precision_recall_png(symbol: str, labels: np.ndarray, scores: np.ndarray,
                         metrics: dict) -> bytes:
    """The precision-recall curve of one symbol with its chosen threshold marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.6, 3.1))
    ax = figure.subplots()
    _, precision, recall = evaluation.precision_recall_curve(labels, scores)
    ax.step(np.r_[0.0, recall], np.r_[1.0, precision], where="post", lw=1.5)
    prevalence = metrics["prevalence"]
    if prevalence and math.isfinite(prevalence):
        ax.axhline(prevalence, color="#999", ls=":", lw=1, label=f"chance ({prevalence:.1%})")
    if metrics["true_positives"] + metrics["false_positives"] > 0:
        ax.plot(metrics["recall"], metrics["precision"], "o", color="#c0392b", ms=7,
                label=f"threshold {metrics['threshold']:.3f}")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{symbol}: AP {metrics['average_precision']:.3f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    return _png(figure)


# --------------------------------------------------------------------------------------------
# HTML pieces


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def _thumbnail_uri(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail(THUMBNAIL_BOX)
            return _jpeg_uri(image)
    except (OSError, ValueError) as error:  # moved or deleted since training
        log.warning("report: no thumbnail of %s (%s).", path, error)
        return None


def _overlay_uri(frame: heatmaps.FrameHeatmaps, symbol: str) -> str:
    return _jpeg_uri(heatmaps.overlay(frame.image, frame.maps[symbol],
                                      heatmaps.label(symbol, frame.probabilities[symbol])))


def _frame_heatmaps(model, metadata: dict, filenames: Sequence[str],
                    path_of: dict[str, str]) -> dict[str, heatmaps.FrameHeatmaps]:
    """The heatmaps of the frames that the contact sheets show, on thumbnails; none (with a
    warning) for a model that cannot give them."""
    filenames = list(dict.fromkeys(filenames))
    try:
        frames = heatmaps.frame_heatmaps(model, metadata, [path_of[f] for f in filenames],
                                         max_size=THUMBNAIL_BOX)
    except heatmaps.InputError as error:
        log.warning("report: no heatmaps: %s", error)
        return {}
    return {f: frame for f, frame in zip(filenames, frames) if frame is not None}


def _number(value, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if value is not None and math.isfinite(value) else "–"


def _interval(values) -> str:
    return f"{values[0]:.2f}–{values[1]:.2f}" if values else "–"


def _worst_per_group(frames: pd.DataFrame, probability_column: str, highest: bool,
                     shown: int = CONTACT_SHEET_SIZE) -> pd.DataFrame:
    """The most confident frame of each group, most confident first, with `others`: how many
    more of its group made the same mistake. Neighbouring frames of a shot are near-identical
    and share their mistakes, so one thumbnail per shot shows twelve different problems
    rather than one problem twelve times."""
    ordered = frames.sort_values(probability_column, ascending=not highest, kind="mergesort")
    sizes = ordered["group"].value_counts()
    first = ordered.drop_duplicates("group").head(shown)
    return first.assign(others=first["group"].map(sizes).to_numpy() - 1)


def _contact_sheet(frames: pd.DataFrame, paths: dict[str, str], probability_column: str,
                   overlays: dict[str, heatmaps.FrameHeatmaps], symbol: str) -> str:
    """Thumbnails of `frames` with file name and probability; those in `overlays` with the
    heatmap of `symbol` laid over them."""
    if frames.empty:
        return '<p class="none">none</p>'
    figures = []
    for filename, probability, group, others in zip(
            frames["filename"], frames[probability_column], frames["group"], frames["others"]):
        uri = _overlay_uri(overlays[filename], symbol) if filename in overlays else \
            _thumbnail_uri(paths[filename])
        image = f'<img src="{uri}" alt="{html.escape(filename)}">' if uri else \
            '<p class="none">image not readable</p>'
        more = f"<br>+{others:,} more of group {html.escape(str(group))}" if others else ""
        figures.append(f"<figure>{image}<figcaption>{html.escape(filename)}<br>"
                       f"p = {probability:.3f}{more}</figcaption></figure>")
    return f'<div class="sheet">{"".join(figures)}</div>'


def _summary_table(metrics: dict, order: Sequence[str]) -> str:
    rows = []
    for symbol in order:
        m = metrics["symbols"][symbol]
        weak = ' class="weak"' if m["average_precision"] is not None and \
            math.isfinite(m["average_precision"]) and m["average_precision"] < 0.5 else ""
        classes, titles = [], []
        if not m.get("threshold_reached", True):
            classes.append("unmet")
            titles.append("the threshold rule's target was not met")
        if m.get("threshold_unstable"):
            classes.append("unstable")
            titles.append(f"the {m.get('threshold_advice', 'threshold may not hold')}")
        unmet = (f' class="{" ".join(classes)}" title="{html.escape("; ".join(titles))}"'
                 if classes else "")
        mark = " !" if m.get("threshold_unstable") else ""
        rows.append(
            f'<tr><td class="name"><a href="#symbol-{symbol}">{html.escape(symbol)}</a></td>'
            f"<td>{m['frames']:,}</td><td>{m['positives']:,}</td>"
            f"<td>{_number(m['prevalence'] * 100 if m['prevalence'] is not None else None, 1)} %</td>"
            f"<td{weak}>{_number(m['average_precision'])}</td>"
            f"<td>{_interval(m.get('average_precision_interval'))}</td>"
            f"<td>{_number(m['roc_auc'])}</td><td{unmet}>{_number(m['threshold'])}{mark}</td>"
            f"<td>{_number(m['precision'])}</td><td>{_number(m['recall'])}</td>"
            f"<td>{_number(m['f1'])}</td><td>{_interval(m.get('f1_interval'))}</td>"
            f"<td>{m['true_positives']:,} / {m['false_positives']:,} / "
            f"{m['false_negatives']:,} / {m['true_negatives']:,}</td></tr>")
    macro = metrics["macro"]
    rows.append(
        f'<tr><th class="name">macro average</th><th></th><th></th>'
        f"<th>{_number(macro['prevalence'] * 100, 1)} %</th>"
        f"<th>{_number(macro['average_precision'])}</th>"
        f"<th>{_interval(macro.get('average_precision_interval'))}</th>"
        f"<th>{_number(macro['roc_auc'])}</th><th></th><th>{_number(macro['precision'])}</th>"
        f"<th>{_number(macro['recall'])}</th><th>{_number(macro['f1'])}</th>"
        f"<th>{_interval(macro.get('f1_interval'))}</th><th></th></tr>")
    head = ("<tr><th class='name'>symbol</th><th>frames</th><th>positives</th><th>prevalence</th>"
            "<th>AP</th><th>AP 95 %</th><th>ROC-AUC</th><th>threshold</th><th>precision</th>"
            "<th>recall</th><th>F1</th><th>F1 95 %</th><th>TP / FP / FN / TN</th></tr>")
    return f'<div class="wide"><table>{head}{"".join(rows)}</table></div>'


def _pasted_symbols(metadata: dict) -> str:
    """A sentence on the --symbol-image files pasted while fine-tuning; empty without any."""
    pasted = metadata.get("symbol_images") or {}
    if not pasted.get("images"):
        return ""
    files = ", ".join(f"{html.escape(i['symbol'])} from {html.escape(Path(i['path']).name)} "
                      f"({i['width']}x{i['height']}, sha1 {i['sha1'][:10]})"
                      for i in pasted["images"])
    return (f" Fine-tuning pasted {files} into {100 * pasted['rate']:.0f} % of the training "
            "frames that did not show that symbol, labelled as showing it (--symbol-image; "
            "validation frames were never changed).")


def _data_table(counts: dict, symbols: Sequence[str]) -> str:
    rows = []
    for s in symbols:
        train, valid = counts["train"], counts["validation"]
        rows.append(
            f'<tr><td class="name">{html.escape(s)}</td>'
            f"<td>{train['positives'][s]:,}</td><td>{train['negatives'][s]:,}</td>"
            f"<td>{valid['positives'][s]:,}</td><td>{valid['negatives'][s]:,}</td></tr>")
    head = ("<tr><th class='name'>symbol</th><th>train positives</th><th>train negatives</th>"
            "<th>validation positives</th><th>validation negatives</th></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _confusion_table(m: dict) -> str:
    return (
        '<table class="confusion"><tr><th></th><th>predicted visible</th>'
        "<th>predicted not visible</th></tr>"
        f"<tr><th>visible</th><td>{m['true_positives']:,} TP</td><td>{m['false_negatives']:,} FN</td></tr>"
        f"<tr><th>not visible</th><td>{m['false_positives']:,} FP</td><td>{m['true_negatives']:,} TN</td></tr>"
        "</table>")


def _config_table(config: dict) -> str:
    """The settings as the flags that give them, so a reader can repeat the run."""
    def shown(value) -> str:
        return {None: "(not set)", True: "on", False: "off"}.get(value, str(value)) \
            if value is None or isinstance(value, bool) else str(value)

    rows = "".join(f'<tr><td class="name"><code>--{html.escape(k.replace("_", "-"))}</code></td>'
                   f'<td class="name">{html.escape(shown(v))}</td></tr>'
                   for k, v in config.items())
    return f"<table>{rows}</table>"


# --------------------------------------------------------------------------------------------
# The report


def write_report(directory: Path, *, model_name: str, metadata: dict, metrics: dict,
                 history: pd.DataFrame, table: pd.DataFrame, paths: Sequence[str],
                 warnings: Sequence[dict] = (), model=None) -> Path:
    """Write report.html and plots/*.png into `directory` and return the report's path.

    `table` is evaluation.csv's table (one row per validation frame) and `paths` the image
    path of each of its rows, from which the contact sheets are made. `warnings` are the
    run's warnings (dicts with level and message, as run_warnings collects them), shown near
    the top; a live list also shows those given while the report is made. With `model` (the
    Keras model, as saved), each thumbnail shows its symbol's heatmap (heatmaps.py)."""
    symbols = metadata["symbols"]
    plots = directory / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    path_of = dict(zip(table["filename"], paths))

    def embed(name: str, png: bytes, alt: str) -> str:
        (plots / name).write_bytes(png)
        return f'<img src="{_data_uri(png, "image/png")}" alt="{html.escape(alt)}">'

    grouped = bool((table["group"].astype(str) != table["filename"].astype(str)).any())
    grouping = str(metadata["data"]["counts"].get("grouping", "")).split(" (")[0]
    # Weakest first: the symbols that need more labels or a look at their errors.
    order = sorted(symbols, key=lambda s: _sort_key(metrics["symbols"][s]["average_precision"]))
    sheets = {}
    for symbol in order:
        probability_column, outcome = f"{symbol}_probability", table[f"{symbol}_outcome"]
        sheets[symbol] = (
            _worst_per_group(table[outcome == "true positive"], probability_column, True,
                             HITS_SHOWN),
            _worst_per_group(table[outcome == "false positive"], probability_column, True),
            _worst_per_group(table[outcome == "false negative"], probability_column, False))
    overlays = {} if model is None else _frame_heatmaps(
        model, metadata, [f for shown in sheets.values() for frames in shown
                          for f in frames["filename"]], path_of)
    sections = []
    for symbol in order:
        m = metrics["symbols"][symbol]
        label = table[f"{symbol}_label"]
        annotated = label.notna().to_numpy()
        probability_column = f"{symbol}_probability"
        outcome = table[f"{symbol}_outcome"]
        hits, false_positives, false_negatives = sheets[symbol]
        if m["positives"] > 0:
            curve = embed(f"precision_recall_{symbol}.png", precision_recall_png(
                symbol, label[annotated].to_numpy(dtype=float) == 1,
                table.loc[annotated, probability_column].to_numpy(), m),
                f"precision-recall curve of {symbol}")
        else:
            curve = '<p class="none">No positive validation frame: no curve.</p>'
        note = f'<p class="note unmet">{html.escape(m["threshold_note"])}.</p>' \
            if m.get("threshold_note") else ""
        if m.get("threshold_advice"):
            note += (f'<p class="note unstable">The {html.escape(m["threshold_advice"])}.</p>')
        sections.append(f"""
<section class="symbol" id="symbol-{symbol}">
<h3>{html.escape(symbol)} <a class="up" href="#summary">back to the summary</a></h3>
<div class="row"><div>{curve}</div><div>
<p>AP {_number(m['average_precision'])} (95 % interval {_interval(m.get('average_precision_interval'))}),
ROC-AUC {_number(m['roc_auc'])}.<br>At threshold {_number(m['threshold'])} (rule
<code>{html.escape(str(m.get('threshold_rule', '')))}</code>): precision {_number(m['precision'])},
recall {_number(m['recall'])}, F1 {_number(m['f1'])}.</p>{note}
{_confusion_table(m)}
<p class="note">{m['frames']:,} annotated validation frames, {m['positives']:,} showing {html.escape(symbol)}.</p>
</div></div>
<h4>Most confident hits ({_mistakes(table[outcome == 'true positive'], grouped)}; highest probability first)</h4>
{_contact_sheet(hits, path_of, probability_column, overlays, symbol)}
<h4>Most confident false positives ({_mistakes(table[outcome == 'false positive'], grouped)}; highest probability first)</h4>
{_contact_sheet(false_positives, path_of, probability_column, overlays, symbol)}
<h4>Most confident false negatives ({_mistakes(table[outcome == 'false negative'], grouped)}; lowest probability first)</h4>
{_contact_sheet(false_negatives, path_of, probability_column, overlays, symbol)}
</section>""")

    counts = metadata["data"]["counts"]
    training = metadata["training"]
    config = training["config"]
    phases = training.get("phase_seconds", {})
    curves = embed("training_curves.png", training_curves_png(history), "training curves")
    bootstrap = metrics.get("bootstrap", {})
    document = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(model_name)}: symbol model report</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(model_name)}</h1>
<p class="lead">{len(symbols)} symbol{'s' if len(symbols) != 1 else ''}, trained
{html.escape(str(training.get('started_at', '')))} on {counts['train']['images']:,} frames and
validated on {counts['validation']['images']:,}{_split_by(counts, grouping)}. Backbone {html.escape(config['backbone'])}
(alpha {config['alpha']}), input {metadata['input']['width']}x{metadata['input']['height']}
pixels ({html.escape(config['resize'])}).{_pasted_symbols(metadata)}</p>
{_refit_note(metadata)}

{_warnings_section(warnings)}

<h2 id="summary">Summary</h2>
<p class="note">Validation metrics, weakest symbol first. AP (average precision) summarises
the precision-recall curve independently of any threshold; red cells are below 0.5. The
threshold decides "visible" (probability at or above it) and was chosen on these validation
frames by the rule <code>{html.escape(str(config.get('threshold_for', 'f1')))}</code>, so
precision, recall and F1 there are optimistic for new frames. A threshold marked
<span class="unstable">!</span> may not hold on new frames: it rests on fewer than
{evaluation.MIN_THRESHOLD_POSITIVES} validation positives or lies outside
{evaluation.STABLE_THRESHOLD_RANGE[0]:g}–{evaluation.STABLE_THRESHOLD_RANGE[1]:g}
(the symbol's section says what to do). Intervals are 95 % bootstrap
intervals over {bootstrap.get('replicates', 0):,} resamples of
{html.escape(str(bootstrap.get('resampled', 'frames')).split(' (')[0])}. Every frame's labels, probabilities
and outcomes are in <code>evaluation.csv</code>.</p>
{_summary_table(metrics, order)}

<h2>Training</h2>
<p class="note">Feature extraction {phases.get('features', 0):.0f} s, head phase
{phases.get('head', 0):.0f} s, fine-tuning {phases.get('fine_tune', 0):.0f} s. Each phase keeps
the weights of its epoch with the highest validation AP (mean over the symbols with both
visible and not-visible validation frames; the lowest validation loss when there are none),
and stops after {config['patience']} epochs without improvement (fine-tuning after
{config.get('fine_tune_patience', config['patience'])}); fine-tuning keeps the head
phase's weights when none of its epochs scores higher than they did.</p>
{curves}

<h2>Data</h2>
<p class="note">{counts.get('listed', 0):,} frames listed, {counts.get('unreadable', 0):,}
skipped as unreadable.</p>
{_data_table(counts, symbols)}

<h2>Symbols</h2>
<p class="note">Per symbol: the precision-recall curve with the chosen threshold marked, the
confusion counts at that threshold, a few validation frames it gets right, and those it is
most sure of and gets wrong. These are where label errors hide: a "false positive" that
shows the symbol is a missing label.{_heatmap_note(bool(overlays))}</p>
{''.join(sections)}

<h2>Configuration</h2>
{_config_table(config)}
<p class="note">Packages: {html.escape(', '.join(f'{k} {v}' for k, v in metadata.get('packages', {}).items()))}.</p>
</body></html>
"""
    path = directory / REPORT_FILE
    path.write_text(document, encoding="utf-8", errors="backslashreplace")  # odd file names
    return path


def _refit_note(metadata: dict) -> str:
    """refit.py's sentence on which model was saved and where the figures come from."""
    record = metadata.get("refit") or {}
    if not record.get("note"):
        return ""
    kind = "refit" if record.get("refit") else "no-refit"
    return f'<p class="lead {kind}" id="refit"><b>{html.escape(record["note"])}</b></p>'


def _heatmap_note(shown: bool) -> str:
    if not shown:
        return ""
    return (" Each thumbnail shows where the model sees the symbol: its probability at each "
            "place of the frame, on the scale <span class=\"scale\"></span> from 0 (dark "
            "blue, faint) to 1 (red, strong), and the frame's probability in the corner. "
            "Places the model did not see (cut off by <code>--resize crop</code>) are left as "
            "they are. A false positive that lights up a look-alike shows what the model "
            "confuses the symbol with; a miss that stays dark over the symbol shows that the "
            "model did not see it there.")


def _warnings_section(warnings: Sequence[dict]) -> str:
    if not warnings:
        return ('<h2 id="warnings">Warnings</h2>\n<p class="none">The run gave no warnings.</p>')
    items = "".join(f"<li><b>{html.escape(w.get('level', 'WARNING'))}</b>: "
                    f"{html.escape(w['message'])}</li>" for w in warnings)
    return (f'<h2 id="warnings">Warnings ({len(warnings)})</h2>\n'
            '<p class="note">Everything the run warned about, in the order it was logged (also '
            'in <code>metrics.json</code> under <code>warnings</code>): each may make the '
            'numbers below less trustworthy, and says what to do.</p>\n'
            f'<ul class="warnings">{items}</ul>')


def _split_by(counts: dict, grouping: str) -> str:
    if "groups" not in counts["train"]:
        return f", split frame by frame ({html.escape(grouping)})"
    return (f", split by {html.escape(grouping)}: {counts['train']['groups']:,} groups in training, "
            f"{counts['validation']['groups']:,} in validation, none in both")


def _mistakes(frames: pd.DataFrame, grouped: bool) -> str:
    if not grouped:
        return f"{len(frames):,} in all"
    return (f"{len(frames):,} in {frames['group'].nunique():,} groups; the most confident frame of "
            "each group")


def _sort_key(value) -> float:
    return value if value is not None and math.isfinite(value) else math.inf
