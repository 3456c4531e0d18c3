#!/usr/bin/env python3
"""What heatmaps cost: report.html's size and writing time with and without the heatmap
overlays on its thumbnails, and predict.py's rate without --heatmaps, with it (symbols at or
above their threshold) and with --heatmaps-all, with the number and size of the PNGs.

MODEL_DIR is a model directory trained on IMAGE_DIR (its evaluation.csv names the frames
that the report shows). The results go to docs/measurements/heatmaps.md.

    python build_multi_hot_model.py /work/data/train_a/images /work/data/train_a/labels.csv \\
        /tmp/model --alpha 0.35 --weights ../shared/weights/mobilenet_v2_0.35_no_top_imagenet.weights.h5 \\
        --fine-tune-epochs 0
    python bench/heatmaps_cost.py /tmp/model /work/data/train_a/images --frames 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import measurements  # noqa: E402


def report_sizes(model_dir: Path, image_dir: Path, work: Path) -> dict:
    import pandas as pd

    from symbol_trainer import model_format
    from symbol_trainer.model_dir import load_model_dir
    from symbol_trainer import report

    loaded = load_model_dir(model_dir)
    table = pd.read_csv(model_dir / model_format.EVALUATION_FILE, keep_default_na=True)
    arguments = dict(model_name=model_dir.name, metadata=loaded.metadata,
                     metrics=json.loads((model_dir / model_format.METRICS_FILE).read_text()),
                     history=pd.read_csv(model_dir / model_format.HISTORY_FILE), table=table,
                     paths=[str(image_dir / f) for f in table["filename"]])
    results = {}
    for name, model in (("plain", None), ("heatmaps", loaded.model)):
        folder = work / name
        folder.mkdir()
        started = time.monotonic()
        path = report.write_report(folder, **arguments, model=model)
        text = path.read_text()
        images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text)
        results[name] = {"bytes": path.stat().st_size, "seconds": time.monotonic() - started,
                         "thumbnails": len(images),
                         "thumbnail_kib": sum(map(len, images)) / max(1, len(images)) / 1024}
    symbols = loaded.metadata["symbols"]
    results["hits"] = sum(min(report.HITS_SHOWN, table.loc[
        table[f"{s}_outcome"] == "true positive", "group"].nunique()) for s in symbols)
    return results


def predict_rates(model_dir: Path, image_dir: Path, frames: int, work: Path) -> dict:
    # Absolute paths: predict.py reads a list's relative paths against the list's own folder.
    names = sorted(p.resolve() for p in image_dir.rglob("*.jpg"))[:frames]
    listing = work / "frames.txt"
    listing.write_text("".join(f"{p}\n" for p in names))
    results = {}
    for name, flags in (("without", []), ("--heatmaps", ["--heatmaps", work / "heat"]),
                        ("--heatmaps-all", ["--heatmaps", work / "all", "--heatmaps-all"])):
        process = subprocess.run(
            [sys.executable, str(ROOT / "predict.py"), str(model_dir), str(listing),
             "-o", str(work / f"{name.strip('-')}.csv"), *map(str, flags)],
            capture_output=True, text=True, check=True)
        rate = re.search(r"Predicted ([\d,]+) frames in ([\d.]+) s \(([\d.]+) frames/s\)",
                         process.stderr)
        pngs = list(Path(flags[1]).rglob("*.png")) if flags else []
        results[name] = {"frames": int(rate.group(1).replace(",", "")),
                         "seconds": float(rate.group(2)), "rate": float(rate.group(3)),
                         "pngs": len(pngs),
                         "png_kb": sum(p.stat().st_size for p in pngs) / max(1, len(pngs)) / 1024}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("image_dir", type=Path)
    parser.add_argument("--frames", type=int, default=200, help="Frames predicted per mode.")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "measurements" / "heatmaps.md")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="heatmaps_cost_"))
    try:
        sizes = report_sizes(args.model_dir, args.image_dir, work)
        rates = predict_rates(args.model_dir, args.image_dir, args.frames, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    metadata = json.loads((args.model_dir / "metadata.json").read_text())
    plain, heated = sizes["plain"], sizes["heatmaps"]
    # The command, commit, date and machine (report_sizes imported TensorFlow in this process).
    facts = measurements.header("Heatmaps: what they cost", started,
                                measurements.backend_description())
    load = os.getloadavg()[0]
    lines = [
        measurements.header_markdown(facts),
        f"Model directory {args.model_dir}, frames from {args.image_dir}, {args.frames} frames "
        f"per mode of predict.py; on {platform.node()}, load average {load:.1f} at the end "
        "(when other processes share the cores, the rates are lower bounds).",
        f"Model: {metadata['backbone']['name']} alpha {metadata['backbone']['alpha']}, input "
        f"{metadata['input']['width']}x{metadata['input']['height']} ({metadata['input']['resize']}), "
        f"symbols {', '.join(metadata['symbols'])}.",
        "",
        "## report.html",
        "",
        "| | thumbnails | mean thumbnail (base64) | report size | writing time |",
        "|---|---:|---:|---:|---:|",
        f"| without heatmaps | {plain['thumbnails']} | {plain['thumbnail_kib']:.1f} KiB | "
        f"{plain['bytes'] / 1024:.0f} KiB | {plain['seconds']:.1f} s |",
        f"| with heatmaps | {heated['thumbnails']} | {heated['thumbnail_kib']:.1f} KiB | "
        f"{heated['bytes'] / 1024:.0f} KiB | {heated['seconds']:.1f} s |",
        "",
        f"The overlays change the size by {(heated['bytes'] - plain['bytes']) / 1024:+.0f} KiB "
        f"({heated['bytes'] / plain['bytes'] - 1:+.0%}) and take {heated['seconds'] - plain['seconds']:.1f} s "
        f"more. {sizes['hits']} of the thumbnails are the hits sheets that this version added "
        f"(about {sizes['hits'] * heated['thumbnail_kib']:.0f} KiB of the report); a report "
        "shows at most 30 thumbnails per symbol (6 hits, 12 false positives, 12 misses).",
        "",
        "## predict.py",
        "",
        "| | frames | frames/s | PNGs | mean PNG size |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rates.items():
        lines.append(f"| {name} | {r['frames']} | {r['rate']:.1f} | {r['pngs']} | "
                     + (f"{r['png_kb']:.0f} KiB |" if r["pngs"] else "– |"))
    data = {"header": facts, "load_average_at_end": load, "model": {
                "backbone": metadata["backbone"], "input": metadata["input"],
                "symbols": metadata["symbols"]},
            "report": sizes, "predict": rates}
    markdown, twin = measurements.write(args.output, "\n".join(lines), data)
    print("\n".join(lines))
    print(f"Wrote {markdown} and {twin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
