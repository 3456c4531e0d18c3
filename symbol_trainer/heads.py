"""The spatial heads of `--pooling max|lse|topk|attention`: per-location symbol scores on the backbone's
feature map, pooled over locations into one logit per symbol.

    feature map (batch, h, w, channels) -> Dropout "head_dropout"
      -> Conv2D "score_map": 1x1, one linear filter per symbol, float32
         = per-location logits (batch, h, w, symbols), in symbol order
      -> pooling "pooling" over the h x w locations, per symbol -> (batch, symbols)
      -> one output per symbol, named after it: the sigmoid of its logit, (batch, 1), as a
         standard Dense(1, sigmoid) layer whose fixed, untrained kernel picks the symbol's
         column (1 there, 0 elsewhere, bias 0: exactly that logit)

`keras.Model(model.inputs, model.get_layer("score_map").output)` of a saved model gives the
per-location logits, e.g. for heatmaps. `--pooling avg` keeps the original head
(GlobalAveragePooling2D "pooling" -> Dropout -> Dense(1, sigmoid) per symbol), which is the
same function as averaging a 1x1 convolution's per-location logits; it has no "score_map".

The poolings, on one symbol's per-location logits x (h x w = N locations):
- max:  max(x). A symbol seen at one location alone gives the frame its logit.
- lse:  log-sum-exp, (1/r) log(mean(exp(r x))) with the fixed sharpness r = LSE_SHARPNESS.
        Between mean(x) (r -> 0) and max(x) (r -> infinity); unlike max, every location
        gets a gradient, the highest the most.
- topk: the mean of the k highest logits, k = max(1, round(TOPK_FRACTION x N)): 3 of the
        7 x 12 = 84 locations of a 224x384 input, 10 of 336 at 448x768. Between max and
        mean: one high location alone (noise, or a symbol lighting up a single location) is
        diluted by k, a symbol that lights up k locations (a small symbol straddling cells,
        whose neighbours see it through their receptive fields) counts in full.
- attention: sum over locations of softmax(a) x, where a is a second 1x1 convolution's
        per-location attention logit for the symbol ("attention_map", learned; initialised
        to zero, so training starts from the mean and learns where to look).

A `max` model is made of standard Keras layers only. `lse` and `topk` pool with the small
layers below, registered with Keras (package "symbol_trainer") and computing with keras.ops:
their saved models load in Keras safe mode in any process that has imported this module
(model imports it, and model_dir through model). Standard library, NumPy and Keras only:
this module imports nothing of the tool's own but backend (TensorFlow and Keras).
"""

from __future__ import annotations

import logging
import math
import tempfile
from typing import Sequence

import numpy as np

from symbol_trainer.backend import keras  # TensorFlow first, quietly

log = logging.getLogger(__name__)

SPATIAL_POOLINGS = ("max", "lse", "topk", "attention")
# The sharpness r of log-sum-exp pooling. Logits of a 1x1 convolution usually span a few units
# from background to symbol; with r = 5 a symbol at one of the 84 locations of a 224x384 input
# gives a frame logit within log(84)/5 = 0.9 of its own, and background noise of +-1 unit
# around a mean moves the frame logit by about that much, not to the maximum.
LSE_SHARPNESS = 5.0
# The share of locations whose logits top-k pooling averages: 3 % is a 2x2 patch less one
# at 224x384 (a symbol of about 30-60 px), so a small symbol can fill it.
TOPK_FRACTION = 0.03
# Feature maps are kept as float16 (half the memory of float32; the head's 1x1 convolution
# computes in float32). Beyond this many bytes they go to a nameless file in $TMPDIR, mapped
# into memory, instead of RAM.
MAPS_IN_MEMORY_BYTES = 4 * 1024**3
MAP_DTYPE = np.float16


def is_spatial(pooling: str) -> bool:
    return pooling in SPATIAL_POOLINGS


@keras.saving.register_keras_serializable(package="symbol_trainer")
class LogSumExpPooling(keras.layers.Layer):
    """(batch, h, w, c) -> (batch, c): (1/r) log(mean over locations of exp(r x))."""

    def __init__(self, sharpness: float = LSE_SHARPNESS, **kwargs):
        super().__init__(**kwargs)
        if not sharpness > 0:
            raise ValueError(f"sharpness must be above 0, got {sharpness}")
        self.sharpness = float(sharpness)

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        locations = keras.ops.shape(x)[1] * keras.ops.shape(x)[2]
        total = keras.ops.logsumexp(self.sharpness * x, axis=(1, 2))
        return (total - keras.ops.log(keras.ops.cast(locations, total.dtype))) / self.sharpness

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[3])

    def get_config(self):
        return {**super().get_config(), "sharpness": self.sharpness}


@keras.saving.register_keras_serializable(package="symbol_trainer")
class AttentionPooling(keras.layers.Layer):
    """[scores, attention logits], both (batch, h, w, c) -> (batch, c): per channel, the
    scores averaged with weights softmax(attention logits) over the locations."""

    def call(self, inputs):
        scores, attention = (keras.ops.cast(x, self.compute_dtype) for x in inputs)
        shape = keras.ops.shape(scores)
        flat = (shape[0], shape[1] * shape[2], shape[3])
        weights = keras.ops.softmax(keras.ops.reshape(attention, flat), axis=1)
        return keras.ops.sum(weights * keras.ops.reshape(scores, flat), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][3])


def top_count(locations: int, fraction: float) -> int:
    """How many of `locations` top-k pooling averages."""
    return max(1, min(locations, int(round(fraction * locations))))


@keras.saving.register_keras_serializable(package="symbol_trainer")
class TopKMeanPooling(keras.layers.Layer):
    """(batch, h, w, c) -> (batch, c): the mean of the top_count(h x w, fraction) highest
    values of each channel. h and w must be known when the layer is built."""

    def __init__(self, fraction: float = TOPK_FRACTION, **kwargs):
        super().__init__(**kwargs)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be above 0 and at most 1, got {fraction}")
        self.fraction = float(fraction)

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        height, width, channels = inputs.shape[1], inputs.shape[2], inputs.shape[3]
        if height is None or width is None:
            raise ValueError("TopKMeanPooling needs a feature map of known height and width")
        k = top_count(height * width, self.fraction)
        flat = keras.ops.reshape(x, (-1, height * width, channels))
        values, _ = keras.ops.top_k(keras.ops.transpose(flat, (0, 2, 1)), k, sorted=False)
        return keras.ops.mean(values, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[3])

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction}


def pooling_layer(pooling: str, name: str = "pooling") -> keras.layers.Layer:
    """The layer that pools per-location logits (batch, h, w, symbols) into (batch, symbols)."""
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=name, dtype="float32")
    if pooling == "lse":
        return LogSumExpPooling(name=name, dtype="float32")
    if pooling == "topk":
        return TopKMeanPooling(name=name, dtype="float32")
    if pooling == "attention":
        return AttentionPooling(name=name, dtype="float32")
    raise ValueError(f"not a spatial pooling: {pooling!r}; choose one of {SPATIAL_POOLINGS}")


class SpatialHead:
    """The layers of a spatial head; calling it on a feature map gives {symbol: probability}.
    Calling it on two inputs (the image model's backbone output and a feature-map input)
    shares the layers between the two models, as build_model's head and model do."""

    def __init__(self, symbols: Sequence[str], pooling: str, dropout: float):
        self.symbols = list(symbols)
        self.dropout = keras.layers.Dropout(dropout, name="head_dropout")
        # float32: per-location logits stay exact under mixed precision.
        self.score_map = keras.layers.Conv2D(len(self.symbols), 1, name="score_map",
                                             dtype="float32")
        self.attention_map = attention_conv(len(self.symbols), "attention_map") \
            if pooling == "attention" else None
        self.pooling = pooling_layer(pooling)
        self.outputs = [keras.layers.Dense(1, activation="sigmoid", name=s, dtype="float32",
                                           trainable=False) for s in self.symbols]

    def __call__(self, feature_map):
        x = self.dropout(feature_map)
        logits = self.pooling(self.score_map(x) if self.attention_map is None
                              else [self.score_map(x), self.attention_map(x)])
        probabilities = {s: output(logits) for s, output in zip(self.symbols, self.outputs)}
        for i, output in enumerate(self.outputs):  # pick column i, exactly
            kernel = np.zeros((len(self.symbols), 1), np.float32)
            kernel[i, 0] = 1.0
            output.set_weights([kernel, np.zeros(1, np.float32)])
        return probabilities


def attention_conv(filters: int, name: str) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, 1, name=name, dtype="float32",
                               kernel_initializer="zeros")


def fused_spatial_head(head: keras.Model, pooling: str, dropout: float,
                       map_shape: tuple[int, int, int]) -> keras.Model:
    """A training twin of a SpatialHead's model `head`, feature map -> logits (batch, symbols)
    in one model output (see training.fused_head for why), starting from its weights."""
    score_map = head.get_layer("score_map")
    inputs = keras.Input(shape=tuple(map_shape), name="features")
    x = keras.layers.Dropout(dropout, dtype="float32")(inputs)
    conv = keras.layers.Conv2D(score_map.filters, 1, name="logits", dtype="float32")
    pooling_input = conv(x)
    if pooling == "attention":
        attention = attention_conv(score_map.filters, "attention")
        pooling_input = [pooling_input, attention(x)]
    logits = pooling_layer(pooling, name="logit_pooling")(pooling_input)
    model = keras.Model(inputs, logits, name="fused_head")
    conv.set_weights(score_map.get_weights())
    if pooling == "attention":
        attention.set_weights(head.get_layer("attention_map").get_weights())
    return model


def copy_fused_spatial_head(fused: keras.Model, head: keras.Model, pooling: str) -> None:
    head.get_layer("score_map").set_weights(fused.get_layer("logits").get_weights())
    if pooling == "attention":
        head.get_layer("attention_map").set_weights(fused.get_layer("attention").get_weights())


def map_bytes(count: int, shape: Sequence[int]) -> int:
    return int(count) * math.prod(shape) * np.dtype(MAP_DTYPE).itemsize


def feature_map_array(count: int, shape: Sequence[int]) -> np.ndarray:
    """An uninitialised float16 array for `count` feature maps of `shape`: in memory, or,
    beyond MAPS_IN_MEMORY_BYTES, mapped from a nameless file in $TMPDIR (freed with the
    array, however the run ends)."""
    needed = map_bytes(count, shape)
    if needed <= MAPS_IN_MEMORY_BYTES:
        return np.empty((count, *shape), MAP_DTYPE)
    handle = tempfile.TemporaryFile(prefix="feature_maps_")
    log.info("Keeping %s feature maps (%.2f GB) in a nameless file in %s.", f"{count:,}",
             needed / 1e9, tempfile.gettempdir())
    return np.memmap(handle, MAP_DTYPE, "w+", shape=(count, *shape))


def take_rows(maps: np.ndarray, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """maps[rows] as a new feature_map_array: for a set held in a mapped file, the rows of the
    training or validation split also go to one instead of into memory."""
    taken = feature_map_array(len(rows), maps.shape[1:])
    for first in range(0, len(rows), chunk):
        taken[first:first + chunk] = maps[rows[first:first + chunk]]
    return taken
