"""Seeded index selection: stratified validation split and class-balanced subset."""

from collections import Counter

import pytest

from lora_vision.data.splits import TransformedSubset, balanced_subset, stratified_split

TARGETS = [0] * 50 + [1] * 30 + [2] * 20


def test_stratified_split_is_seeded_disjoint_complete_and_stratified():
    rest, held = stratified_split(TARGETS, 0.2, seed=3)
    assert (rest, held) == stratified_split(TARGETS, 0.2, seed=3)
    assert held != stratified_split(TARGETS, 0.2, seed=4)[1]
    assert not set(rest) & set(held)
    assert sorted(rest + held) == list(range(len(TARGETS)))
    assert Counter(TARGETS[i] for i in held) == {0: 10, 1: 6, 2: 4}


@pytest.mark.parametrize("fraction", [0.0, 1.0, 0.001])
def test_stratified_split_rejects_fractions_leaving_a_part_empty(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(TARGETS, fraction, seed=0)


def test_balanced_subset_spreads_evenly_and_is_seeded():
    chosen = balanced_subset(TARGETS, 31, seed=0)
    counts = Counter(TARGETS[i] for i in chosen)
    assert sum(counts.values()) == 31
    assert sorted(counts.values()) == [10, 10, 11]
    assert chosen == balanced_subset(TARGETS, 31, seed=0)
    assert chosen != balanced_subset(TARGETS, 31, seed=1)


def test_balanced_subset_draws_only_from_the_given_candidates():
    rest, _ = stratified_split(TARGETS, 0.5, seed=0)
    assert set(balanced_subset(TARGETS, 12, seed=0, among=rest)) <= set(rest)


def test_balanced_subset_errors_name_the_limit():
    with pytest.raises(ValueError, match=r"train_subset=70 needs 24 images of class 2 .* up to train_subset=60"):
        balanced_subset(TARGETS, 70, seed=0)
    with pytest.raises(ValueError, match=r"\[1, 100\]"):
        balanced_subset(TARGETS, 101, seed=0)


class _Pairs(list):
    """(value, label) items with the ``targets`` list torchvision datasets have."""

    @property
    def targets(self):
        return [label for _, label in self]


def test_transformed_subset_applies_transform_and_keeps_targets():
    view = TransformedSubset(_Pairs(zip(range(5), TARGETS[48:53], strict=True)), [1, 3], lambda x: x * 10)
    assert [view[0], view[1]] == [(10, 0), (30, 1)]
    assert view.targets == [0, 1]
    assert len(TransformedSubset(view, None, None)) == 2
