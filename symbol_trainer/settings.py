"""Every setting of training, its default, its range and its flag, in one place.

`TrainingConfig` is the frozen dataclass the training flags are generated from
(`add_training_arguments`) and read back into (`config_from_args`), checking every value's
range with the flag named. This module imports only the standard library, so `--help` and
every flag mistake are answered in a fraction of a second, before TensorFlow is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from symbol_trainer.errors import InputError

RESIZE_METHODS = ("letterbox", "squash", "crop")
EXPORT_FORMATS = ("saved_model", "tflite", "onnx")
SWITCH_SETTINGS = ("auto", "on", "off")  # --mixed-precision and --xla
# Names of the augmentation policies of --augment (augmentation.py defines what each does).
AUGMENT_POLICIES = ("none", "light", "default", "heavy")
# --pooling: 'avg' is the original head; the others are the spatial heads of heads.py.
POOLINGS = ("avg", "max", "lse", "topk", "attention")
# --fine-tune-schedule: how the fine-tuning learning rate changes over its steps (schedules.py).
FINE_TUNE_SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------------------------
# Backbones


@dataclass(frozen=True)
class BackboneSpec:
    constructor: str           # name in keras.applications
    preprocessing: str         # 'tf' (x/127.5 - 1), 'caffe' (BGR, mean subtracted), 'included'
    alphas: tuple[float, ...] = ()  # widths with ImageNet weights; () if no width parameter
    min_size: int = 32
    extra: tuple[tuple[str, object], ...] = ()  # further constructor keyword arguments


BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet": BackboneSpec("MobileNet", "tf", (0.25, 0.5, 0.75, 1.0)),
    "mobilenet_v2": BackboneSpec("MobileNetV2", "tf", (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)),
    "mobilenet_v3_small": BackboneSpec("MobileNetV3Small", "included", (0.75, 1.0),
                                       extra=(("include_preprocessing", True),)),
    "mobilenet_v3_large": BackboneSpec("MobileNetV3Large", "included", (0.75, 1.0),
                                       extra=(("include_preprocessing", True),)),
    "efficientnet_b0": BackboneSpec("EfficientNetB0", "included"),
    "efficientnet_v2_b0": BackboneSpec("EfficientNetV2B0", "included",
                                       extra=(("include_preprocessing", True),)),
    "resnet50": BackboneSpec("ResNet50", "caffe"),
    "inception_v3": BackboneSpec("InceptionV3", "tf", min_size=75),
    "convnext_tiny": BackboneSpec("ConvNeXtTiny", "included",
                                  extra=(("include_preprocessing", True),)),
}


# --------------------------------------------------------------------------------------------
# Devices (distribution.py places training on them)


DEVICES_HELP = (
    "Devices to train on: 'auto' (every visible GPU, under MirroredStrategy when there are "
    "several; the CPU when there is none), GPU indices such as '0,1', 'cpu' (the CPU even when "
    "GPUs are visible), or 'cpu:N' (N logical CPU devices under MirroredStrategy, to try the "
    "multi-device path without GPUs; slower than one). --batch-size is per device: the global "
    "batch is --batch-size times the number of devices. Across machines, TF_CONFIG or an srun "
    "with several tasks starts MultiWorkerMirroredStrategy (see docs/batch-jobs.md). Under "
    "KERAS_BACKEND=jax several devices, and several machines (srun, or KERAS_DISTRIBUTION_*), "
    "train under keras.distribution.DataParallel instead (docs/backends.md). Default: "
    "%(default)s.")


@dataclass(frozen=True)
class DeviceChoice:
    """What --devices asked for."""

    kind: str                        # 'auto', 'gpus' or 'cpu'
    gpu_indices: tuple[int, ...] = ()
    cpu_devices: int = 1

    @classmethod
    def parse(cls, text: str) -> "DeviceChoice":
        """Parse a --devices value; raises ValueError saying what is accepted."""
        value = text.strip().lower()
        if value == "auto":
            return cls("auto")
        if value == "cpu":
            return cls("cpu")
        match = re.fullmatch(r"cpu:(\d+)", value)
        if match and int(match.group(1)) >= 1:
            return cls("cpu", cpu_devices=int(match.group(1)))
        if re.fullmatch(r"\d+(,\d+)*", value):
            indices = tuple(int(i) for i in value.split(","))
            if len(set(indices)) == len(indices):
                return cls("gpus", gpu_indices=indices)
        raise ValueError("expected 'auto', 'cpu', 'cpu:N' with N at least 1, or distinct GPU "
                         "indices separated by commas such as '0,1'")


# --------------------------------------------------------------------------------------------
# Decision thresholds (evaluation.py chooses them)


@dataclass(frozen=True)
class ThresholdRule:
    """How each symbol's decision threshold is chosen on the validation set: 'f1' maximises
    F1; 'precision' takes the lowest threshold whose precision reaches `value`; 'recall'
    the highest threshold whose recall is still at least `value`."""

    target: str = "f1"
    value: float | None = None

    def __str__(self) -> str:
        return self.target if self.value is None else f"{self.target}={self.value:g}"


def parse_threshold_rule(text: str) -> ThresholdRule:
    """'f1', 'precision=0.95' or 'recall=0.9' as a ThresholdRule; ValueError says what is wrong."""
    cleaned = str(text).strip().lower()
    if cleaned == "f1":
        return ThresholdRule()
    match = re.fullmatch(r"(precision|recall)\s*=\s*([0-9.]+)", cleaned)
    if match is None:
        raise ValueError("write f1, precision=VALUE or recall=VALUE (for example precision=0.95)")
    try:
        value = float(match.group(2))
    except ValueError:
        raise ValueError(f"{match.group(2)!r} is not a number") from None
    if not 0 < value <= 1:
        raise ValueError(f"the {match.group(1)} must be above 0 and at most 1")
    return ThresholdRule(match.group(1), value)


# --------------------------------------------------------------------------------------------
# Ranges of the numeric settings

# The largest --image-size: a 16:9 frame then becomes a 2048x3648 input, 90 MB per image in
# float32 before the backbone multiplies it; beyond that no machine of ours trains a batch.
MAX_IMAGE_SIZE = 2048
MAX_BATCH_SIZE = 4096
MAX_EPOCHS = 10_000
# NumPy's and TensorFlow's seeds are unsigned 32-bit integers.
MAX_SEED = 2**32 - 1


def _whole(value, low: int, high: int) -> bool:
    """Whether `value` is an int (not a bool) from `low` to `high`."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _real(value) -> bool:
    """Whether `value` is a finite number (NaN and infinities are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# Settings: one frozen dataclass holds every training default, and the flags are made from it.


def _setting(default, flag: str, help: str, **argparse_kwargs):
    return field(default=default, metadata={"flag": flag, "help": help, **argparse_kwargs})


class _AppendPair(argparse.Action):
    """A repeatable NAME=VALUE flag collected into a tuple of (name, value) pairs; a value
    without '=' becomes (text, ''), which TrainingConfig's check then names."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, _, value = str(values).partition("=")
        setattr(namespace, self.dest,
                tuple(getattr(namespace, self.dest, None) or ()) + ((name.strip(), value),))


@dataclass(frozen=True)
class TrainingConfig:
    """Every training setting, with its default. The command-line flags are generated from it."""

    backbone: str = _setting(
        "mobilenet_v2", "--backbone",
        "Pretrained Keras Applications backbone, in snake case (the list: docs/reference.md, "
        "'Backbones'). Default: %(default)s.", metavar="NAME")
    alpha: float = _setting(
        1.0, "--alpha",
        "Width multiplier of MobileNet backbones (for example 0.35, 0.5, 0.75, 1.0); other "
        "backbones only accept 1.0. Default: %(default)s.", type=float)
    weights: str = _setting(
        "imagenet", "--weights",
        "Backbone weights: 'imagenet' (downloaded once by Keras into $KERAS_HOME/models), "
        "'none' (random initialisation with BatchNorm statistics taken from one batch of "
        "training images; for tests and demos only), or the path of a weights "
        "file (.h5 or .weights.h5) for machines without internet. Default: %(default)s.",
        metavar="imagenet|none|PATH")
    image_size: int = _setting(
        224, "--image-size",
        "Short side of the model input in pixels. With --resize letterbox or crop, the long "
        "side follows the most common aspect ratio of the training frames, rounded to a "
        "multiple of 32 (16:9 frames at 224 give 224x384); with squash the input is square. "
        "Default: %(default)s.", type=int, metavar="PIXELS")
    resize: str = _setting(
        "letterbox", "--resize",
        "How a frame becomes the model input: 'letterbox' keeps its aspect ratio and adds black "
        "bars where its shape differs from the input's; 'crop' keeps the aspect ratio and cuts "
        "the overflow equally from both sides; 'squash' stretches it. Prediction applies the "
        "same. Default: %(default)s.", choices=RESIZE_METHODS)
    batch_size: int = _setting(
        32, "--batch-size", "Images per training step. Default: %(default)s.", type=int)
    epochs: int = _setting(
        100, "--epochs",
        "Most epochs of the head phase (backbone frozen, trained on features computed once); "
        "early stopping usually ends it sooner. Default: %(default)s.", type=int)
    fine_tune_epochs: int = _setting(
        5, "--fine-tune-epochs",
        "Most epochs of the fine-tuning phase (top of the backbone unfrozen, images streamed "
        "from disk); 0 skips it. Default: %(default)s.", type=int)
    learning_rate: float = _setting(
        3e-3, "--learning-rate",
        "Adam learning rate of the head phase. Default: %(default)s.", type=float)
    fine_tune_learning_rate: float = _setting(
        2e-4, "--fine-tune-learning-rate",
        "Adam learning rate of the fine-tuning phase, lower than --learning-rate so the "
        "pretrained features are adjusted rather than overwritten; the peak of "
        "--fine-tune-schedule cosine, reached after the warm-up. Default: %(default)s.",
        type=float)
    fine_tune_schedule: str = _setting(
        "cosine", "--fine-tune-schedule",
        "How the fine-tuning learning rate changes from step to step: 'constant' keeps "
        "--fine-tune-learning-rate throughout; 'cosine' rises linearly from near 0 to "
        "--fine-tune-learning-rate over the warm-up (--fine-tune-warmup), then falls along a "
        "half cosine to near 0 at the last step of the last planned epoch (--fine-tune-epochs), "
        "so that the first steps, taken before Adam's running estimates of the gradients "
        "have settled, move the pretrained weights little, and the last ones settle them. "
        "Early stopping may end it before the end of the decay; a higher --fine-tune-patience "
        "lets it finish. history.csv shows each epoch's rate in its learning_rate column. "
        "'cosine' with the whole backbone, a peak of 2e-4 and patience 5 found small symbols "
        "in unseen episodes better than the earlier constant 1e-4 on the top 30 %% "
        "(docs/fine-tuning.md). Default: %(default)s.", choices=FINE_TUNE_SCHEDULES)
    fine_tune_warmup: float = _setting(
        1.0, "--fine-tune-warmup",
        "Length of the warm-up of --fine-tune-schedule cosine, in epochs of fine-tuning "
        "(fractions allowed, 0 for none). In epochs rather than as a share of the run because "
        "what it guards against, Adam's first steps taken before its estimates of the "
        "gradients have settled, lasts a number of steps however long the run is. It is cut "
        "to half of the planned fine-tuning steps when longer, so that the rate still decays. "
        "Ignored by 'constant'. Default: %(default)s.", type=float, metavar="EPOCHS")
    fine_tune_fraction: float = _setting(
        1.0, "--fine-tune-fraction",
        "Share of the backbone's layers, counted from the top, that the fine-tuning phase "
        "unfreezes (BatchNorm layers always stay frozen); 1 trains the whole backbone, which "
        "a small symbol needs (docs/fine-tuning.md); 0.3 costs about half as much per epoch. "
        "Default: %(default)s.", type=float)
    augment: str = _setting(
        "default", "--augment",
        "Augmentation of the fine-tuning images (training only; the saved model has none): "
        "'none'; 'light'; 'default' (rotations up to 5 degrees, zoom up to 10 %% in or out, "
        "shifts up to 5 %% that cut symbols at the frame edge, brightness, contrast and "
        "saturation up to 20 %%, blur, and 30 %% of images at half resolution); 'heavy'. "
        "Never mirrors: a mirrored logo is a different logo (see --flip). "
        "Default: %(default)s.", choices=AUGMENT_POLICIES)
    flip: bool = _setting(
        False, "--flip",
        "Also mirror images left to right at random while fine-tuning; only for symbols that "
        "look the same mirrored. Default: off.", action="store_true")
    dropout: float = _setting(
        0.2, "--dropout", "Dropout rate before the output layer. Default: %(default)s.",
        type=float)
    pooling: str = _setting(
        "avg", "--pooling",
        "How the model turns the backbone's feature map into one probability per symbol. "
        "'avg': the average of the map's locations, then one dense output per symbol (the "
        "original head). 'max', 'lse', 'topk' and 'attention': a 1x1 convolution named "
        "score_map gives each location a score per symbol, pooled over the locations by their "
        "maximum, their log-sum-exp (sharpness 5, between mean and maximum), the mean of the "
        "highest 3 %% of them, or their average weighted by a learned attention map, so "
        "that a symbol seen in a small part of the frame is not averaged away; their head phase trains on cached feature maps (more memory and disk than the "
        "pooled vectors of 'avg'; see docs/training.md, 'The head'). Default: %(default)s.",
        choices=POOLINGS)
    patience: int = _setting(
        5, "--patience",
        "Early stopping of the head phase: epochs without a higher validation average "
        "precision (the mean over symbols) before it stops; the best epoch's weights are kept. "
        "Default: %(default)s.", type=int)
    fine_tune_patience: int = _setting(
        5, "--fine-tune-patience",
        "Early stopping of the fine-tuning phase: epochs without a validation average precision "
        "higher than the best so far, the head phase's included, before it stops; the best "
        "weights are kept. As long as the default --fine-tune-epochs, so the cosine schedule "
        "runs to its end (a validation set of a few dozen shots is too noisy to stop it "
        "early); 2 stops sooner and costs less. Default: %(default)s.", type=int)
    positive_weighting: str = _setting(
        "balanced", "--positive-weighting",
        "How a symbol's positive frames are weighted in the loss: 'balanced' weights them by "
        "negatives/positives of that symbol (capped at 100) so rare symbols are still learned; "
        "'none' weights every frame 1. Default: %(default)s.", choices=("balanced", "none"))
    focal_gamma: float = _setting(
        0.0, "--focal-gamma",
        "Focal loss (Lin et al., 2017): each frame's loss for a symbol is multiplied by "
        "(1 - p)^G, where p is the probability the model gives the frame's true label, so "
        "frames it already gets right count less and those it confuses (look-alikes of a "
        "symbol, hard negatives) count more. 0 is plain cross-entropy; 2 is the usual focal "
        "setting; from 0 to 5. Default: %(default)s.", type=float, metavar="G")
    validation_split: float = _setting(
        0.2, "--validation-split",
        "Share of the images held out for validation, between 0 and 0.5. Default: %(default)s.",
        type=float)
    refit: bool = _setting(
        False, "--refit",
        "After the usual run (each phase stopped early on the validation frames, thresholds "
        "chosen on them), train a fresh model on the training and validation frames together "
        "for exactly the head and fine-tuning epochs that validation kept, with no early "
        "stopping, and save that model with the thresholds chosen on validation. The metrics, "
        "evaluation.csv and report.html stay those of the validation run, the only scores on "
        "held-out frames (see docs/refit.md). Costs a second training pass, about as long as "
        "the first. Default: off.", action="store_true")
    group_by: str | None = _setting(
        None, "--group-by",
        "Which frames must stay together on one side of the train/validation split, so that "
        "near-identical frames of one shot or episode never validate each other: the name of a "
        "column of the labels CSV (e.g. episode), 'folder' (the image's folder below IMAGE_DIR, "
        "WITH_DIR or WITHOUT_DIR), a regular expression whose first group is taken from the "
        "file name (e.g. 'ep(\\d+)_'), or 'none' to split frames one by one. Default: a CSV "
        "column named episode, group, video or shot when there is one, else none.",
        metavar="COLUMN|folder|REGEX|none")
    seed: int = _setting(
        0, "--seed",
        "Random seed of the split, the shuffling and the initialisation. Default: %(default)s.",
        type=int)
    max_unreadable: float = _setting(
        0.05, "--max-unreadable",
        "Stop before training when more than this share of the images cannot be read "
        "(corrupt, truncated, oversized); fewer are skipped and listed. Default: %(default)s.",
        type=float)
    threshold_for: str = _setting(
        "f1", "--threshold-for",
        "How each symbol's decision threshold (probability at or above it: visible) is chosen "
        "on the validation frames after training: 'f1' maximises F1; 'precision=0.95' takes "
        "the lowest threshold whose precision reaches 0.95 (fewest missed frames at that "
        "precision); 'recall=0.9' the highest threshold that still finds 90 %% of the frames "
        "showing the symbol (fewest false alarms at that recall). A symbol whose target cannot "
        "be met gets its best-F1 threshold, and the log and report say so. The thresholds are "
        "stored in metadata.json and used at prediction. Default: %(default)s.",
        metavar="f1|precision=P|recall=R")
    cache_dir: str | None = _setting(
        None, "--cache-dir",
        "Folder in which to keep the backbone features of every image, keyed by the image's "
        "content, the backbone, its weights and the input geometry, so that later runs on the "
        "same images skip computing them. Shared safely by runs at the same time. Not used "
        "with --weights none. Default: no cache.", type=str, metavar="DIR")
    decoded_cache_gb: float = _setting(
        20.0, "--decoded-cache-gb",
        "Most disk space, in GB, for a temporary file of decoded and resized images in $TMPDIR, "
        "written on the first pass over the images and read back by every fine-tuning epoch "
        "instead of decoding each image again (224x224 inputs take 0.15 MB per image). When the "
        "images need more, or the disk has less free space, they are decoded every epoch "
        "instead; 0 always decodes. The file is deleted at the end. Default: %(default)s.",
        type=float, metavar="GB")
    mixed_precision: str = _setting(
        "auto", "--mixed-precision",
        "Compute in float16 with float32 weights: 'auto' turns it on when every visible GPU "
        "has compute capability 7.0 or more (tensor cores) and off on CPU, where it is slower; "
        "'on' or 'off' force it. The saved model always computes in float32. "
        "Default: %(default)s.", choices=SWITCH_SETTINGS)
    xla: str = _setting(
        "auto", "--xla",
        "Compile the training steps with XLA: 'auto' does it on GPUs (Keras's own default) and "
        "not on CPU; 'on' or 'off' force it. Default: %(default)s.", choices=SWITCH_SETTINGS)
    devices: str = _setting(
        "auto", "--devices", DEVICES_HELP, metavar="auto|cpu|cpu:N|0,1,...")
    symbol_images: tuple[tuple[str, str], ...] = _setting(
        (), "--symbol-image",
        "A clean image of a symbol, as NAME=FILE (NAME one of the run's symbols; FILE a PNG, "
        "JPEG or other image, whose alpha channel, if any, says which pixels are the symbol; "
        "without one the whole rectangle is pasted). Fine-tuning then pastes it into training "
        "frames that do not show that symbol, at random positions, sizes, small rotations, "
        "colours, opacities and blur, and labels those frames as showing it (validation "
        "frames are never changed; see docs/symbol-image.md). Repeat the flag for several "
        "symbols or several images of one. Needs fine-tuning (--fine-tune-epochs above 0). "
        "Default: none.",
        action=_AppendPair, metavar="NAME=FILE")
    symbol_image_rate: float = _setting(
        0.3, "--symbol-image-rate",
        "With --symbol-image: the chance that a fine-tuning image not showing one of those "
        "symbols gets one pasted into it, drawn anew for every image in every epoch; 0 pastes "
        "nothing. Default: %(default)s.", type=float, metavar="SHARE")
    symbol_image_size: str = _setting(
        "0.08,0.5", "--symbol-image-size",
        "With --symbol-image: the smallest and largest size of a pasted symbol, as MIN,MAX "
        "shares of the frame's shorter side that its longer side spans (drawn log-uniformly "
        "between them). Make it match how large the symbol looks in your frames: a TV "
        "channel's logo is about 0.05-0.15. Default: %(default)s.", metavar="MIN,MAX")

    tensorboard: str | None = _setting(
        None, "--tensorboard",
        "Also write Keras TensorBoard logs of both phases into this folder (subfolders head "
        "and fine_tune), to watch with 'tensorboard --logdir DIR'. Default: none.",
        type=str, metavar="DIR")

    def __post_init__(self):
        checks = [
            ("backbone", self.backbone in BACKBONES,
             f"choose one of {', '.join(sorted(BACKBONES))}"),
            ("image_size", _whole(self.image_size, 32, MAX_IMAGE_SIZE),
             f"must be a whole number of pixels from 32 to {MAX_IMAGE_SIZE}"),
            ("batch_size", _whole(self.batch_size, 1, MAX_BATCH_SIZE),
             f"must be a whole number from 1 to {MAX_BATCH_SIZE}"),
            ("epochs", _whole(self.epochs, 1, MAX_EPOCHS),
             f"must be a whole number from 1 to {MAX_EPOCHS}"),
            ("fine_tune_epochs", _whole(self.fine_tune_epochs, 0, MAX_EPOCHS),
             f"must be a whole number from 0 to {MAX_EPOCHS}"),
            ("learning_rate", _real(self.learning_rate) and 0 < self.learning_rate <= 1,
             "must be a number above 0 and at most 1 (Adam's rates are usually 1e-4 to 1e-2)"),
            ("fine_tune_learning_rate",
             _real(self.fine_tune_learning_rate) and 0 < self.fine_tune_learning_rate <= 1,
             "must be a number above 0 and at most 1 (Adam's rates are usually 1e-5 to 1e-3)"),
            ("fine_tune_schedule", self.fine_tune_schedule in FINE_TUNE_SCHEDULES,
             f"choose one of {', '.join(FINE_TUNE_SCHEDULES)}"),
            ("fine_tune_warmup",
             _real(self.fine_tune_warmup) and 0 <= self.fine_tune_warmup <= MAX_EPOCHS,
             f"must be a number of epochs from 0 to {MAX_EPOCHS}"),
            ("fine_tune_fraction", _real(self.fine_tune_fraction) and 0 < self.fine_tune_fraction <= 1,
             "must be greater than 0 and at most 1"),
            ("dropout", _real(self.dropout) and 0 <= self.dropout < 1,
             "must be at least 0 and below 1"),
            ("patience", _whole(self.patience, 1, MAX_EPOCHS),
             f"must be a whole number from 1 to {MAX_EPOCHS}"),
            ("fine_tune_patience", _whole(self.fine_tune_patience, 1, MAX_EPOCHS),
             f"must be a whole number from 1 to {MAX_EPOCHS}"),
            ("positive_weighting", self.positive_weighting in ("balanced", "none"),
             "choose 'balanced' or 'none'"),
            ("focal_gamma", _real(self.focal_gamma) and 0 <= self.focal_gamma <= 5,
             "must be a number from 0 to 5 (2 is the usual focal setting)"),
            ("validation_split", _real(self.validation_split) and 0 < self.validation_split <= 0.5,
             "must be greater than 0 and at most 0.5"),
            ("max_unreadable", _real(self.max_unreadable) and 0 <= self.max_unreadable <= 1,
             "must be between 0 and 1"),
            ("decoded_cache_gb", _real(self.decoded_cache_gb) and self.decoded_cache_gb >= 0,
             "must be a number of GB, 0 or more"),
            ("seed", _whole(self.seed, 0, MAX_SEED), f"must be a whole number from 0 to {MAX_SEED}"),
            ("alpha", _real(self.alpha) and self.alpha > 0, "must be a number above 0"),
            ("mixed_precision", self.mixed_precision in SWITCH_SETTINGS,
             "choose 'auto', 'on' or 'off'"),
            ("xla", self.xla in SWITCH_SETTINGS, "choose 'auto', 'on' or 'off'"),
            ("resize", self.resize in RESIZE_METHODS, f"choose one of {', '.join(RESIZE_METHODS)}"),
            ("pooling", self.pooling in POOLINGS, f"choose one of {', '.join(POOLINGS)}"),
            ("augment", self.augment in AUGMENT_POLICIES,
             f"choose one of {', '.join(AUGMENT_POLICIES)}"),
            ("symbol_image_rate",
             _real(self.symbol_image_rate) and 0 <= self.symbol_image_rate <= 1,
             "must be a share from 0 to 1"),
        ]
        if self.refit and _real(self.validation_split) and self.validation_split == 0:
            raise InputError(
                "--refit needs validation frames to choose the epochs and thresholds it refits "
                "with, and --validation-split 0 leaves none: give a --validation-split above 0 "
                "(for example 0.2), or leave out --refit.")
        for name, ok, what in checks:
            if not ok:
                raise InputError(f"{flag_of(name)} {what}; got {getattr(self, name)!r}.")
        spec = BACKBONES[self.backbone]
        if spec.alphas and self.alpha not in spec.alphas:
            raise InputError(
                f"--alpha {self.alpha} is not available for {self.backbone}; choose one of "
                f"{', '.join(str(a) for a in spec.alphas)}.")
        if not spec.alphas and self.alpha != 1.0:
            raise InputError(
                f"--alpha only applies to MobileNet backbones; {self.backbone} takes 1.0, "
                f"got {self.alpha}.")
        if self.image_size < spec.min_size:
            raise InputError(
                f"--image-size {self.image_size} is too small for {self.backbone}; it needs at "
                f"least {spec.min_size}.")
        if self.weights.lower() not in ("imagenet", "none"):
            path = Path(self.weights)
            if not path.is_file():
                raise InputError(
                    f"--weights {self.weights!r}: no such file. Give 'imagenet', 'none', or the "
                    "path of a weights file (.h5 or .weights.h5).")
            if not path.name.endswith(".h5"):
                raise InputError(
                    f"--weights {self.weights!r}: expected a Keras weights file ending in .h5 "
                    "or .weights.h5.")
        try:
            DeviceChoice.parse(self.devices)
        except ValueError as error:
            raise InputError(f"--devices {self.devices!r}: {error}.") from None
        try:
            parse_threshold_rule(self.threshold_for)
        except ValueError as error:
            raise InputError(f"--threshold-for {self.threshold_for!r}: {error}.") from None
        _check_symbol_images(self.symbol_images)
        try:
            parse_size_range(self.symbol_image_size)
        except ValueError as error:
            raise InputError(f"--symbol-image-size {self.symbol_image_size!r}: {error}.") \
                from None
        if self.symbol_images and self.fine_tune_epochs == 0:
            raise InputError("--symbol-image pastes into the images of the fine-tuning phase, "
                             "which --fine-tune-epochs 0 skips; give --fine-tune-epochs 1 or "
                             "more, or leave --symbol-image out.")
        if self.tensorboard is not None:
            if Path(self.tensorboard).exists() and not Path(self.tensorboard).is_dir():
                raise InputError(f"--tensorboard {self.tensorboard!r} is a file; give a folder.")
            if importlib.util.find_spec("tensorboard") is None:
                raise InputError("--tensorboard needs the tensorboard package, which "
                                 "requirements.txt installs: pip install -r requirements.txt.")
        if self.cache_dir is not None and Path(self.cache_dir).exists() \
                and not Path(self.cache_dir).is_dir():
            raise InputError(f"--cache-dir {self.cache_dir!r} is a file; give a folder.")

    @property
    def weights_source(self) -> str:
        """'imagenet', 'none', or the weights file's absolute path."""
        lowered = self.weights.lower()
        return lowered if lowered in ("imagenet", "none") else str(Path(self.weights).resolve())


def parse_size_range(text: str) -> tuple[float, float]:
    """'0.08,0.5' as (0.08, 0.5); ValueError says what is wrong."""
    parts = str(text).split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise ValueError("write MIN,MAX, two shares of the frame's shorter side such as "
                         "0.08,0.5") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= 1):
        raise ValueError("MIN and MAX must be above 0 and at most 1, MIN not above MAX")
    return low, high


def _check_symbol_images(pairs) -> None:
    """Each --symbol-image is NAME=FILE with a name and an existing file (symbol_paste.py
    checks that the file decodes and that NAME is a symbol of the run)."""
    for pair in pairs:
        name, path = pair
        shown = f"{name}={path}" if path else name
        if not name or not path:
            raise InputError(f"--symbol-image {shown!r}: write NAME=FILE, the symbol's name "
                             "and its image file, for example --symbol-image star=star.png.")
        if not Path(path).is_file():
            raise InputError(f"--symbol-image {shown!r}: no such file {path!r}. Give the path "
                             "of an image file (PNG with transparency works best).")


def flag_of(setting_name: str) -> str:
    """The command-line flag of a TrainingConfig field."""
    return TrainingConfig.__dataclass_fields__[setting_name].metadata["flag"]


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every training command shares; defaults come from TrainingConfig."""
    group = parser.add_argument_group("training options")
    for f in dataclasses.fields(TrainingConfig):
        meta = dict(f.metadata)
        flag = meta.pop("flag")
        if "action" not in meta:
            # A setting whose default is None (no grouping, no folder) takes text.
            meta.setdefault("type", str if f.default is None or isinstance(f.default, str)
                            else type(f.default))
        if "choices" in meta:
            meta.pop("type")
        group.add_argument(flag, dest=f.name, default=f.default, **meta)
    output = parser.add_argument_group("output and logging")
    output.add_argument(
        "--dry-run", action="store_true",
        help="Do every check that comes before training (find and read the images, validate the "
             "labels, split), print a summary table of images and positives per symbol and split, "
             "and stop: exit code 0 if training could start, 2 with the errors otherwise. Nothing "
             "is written.")
    output.add_argument(
        "--overwrite", action="store_true",
        help="Replace OUTPUT_MODEL_DIR if it exists and is not empty (it is only replaced once "
             "the new model is complete).")
    output.add_argument(
        "--no-resume", action="store_true",
        help="Start over even if OUTPUT_MODEL_DIR.partial holds the checkpoint of an unfinished "
             "run, and delete that checkpoint. By default a run continues from the checkpoint "
             "that an interrupted run of the same settings and data left (every completed "
             "epoch of either phase is kept), and refuses one of other settings.")
    output.add_argument(
        "--export", action="append", default=[], choices=EXPORT_FORMATS,
        help="Also write the model as a TensorFlow SavedModel for TensorFlow Serving "
             "(saved_model/, whose default signature takes encoded image files), as "
             "TensorFlow Lite (model.tflite), or as ONNX for onnxruntime (model.onnx, under "
             "every backend; needs requirements-onnx.txt installed); each is loaded back and "
             "checked against the Keras model's predictions before the run succeeds. "
             "saved_model and tflite need the TensorFlow backend. Repeat the flag for several "
             "(see docs/exports.md). Default: none.")
    output.add_argument(
        "--download-weights-only", action="store_true",
        help="Only download the ImageNet weights of --backbone (and --alpha) into the Keras "
             "cache ($KERAS_HOME/models, by default ~/.keras/models) and stop; no images or "
             "output folder are needed. Run it on a machine with internet, then copy that "
             "folder to the offline machine (see docs/offline.md).")
    output.add_argument(
        "--json", action="store_true",
        help="Print one JSON line at the end on standard output, and nothing else there: the "
             "status, exit code, model directory, metrics and timings, or the error. Logs and "
             "the summary go to standard error.")
    output.add_argument("--quiet", action="store_true",
                        help="Only print warnings and errors.")
    output.add_argument("--debug", action="store_true",
                        help="Print full tracebacks and debug messages.")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The TrainingConfig that parsed flags describe (validated; raises InputError)."""
    return TrainingConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig)})

