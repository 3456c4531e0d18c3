"""The model: backbones with their preprocessing, build_model (raw pixels -> preprocessing ->
pretrained backbone -> pooling -> dropout -> one named sigmoid output per symbol), its parts,
and the BatchNorm calibration and partial unfreezing of fine-tuning.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from symbol_trainer.backend import keras
from symbol_trainer import heads
from symbol_trainer.errors import WeightsUnavailableError
from symbol_trainer.images import ImageGeometry
from symbol_trainer.labelled_images import check_symbol_names
from symbol_trainer.settings import BACKBONES, BackboneSpec, TrainingConfig


# ImageNet channel means in BGR order, as keras.applications.imagenet_utils uses them.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _preprocessing_layer(spec: BackboneSpec):
    """The backbone's input preprocessing as a standard, serialisable Keras layer (no Lambda),
    so the saved model takes raw 0-255 RGB and loads in safe mode."""
    if spec.preprocessing == "tf":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocessing")
    if spec.preprocessing == "caffe":
        # RGB -> BGR and mean subtraction as one fixed 1x1 convolution.
        swap = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for rgb in range(3):
            swap[0, 0, rgb, 2 - rgb] = 1.0
        layer = keras.layers.Conv2D(3, 1, name="preprocessing", trainable=False)
        layer.build((None, None, None, 3))
        layer.set_weights([swap, -np.array(_CAFFE_MEAN_BGR, dtype=np.float32)])
        return layer
    return None


def keras_models_cache() -> Path:
    """Where Keras caches downloaded weights ($KERAS_HOME/models, default ~/.keras/models)."""
    from keras.src.backend import config as keras_config  # Keras fixes its home at import
    return Path(keras_config.keras_home()) / "models"


def build_backbone(config: TrainingConfig, input_shape: tuple[int, int, int]) -> keras.Model:
    """The pretrained backbone without its top; raises WeightsUnavailableError with the fix."""
    spec = BACKBONES[config.backbone]
    kwargs = dict(spec.extra)
    if spec.alphas:
        kwargs["alpha"] = config.alpha
    source = config.weights_source
    weights = None if source == "none" else source
    constructor = getattr(keras.applications, spec.constructor)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)  # a node behind a silent firewall must fail, not hang all night
    try:
        backbone = constructor(include_top=False, weights=weights, input_shape=input_shape, **kwargs)
    except Exception as error:
        if source == "imagenet":
            raise WeightsUnavailableError(
                f"could not get the ImageNet weights of {config.backbone} "
                f"(alpha {config.alpha}, input {input_shape[0]}x{input_shape[1]}): {error}. "
                f"On a machine without internet, either pass --weights PATH with a weights "
                f"file (.h5), or run the same command once on a machine with internet and "
                f"copy its Keras cache folder ({keras_models_cache()}) to the same place "
                f"(or to $KERAS_HOME/models) on this one. Never trained on random weights."
            ) from None
        if source != "none":
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WeightsUnavailableError(
                f"--weights {config.weights}: the file does not fit {config.backbone} with "
                f"alpha {config.alpha} ({first_line[:300]}). Use the weights file made for "
                f"this backbone and width, without the top (no_top).") from None
        raise
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return keras.Model(backbone.input, backbone.output, name="backbone")


@dataclass
class ModelParts:
    """The full model and the two views of it that training uses (layers are shared)."""

    model: keras.Model             # raw RGB image -> {symbol: probability}
    features: keras.Model          # raw RGB image -> pooled features (avg) or feature map
    head: keras.Model              # features -> {symbol: probability}
    backbone: keras.Model
    preprocessing: keras.layers.Layer | None
    pooling: str = "avg"           # TrainingConfig.pooling; heads.is_spatial tells the kind

    @property
    def spatial(self) -> bool:
        """Whether the head pools per-location scores (heads.py), trained on feature maps."""
        return heads.is_spatial(self.pooling)


def build_model(symbols: Sequence[str], config: TrainingConfig,
                geometry: ImageGeometry) -> ModelParts:
    """Raw 0-255 RGB pixels -> preprocessing -> frozen backbone -> pooling -> dropout ->
    one Dense(1, sigmoid) output per symbol, named after it. With a spatial
    `config.pooling` the head after the backbone is heads.SpatialHead instead: dropout ->
    1x1 Conv2D "score_map" -> pooling over locations -> a sigmoid output per symbol."""
    check_symbol_names(list(symbols), "symbols")
    input_shape = (geometry.height, geometry.width, 3)
    backbone = build_backbone(config, input_shape)
    backbone.trainable = False
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    preprocessing = _preprocessing_layer(BACKBONES[config.backbone])
    if preprocessing is not None:
        x = preprocessing(x)
    # training=False keeps BatchNorm in inference mode in both phases, as the keras.io
    # transfer-learning guide advises: its statistics are not relearned from small batches.
    x = backbone(x, training=False)
    if heads.is_spatial(config.pooling):
        head_layers = heads.SpatialHead(symbols, config.pooling, config.dropout)
        model = keras.Model(inputs, head_layers(x), name="symbol_classifier")
        features = keras.Model(inputs, x, name="feature_extractor")
        feature_input = keras.Input(shape=tuple(x.shape[1:]), name="features")
        head = keras.Model(feature_input, head_layers(feature_input), name="head")
        return ModelParts(model, features, head, backbone, preprocessing, config.pooling)
    pooled = keras.layers.GlobalAveragePooling2D(name="pooling")(x)
    dropout = keras.layers.Dropout(config.dropout, name="head_dropout")
    # float32 outputs keep the sigmoid and the loss exact under mixed precision.
    outputs = [keras.layers.Dense(1, activation="sigmoid", name=s, dtype="float32")
               for s in symbols]
    hidden = dropout(pooled)
    model = keras.Model(inputs, {s: h(hidden) for s, h in zip(symbols, outputs)},
                        name="symbol_classifier")
    features = keras.Model(inputs, pooled, name="feature_extractor")
    feature_input = keras.Input(shape=(pooled.shape[-1],), name="features")
    hidden = dropout(feature_input)
    head = keras.Model(feature_input, {s: h(hidden) for s, h in zip(symbols, outputs)},
                       name="head")
    return ModelParts(model, features, head, backbone, preprocessing)


def calibrate_batchnorm(parts: ModelParts, images: np.ndarray) -> None:
    """Set every BatchNorm layer's statistics from one batch of training images.

    Only for `--weights none`: a randomly initialised backbone whose BatchNorm layers keep
    their initial statistics (mean 0, variance 1) shrinks activations layer after layer, and
    its pooled features come out near 1e-11 and constant. One forward pass in training mode
    with momentum 0 stores each layer's batch statistics, so in inference mode the random
    network passes a signal and its features are usable (data-dependent initialisation).
    """
    layers = [l for l in parts.backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    x = keras.ops.convert_to_tensor(np.asarray(images, np.float32))
    if parts.preprocessing is not None:
        x = parts.preprocessing(x)
    trainable = parts.backbone.trainable
    try:
        # A frozen BatchNorm layer ignores training=True, so unfreeze for this one pass.
        parts.backbone.trainable = True
        for layer in layers:
            layer.momentum = 0.0
        parts.backbone(x, training=True)
    finally:
        parts.backbone.trainable = trainable
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def unfreeze_top(backbone: keras.Model, fraction: float) -> int:
    """Make the top `fraction` of the backbone's layers trainable, BatchNorm excepted;
    returns how many layers now train."""
    backbone.trainable = True
    layers = backbone.layers
    first = int(round(len(layers) * (1 - fraction)))
    count = 0
    for index, layer in enumerate(layers):
        trainable = index >= first and not isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = trainable
        count += bool(trainable and layer.weights)
    return count
