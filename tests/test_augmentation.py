"""Augmentation: what each policy does, that it is training-only, and its flags."""

from __future__ import annotations

import numpy as np
import pytest

from symbol_trainer import augmentation
import build_multi_hot_model
from symbol_trainer import errors, settings
from conftest import scene


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    return np.stack([np.asarray(scene(rng, True, True, (64, 48)).resize((64, 64)))
                     for _ in range(4)]).astype(np.uint8)


@pytest.mark.parametrize("policy", ["light", "default", "heavy"])
def test_policies_change_training_images_and_leave_inference_alone(policy, batch):
    layers = augmentation.augmentation_layers(policy, flip=False, seed=0)
    trained = layers(batch, training=True).numpy()
    assert trained.shape == batch.shape
    assert np.abs(trained - batch).mean() > 1.0  # visibly changed
    assert trained.min() >= 0 and trained.max() <= 255.5
    np.testing.assert_array_equal(layers(batch, training=False).numpy(), batch)


def test_nothing_mirrors_unless_flip_is_asked_for():
    for policy in augmentation.POLICIES:
        layers = augmentation.augmentation_layers(policy, flip=False, seed=0)
        names = [type(layer).__name__ for layer in (layers.layers if layers else [])]
        assert "RandomFlip" not in names
    assert augmentation.augmentation_layers("none", flip=False, seed=0) is None
    flipping = augmentation.augmentation_layers("none", flip=True, seed=0)
    assert [type(layer).__name__ for layer in flipping.layers] == ["RandomFlip"]


def test_the_same_seed_augments_the_same_way(batch):
    first = augmentation.augmentation_layers("default", False, seed=3)(batch, training=True)
    second = augmentation.augmentation_layers("default", False, seed=3)(batch, training=True)
    np.testing.assert_array_equal(first.numpy(), second.numpy())


def test_each_stage_of_the_layer_does_what_it_says(batch):
    images = batch.astype(np.float32)
    still = augmentation.Policy(0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0, 2, 0.0)
    layer = augmentation.SymbolAugmentation(still, seed=0)
    np.testing.assert_allclose(layer(images, training=True), images, atol=1e-3)  # all ranges 0

    edges = lambda x: np.abs(np.diff(np.asarray(x), axis=2)).mean()
    soft = augmentation.SymbolAugmentation(
        augmentation.Policy(0, (1.0, 1.0), 0.0, 0.0, 0.0, 0.0, 0.0, 4, 1.0), seed=0)
    assert edges(soft(images, training=True)) < 0.8 * edges(images)

    shifted = augmentation.SymbolAugmentation(
        augmentation.Policy(0, (1.0, 1.0), 0.25, 0.0, 0.0, 0.0, 0.0, 2, 0.0), seed=0)
    out = np.asarray(shifted(images, training=True))
    assert (out.max(axis=3) == 0).mean() > 0.02  # black borders where the frame moved away
    assert not (out == 0).all(axis=(1, 2, 3)).any()

    grey = augmentation.SymbolAugmentation(
        augmentation.Policy(0, (1.0, 1.0), 0.0, 0.0, 0.0, 1.0, 0.0, 2, 0.0), seed=0)
    colour = lambda x: np.abs(np.asarray(x) - np.asarray(x).mean(axis=3, keepdims=True)).mean(axis=(1, 2, 3))
    assert not np.allclose(colour(grey(images, training=True)), colour(images))


def test_augment_and_flip_flags(tmp_path, capsys):
    parser = build_multi_hot_model.build_parser()
    args = parser.parse_args(["d", "l.csv", "o", "--augment", "heavy", "--flip"])
    config = settings.config_from_args(args)
    assert (config.augment, config.flip) == ("heavy", True)
    defaults = settings.config_from_args(parser.parse_args(["d", "l.csv", "o"]))
    assert (defaults.augment, defaults.flip) == ("default", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["d", "l.csv", "o", "--augment", "strong"])
    assert "argument --augment: invalid choice: 'strong'" in capsys.readouterr().err
    with pytest.raises(errors.InputError, match="--augment choose one of none, light, default, heavy"):
        settings.TrainingConfig(augment="strong")
