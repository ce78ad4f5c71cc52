"""ImageFolder reader: generated PNG trees, grayscale and RGB, and bad folders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from neuronwise.data import DataError, load, load_image_folder
from neuronwise.data.folder import read_image_folder


def save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def gray(value, shape=(4, 5)):
    return np.full(shape, value, dtype=np.uint8)


def test_grayscale_tree(tmp_path):
    # Class order is sorted, not creation order; files sorted within a class; others ignored.
    save(tmp_path / "zebra" / "b.png", gray(30), "L")
    save(tmp_path / "zebra" / "a.png", gray(20), "L")
    save(tmp_path / "ant" / "x.png", gray(10), "L")
    (tmp_path / "ant" / "README.txt").write_text("not an image")
    images, labels, classes = read_image_folder(tmp_path)
    assert classes == ["ant", "zebra"]
    assert labels.tolist() == [0, 1, 1]
    assert images.shape == (3, 1, 4, 5) and images.dtype == np.uint8
    assert images[:, 0, 0, 0].tolist() == [10, 20, 30]


def test_rgb_channels_first_and_mixed_modes_become_rgb(tmp_path):
    pixel = np.zeros((2, 3, 3), dtype=np.uint8)
    pixel[..., 0], pixel[..., 1], pixel[..., 2] = 200, 100, 50
    save(tmp_path / "a" / "color.png", pixel, "RGB")
    save(tmp_path / "b" / "gray.png", gray(77, (2, 3)), "L")
    images, labels, _ = read_image_folder(tmp_path)
    assert images.shape == (2, 3, 2, 3) and labels.tolist() == [0, 1]
    assert images[0, :, 1, 2].tolist() == [200, 100, 50]
    assert images[1, :, 0, 0].tolist() == [77, 77, 77]


def test_resize_to_image_size(tmp_path):
    save(tmp_path / "a" / "small.png", gray(5, (4, 4)), "L")
    save(tmp_path / "a" / "large.png", gray(9, (10, 7)), "L")
    images, _, _ = read_image_folder(tmp_path, image_size=6)
    assert images.shape == (2, 1, 6, 6)
    assert sorted(np.unique(images).tolist()) == [5, 9]


def test_size_mismatch_names_file(tmp_path):
    save(tmp_path / "a" / "1.png", gray(0, (4, 4)), "L")
    save(tmp_path / "a" / "2.png", gray(0, (4, 6)), "L")
    with pytest.raises(DataError) as error:
        read_image_folder(tmp_path)
    assert str(tmp_path / "a" / "2.png") in str(error.value)
    assert "image size 6x4 differs from 4x4" in str(error.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="empty image folder") as error:
        read_image_folder(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_empty_class_folder(tmp_path):
    save(tmp_path / "a" / "1.png", gray(0), "L")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("")
    with pytest.raises(DataError, match="empty class folder") as error:
        read_image_folder(tmp_path)
    assert str(tmp_path / "b") in str(error.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        read_image_folder(tmp_path / "nope")


def test_unreadable_image_names_file(tmp_path):
    save(tmp_path / "a" / "ok.png", gray(0), "L")
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as error:
        read_image_folder(tmp_path)
    assert str(error.value).startswith(f"{broken}: expected a readable image")


def test_load_imagefolder_splits_scaled_to_unit_interval(tmp_path):
    for split, value in (("train", 255), ("test", 51)):
        save(tmp_path / split / "only" / "x.png", gray(value), "L")
        save(tmp_path / split / "other" / "y.png", gray(0), "L")
    train, test = load("imagefolder", "train", tmp_path), load("imagefolder", "test", tmp_path)
    assert train.num_classes == 2 and train.classes == ("only", "other")
    assert train.images[0].unique().tolist() == [1.0]
    assert test.images[0].unique().tolist() == [pytest.approx(0.2)]
    assert test.labels.tolist() == [0, 1]


def test_load_image_folder_normalizes(tmp_path):
    save(tmp_path / "a" / "x.png", gray(51), "L")
    dataset = load_image_folder(tmp_path, mean=(0.5,), std=(0.25,))
    torch.testing.assert_close(dataset.images, torch.full((1, 1, 4, 5), (0.2 - 0.5) / 0.25))
    assert dataset.mean == (0.5,) and dataset.std == (0.25,)
    with pytest.raises(ValueError, match="expected both or neither"):
        load_image_folder(tmp_path, mean=(0.5,))
