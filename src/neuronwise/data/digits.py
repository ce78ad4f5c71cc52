"""scikit-learn's embedded handwritten digits: 1,797 8×8 images, no download needed."""

from __future__ import annotations

import numpy as np

TEST_FRACTION = 0.2


def read_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (float64 in [0, 1], N×1×8×8) and labels (int64) of a fixed split.

    ``sklearn.datasets.load_digits`` returns the samples in a fixed order; the first
    ⌊0.8·N⌋ = 1,437 are the training split and the last 360 the test split, so the split needs
    no seed and is the same everywhere.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts of set bits in 4×4 blocks of a 32×32 bitmap, so 16 is white.
    images = bunch.images.astype(np.float64)[:, None] / 16.0
    labels = bunch.target.astype(np.int64)
    num_train = int(len(labels) * (1.0 - TEST_FRACTION))
    part = slice(None, num_train) if split == "train" else slice(num_train, None)
    return images[part], labels[part]
