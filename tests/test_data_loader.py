"""TensorLoader: coverage, determinism from (seed, epoch), sharding, augmentation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from neuronwise.data import ArrayDataset, TensorLoader, random_crop_flip


def indexed(n, channels=1, size=2):
    """Image i is filled with the value i and labelled i, so every batch says what it holds."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    images = images.expand(n, channels, size, size).clone()
    return ArrayDataset(images, torch.arange(n), max(n, 1))


def epoch_ids(loader):
    ids = []
    for x, y in loader:
        assert torch.equal(x[:, 0, 0, 0].long(), y), "images and labels must stay paired"
        ids.extend(y.tolist())
    return ids


def test_every_sample_once_per_epoch():
    loader = TensorLoader(indexed(103), batch_size=10, shuffle=True, seed=5)
    assert len(loader) == 11
    sizes = [len(y) for _, y in loader]
    assert sizes == [10] * 10 + [3]
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert sorted(epoch_ids(loader)) == list(range(103))


def test_order_is_a_function_of_seed_and_epoch():
    def order(seed, epoch):
        loader = TensorLoader(indexed(64), batch_size=8, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return epoch_ids(loader)

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    assert order(0, 1) != order(1, 0)
    assert order(0, 0) != list(range(64))


def test_no_shuffle_matches_dataloader():
    dataset = indexed(23)
    ours = list(TensorLoader(dataset, batch_size=5))
    theirs = list(DataLoader(TensorDataset(dataset.images, dataset.labels), batch_size=5))
    assert len(ours) == len(theirs)
    for (x, y), (x_ref, y_ref) in zip(ours, theirs):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_drop_last_drops_the_incomplete_batch():
    loader = TensorLoader(indexed(23), batch_size=5, shuffle=True, drop_last=True)
    assert len(loader) == 4
    assert [len(y) for _, y in loader] == [5] * 4


@pytest.mark.parametrize(
    "n, world_size, drop_last", [(103, 4, False), (103, 4, True), (8, 3, False)]
)
def test_shards_follow_distributed_sampler(n, world_size, drop_last):
    dataset = indexed(n)
    for rank in range(world_size):
        loader = TensorLoader(
            dataset, batch_size=7, rank=rank, world_size=world_size, drop_last=drop_last
        )
        sampler = DistributedSampler(
            range(n), num_replicas=world_size, rank=rank, shuffle=False, drop_last=drop_last
        )
        assert loader.indices().tolist() == list(sampler)


@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffled_shards_are_disjoint_and_equally_long(drop_last):
    n, world_size = 101, 4
    shards = []
    for rank in range(world_size):
        loader = TensorLoader(
            indexed(n),
            batch_size=6,
            shuffle=True,
            seed=2,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        loader.set_epoch(7)
        shards.append(epoch_ids(loader))
        assert len(loader) == len(
            TensorLoader(indexed(n), 6, drop_last=drop_last, rank=0, world_size=world_size)
        )
    assert len({len(shard) for shard in shards}) == 1
    seen = list(itertools.chain(*shards))
    if drop_last:
        # 25 samples per rank, of which the last incomplete batch (1 sample) is dropped.
        assert len(seen) == len(set(seen)) == 96
    else:
        # 104 positions: the 3 padded ones repeat the first samples of the permutation.
        assert set(seen) == set(range(n)) and len(seen) == 104


def test_ranks_shuffle_the_same_permutation():
    full = TensorLoader(indexed(40), batch_size=4, shuffle=True, seed=9)
    full.set_epoch(2)
    permutation = full.indices()
    for rank in range(4):
        shard = TensorLoader(indexed(40), 4, shuffle=True, seed=9, rank=rank, world_size=4)
        shard.set_epoch(2)
        assert torch.equal(shard.indices(), permutation[rank::4])


def crops_of(image, padding, fill):
    """Every crop (and its mirror) of ``image`` padded with ``fill``, written out plainly."""
    c, h, w = image.shape
    padded = torch.stack([F.pad(image[k], (padding,) * 4, value=float(fill[k])) for k in range(c)])
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + h, left : left + w]
            yield crop
            yield crop.flip(-1)


def test_random_crop_flip_yields_padded_crops():
    images = torch.randn(32, 3, 6, 6)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2, fill=fill)
    assert out.shape == images.shape
    matches = []
    for image, result in zip(images, out):
        found = [k for k, crop in enumerate(crops_of(image, 2, fill)) if torch.equal(result, crop)]
        assert found, "an output that is no crop of the padded input"
        matches.append(found[0])
    # crops_of alternates plain and mirrored crops: both kinds and several offsets must occur.
    assert {k % 2 for k in matches} == {0, 1}
    assert len({k // 2 for k in matches}) > 5


def test_random_crop_flip_varies_offsets():
    images = torch.randn(64, 1, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(1), padding=4)
    unchanged = sum(torch.equal(a, b) for a, b in zip(images, out))
    assert unchanged < 8, "about 1 in 162 images keeps its place; 8 of 64 means no randomness"


def test_cifar_augmentation_in_the_loader():
    dataset = ArrayDataset(
        torch.randn(20, 3, 32, 32),
        torch.arange(20) % 10,
        10,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.2, 0.1),
    )

    def batches(epoch, seed=0):
        loader = TensorLoader(dataset, batch_size=8, augment="cifar", seed=seed)
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    first = batches(1)
    assert [tuple(x.shape) for x in first] == [(8, 3, 32, 32)] * 2 + [(4, 3, 32, 32)]
    assert all(torch.equal(a, b) for a, b in zip(first, batches(1)))
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(2)))
    assert not torch.equal(torch.cat(first), dataset.images)
    # Padding is a black pixel: (0 − mean) / std per channel.
    black = torch.tensor([-2.5, -2.0, -3.0])
    for x, image in zip(first[0], dataset.images[:8]):
        assert any(torch.equal(x, crop) for crop in crops_of(image, 4, black))


def test_callable_augmentation_receives_a_generator():
    calls = []

    def augment(x, generator):
        calls.append(torch.rand(1, generator=generator).item())
        return x + 1

    loader = TensorLoader(indexed(6), batch_size=3, augment=augment)
    xs = [x for x, _ in loader]
    assert torch.equal(torch.cat(xs)[:, 0, 0, 0], torch.arange(6.0) + 1)
    first_calls = list(calls)
    list(loader)
    assert calls[2:] == first_calls and first_calls[0] != first_calls[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "Invalid batch_size: 0"),
        ({"batch_size": 2, "world_size": 0}, "Invalid world_size: 0"),
        ({"batch_size": 2, "rank": 2, "world_size": 2}, "Invalid rank: 2"),
        ({"batch_size": 2, "seed": -1}, "Invalid seed: -1"),
        ({"batch_size": 2, "augment": "imagenet"}, "Invalid augment: 'imagenet'"),
    ],
)
def test_constructor_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensorLoader(indexed(4), **kwargs)


def test_set_epoch_validation():
    with pytest.raises(ValueError, match="Invalid epoch: -1"):
        TensorLoader(indexed(4), 2).set_epoch(-1)
