#!/usr/bin/env python3
"""--pooling on frames of unseen backgrounds: train one model per pooling on one labelled set
and score it on another whose frames it never saw, by macro ROC-AUC and average precision.

    python bench/pooling_unseen.py TRAIN_DIR TEST_DIR [--pooling avg max lse] [-- TRAINING FLAGS]

TRAIN_DIR and TEST_DIR each hold labels.csv (filename relative to images/, 0/1 columns
<symbol>_visible); the frames of make_symbol_frames.py have that layout. Everything after
`--` goes to build_multi_hot_model.py for every pooling (weights, alpha, epochs, ...). One
run per pooling and seed: no interval across training runs, so small differences say little.
Writes docs/measurements/pooling_unseen.md (or --output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_multi_hot_model  # noqa: E402
from symbol_trainer import image_predictions, model_dir, model_format  # noqa: E402
from symbol_trainer import evaluation  # noqa: E402
import measurements  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    training = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_dir", type=Path)
    parser.add_argument("test_dir", type=Path)
    parser.add_argument("--pooling", nargs="+", default=["avg", "max", "lse"])
    parser.add_argument("--work", type=Path, default=None, help="where the models go (default: a temporary folder)")
    parser.add_argument("--output", type=Path,
                        default=ROOT / "docs" / "measurements" / "pooling_unseen.md")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    work = args.work or Path(tempfile.mkdtemp(prefix="pooling_unseen_"))
    test = pd.read_csv(args.test_dir / "labels.csv")
    rows = []
    for pooling in args.pooling:
        out = work / f"model_{pooling}"
        start = time.monotonic()
        code = build_multi_hot_model.main([str(args.train_dir / "images"),
                                           str(args.train_dir / "labels.csv"), str(out),
                                           "--overwrite", "--pooling", pooling, *training])
        seconds = time.monotonic() - start
        if code != 0:
            raise SystemExit(f"training with --pooling {pooling} failed (exit {code})")
        loaded = model_dir.load_model_dir(out)
        symbols = loaded.metadata["symbols"]
        table = image_predictions.predict_images(loaded, [str(args.test_dir / "images" / f)
                                               for f in test["filename"]])
        per_symbol = {}
        for symbol in symbols:
            labels = test[f"{symbol}_visible"].to_numpy(float)
            scores = table[f"{symbol}_probability"].to_numpy(float)
            per_symbol[symbol] = (evaluation.roc_auc(labels, scores),
                                  evaluation.average_precision(labels, scores))
        validation = json.loads((out / model_format.METRICS_FILE).read_text())
        rows.append({"pooling": pooling, "seconds": seconds, "per_symbol": per_symbol,
                     "validation_ap": validation.get("macro", {}).get("average_precision")})
        print(pooling, rows[-1], flush=True)
    symbols = list(rows[0]["per_symbol"])
    prevalence = {s: float(test[f"{s}_visible"].mean()) for s in symbols}
    # The command (sys.argv, training flags after -- included), commit, date and machine.
    facts = measurements.header("--pooling on unseen frames", started,
                                measurements.backend_description())
    lines = [
        measurements.header_markdown(facts),
        f"Trained on {args.train_dir} (validation split as the tool makes it), scored on all "
        f"{len(test)} frames of {args.test_dir} (prevalence "
        + ", ".join(f"{s} {p:.2f}" for s, p in prevalence.items())
        + "). One training run per pooling, one seed: no interval across runs.",
        "",
        "| --pooling | " + " | ".join(f"{s} ROC-AUC | {s} AP" for s in symbols)
        + " | macro ROC-AUC | macro AP | validation AP (tool) | training s |",
        "|---" * (2 * len(symbols) + 5) + "|",
    ]
    for row in rows:
        values = row["per_symbol"]
        aucs = [values[s][0] for s in symbols]
        aps = [values[s][1] for s in symbols]
        cells = " | ".join(f"{values[s][0]:.3f} | {values[s][1]:.3f}" for s in symbols)
        validation_ap = row["validation_ap"]
        lines.append(f"| {row['pooling']} | {cells} | {np.mean(aucs):.3f} | {np.mean(aps):.3f} | "
                     f"{'-' if validation_ap is None else f'{validation_ap:.3f}'} | "
                     f"{row['seconds']:.0f} |")
    data = {"header": facts, "train_dir": args.train_dir, "test_dir": args.test_dir,
            "training_flags": training, "prevalence": prevalence,
            "runs": [{"pooling": r["pooling"], "training_seconds": r["seconds"],
                      "validation_ap": r["validation_ap"],
                      "unseen": {s: {"roc_auc": auc, "average_precision": ap}
                                 for s, (auc, ap) in r["per_symbol"].items()}} for r in rows]}
    markdown, twin = measurements.write(args.output, "\n".join(lines), data)
    print("\n".join(lines))
    print(f"Wrote {markdown} and {twin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
