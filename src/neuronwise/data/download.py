"""Downloads with checksum verification: a file appears complete and verified, or not at all."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from .catalog import DatasetInfo, FileInfo
from .errors import DataError
from .registry import file_path, get_info, resolve_root, verify

_CHUNK = 1 << 20


def _is_single_gzip(path: Path) -> bool:
    return path.suffix == ".gz" and not path.name.endswith(".tar.gz")


def _md5_of(path: Path, decompress: bool) -> str:
    digest = hashlib.md5()
    try:
        with (gzip.open if decompress else open)(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: expected a complete gzip stream, found a corrupt one ({error})")
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through a temporary file that is renamed only once complete.

    ``md5`` is checked before the rename; for a single-file gzip (``.gz``, not ``.tar.gz``) it is
    the md5 of the decompressed content, as in the registry, otherwise of the file itself. On any
    failure no file is left at ``dest`` or beside it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    shutil.copyfileobj(response, handle, _CHUNK)
            except (urllib.error.URLError, OSError) as error:
                raise DataError(f"{url}: download to {dest} failed: {error}") from error
            handle.flush()
            os.fsync(handle.fileno())
        if md5 is not None:
            found = _md5_of(Path(tmp), _is_single_gzip(dest))
            if found != md5:
                kind = "decompressed content" if _is_single_gzip(dest) else "file"
                raise DataError(
                    f"{dest}: md5 mismatch after download from {url}: expected {md5} ({kind}), "
                    f"found {found}"
                )
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def _download_any(bases: Sequence[str], file: FileInfo, dest: Path) -> Path:
    errors = []
    for base in bases:
        try:
            return download(base + file.name, dest, file.md5)
        except DataError as error:
            errors.append(str(error))
    raise DataError(f"{dest}: no source worked: {' | '.join(errors)}")


def _extract(archive: Path, root: Path) -> None:
    """Extract a tar archive under ``root``, refusing members that would land elsewhere or that
    are not plain files or directories (links, devices)."""
    root = root.resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                target = (root / member.name).resolve()
                if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
                    raise DataError(
                        f"{archive}: unsafe archive member {member.name!r}: expected files and "
                        f"folders under {root}"
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members, filter="data")
            else:
                tar.extractall(root, members)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{archive}: expected a readable tar archive, found {error}") from error


def fetch(
    dataset: str | DatasetInfo,
    root: str | os.PathLike | None = None,
    mirrors: Sequence[str] = (),
) -> list[Path]:
    """Download the files of ``dataset`` that are missing or fail verification; return those written.

    ``mirrors`` are base URLs tried before the registry's. Archives (CIFAR) are verified,
    extracted under ``root`` and deleted. Ends with a full :func:`verify`.
    """
    info = get_info(dataset)
    if info.format == "digits":
        return []
    if info.format == "imagefolder":
        raise ValueError("Invalid dataset: 'imagefolder' (a generic reader has nothing to fetch)")
    root = resolve_root(root)
    bases = tuple(mirrors) + info.urls
    bad = {row.file for row in verify(info, root) if not row.verified}
    written = []
    if bad and info.archive is not None:
        archive = _download_any(bases, info.archive, root / info.archive.name)
        try:
            _extract(archive, root)
        finally:
            archive.unlink()
        written = [file_path(info, file, root) for file in info.files]
    else:
        for file in info.files:
            path = root / info.directory / file.name
            if str(file_path(info, file, root)) in bad:
                written.append(_download_any(bases, file, path))
    failed = [row.detail for row in verify(info, root) if not row.verified]
    if failed:
        raise DataError(f"{root / info.directory}: fetched files fail verification: {failed[0]}")
    return written
