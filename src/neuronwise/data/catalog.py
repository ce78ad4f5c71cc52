"""The datasets neuronwise knows: their files, checksums, shapes and normalization.

Checksums are md5 digests of the *decompressed* content, so a ``.gz`` file that was recompressed
(other gzip level or header) still verifies, and so does its plain, uncompressed copy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FileInfo:
    """One file of a dataset, relative to the dataset's directory.

    ``md5``/``size``: of the decompressed content (None: checked structurally only).
    ``role``: "images"/"labels" (IDX), "batch"/"meta" (CIFAR) or "archive" (the download).
    """

    name: str
    role: str
    split: str | None
    md5: str | None = None
    size: int | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """Everything needed to find, verify, download and normalize a dataset.

    ``format`` selects the reader ("idx", "cifar", "digits", "imagefolder"). Images are scaled to
    [0, 1] and normalized per channel with ``mean``/``std`` (None: no normalization). ``urls`` are
    base URLs tried in order; a file (or the ``archive``, when there is one) is fetched from
    ``url + name``. None in ``num_classes``/``in_channels``/``image_size`` means "read from the data".
    """

    name: str
    format: str
    num_classes: int | None
    in_channels: int | None
    image_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    directory: str = ""
    files: tuple[FileInfo, ...] = ()
    urls: tuple[str, ...] = ()
    archive: FileInfo | None = None
    train_size: int | None = None
    test_size: int | None = None
    label_key: str = "labels"

    def split_files(self, split: str) -> list[FileInfo]:
        """The files of ``split`` ("train" or "test"), in reading order."""
        return [f for f in self.files if f.split == split]


def _idx_files(md5: dict[str, str]) -> tuple[FileInfo, ...]:
    files = []
    for split, prefix, count in (("train", "train", 60000), ("test", "t10k", 10000)):
        for role, suffix, size in (
            ("images", "images-idx3-ubyte", 16 + count * 28 * 28),
            ("labels", "labels-idx1-ubyte", 8 + count),
        ):
            name = f"{prefix}-{suffix}"
            files.append(FileInfo(f"{name}.gz", role, split, md5[name], size))
    return tuple(files)


_MNIST_STATS = {"mean": (0.1307,), "std": (0.3081,)}
_MNIST_SHAPE = {"num_classes": 10, "in_channels": 1, "image_size": 28}
_CIFAR_SHAPE = {"in_channels": 3, "image_size": 32, "train_size": 50000, "test_size": 10000}

DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="mnist",
            format="idx",
            **_MNIST_SHAPE,
            **_MNIST_STATS,
            directory="MNIST/raw",
            files=_idx_files(
                {
                    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
                    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
                    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
                    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
                }
            ),
            urls=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/",
                "http://yann.lecun.com/exdb/mnist/",
            ),
            train_size=60000,
            test_size=10000,
        ),
        DatasetInfo(
            # Same normalization as MNIST: the LOBSTER official code uses it for both.
            name="fashion-mnist",
            format="idx",
            **_MNIST_SHAPE,
            **_MNIST_STATS,
            directory="FashionMNIST/raw",
            files=_idx_files(
                {
                    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
                }
            ),
            urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
            train_size=60000,
            test_size=10000,
        ),
        DatasetInfo(
            name="cifar10",
            format="cifar",
            num_classes=10,
            **_CIFAR_SHAPE,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),
            directory="cifar-10-batches-py",
            files=(
                FileInfo("data_batch_1", "batch", "train", "c99cafc152244af753f735de768cd75f"),
                FileInfo("data_batch_2", "batch", "train", "d4bba439e000b95fd0a9bffe97cbabec"),
                FileInfo("data_batch_3", "batch", "train", "54ebc095f3ab1f0389bbae665268c751"),
                FileInfo("data_batch_4", "batch", "train", "634d18415352ddfa80567beed471001a"),
                FileInfo("data_batch_5", "batch", "train", "482c414d41f54cd18b22e5b47cb7c3cb"),
                FileInfo("test_batch", "batch", "test", "40351d587109b95175f43aff81a1287e"),
                FileInfo("batches.meta", "meta", None, "5ff9c542aee3614f3951f8cda6e48888"),
            ),
            urls=("https://www.cs.toronto.edu/~kriz/",),
            archive=FileInfo(
                "cifar-10-python.tar.gz",
                "archive",
                None,
                "c58f30108f718f92721af3b95e74349a",
                170498071,
            ),
        ),
        DatasetInfo(
            name="cifar100",
            format="cifar",
            num_classes=100,
            **_CIFAR_SHAPE,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            directory="cifar-100-python",
            files=(
                FileInfo("train", "batch", "train", "16019d7e3df5f24257cddd939b257f8d"),
                FileInfo("test", "batch", "test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
                FileInfo("meta", "meta", None, "7973b15100ade9c7d40fb424638fde48"),
            ),
            urls=("https://www.cs.toronto.edu/~kriz/",),
            archive=FileInfo(
                "cifar-100-python.tar.gz", "archive", None, "eb9058c3a382ffc7106e4002c42a8d85"
            ),
            label_key="fine_labels",
        ),
        DatasetInfo(
            # Mean/std of the training split's pixels after scaling to [0, 1].
            name="digits",
            format="digits",
            num_classes=10,
            in_channels=1,
            image_size=8,
            mean=(0.3054,),
            std=(0.3755,),
            train_size=1437,
            test_size=360,
        ),
        DatasetInfo(
            name="imagefolder",
            format="imagefolder",
            num_classes=None,
            in_channels=None,
            image_size=None,
            mean=None,
            std=None,
        ),
    )
}
