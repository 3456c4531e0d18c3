"""The files of a model directory, by name, and the version of its format.

Standard library only: model_checks, model_dir and the pipeline share these names.
"""

from __future__ import annotations

from symbol_trainer.output_dir import METADATA_FILE, MODEL_FILE

__all__ = ["MODEL_FORMAT_VERSION", "HISTORY_FILE", "METRICS_FILE", "SPLIT_FILE", "EVALUATION_FILE",
           "CSV_FILE_NAMES", "CHECKPOINT_FOLDER", "METADATA_FILE", "MODEL_FILE"]


MODEL_FORMAT_VERSION = 1
HISTORY_FILE = "history.csv"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.csv"
EVALUATION_FILE = "evaluation.csv"
# How the CSV files of a model directory are encoded: UTF-8, and a file name that is not
# valid UTF-8 (Python holds its bytes as lone surrogates) keeps its original bytes, so
# `pd.read_csv(path, encoding_errors="surrogateescape")` and os.fsencode give them back.
CSV_FILE_NAMES = {"encoding": "utf-8", "errors": "surrogateescape"}


CHECKPOINT_FOLDER = "checkpoint"
