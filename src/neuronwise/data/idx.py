"""Reader for the IDX format of MNIST and Fashion-MNIST, gzip-compressed or plain.

An IDX file is a 4-byte magic number ``0x00 0x00 TYPE NDIM``, NDIM big-endian uint32 sizes, then
the values in C order, big-endian. MNIST images have magic 2051 (uint8, 3 dims), labels 2049
(uint8, 1 dim). http://yann.lecun.com/exdb/mnist/
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGES_MAGIC = 0x0803
LABELS_MAGIC = 0x0801

_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of ``path``, decompressed when its name ends in ``.gz``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: expected a complete gzip stream, found a corrupt one ({error})")


def parse_idx(data: bytes, path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Decode IDX ``data`` read from ``path`` (named in errors); check ``magic`` when given."""
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated IDX header: expected at least 4 bytes, found {len(data)}"
        )
    found = int.from_bytes(data[:4], "big")
    if magic is not None and found != magic:
        raise DataError(f"{path}: wrong IDX magic number: expected {magic}, found {found}")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or type_code not in _TYPES:
        raise DataError(
            f"{path}: not an IDX file: expected magic 0x0000TTDD with type TT in "
            f"{sorted(hex(t) for t in _TYPES)}, found {found:#010x}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header: expected {header} bytes, found {len(data)}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _TYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes"
        raise DataError(
            f"{path}: {problem}: expected {expected} bytes for shape {shape}, found {len(data)}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into an array of its native shape and type."""
    return parse_idx(read_bytes(path), path, magic)
