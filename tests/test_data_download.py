"""download and fetch from file:// URLs: verified files appear whole or not at all."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from neuronwise.data import DATASETS, DataError, download, fetch, load, verify


def test_download_copies_and_checks_md5(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload " * 1000)
    dest = tmp_path / "out" / "file.bin"
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    assert download(source.as_uri(), dest, md5) == dest
    assert dest.read_bytes() == source.read_bytes()


def test_md5_mismatch_leaves_no_file(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload")
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        download(source.as_uri(), out / "file.bin", "0" * 32)
    message = str(error.value)
    assert message.startswith(f"{out / 'file.bin'}: md5 mismatch") and source.as_uri() in message
    assert list(out.iterdir()) == []


def test_gzip_md5_is_of_the_decompressed_content(tmp_path):
    content = b"idx content " * 100
    source = tmp_path / "labels.gz"
    source.write_bytes(gzip.compress(content, compresslevel=1))
    dest = tmp_path / "out" / "labels.gz"
    with pytest.raises(DataError, match=r"\(decompressed content\)"):
        download(source.as_uri(), dest, hashlib.md5(source.read_bytes()).hexdigest())
    assert not dest.exists()
    download(source.as_uri(), dest, hashlib.md5(content).hexdigest())
    assert gzip.decompress(dest.read_bytes()) == content


def test_unreachable_url_leaves_no_file(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="download to .* failed") as error:
        download((tmp_path / "absent.gz").as_uri(), out / "absent.gz")
    assert "absent.gz" in str(error.value)
    assert list(out.iterdir()) == []


def test_existing_file_survives_a_failed_download(tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"old")
    source = tmp_path / "new.bin"
    source.write_bytes(b"new")
    with pytest.raises(DataError):
        download(source.as_uri(), dest, "0" * 32)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "new.bin"]


def test_fetch_mnist_from_a_mirror(real_data_root, tmp_path):
    mirror = (real_data_root / "MNIST" / "raw").as_uri() + "/"
    written = fetch("mnist", tmp_path, mirrors=[mirror])
    assert sorted(p.name for p in written) == sorted(f.name for f in DATASETS["mnist"].files)
    assert [row.state for row in verify("mnist", tmp_path)] == ["verified"] * 4
    assert fetch("mnist", tmp_path, mirrors=[mirror]) == []


def test_fetch_replaces_only_bad_files(real_data_root, tmp_path):
    mirror = (real_data_root / "MNIST" / "raw").as_uri() + "/"
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
    ):
        (raw / name).write_bytes((real_data_root / "MNIST" / "raw" / name).read_bytes())
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"broken"))
    written = fetch("mnist", tmp_path, mirrors=[mirror])
    assert sorted(p.name for p in written) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    assert len(load("mnist", "test", tmp_path)) == 10000


def test_fetch_with_no_working_source(tmp_path):
    info = dataclasses.replace(DATASETS["fashion-mnist"], urls=())
    with pytest.raises(DataError, match="no source worked") as error:
        fetch(info, tmp_path / "root", mirrors=[(tmp_path / "empty").as_uri() + "/"])
    assert "train-images-idx3-ubyte.gz" in str(error.value)


def cifar_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            entry = tarfile.TarInfo(name)
            entry.size = len(payload)
            tar.addfile(entry, io.BytesIO(payload))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_fetch_cifar_archive(monkeypatch, tmp_path):
    info = DATASETS["cifar10"]
    rng = np.random.default_rng(0)
    members = {}
    for file in info.files:
        content = (
            {"label_names": list("abcdefghij")}
            if file.role == "meta"
            else {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [3, 4]}
        )
        members[f"{info.directory}/{file.name}"] = pickle.dumps(content, protocol=2)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = cifar_archive(mirror / info.archive.name, members)
    fake = dataclasses.replace(
        info,
        urls=(),
        archive=dataclasses.replace(info.archive, md5=md5),
        files=tuple(dataclasses.replace(f, md5=None) for f in info.files),
    )
    monkeypatch.setitem(DATASETS, "cifar10", fake)
    root = tmp_path / "root"
    written = fetch("cifar10", root, mirrors=[mirror.as_uri() + "/"])
    assert len(written) == 7 and not (root / info.archive.name).exists()
    train = load("cifar10", "train", root)
    assert train.images.shape == (10, 3, 32, 32) and train.labels.tolist() == [3, 4] * 5


def test_unsafe_archive_is_refused(monkeypatch, tmp_path):
    info = DATASETS["cifar100"]
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    md5 = cifar_archive(mirror / info.archive.name, {"../escaped": b"gotcha"})
    fake = dataclasses.replace(info, urls=(), archive=dataclasses.replace(info.archive, md5=md5))
    root = tmp_path / "root"
    with pytest.raises(DataError, match="unsafe archive member '../escaped'"):
        fetch(fake, root, mirrors=[mirror.as_uri() + "/"])
    assert not (tmp_path / "escaped").exists()
    assert list(root.iterdir()) == []


def test_fetch_digits_needs_nothing(tmp_path):
    assert fetch("digits", tmp_path) == []
