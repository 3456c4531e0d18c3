"""The symbol trainers' library under its old name: `import common` keeps working.

The code lives in the package symbol_trainer, one module per stage (docs/layout.md draws
the tree); this module only re-exports its public API, so that scripts and notebooks written
for the single-module layout run unchanged. The names most callers need:

    images_from_directories, images_from_csv    labelled images (WITH/WITHOUT folders, a CSV)
    TrainingConfig                              every training setting (settings)
    build_model, train_and_save                 the model, and a whole training run
    load_model_dir, predict_images              a trained model directory, and prediction
    InputError and the other errors             (errors)

New code should import from the package (`from symbol_trainer.labels_csv import
images_from_csv`); the package does not need this file.
"""

from __future__ import annotations

# TensorFlow first, quietly (as `import common` always did).
from symbol_trainer.backend import keras, tf
from symbol_trainer.errors import (
    ImageReadError, InputError, listing, printable, SymbolTrainerError, Terminated,
    WeightsUnavailableError)
from symbol_trainer.settings import (
    BACKBONES, EXPORT_FORMATS, RESIZE_METHODS, SWITCH_SETTINGS, add_training_arguments,
    BackboneSpec, config_from_args, flag_of, TrainingConfig)
from symbol_trainer.command import configure_logging, run_command, sigterm_raises
from symbol_trainer.output_dir import METADATA_FILE, MODEL_FILE, check_output_dir
from symbol_trainer.model_format import (
    CHECKPOINT_FOLDER, CSV_FILE_NAMES, EVALUATION_FILE, HISTORY_FILE, METRICS_FILE,
    MODEL_FORMAT_VERSION, SPLIT_FILE)
from symbol_trainer.images import (
    ALPHA_BACKGROUND, IMAGE_EXTENSIONS, find_images, ImageGeometry, input_geometry,
    load_image_array, perceptual_hash, read_image, resize_to_geometry, scan_images, ScanResult)
from symbol_trainer.labelled_images import (
    RESERVED_LAYER_NAMES, SYMBOL_NAME_PATTERN, TABLE_COLUMNS, check_identical_content,
    check_learnable, check_symbol_names, clean_symbol_name, drop_unreadable, LabelledImages,
    symbol_from_directory, with_validation_set)
from symbol_trainer.image_folders import images_from_directories
from symbol_trainer.csv_rows import CSV_DELIMITERS, CsvFormat, read_csv_rows, spreadsheet_rows
from symbol_trainer.labels_csv import (
    ALLOWED_LABELS_TEXT, LABEL_SPELLINGS, NOT_ANNOTATED_SPELLINGS, VISIBLE_SUFFIX,
    images_from_csv, near_symbol_columns)
from symbol_trainer.splitting import (
    AUTOMATIC_GROUP_COLUMNS, NEAR_DUPLICATE_BITS, NEAR_DUPLICATE_WARNING_SHARE,
    automatic_group_column, frame_groups, FrameGroups, near_duplicates, split_train_validation)
from symbol_trainer.preparation import (
    MIN_VALIDATION_POSITIVES, format_data_summary, prepare_training_data, PreparedData,
    split_counts)
from symbol_trainer.model import (
    build_backbone, build_model, calibrate_batchnorm, keras_models_cache, ModelParts,
    unfreeze_top)
from symbol_trainer.datasets import (
    compiled_inference, epoch_batches, feature_dataset, image_dataset, run_inference)
from symbol_trainer.features import (
    FEATURE_CHUNK_BATCHES, backbone_features, decoded_chunks, decoded_image_store,
    extract_features, feature_array, feature_description)
from symbol_trainer.callbacks import (
    PROGRESS_LINE_SECONDS, STEP_LOSS_CHECK_SECONDS, EpochCheckpoint, EpochLog, FiniteLossGuard,
    mean_weighted_crossentropy, rankable_symbols, ResumableEarlyStopping, TrainingDiverged,
    validation_macro_ap, ValidationScores)
from symbol_trainer.training import (
    compile_fused, fine_tune, fit_phase, fused_head, fused_targets, positive_weights,
    sample_weights, single_device_run, train_head, training_model, TrainingRun,
    weighted_binary_crossentropy)
from symbol_trainer.json_files import finite_json, json_default, write_history, write_json
from symbol_trainer.model_dir import (
    data_fingerprint, decision_thresholds, load_model_dir, LoadedModel, ModelDirectory,
    package_versions, save_model)
from symbol_trainer.image_predictions import predict_images
from symbol_trainer.pipeline import (
    SETTINGS_NOT_IN_RUN_KEY, check_or_train, check_output_outside_images, CommandOutcome,
    run_key, train_and_save, TrainingResult)
from symbol_trainer.precision import dtype_policy, float32_twin, mixed_precision_enabled
from symbol_trainer.weights_download import download_weights
from symbol_trainer.pixel_store import PixelStore
# The modules `common.<module>` used to reach.
from symbol_trainer import (
    augmentation, checkpoints, distribution, duplicates, evaluation, feature_cache, heads,
    report, run_lock, run_warnings)
from symbol_trainer import output_dir as output_dir_checks

__all__ = [
    "keras", "tf", "ImageReadError", "InputError", "listing", "printable", "SymbolTrainerError",
    "Terminated", "WeightsUnavailableError", "BACKBONES", "EXPORT_FORMATS", "RESIZE_METHODS",
    "SWITCH_SETTINGS", "add_training_arguments", "BackboneSpec", "config_from_args", "flag_of",
    "TrainingConfig", "configure_logging", "run_command", "sigterm_raises", "METADATA_FILE",
    "MODEL_FILE", "check_output_dir", "CHECKPOINT_FOLDER", "CSV_FILE_NAMES", "EVALUATION_FILE",
    "HISTORY_FILE", "METRICS_FILE", "MODEL_FORMAT_VERSION", "SPLIT_FILE", "ALPHA_BACKGROUND",
    "IMAGE_EXTENSIONS", "find_images", "ImageGeometry", "input_geometry", "load_image_array",
    "perceptual_hash", "read_image", "resize_to_geometry", "scan_images", "ScanResult",
    "RESERVED_LAYER_NAMES", "SYMBOL_NAME_PATTERN", "TABLE_COLUMNS", "check_identical_content",
    "check_learnable", "check_symbol_names", "clean_symbol_name", "drop_unreadable",
    "LabelledImages", "symbol_from_directory", "with_validation_set", "images_from_directories",
    "CSV_DELIMITERS", "CsvFormat", "read_csv_rows", "spreadsheet_rows", "ALLOWED_LABELS_TEXT",
    "LABEL_SPELLINGS", "NOT_ANNOTATED_SPELLINGS", "VISIBLE_SUFFIX", "images_from_csv",
    "near_symbol_columns", "AUTOMATIC_GROUP_COLUMNS", "NEAR_DUPLICATE_BITS",
    "NEAR_DUPLICATE_WARNING_SHARE", "automatic_group_column", "frame_groups", "FrameGroups",
    "near_duplicates", "split_train_validation", "MIN_VALIDATION_POSITIVES",
    "format_data_summary", "prepare_training_data", "PreparedData", "split_counts",
    "build_backbone", "build_model", "calibrate_batchnorm", "keras_models_cache", "ModelParts",
    "unfreeze_top", "compiled_inference", "epoch_batches", "feature_dataset", "image_dataset",
    "run_inference", "FEATURE_CHUNK_BATCHES", "backbone_features", "decoded_chunks",
    "decoded_image_store", "extract_features", "feature_array", "feature_description",
    "PROGRESS_LINE_SECONDS", "STEP_LOSS_CHECK_SECONDS", "EpochCheckpoint", "EpochLog",
    "FiniteLossGuard", "mean_weighted_crossentropy", "rankable_symbols",
    "ResumableEarlyStopping", "TrainingDiverged", "validation_macro_ap", "ValidationScores",
    "compile_fused", "fine_tune", "fit_phase", "fused_head", "fused_targets",
    "positive_weights", "sample_weights", "single_device_run", "train_head", "training_model",
    "TrainingRun", "weighted_binary_crossentropy", "finite_json", "json_default",
    "write_history", "write_json", "data_fingerprint", "decision_thresholds", "load_model_dir",
    "LoadedModel", "ModelDirectory", "package_versions", "save_model", "predict_images",
    "SETTINGS_NOT_IN_RUN_KEY", "check_or_train", "check_output_outside_images",
    "CommandOutcome", "dtype_policy", "float32_twin", "mixed_precision_enabled", "run_key",
    "train_and_save", "TrainingResult", "download_weights", "PixelStore", "augmentation",
    "checkpoints", "distribution", "duplicates", "evaluation", "feature_cache", "heads",
    "report", "run_lock", "run_warnings", "output_dir_checks"]
