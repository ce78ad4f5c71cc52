"""CIFAR pickle reader: generated batches, restricted unpickling, malformed batches."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from neuronwise.data import DataError
from neuronwise.data.cifar import read_batch, read_pickle


def write_pickle(path, content, protocol=2):
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    return path


def cifar_content(n, label_key="labels", num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "batch_label": b"training batch 1 of 5",
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, size=n).tolist(),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


def test_cifar10_batch_layout_is_channel_major(tmp_path):
    content = cifar_content(4)
    images, labels = read_batch(write_pickle(tmp_path / "data_batch_1", content), "labels", 10)
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.uint8
    data = content["data"]
    # Row i holds 1024 red values, then green, then blue, each 32×32 in row-major order.
    for i, c, y, x in [(0, 0, 0, 0), (1, 1, 5, 7), (3, 2, 31, 31), (2, 0, 31, 0)]:
        assert images[i, c, y, x] == data[i, c * 1024 + y * 32 + x]
    assert labels.dtype == np.int64 and labels.tolist() == content["labels"]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar100_batch_any_protocol(tmp_path, protocol):
    content = cifar_content(6, "fine_labels", 100)
    content["coarse_labels"] = [label // 5 for label in content["fine_labels"]]
    path = write_pickle(tmp_path / "train", content, protocol)
    images, labels = read_batch(path, "fine_labels", 100)
    np.testing.assert_array_equal(images.reshape(6, -1), content["data"])
    assert labels.tolist() == content["fine_labels"]


def test_bytes_keys_as_in_python2_pickles(tmp_path):
    content = {key.encode(): value for key, value in cifar_content(2).items()}
    images, labels = read_batch(write_pickle(tmp_path / "test_batch", content), "labels", 10)
    assert images.shape == (2, 3, 32, 32) and len(labels) == 2


def test_meta_file(tmp_path):
    names = ["airplane", "automobile"]
    path = write_pickle(tmp_path / "batches.meta", {"label_names": names, "num_vis": 3072})
    assert read_pickle(path) == {"label_names": names, "num_vis": 3072}


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __reduce__(self):
        return eval, ("1 + 1",)


@pytest.mark.parametrize("make", [lambda m: _Exploit(m), lambda m: _Eval()])
def test_malicious_pickle_is_refused_before_running(tmp_path, make):
    marker = tmp_path / "pwned"
    path = write_pickle(tmp_path / "data_batch_1", {"data": make(marker), "labels": [0]})
    with pytest.raises(DataError, match="refused to unpickle global") as error:
        read_batch(path, "labels", 10)
    assert str(path) in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload", [b"definitely not a pickle", pickle.dumps({"data": list(range(100))})[:-20], b""]
)
def test_malformed_pickle(tmp_path, payload):
    path = tmp_path / "data_batch_2"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="malformed pickle") as error:
        read_pickle(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def _broken(content, field, value):
    content = dict(content)
    if value is None:
        del content[field]
    else:
        content[field] = value
    return content


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("labels", None, "missing key 'labels'"),
        ("data", np.zeros((3, 3072), dtype=np.float32), "expected uint8 array (N, 3072)"),
        ("data", np.zeros((3, 1024), dtype=np.uint8), "found uint8 (3, 1024)"),
        ("labels", [0, 1], "expected 3 labels (one per image), found shape (2,)"),
        ("labels", [0, 1, 10], "expected labels in [0, 10), found [0, 10]"),
        ("labels", ["cat", "dog", "cat"], "expected integers"),
    ],
)
def test_malformed_batch(tmp_path, field, value, expected):
    path = write_pickle(tmp_path / "data_batch_3", _broken(cifar_content(3), field, value))
    with pytest.raises(DataError) as error:
        read_batch(path, "labels", 10)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value)


def test_not_a_dict(tmp_path):
    path = write_pickle(tmp_path / "data_batch_4", [1, 2, 3])
    with pytest.raises(DataError, match="expected a pickled dict, found list"):
        read_pickle(path)
