"""Registry, load, verify and status: generated files in a temporary root, and the real data."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
import struct
import types

import numpy as np
import pytest
import torch

from neuronwise.data import (
    DATASETS,
    DataError,
    load,
    registry,
    resolve_root,
    status,
    verify,
)


def idx_bytes(array):
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + (array.astype(np.uint8).tobytes())
    )


def make_mnist(root, n_train=12, n_test=5, directory="MNIST/raw", compress=True):
    """A miniature MNIST with the real file names; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for name, array in (
            (f"{prefix}-images-idx3-ubyte", images),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            path = root / directory / (name + ".gz" if compress else name)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = idx_bytes(array)
            path.write_bytes(gzip.compress(data) if compress else data)
            arrays[name] = (array, hashlib.md5(data).hexdigest(), len(data))
    return arrays


def registered_like(monkeypatch, name, arrays):
    """Register ``name`` with the checksums of the miniature files (restored after the test)."""
    info = DATASETS[name]
    files = tuple(
        dataclasses.replace(f, md5=arrays[f.name[:-3]][1], size=arrays[f.name[:-3]][2])
        for f in info.files
    )
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, files=files))


def test_resolve_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURONWISE_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_root() == tmp_path / "env"
    monkeypatch.delenv("NEURONWISE_DATA")
    assert resolve_root() == tmp_path / "xdg" / "neuronwise"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_root() == tmp_path / "home" / ".cache" / "neuronwise"


def test_registry_facts():
    assert set(DATASETS) == {
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "digits",
        "imagefolder",
    }
    for name in ("mnist", "fashion-mnist"):
        info = DATASETS[name]
        assert (info.mean, info.std, info.num_classes, info.in_channels, info.image_size) == (
            (0.1307,),
            (0.3081,),
            10,
            1,
            28,
        )
        sizes = {f.name: f.size for f in info.files}
        assert sizes["train-images-idx3-ubyte.gz"] == 16 + 60000 * 784
        assert sizes["t10k-labels-idx1-ubyte.gz"] == 8 + 10000
    assert DATASETS["mnist"].directory == "MNIST/raw"
    assert DATASETS["fashion-mnist"].directory == "FashionMNIST/raw"
    cifar10, cifar100 = DATASETS["cifar10"], DATASETS["cifar100"]
    assert cifar10.directory == "cifar-10-batches-py" and cifar100.directory == "cifar-100-python"
    assert cifar10.std == (0.2023, 0.1994, 0.2010) and cifar100.num_classes == 100
    assert cifar10.archive.md5 == "c58f30108f718f92721af3b95e74349a"
    assert len(cifar10.split_files("train")) == 5


def test_load_miniature_mnist_normalizes(monkeypatch, tmp_path):
    arrays = make_mnist(tmp_path)
    registered_like(monkeypatch, "mnist", arrays)
    train = load("mnist", "train", tmp_path)
    raw = arrays["train-images-idx3-ubyte"][0]
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == [
        i % 10 for i in range(12)
    ]
    assert train.images[3, 0, 5, 9].item() == pytest.approx((raw[3, 5, 9] / 255 - 0.1307) / 0.3081)
    assert (train.mean, train.std, train.num_classes) == ((0.1307,), (0.3081,), 10)
    assert len(load("mnist", "test", tmp_path)) == 5


def test_uncompressed_files_are_accepted(monkeypatch, tmp_path):
    arrays = make_mnist(tmp_path, directory="FashionMNIST/raw", compress=False)
    registered_like(monkeypatch, "fashion-mnist", arrays)
    assert len(load("fashion-mnist", "train", tmp_path)) == 12
    assert all(row.verified for row in verify("fashion-mnist", tmp_path))


def test_md5_mismatch_names_file(monkeypatch, tmp_path):
    arrays = make_mnist(tmp_path)
    registered_like(monkeypatch, "mnist", arrays)
    path = tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.array([9, 9, 9, 9, 9]))))
    with pytest.raises(DataError) as error:
        load("mnist", "test", tmp_path)
    expected = arrays["t10k-labels-idx1-ubyte"][1]
    assert str(error.value).startswith(f"{path}: md5 mismatch: expected {expected}")
    assert load("mnist", "test", tmp_path, verify=False).labels.tolist() == [9] * 5
    rows = {row.file: row for row in verify("mnist", tmp_path)}
    assert rows[str(path)].state == "mismatch" and "md5 mismatch" in rows[str(path)].detail
    assert str(rows[str(path)]).startswith(
        f"mnist          mismatch  {path}  ({path}: md5 mismatch"
    )
    assert sum(row.state == "verified" for row in rows.values()) == 3


def test_size_mismatch_against_the_real_registry(tmp_path):
    make_mnist(tmp_path)
    with pytest.raises(DataError, match="size mismatch: expected 47040016 bytes"):
        load("mnist", "train", tmp_path)


def test_checksums_are_computed_once_per_file(monkeypatch, tmp_path):
    arrays = make_mnist(tmp_path)
    registered_like(monkeypatch, "mnist", arrays)
    calls = []

    def counting_md5(data):
        calls.append(len(data))
        return hashlib.md5(data)

    monkeypatch.setattr(registry, "hashlib", types.SimpleNamespace(md5=counting_md5))
    load("mnist", "train", tmp_path)
    load("mnist", "train", tmp_path)
    assert len(calls) == 2
    # A rewritten file (new size) is hashed again, and the change is caught.
    path = tmp_path / "MNIST/raw/train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(13))))
    with pytest.raises(DataError, match="size mismatch"):
        load("mnist", "train", tmp_path)


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as error:
        load("mnist", "train", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz") in message
    assert "fetch('mnist'" in message and "\n" not in message


def test_label_count_mismatch(tmp_path):
    make_mnist(tmp_path)
    labels = tmp_path / "MNIST/raw/train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(11))))
    with pytest.raises(DataError) as error:
        load("mnist", "train", tmp_path, verify=False)
    assert str(error.value).startswith(f"{labels}: label count mismatch: expected 12")


def test_label_out_of_range(tmp_path):
    make_mnist(tmp_path)
    labels = tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.array([0, 1, 2, 3, 10]))))
    with pytest.raises(DataError, match=r"expected labels in \[0, 10\), found 10"):
        load("mnist", "test", tmp_path, verify=False)


def make_cifar(root, name):
    info = DATASETS[name]
    rng = np.random.default_rng(1)
    written = {}
    for file in info.files:
        if file.role == "meta":
            content = {"label_names": [str(i) for i in range(info.num_classes)]}
        else:
            n = 4 if file.split == "train" else 3
            content = {
                "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                info.label_key: rng.integers(0, info.num_classes, size=n).tolist(),
            }
        path = root / info.directory / file.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(content, protocol=2))
        written[file.name] = content
    return written


@pytest.mark.parametrize("name, train_size", [("cifar10", 20), ("cifar100", 4)])
def test_load_miniature_cifar(tmp_path, name, train_size):
    written = make_cifar(tmp_path, name)
    info = DATASETS[name]
    train = load(name, "train", tmp_path, verify=False)
    assert train.images.shape == (train_size, 3, 32, 32)
    first = info.split_files("train")[0].name
    pixel = written[first]["data"][1, 1024 + 33]  # image 1, green, row 1, column 1
    assert train.images[1, 1, 1, 1].item() == pytest.approx(
        (pixel / 255 - info.mean[1]) / info.std[1]
    )
    test = load(name, "test", tmp_path, verify=False)
    assert test.labels.tolist() == written[info.split_files("test")[0].name][info.label_key]
    assert test.num_classes == info.num_classes
    # The real checksums do not match generated batches.
    with pytest.raises(DataError, match="md5 mismatch"):
        load(name, "test", tmp_path)
    assert {row.state for row in verify(name, tmp_path)} == {"mismatch"}


def test_cifar_structure_is_verified_without_checksums(monkeypatch, tmp_path):
    make_cifar(tmp_path, "cifar100")
    info = DATASETS["cifar100"]
    files = tuple(dataclasses.replace(f, md5=None) for f in info.files)
    monkeypatch.setitem(DATASETS, "cifar100", dataclasses.replace(info, files=files))
    assert all(row.verified for row in verify("cifar100", tmp_path))
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({"data": 1}, protocol=2))
    rows = {row.file.rsplit("/", 1)[-1]: row for row in verify("cifar100", tmp_path)}
    assert rows["test"].state == "mismatch" and "missing key 'fine_labels'" in rows["test"].detail
    assert rows["train"].verified and rows["meta"].verified


def test_embedded_digits_match_their_checksum_and_a_damaged_file_is_refused(monkeypatch):
    import hashlib

    from neuronwise.data import digits

    images, labels = digits.raw_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == digits.SHA256
    monkeypatch.setattr(digits, "SHA256", "0" * 64)
    with pytest.raises(ValueError, match="digits.npz: damaged"):
        digits.raw_digits()
    assert not verify("digits")[0].verified


def test_digits_fixed_split():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits  # the embedded file's source

    train, test = load("digits", "train"), load("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 1, 8, 8) and train.num_classes == 10
    reference = torch.from_numpy(load_digits().images).float() / 16
    joined = torch.cat([train.images, test.images])[:, 0] * 0.3755 + 0.3054
    torch.testing.assert_close(joined, reference)
    assert torch.equal(
        torch.cat([train.labels, test.labels]), torch.from_numpy(load_digits().target)
    )
    # The recorded statistics are the training split's own.
    assert abs(train.images.mean().item()) < 1e-3
    assert train.images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_status_lists_every_file(tmp_path):
    rows = status(tmp_path)
    expected = sum(len(info.files) for info in DATASETS.values() if info.format in ("idx", "cifar"))
    assert len(rows) == expected + 1
    assert {row.dataset for row in rows} == set(DATASETS) - {"imagefolder"}
    assert {row.state for row in rows if row.dataset != "digits"} == {"missing"}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: load("imagenet"), "Invalid dataset: 'imagenet'"),
        (lambda: load("digits", "val"), "Invalid split: 'val'"),
        (lambda: verify("imagefolder"), "generic reader has no files"),
    ],
)
def test_invalid_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_data(real_data_root, name):
    rows = verify(name, real_data_root)
    assert [row.state for row in rows] == ["verified"] * 4
    test = load(name, "test", real_data_root)
    train = load(name, "train", real_data_root)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    for split in (train, test):
        assert split.labels.min() == 0 and split.labels.max() == 9
        assert torch.bincount(split.labels).min() > 500 * (len(split) // 10000)
    if name == "mnist":
        # 0.1307 and 0.3081 are the statistics of MNIST's training images.
        assert abs(train.images.mean().item()) < 1e-3
        assert train.images.std().item() == pytest.approx(1.0, abs=1e-3)
