"""JSON and CSV files of a model directory: NumPy numbers and NaN written as strict JSON.

NumPy only: the programs' --json line uses these before TensorFlow is imported.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np


def json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_json(value):
    """`value` with every NaN or infinity replaced by None: strict JSON readers (browsers, jq)
    reject NaN."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(finite_json(data), indent=2, default=json_default) + "\n",
                    encoding="utf-8")


def write_history(path: Path, rows: list[dict]) -> None:
    columns = ["phase", "epoch", "seconds", "train_seconds"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
