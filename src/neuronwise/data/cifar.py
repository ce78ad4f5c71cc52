"""Reader for the CIFAR-10/100 "python version" batches, through a restricted unpickler.

Each batch is a pickled dict with ``data`` (uint8, N×3072: 1024 red, 1024 green, 1024 blue values
of a 32×32 image in row-major order) and ``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels``
(CIFAR-100). https://www.cs.toronto.edu/~kriz/cifar.html

Unpickling can run arbitrary code, so only the globals that rebuild bytes and numpy arrays are
allowed; anything else is refused with a DataError before it is called.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

# (module, name) pairs a CIFAR batch needs: numpy 1.x and 2.x spellings of array reconstruction,
# and _codecs.encode, which Python 3 pickles of protocol < 3 use to encode bytes.
_ALLOWED_GLOBALS = frozenset(
    [
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    ]
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, handle: Any, path: Path) -> None:
        # latin1 turns Python 2 str keys into str and keeps numpy's raw array bytes intact.
        super().__init__(handle, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataError(
                f"{self._path}: refused to unpickle global {module}.{name}: expected only "
                "builtins, dict, list, bytes, str and numpy arrays"
            )
        return super().find_class(module, name)


def read_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a CIFAR batch or meta file, allowing only plain containers and numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as handle:
        try:
            content = _RestrictedUnpickler(handle, path).load()
        except DataError:
            raise
        except Exception as error:  # a malformed pickle may fail in any of dozens of ways
            raise DataError(
                f"{path}: malformed pickle: expected a CIFAR batch, found "
                f"{type(error).__name__}: {error}"
            ) from error
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(content).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def read_batch(
    path: str | os.PathLike, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch as images (uint8, N×3×32×32) and labels (int64, N), checking its structure."""
    content = read_pickle(path)
    for key in ("data", label_key):
        if key not in content:
            raise DataError(
                f"{path}: missing key {key!r}: expected a CIFAR batch, found keys "
                f"{sorted(map(str, content))}"
            )
    data = content["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * 32 * 32)
    ):
        found = (
            f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        )
        raise DataError(f"{path}: field 'data': expected uint8 array (N, 3072), found {found}")
    try:
        labels = np.asarray(content[label_key], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: field {label_key!r}: expected integers, found {error}") from error
    if labels.shape != (len(data),):
        raise DataError(
            f"{path}: field {label_key!r}: expected {len(data)} labels (one per image), "
            f"found shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: field {label_key!r}: expected labels in [0, {num_classes}), "
            f"found [{labels.min()}, {labels.max()}]"
        )
    return data.reshape(-1, 3, 32, 32), labels
