#!/usr/bin/env python3
"""Where --symbol-image changes the scores: per configuration and seed of a finished
bench/accuracy.py run on the adidas set, the mean probability the saved model gives the logo a
photo shows and the logo it does not show (every adidas_puma_logos photo shows exactly one),
and the share of unseen photos called both (two probabilities of 0.5 or more).

    python bench/paste_scores.py --work /tmp/acc-i25 --configs old,paste,paste-0.1,paste-0.6 \
        --output docs/measurements/symbol_image_scores_adidas.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import measurements  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="bench/accuracy.py's --work folder.")
    parser.add_argument("--configs", required=True, help="Configuration names, comma-separated.")
    parser.add_argument("--seeds", default="0,1,2", help="Default: %(default)s.")
    parser.add_argument("--output", required=True, help="Results file (markdown).")
    args = parser.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    data = accuracy.load_adidas(args)
    shown = data.test_labels == 1
    rows, results = [], []
    for config in args.configs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = Path(args.work) / "runs" / "adidas" / f"{config}_seed{seed}"
            probabilities = np.load(folder / "unseen_probabilities.npy")
            flags = json.loads((folder / "run.json").read_text())["key"]["flags"]
            entry = {"config": config, "seed": seed, "flags": flags,
                     "shown_logo_mean": float(probabilities[shown].mean()),
                     "absent_logo_mean": float(probabilities[~shown].mean()),
                     "called_both": float(((probabilities >= 0.5).sum(axis=1) == 2).mean())}
            results.append(entry)
            rows.append(f"| {config} | {seed} | {entry['shown_logo_mean']:.3f} | "
                        f"{entry['absent_logo_mean']:.3f} | {entry['called_both']:.0%} |")
    markdown = "\n".join([
        measurements.header_markdown(measurements.header(
            "Scores of the logo shown and the logo absent (bench/paste_scores.py)", started,
            None)),
        f"{data.description}. Unseen: {len(data.test_paths)} images; each shows exactly one "
        "of the two logos. Probabilities of the saved models of the bench/accuracy.py runs in "
        f"`{args.work}` (their flags are in the JSON beside this file).", "",
        "| configuration | seed | mean probability, logo shown | mean probability, logo "
        "absent | photos called both |", "|---|---:|---:|---:|---:|", *rows, ""])
    measurements.write(args.output, markdown, {"runs": results, "work": args.work})
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
