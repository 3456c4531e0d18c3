"""Augmentation: what each policy does, that it is training-only, and its flags."""

from __future__ import annotations

import numpy as np
import pytest

import augmentation
import build_multi_hot_model
import common
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


def test_low_resolution_softens_only_the_chosen_share(batch):
    layer = augmentation.RandomLowResolution(0.25, probability=1.0, seed=0)
    softened = layer(batch.astype(np.float32), training=True).numpy()
    edges = lambda images: np.abs(np.diff(images, axis=2)).mean()
    assert edges(softened) < 0.8 * edges(batch.astype(np.float32))
    untouched = augmentation.RandomLowResolution(0.25, probability=0.0)(batch.astype(np.float32), training=True)
    np.testing.assert_array_equal(untouched, batch)


def test_augment_and_flip_flags(tmp_path, capsys):
    parser = build_multi_hot_model.build_parser()
    args = parser.parse_args(["d", "l.csv", "o", "--augment", "heavy", "--flip"])
    config = common.config_from_args(args)
    assert (config.augment, config.flip) == ("heavy", True)
    defaults = common.config_from_args(parser.parse_args(["d", "l.csv", "o"]))
    assert (defaults.augment, defaults.flip) == ("default", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["d", "l.csv", "o", "--augment", "strong"])
    assert "argument --augment: invalid choice: 'strong'" in capsys.readouterr().err
    with pytest.raises(common.InputError, match="--augment choose one of none, light, default, heavy"):
        common.TrainingConfig(augment="strong")
