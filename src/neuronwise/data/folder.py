"""Reader for an ImageFolder-style directory: one subfolder per class, images inside it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)


def read_image_folder(
    path: str | os.PathLike, image_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``path/<class>/<image>`` into images (uint8, N×C×H×W), labels (int64) and class names.

    Classes are the subfolder names in sorted order (label i = i-th name), images sorted by name
    within each class. Images are grayscale (C = 1) when every file is, else RGB (C = 3). With
    ``image_size`` each image is resized to a square of that side (bilinear); without it all
    images must already have the same size.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: image folder not found: expected a directory of class folders")
    classes = sorted(entry.name for entry in path.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"{path}: empty image folder: expected one subfolder per class, found none")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        members = sorted(
            entry
            for entry in (path / name).iterdir()
            if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not members:
            raise DataError(
                f"{path / name}: empty class folder: expected image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}), found none"
            )
        files.extend((member, label) for member in members)

    pictures = []
    for file, _ in files:
        try:
            with Image.open(file) as picture:
                picture.load()
                pictures.append(picture)
        # Pillow reports some corrupt chunks as SyntaxError ("broken PNG file").
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            raise DataError(f"{file}: expected a readable image, found {error}") from error
    mode = (
        "L" if all(picture.mode in ("1", "L", "I", "I;16", "F") for picture in pictures) else "RGB"
    )
    arrays = []
    expected_size = (image_size, image_size) if image_size is not None else pictures[0].size
    for (file, _), picture in zip(files, pictures):
        picture = picture.convert(mode)
        if image_size is not None:
            picture = picture.resize(expected_size, Image.BILINEAR)
        elif picture.size != expected_size:
            raise DataError(
                f"{file}: image size {picture.size[0]}x{picture.size[1]} differs from "
                f"{expected_size[0]}x{expected_size[1]} of {files[0][0]}: pass image_size to resize"
            )
        array = np.asarray(picture, dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    labels = np.array([label for _, label in files], dtype=np.int64)
    return np.stack(arrays), labels, classes
