"""The stratified split and the loss weighting."""

from __future__ import annotations

import numpy as np
import pytest

from symbol_trainer import splitting, training


def test_split_is_seeded_stratified_and_sized():
    rng = np.random.default_rng(1)
    labels = (rng.random((500, 1)) < 0.1).astype(np.float32)
    validation = splitting.split_train_validation(labels, 0.2, seed=3)
    assert validation.sum() == 100
    assert labels[validation].sum() == pytest.approx(labels.sum() * 0.2, abs=1)
    np.testing.assert_array_equal(validation, splitting.split_train_validation(labels, 0.2, seed=3))
    assert not np.array_equal(validation, splitting.split_train_validation(labels, 0.2, seed=4))


def test_split_puts_both_classes_of_a_tiny_symbol_in_validation():
    labels = np.zeros((40, 2), dtype=np.float32)
    labels[:2, 0] = 1          # two positives only
    labels[:, 1] = 1
    labels[-2:, 1] = 0         # two negatives only
    for seed in range(10):
        validation = splitting.split_train_validation(labels, 0.1, seed)
        for column in range(2):
            for value in (0, 1):
                assert (labels[validation, column] == value).any()
                assert (labels[~validation, column] == value).any()


def test_multi_label_split_gives_every_symbol_its_share():
    rng = np.random.default_rng(0)
    labels = (rng.random((1000, 5)) < [0.02, 0.05, 0.1, 0.3, 0.5]).astype(np.float32)
    validation = splitting.split_train_validation(labels, 0.25, seed=0)
    share = labels[validation].sum(axis=0) / labels.sum(axis=0)
    assert np.all(np.abs(share - 0.25) < 0.05), share


def test_groups_never_straddle_the_split():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(50), 6)
    labels = np.repeat(rng.random((50, 1)) < 0.3, 6, axis=0).astype(np.float32)
    validation = splitting.split_train_validation(labels, 0.2, seed=0, groups=groups)
    for group in range(50):
        assert len(set(validation[groups == group])) == 1
    assert labels[validation].sum() > 0 and (labels[validation] == 0).sum() > 0


def test_positive_weighting_balances_rare_symbols():
    labels = np.zeros((100, 2), dtype=np.float32)
    labels[:2, 0] = 1
    labels[:50, 1] = 1
    labels[99, 1] = np.nan
    weights = training.positive_weights(labels, "balanced")
    np.testing.assert_allclose(weights, [49.0, 1.0])
    per_frame = training.sample_weights(labels, weights)
    assert per_frame[0, 0] == 49 and per_frame[50, 0] == 1 and per_frame[99, 1] == 0
    np.testing.assert_array_equal(training.positive_weights(labels, "none"), [1, 1])


def test_grouped_split_validates_a_symbol_seen_in_only_two_large_groups():
    # Three signs, each filmed in two tracks of 30 frames: a group is larger than the sign's
    # validation share (12 frames), and the plain rule would put both tracks in training.
    groups = np.repeat(np.arange(6), 30)
    labels = np.eye(3, dtype=np.float32)[np.repeat(np.arange(3), 60)]
    for seed in range(5):
        validation = splitting.split_train_validation(labels, 0.2, seed, groups)
        assert labels[validation].sum(axis=0).tolist() == [30, 30, 30]
        assert not set(groups[validation]) & set(groups[~validation])
