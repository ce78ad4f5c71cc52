"""Write src/neuronwise/data/digits.npz: the 1,797 8×8 handwritten digits, embedded in the package.

The samples are scikit-learn's ``load_digits()`` (the UCI "Optical Recognition of Handwritten
Digits" test set, CC BY 4.0), in its stored order: pixel counts 0..16 as uint8, labels as uint8.
Run once, where scikit-learn is installed: ``python scripts/make_digits.py``; the core install then
needs no scikit-learn. ``neuronwise.data.digits.SHA256`` pins the arrays' content.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "src" / "neuronwise" / "data" / "digits.npz"

bunch = load_digits()
images = bunch.images.astype(np.uint8)
labels = bunch.target.astype(np.uint8)
assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
buffer = io.BytesIO()
np.savez_compressed(buffer, images=images, labels=labels)
OUT.write_bytes(buffer.getvalue())
digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
print(f"{OUT}: {OUT.stat().st_size:,} bytes; images {images.shape}, labels {labels.shape}; "
      f"sha256 of images + labels bytes {digest}")
