"""The embedded handwritten digits: 1,797 8×8 images shipped with neuronwise, no download needed.

``digits.npz`` holds scikit-learn's ``load_digits()`` samples (the UCI "Optical Recognition of
Handwritten Digits" test set, CC BY 4.0) in their stored order, written once by
``scripts/make_digits.py``; :data:`SHA256` pins its content, so neuronwise needs no scikit-learn.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import numpy as np

TEST_FRACTION = 0.2
# sha256 of the uint8 image bytes (1797×8×8) followed by the uint8 label bytes.
SHA256 = "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts (uint8 0..16, 1797×8×8) and labels (uint8), checked against :data:`SHA256`."""
    packaged = resources.files("neuronwise.data").joinpath("digits.npz")
    with packaged.open("rb") as handle, np.load(handle, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    if images.shape != (1797, 8, 8) or labels.shape != (1797,) or digest != SHA256:
        raise ValueError(f"neuronwise/data/digits.npz: damaged (sha256 {digest}, expected "
                         f"{SHA256}); reinstall neuronwise")
    return images, labels


def read_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (float64 in [0, 1], N×1×8×8) and labels (int64) of a fixed split.

    The samples keep their stored order; the first ⌊0.8·N⌋ = 1,437 are the training split and the
    last 360 the test split, so the split needs no seed and is the same everywhere.
    """
    images, labels = raw_digits()
    # Pixel values are counts of set bits in 4×4 blocks of a 32×32 bitmap, so 16 is white.
    images = images.astype(np.float64)[:, None] / 16.0
    labels = labels.astype(np.int64)
    num_train = int(len(labels) * (1.0 - TEST_FRACTION))
    part = slice(None, num_train) if split == "train" else slice(num_train, None)
    return images[part], labels[part]
