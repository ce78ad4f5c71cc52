"""Malformed input to every reader, through the CLI: one line and exit code 2, never a traceback.

Readers: IDX (MNIST), CIFAR pickles, ImageFolder, YAML configs, checkpoints. Each fuzzer starts
from a valid miniature file and damages it (truncation, bit flips, garbage, appended bytes); a
damage that leaves the file valid may run (exit 0) but must never crash. Examples are derandomized,
so a failure reproduces.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from neuronwise.data import DATASETS
from neuronwise.experiment.cli import main
from neuronwise.experiment.config import Config
from neuronwise.experiment.rundir import RunDirError, load_checkpoint

FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# No training: set-up (data, model, method, checkpoint) is all that reads input.
NO_TRAINING = ["--set", "train.epochs=0", "--set", "train.threads=1"]

damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                  st.integers(0, 7)), min_size=1, max_size=3)),
    st.tuples(st.just("garbage"), st.binary(max_size=64)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
)


def damaged(data: bytes, how: tuple) -> bytes:
    kind, detail = how
    if kind == "truncate":
        return data[: int(detail * len(data))]
    if kind == "garbage":
        return detail
    if kind == "append":
        return data + detail
    flipped = bytearray(data)
    for where, bit in detail:
        flipped[int(where * len(data))] ^= 1 << bit
    return bytes(flipped)


def cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_clean(code: int, err: str, must_fail: bool = False) -> None:
    """Exit 0, or exit 2 with one line ``neuronwise: error: ...`` (after one-line warnings, such
    as a fallback to previous.pt); never a traceback."""
    assert code in ((2,) if must_fail else (0, 2)), err
    if currently_in_test_context():
        event(f"exit {code}")  # shown by --hypothesis-show-statistics
    lines = err.splitlines()
    assert all(line.startswith(("neuronwise: warning: ", "neuronwise: error: ")) for line in lines), err
    errors = [line for line in lines if line.startswith("neuronwise: error: ")]
    assert errors == (lines[-1:] if code == 2 else []), err


def fresh(base: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=base))


def structural_only(monkeypatch, name: str) -> None:
    """Drop the registry's checksums of ``name`` so that damaged bytes reach the parser."""
    info = DATASETS[name]
    files = tuple(dataclasses.replace(f, md5=None, size=None) for f in info.files)
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, files=files))


# -- IDX --------------------------------------------------------------------------------------
def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


MNIST_FILES = {
    "train-images-idx3-ubyte": idx_bytes(np.arange(20 * 28 * 28).reshape(20, 28, 28) % 251),
    "train-labels-idx1-ubyte": idx_bytes(np.arange(20) % 10),
    "t10k-images-idx3-ubyte": idx_bytes(np.arange(5 * 28 * 28).reshape(5, 28, 28) % 241),
    "t10k-labels-idx1-ubyte": idx_bytes(np.arange(5) % 10),
}


@FUZZ
@given(target=st.sampled_from(sorted(MNIST_FILES)), how=damage,
       layer=st.sampled_from(["plain", "content of .gz", "gzip stream"]))
def test_idx_files(tmp_path, capsys, monkeypatch, target, how, layer):
    structural_only(monkeypatch, "mnist")
    root = fresh(tmp_path)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, data in MNIST_FILES.items():
        if name == target and layer != "gzip stream":
            data = damaged(data, how)
        if layer == "plain":
            (raw / name).write_bytes(data)
            continue
        data = gzip.compress(data, mtime=0)
        (raw / f"{name}.gz").write_bytes(damaged(data, how) if name == target
                                         and layer == "gzip stream" else data)
    code, err = cli(capsys, "quickstart", "--run-dir", root / "run", "--set", "data.name=mnist",
                    "--data-root", root, *NO_TRAINING)
    # IDX sizes are exact: a shorter or longer content, or garbage, is always an error; a gzip
    # stream tolerates trailing bytes and flips in its header.
    must_fail = how[0] in ("truncate", "garbage") or (how[0] == "append" and layer != "gzip stream")
    assert_clean(code, err, must_fail)
    if code == 2:
        assert target in err


# -- CIFAR pickles ----------------------------------------------------------------------------
def cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps({"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, size=n).tolist()}, protocol=2)


CIFAR_FILES = {
    **{f"data_batch_{i}": cifar_batch(2, i) for i in range(1, 6)},
    "test_batch": cifar_batch(2, 9),
    "batches.meta": pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}, protocol=2),
}


def write_cifar(root: Path, replace: dict[str, bytes]) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in {**CIFAR_FILES, **replace}.items():
        (folder / name).write_bytes(data)


@FUZZ
@given(target=st.sampled_from(sorted(set(CIFAR_FILES) - {"batches.meta"})), how=damage)
def test_cifar_pickles(tmp_path, capsys, monkeypatch, target, how):
    structural_only(monkeypatch, "cifar10")
    root = fresh(tmp_path)
    write_cifar(root, {target: damaged(CIFAR_FILES[target], how)})
    code, err = cli(capsys, "quickstart", "--run-dir", root / "run", "--set", "data.name=cifar10",
                    "--data-root", root, *NO_TRAINING)
    # A pickle ends with STOP: appended bytes are never read, flips may still decode.
    assert_clean(code, err, must_fail=how[0] in ("truncate", "garbage"))
    if code == 2:
        assert target in err


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_is_refused_through_the_cli(tmp_path, capsys, monkeypatch):
    structural_only(monkeypatch, "cifar10")
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": Payload(marker), "labels": [0, 1]}, protocol=2)
    write_cifar(tmp_path, {"data_batch_1": evil})
    code, err = cli(capsys, "quickstart", "--run-dir", tmp_path / "run",
                    "--set", "data.name=cifar10", "--data-root", tmp_path, *NO_TRAINING)
    assert_clean(code, err, must_fail=True)
    assert "data_batch_1: refused to unpickle global posix.system" in err
    assert not marker.exists()


# -- ImageFolder ------------------------------------------------------------------------------
def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = (np.arange(64).reshape(8, 8) * (seed + 1)) % 256
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {f"{split}/{label}/{i}.png": png(i + 3 * k)
          for split in ("train", "test") for k, label in enumerate("ab") for i in range(3)}


def write_images(root: Path, replace: dict[str, bytes]) -> None:
    for name, data in {**IMAGES, **replace}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


@FUZZ
@given(target=st.sampled_from(sorted(IMAGES)), how=damage)
def test_image_folder(tmp_path, capsys, target, how):
    root = fresh(tmp_path)
    write_images(root, {target: damaged(IMAGES[target], how)})
    code, err = cli(capsys, "quickstart", "--run-dir", root / "run",
                    "--set", "data.name=imagefolder", "--data-root", root, *NO_TRAINING)
    assert_clean(code, err)


def test_image_with_a_broken_png_chunk(tmp_path, capsys):
    data = bytearray(png(0))
    data[36] ^= 1 << 4  # a flipped bit in the IDAT length: Pillow raises SyntaxError
    write_images(tmp_path, {"train/a/0.png": bytes(data)})
    code, err = cli(capsys, "quickstart", "--run-dir", tmp_path / "run",
                    "--set", "data.name=imagefolder", "--data-root", tmp_path, *NO_TRAINING)
    assert_clean(code, err, must_fail=True)
    assert "train/a/0.png" in err


# -- YAML configs -----------------------------------------------------------------------------
def _sections() -> dict[str, list[str]]:
    # Every top-level key of a config file, the registered methods' sections included.
    return {name: list(value) if isinstance(value, dict) else []
            for name, value in Config().to_dict().items()}


SECTIONS = _sections()
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-2, 2), max_size=3))
configs = st.dictionaries(
    st.sampled_from(sorted(SECTIONS) + ["bogus"]),
    st.one_of(scalars, st.dictionaries(
        st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys}) + ["bogus"]),
        scalars, max_size=4)),
    max_size=5)


@FUZZ
@given(text=st.one_of(configs.map(yaml.safe_dump), st.text(max_size=200),
                      st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_yaml_configs(tmp_path, capsys, text):
    folder = fresh(tmp_path)
    config = folder / "config.yaml"
    config.write_text(text, encoding="utf-8", errors="surrogateescape")
    code, err = cli(capsys, "run", config, "--run-dir", folder / "run", *NO_TRAINING)
    assert_clean(code, err)


def test_config_that_is_not_utf8(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"name: \xff\xfe\n")
    code, err = cli(capsys, "run", config, "--run-dir", tmp_path / "run", *NO_TRAINING)
    assert_clean(code, err, must_fail=True)


# -- checkpoints ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    threads = torch.get_num_threads()
    assert main(["quickstart", "--run-dir", str(run), "--set", "train.epochs=1",
                 "--set", "train.threads=1", "--set", "data.batch_size=128"]) == 0
    torch.set_num_threads(threads)
    return run


def run_with_checkpoint(base: Path, one_epoch: Path, checkpoint: bytes) -> Path:
    run = fresh(base)
    shutil.copyfile(one_epoch / "config.yaml", run / "config.yaml")
    (run / "last.pt").write_bytes(checkpoint)
    return run


def resume(capsys, run: Path) -> tuple[int, str]:
    return cli(capsys, "quickstart", "--run-dir", run, "--resume", "--set", "train.epochs=1",
               "--set", "train.threads=1", "--set", "data.batch_size=128")


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


@FUZZ
@given(how=damage)
def test_damaged_checkpoint_loads_identically_or_is_refused(tmp_path, one_epoch, how):
    original = (one_epoch / "last.pt").read_bytes()
    path = fresh(tmp_path) / "last.pt"
    path.write_bytes(damaged(original, how))
    try:
        state = load_checkpoint(path)
    except RunDirError as error:
        assert str(path) in str(error) and "\n" not in str(error)
    else:  # only bytes no reader looks at changed (zip padding, appended bytes)
        assert same(state, torch.load(one_epoch / "last.pt", weights_only=True))


@FUZZ
@given(how=damage)
def test_damaged_checkpoint_through_the_cli(tmp_path, capsys, one_epoch, how):
    run = run_with_checkpoint(tmp_path, one_epoch, damaged((one_epoch / "last.pt").read_bytes(), how))
    code, err = resume(capsys, run)
    assert_clean(code, err, must_fail=how[0] in ("truncate", "garbage"))


junk = st.one_of(st.none(), st.integers(-2, 2), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.builds(torch.zeros, st.integers(0, 3)))


@FUZZ
@given(replaced=st.dictionaries(st.sampled_from(["epoch", "config", "model", "optimizer",
                                                 "scheduler", "callbacks", "history", "best",
                                                 "rng", "format"]), junk, min_size=1, max_size=3))
def test_malformed_training_state_through_the_cli(tmp_path, capsys, one_epoch, replaced):
    state = torch.load(one_epoch / "last.pt", weights_only=True)
    state.update(replaced)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    code, err = resume(capsys, run_with_checkpoint(tmp_path, one_epoch, buffer.getvalue()))
    assert_clean(code, err)


def test_malicious_checkpoint_is_refused_through_the_cli(tmp_path, capsys, one_epoch):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({**torch.load(one_epoch / "last.pt", weights_only=True), "best": Payload(marker)},
               buffer)
    code, err = resume(capsys, run_with_checkpoint(tmp_path, one_epoch, buffer.getvalue()))
    assert_clean(code, err, must_fail=True)
    assert "unreadable checkpoint" in err and "last.pt" in err
    assert not marker.exists()
