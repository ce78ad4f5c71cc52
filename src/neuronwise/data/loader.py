"""Batches sliced from in-memory tensors, with a data order that is a pure function of the epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .dataset import ArrayDataset

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

# Distinct streams drawn from the same (seed, epoch): the permutation and the augmentations.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def _derive_seed(*words: int) -> int:
    """A 64-bit seed that mixes all ``words``, so nearby (seed, epoch) pairs share no stream."""
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    padding: int = 4,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crop of the original size from the image padded by ``padding`` on each side, then a
    horizontal flip with probability 1/2, for every image of an N×C×H×W batch at once.

    The CIFAR augmentation of the official code (RandomCrop(32, padding=4), RandomHorizontalFlip).
    ``fill`` (one value per channel, default 0) is the padding value; draws come from the CPU
    ``generator``.
    """
    n, c, h, w = images.shape
    padded = images.new_zeros(n, c, h + 2 * padding, w + 2 * padding)
    if fill is not None:
        padded += fill.to(padded).view(1, c, 1, 1)
    padded[:, :, padding : padding + h, padding : padding + w] = images
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    rows = offsets[0, :, None] + torch.arange(h)
    columns = torch.arange(w).expand(n, w)
    # Flipping the crop reads its columns right to left.
    columns = torch.where(flips[:, None], w - 1 - columns, columns) + offsets[1, :, None]
    batch = torch.arange(n)[:, None, None]
    rows, columns, batch = (t.to(images.device) for t in (rows, columns, batch))
    # Advanced indices around a slice put their broadcast dims first: the result is N×H×W×C.
    return padded[batch, :, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2).contiguous()


class TensorLoader:
    r"""Iterate (x, y) batches of an :class:`ArrayDataset` without workers or per-sample Python.

    Epoch e visits the permutation :math:`\pi_e` = ``torch.randperm(N)`` drawn from a generator
    seeded by (seed, e) when ``shuffle``, else 0..N−1; call :meth:`set_epoch` before each epoch.
    With ``world_size`` W > 1 the order is padded by wrapping around (or, with ``drop_last``,
    truncated) to a multiple of W and rank r takes positions r, r+W, r+2W, … (as
    ``DistributedSampler``): the ranks' shards are disjoint (up to the padding) and equally long.
    ``drop_last`` also drops the last incomplete batch. ``augment`` ("cifar" or a callable
    ``(images, generator) -> images``) draws for batch b from a generator seeded by
    (seed, e, rank, b), so a resumed run sees the same data, batch for batch.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: str | Augmentation | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected >= 1)")
        if world_size < 1:
            raise ValueError(f"Invalid world_size: {world_size} (expected >= 1)")
        if not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank: {rank} (expected 0 <= rank < {world_size})")
        if seed < 0:
            raise ValueError(f"Invalid seed: {seed} (expected >= 0)")
        if augment == "cifar":
            augment = self._cifar_augment
        elif augment is not None and not callable(augment):
            raise ValueError(f"Invalid augment: {augment!r} (expected None, 'cifar' or a callable)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # A black pixel after normalization, so padding looks like the official zero-padded image.
        if dataset.mean is not None:
            self._fill = -torch.tensor(dataset.mean) / torch.tensor(dataset.std)
        else:
            self._fill = None

    def _cifar_augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_crop_flip(images, generator, padding=4, fill=self._fill)

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order and augmentation draws for the next iteration."""
        if epoch < 0:
            raise ValueError(f"Invalid epoch: {epoch} (expected >= 0)")
        self.epoch = epoch

    def _samples_per_rank(self) -> int:
        n = len(self.dataset)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        samples = self._samples_per_rank()
        if self.drop_last:
            return samples // self.batch_size
        return math.ceil(samples / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in visiting order."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(
                _derive_seed(self.seed, self.epoch, _SHUFFLE_STREAM)
            )
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        total = self._samples_per_rank() * self.world_size
        if total > n:
            order = order.repeat(math.ceil(total / n))
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices().to(self.dataset.labels.device)
        images, labels = self.dataset.images, self.dataset.labels
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            x = images.index_select(0, index)
            if self.augment is not None:
                generator = torch.Generator().manual_seed(
                    _derive_seed(self.seed, self.epoch, _AUGMENT_STREAM, self.rank, batch)
                )
                x = self.augment(x, generator)
            yield x, labels.index_select(0, index)
