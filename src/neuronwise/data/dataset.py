"""In-memory datasets of normalized image tensors, and deterministic train/validation splits."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ArrayDataset:
    """Images (float32, N×C×H×W, normalized) and labels (int64, N) held in memory.

    ``mean``/``std`` record the per-channel normalization already applied (``x = (p − mean) / std``
    with pixels p in [0, 1]); augmentation uses them to pad with the value of a black pixel.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(
                f"Invalid images: {images.dtype} of shape {tuple(images.shape)} "
                "(expected float32 N×C×H×W)"
            )
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(
                f"Invalid labels: {labels.dtype} of shape {tuple(labels.shape)} (expected int64 N)"
            )
        if len(images) != len(labels):
            raise ValueError(f"Invalid labels: {len(labels)} labels for {len(images)} images")
        if num_classes < 1:
            raise ValueError(f"Invalid num_classes: {num_classes} (expected >= 1)")
        channels = images.shape[1]
        for field, stats in (("mean", mean), ("std", std)):
            if stats is not None and len(stats) != channels:
                raise ValueError(f"Invalid {field}: {len(stats)} values for {channels} channels")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"Invalid classes: {len(classes)} names for {num_classes} classes")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.classes = tuple(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(size={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"num_classes={self.num_classes})"
        )

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ArrayDataset:
        """A new dataset holding the samples at ``indices`` (copied), in that order."""
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.labels.device)
        return ArrayDataset(
            self.images[index],
            self.labels[index],
            self.num_classes,
            self.mean,
            self.std,
            self.classes,
        )

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same dataset on ``device`` (e.g. the GPU, so that batches are sliced there)."""
        return ArrayDataset(
            self.images.to(device),
            self.labels.to(device),
            self.num_classes,
            self.mean,
            self.std,
            self.classes,
        )


def train_val_split(
    dataset: ArrayDataset, val_fraction: float = 0.1, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split into (train, val) with ``⌊val_fraction·N⌋`` validation samples.

    The validation indices are the first ones of ``torch.randperm(N)`` drawn from a generator
    seeded with ``seed``, so the split depends on nothing else; both parts keep the original order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {val_fraction} (expected 0 <= val_fraction < 1)")
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(len(dataset), generator=generator)
    num_val = int(val_fraction * len(dataset))
    val_indices, _ = permutation[:num_val].sort()
    train_indices, _ = permutation[num_val:].sort()
    return dataset.subset(train_indices), dataset.subset(val_indices)
