"""ArrayDataset and train_val_split."""

from __future__ import annotations

import pytest
import torch

from neuronwise.data import ArrayDataset, train_val_split


def indexed(n, num_classes=3):
    """Image i is filled with the value i, so every sample says where it came from."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return ArrayDataset(images, torch.arange(n) % num_classes, num_classes)


def test_len_getitem_subset():
    dataset = indexed(10)
    assert len(dataset) == 10
    x, y = dataset[4]
    assert x.shape == (1, 2, 2) and x[0, 0, 0] == 4 and y == 1
    part = dataset.subset([7, 2, 2])
    assert part.images[:, 0, 0, 0].tolist() == [7, 2, 2] and part.labels.tolist() == [1, 2, 2]
    assert part.num_classes == 3
    part.images += 100
    assert dataset.images.max() == 9, "a subset must not share storage with its dataset"


@pytest.mark.parametrize(
    "images, labels, num_classes, message",
    [
        (torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 2, "expected float32 N×C×H×W"),
        (
            torch.zeros(2, 1, 2, 2, dtype=torch.float64),
            torch.zeros(2, dtype=torch.int64),
            2,
            "expected float32",
        ),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int32), 2, "expected int64 N"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(3, dtype=torch.int64), 2, "3 labels for 2 images"),
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), 0, "Invalid num_classes: 0"),
    ],
)
def test_constructor_validation(images, labels, num_classes, message):
    with pytest.raises(ValueError, match=message):
        ArrayDataset(images, labels, num_classes)


def test_mean_std_must_match_channels():
    with pytest.raises(ValueError, match="Invalid mean: 2 values for 1 channels"):
        ArrayDataset(torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.int64), 1, (0, 0), (1, 1))


@pytest.mark.parametrize("n, fraction, expected_val", [(100, 0.1, 10), (57, 0.1, 5), (10, 0.0, 0)])
def test_split_sizes_disjoint_and_complete(n, fraction, expected_val):
    train, val = train_val_split(indexed(n), val_fraction=fraction, seed=3)
    train_ids = train.images[:, 0, 0, 0].long().tolist()
    val_ids = val.images[:, 0, 0, 0].long().tolist()
    assert len(val_ids) == expected_val and len(train_ids) == n - expected_val
    assert set(train_ids).isdisjoint(val_ids)
    assert sorted(train_ids + val_ids) == list(range(n))
    assert train.labels.tolist() == [i % 3 for i in train_ids]


def test_split_is_the_seeded_permutation():
    _, val = train_val_split(indexed(50), val_fraction=0.2, seed=7)
    reference = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:10].sort().values
    assert val.images[:, 0, 0, 0].long().tolist() == reference.tolist()


def test_split_determinism():
    dataset = indexed(200)

    def val_ids(seed):
        return train_val_split(dataset, seed=seed)[1].images[:, 0, 0, 0]

    assert torch.equal(val_ids(1), val_ids(1))
    assert not torch.equal(val_ids(1), val_ids(2))


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_validation(fraction):
    with pytest.raises(ValueError, match=f"Invalid val_fraction: {fraction}"):
        train_val_split(indexed(10), val_fraction=fraction)
