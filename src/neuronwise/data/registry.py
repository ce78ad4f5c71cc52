"""Finding, verifying and loading the datasets of :mod:`.catalog` under a data root.

Checksums are md5 digests of the *decompressed* content, so a ``.gz`` file that was recompressed
(other gzip level or header) still verifies, and so does its plain, uncompressed copy.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cifar, digits, folder, idx
from .catalog import DATASETS, DatasetInfo, FileInfo
from .dataset import ArrayDataset
from .errors import DataError

SPLITS = ("train", "test")


def resolve_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data root: ``data_root``, else ``$NEURONWISE_DATA``, else ``$XDG_CACHE_HOME/neuronwise``
    (``~/.cache/neuronwise`` when XDG_CACHE_HOME is unset)."""
    if data_root is not None:
        return Path(data_root).expanduser()
    if os.environ.get("NEURONWISE_DATA"):
        return Path(os.environ["NEURONWISE_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "neuronwise"


def get_info(dataset: str | DatasetInfo) -> DatasetInfo:
    """The registry entry of ``dataset`` (a name), or ``dataset`` itself when already an entry."""
    if isinstance(dataset, DatasetInfo):
        return dataset
    if dataset not in DATASETS:
        raise ValueError(f"Invalid dataset: {dataset!r} (expected one of {sorted(DATASETS)})")
    return DATASETS[dataset]


def file_path(info: DatasetInfo, file: FileInfo, root: Path) -> Path:
    """Where ``file`` is: ``root/directory/name``, or its uncompressed twin if only that exists."""
    path = root / info.directory / file.name
    if path.suffix == ".gz" and not path.exists() and path.with_suffix("").exists():
        return path.with_suffix("")
    return path


# md5 of decompressed content per (path, size, mtime): hashing 47 MB of MNIST once per process is
# cheap, every time would not be. A rewritten file changes size or mtime and is hashed again.
_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def content_md5(path: Path, data: bytes | None = None) -> str:
    """md5 of the decompressed content of ``path`` (``data``: that content, already read)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        _MD5_CACHE[key] = hashlib.md5(idx.read_bytes(path) if data is None else data).hexdigest()
    return _MD5_CACHE[key]


def _missing(info: DatasetInfo, path: Path, root: Path) -> DataError:
    source = info.urls[0] if info.urls else "its canonical source"
    return DataError(
        f"{path}: file not found: expected the {info.name} dataset under data root {root}; "
        f"download it with neuronwise.data.fetch({info.name!r}, {str(root)!r}) or from {source}"
    )


def _check_md5(file: FileInfo, path: Path, data: bytes | None = None) -> None:
    if file.size is not None:
        size = len(data) if data is not None else len(idx.read_bytes(path))
        if size != file.size:
            raise DataError(
                f"{path}: size mismatch: expected {file.size} bytes (decompressed), found {size}"
            )
    if file.md5 is not None:
        found = content_md5(path, data)
        if found != file.md5:
            raise DataError(
                f"{path}: md5 mismatch: expected {file.md5} (decompressed content), found {found}"
            )


def _to_dataset(
    images: np.ndarray, labels: np.ndarray, info: DatasetInfo, classes: Sequence[str] | None = None
) -> ArrayDataset:
    """Scale uint8 (or [0, 1] float) N×C×H×W images to [0, 1] and normalize them per channel."""
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if images.dtype == np.uint8:
        tensor.div_(255.0)
    if info.mean is not None:
        mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
        tensor.sub_(mean).div_(std)
    return ArrayDataset(
        tensor,
        torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        info.num_classes,
        info.mean,
        info.std,
        classes,
    )


def _load_idx(info: DatasetInfo, split: str, root: Path, verify: bool) -> ArrayDataset:
    arrays = {}
    for file in info.split_files(split):
        path = file_path(info, file, root)
        if not path.exists():
            raise _missing(info, path, root)
        data = idx.read_bytes(path)
        if verify:
            _check_md5(file, path, data)
        magic = idx.IMAGES_MAGIC if file.role == "images" else idx.LABELS_MAGIC
        arrays[file.role] = (path, idx.parse_idx(data, path, magic))
    (images_path, images), (labels_path, labels) = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: label count mismatch: expected {len(images)} (images in "
            f"{images_path}), found {len(labels)}"
        )
    if len(labels) and labels.max() >= info.num_classes:
        raise DataError(
            f"{labels_path}: expected labels in [0, {info.num_classes}), found {labels.max()}"
        )
    return _to_dataset(images[:, None], labels, info)


def _load_cifar(info: DatasetInfo, split: str, root: Path, verify: bool) -> ArrayDataset:
    images, labels = [], []
    for file in info.split_files(split):
        path = file_path(info, file, root)
        if not path.exists():
            raise _missing(info, path, root)
        if verify:
            _check_md5(file, path)
        batch_images, batch_labels = cifar.read_batch(path, info.label_key, info.num_classes)
        images.append(batch_images)
        labels.append(batch_labels)
    return _to_dataset(np.concatenate(images), np.concatenate(labels), info)


def load(
    name: str | DatasetInfo,
    split: str = "train",
    root: str | os.PathLike | None = None,
    verify: bool = True,
) -> ArrayDataset:
    """Load a registered dataset's ``split`` as normalized float32 N×C×H×W images and labels.

    ``root`` goes through :func:`resolve_root`. For "imagefolder" it is the folder holding
    ``train/`` and ``test/`` class folders, and images are only scaled to [0, 1]. With ``verify``
    each file's decompressed md5 (once per file and process) and size are checked first.
    """
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"Invalid split: {split!r} (expected one of {SPLITS})")
    if info.format == "digits":
        return _to_dataset(*digits.read_digits(split), info)
    root = resolve_root(root)
    if info.format == "imagefolder":
        return load_image_folder(root / split)
    reader = _load_idx if info.format == "idx" else _load_cifar
    return reader(info, split, root, verify)


def load_image_folder(
    path: str | os.PathLike,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ArrayDataset:
    """Load ``path/<class>/<image>`` (see :func:`folder.read_image_folder`), scaled to [0, 1]
    and, with ``mean``/``std``, normalized per channel."""
    if (mean is None) != (std is None):
        raise ValueError(
            f"Invalid normalization: mean={mean}, std={std} (expected both or neither)"
        )
    images, labels, classes = folder.read_image_folder(path, image_size)
    info = DatasetInfo(
        name="imagefolder",
        format="imagefolder",
        num_classes=len(classes),
        in_channels=images.shape[1],
        image_size=images.shape[2],
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
    return _to_dataset(images, labels, info, classes)


@dataclass(frozen=True)
class FileStatus:
    """One row of a data check: ``verified`` is False when missing or mismatched (see ``detail``)."""

    dataset: str
    file: str
    present: bool
    verified: bool
    detail: str = ""

    @property
    def state(self) -> str:
        return "missing" if not self.present else "verified" if self.verified else "mismatch"

    def __str__(self) -> str:
        detail = f"  ({self.detail})" if self.present and not self.verified else ""
        return f"{self.dataset:<14} {self.state:<9} {self.file}{detail}"


def _check_file(info: DatasetInfo, file: FileInfo, path: Path) -> None:
    if info.format == "idx":
        data = idx.read_bytes(path)
        _check_md5(file, path, data)
        idx.parse_idx(data, path, idx.IMAGES_MAGIC if file.role == "images" else idx.LABELS_MAGIC)
        return
    _check_md5(file, path)
    if file.role == "batch":
        cifar.read_batch(path, info.label_key, info.num_classes)
    else:
        cifar.read_pickle(path)


def verify(dataset: str | DatasetInfo, root: str | os.PathLike | None = None) -> list[FileStatus]:
    """Check every file of ``dataset`` (a name or entry): present, md5 and size, structure."""
    info = get_info(dataset)
    name = info.name
    if info.format == "digits":
        return [FileStatus(name, "sklearn.datasets.load_digits", True, True, "embedded")]
    if info.format == "imagefolder":
        raise ValueError("Invalid dataset: 'imagefolder' (a generic reader has no files to verify)")
    root = resolve_root(root)
    rows = []
    for file in info.files:
        path = file_path(info, file, root)
        if not path.exists():
            rows.append(FileStatus(name, str(path), False, False, "not found"))
            continue
        try:
            _check_file(info, file, path)
        except DataError as error:
            rows.append(FileStatus(name, str(path), True, False, str(error)))
        else:
            rows.append(FileStatus(name, str(path), True, True))
    return rows


def status(root: str | os.PathLike | None = None) -> list[FileStatus]:
    """:func:`verify` of every registered dataset with files (one row per file)."""
    return [
        row
        for name, info in DATASETS.items()
        if info.format != "imagefolder"
        for row in verify(name, root)
    ]
