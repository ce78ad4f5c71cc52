"""IDX reader: hand-built files, plain and gzip, and every malformed-file error."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from neuronwise.data import DataError
from neuronwise.data.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_idx


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """The IDX encoding written out by hand: magic, big-endian sizes, big-endian values."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def test_hand_written_bytes_decode_to_known_values(tmp_path):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x03" + b"\x07\x00\xff")
    assert read_idx(path, LABELS_MAGIC).tolist() == [7, 0, 255]


@pytest.mark.parametrize("compressed", [False, True])
def test_images_round_trip_plain_and_gzip(tmp_path, compressed):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    data = idx_bytes(images)
    path = tmp_path / ("images.gz" if compressed else "images")
    path.write_bytes(gzip.compress(data) if compressed else data)
    result = read_idx(path, IMAGES_MAGIC)
    assert result.dtype == np.uint8 and result.shape == (5, 3, 4)
    np.testing.assert_array_equal(result, images)


@pytest.mark.parametrize("type_code", [0x0B, 0x0C, 0x0D, 0x0E])
def test_wider_types_are_big_endian(tmp_path, type_code):
    values = np.array([[1, -2], [300, 70000 if type_code != 0x0B else -300]])
    path = tmp_path / "values"
    path.write_bytes(idx_bytes(values, type_code))
    np.testing.assert_array_equal(read_idx(path), values)


def test_wrong_magic_names_file_and_both_numbers(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(DataError) as error:
        read_idx(path, IMAGES_MAGIC)
    message = str(error.value)
    assert str(path) in message and "expected 2051" in message and "found 2049" in message


def test_not_an_idx_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, world")
    with pytest.raises(DataError, match="not an IDX file") as error:
        read_idx(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "cut, expected",
    [
        (-1, "truncated: expected 28 bytes for shape (2, 2, 3), found 27"),
        (6, "truncated IDX header: expected 16 bytes, found 6"),
        (2, "truncated IDX header: expected at least 4 bytes, found 2"),
    ],
)
def test_truncated_file(tmp_path, cut, expected):
    data = idx_bytes(np.ones((2, 2, 3), dtype=np.uint8))
    path = tmp_path / "images"
    path.write_bytes(data[:cut])
    with pytest.raises(DataError) as error:
        read_idx(path, IMAGES_MAGIC)
    assert str(error.value) == f"{path}: {expected}"


def test_trailing_bytes_are_an_error(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.ones(3, dtype=np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="trailing bytes: expected 11 bytes"):
        read_idx(path, LABELS_MAGIC)


def test_corrupt_gzip_is_one_line_naming_the_file(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)))
    path = tmp_path / "labels.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError) as error:
        read_idx(path, LABELS_MAGIC)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_idx(tmp_path / "nothing.gz")


def test_parse_idx_names_the_given_path():
    with pytest.raises(DataError, match=r"^some/file: "):
        parse_idx(b"\x00\x00\x08", "some/file")
