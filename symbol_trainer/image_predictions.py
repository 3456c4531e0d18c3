"""predict_images: a trained model's probabilities and decisions for image files, as a
DataFrame with the labels CSV's columns (the library's way to predict; predict.py's inputs,
videos and outputs are in prediction).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from symbol_trainer.datasets import image_dataset, run_inference
from symbol_trainer.errors import ImageReadError
from symbol_trainer.images import ImageGeometry
from symbol_trainer.labels_csv import VISIBLE_SUFFIX
from symbol_trainer.model_dir import LoadedModel, decision_thresholds, load_model_dir


def predict_images(model_dir_or_loaded: str | os.PathLike | LoadedModel,
                   paths: Sequence[str | os.PathLike], batch_size: int = 32,
                   thresholds: float | dict[str, float] | None = None) -> pd.DataFrame:
    """Probabilities and decisions per symbol for each image, in the order of `paths`: a table
    with `filename` and, per symbol, `<symbol>_probability` and `<symbol>_visible` (1 where
    the probability is at or above the symbol's threshold: the one stored at training, or
    `thresholds`, one value for all or a value per symbol). Raises ImageReadError naming the
    first unreadable image."""
    loaded = (model_dir_or_loaded if isinstance(model_dir_or_loaded, LoadedModel)
              else load_model_dir(model_dir_or_loaded))
    symbols = loaded.metadata["symbols"]
    cut = decision_thresholds(loaded.metadata, thresholds)
    geometry = ImageGeometry.from_json(loaded.metadata["input"])
    paths = [str(p) for p in paths]
    if not paths:
        return pd.DataFrame({"filename": [], **{f"{s}{suffix}": [] for s in symbols
                                                 for suffix in ("_probability", VISIBLE_SUFFIX)}})
    for path in paths:
        if not os.path.isfile(path):
            raise ImageReadError(path, "file not found")
    # A file that became unreadable raises its ImageReadError (an InputError) from here.
    outputs = run_inference(loaded.model, image_dataset(paths, geometry, batch_size))
    table = pd.DataFrame({"filename": paths})
    for symbol in symbols:
        probability = outputs[symbol][:, 0].astype(np.float64)
        table[f"{symbol}_probability"] = probability
        table[f"{symbol}{VISIBLE_SUFFIX}"] = (probability >= cut[symbol]).astype(int)
    return table
