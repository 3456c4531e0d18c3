"""common.py, the facade: `import common` code written for the single-module layout keeps
working, with the package's own objects."""

from __future__ import annotations

import importlib

import common
from symbol_trainer import image_folders, image_predictions, labels_csv, model, model_dir, pipeline
from symbol_trainer import errors, settings

# The public API the issue names, and where each lives now.
PUBLIC = {"images_from_directories": image_folders, "images_from_csv": labels_csv,
          "build_model": model, "train_and_save": pipeline, "load_model_dir": model_dir,
          "predict_images": image_predictions, "TrainingConfig": settings,
          "InputError": errors, "ImageReadError": errors, "SymbolTrainerError": errors}


def test_the_public_api_is_the_packages_own():
    for name, module in PUBLIC.items():
        assert getattr(common, name) is getattr(module, name), name


def test_every_exported_name_is_the_same_object_as_in_its_module():
    assert len(common.__all__) == len(set(common.__all__)) > 100
    for name in common.__all__:
        value = getattr(common, name)
        home = getattr(value, "__module__", None)
        if isinstance(home, str) and home.startswith("symbol_trainer."):
            assert getattr(importlib.import_module(home), name, value) is value, name
    # Modules common used to hold as attributes are still there.
    assert common.duplicates.__name__ == "symbol_trainer.duplicates"
    assert common.keras.__name__ == "keras" and common.tf.__name__ == "tensorflow"


def test_the_facade_is_short():
    assert len(open(common.__file__, encoding="utf-8").read().splitlines()) < 150
