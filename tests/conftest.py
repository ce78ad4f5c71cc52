"""Shared fixtures: the real-data root and small deterministic settings."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

# On a CPU torch build whose torchvision operators did not load, `import torchvision` fails
# ("operator torchvision::nms does not exist"), and so does `import lightning`, which imports
# torchvision whenever it is installed. Importing it once through the integration (which skips the
# two operator-registration modules) makes every later import in this process succeed.
if importlib.util.find_spec("torchvision") is not None:
    from neuronwise.integrations.torchvision import models as _torchvision_models

    _torchvision_models()

# The checkout's sibling ../shared/data holds real MNIST/Fashion-MNIST in development and CI.
_SIBLING_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _real_data_root() -> Path | None:
    env = os.environ.get("NEURONWISE_DATA")
    for candidate in ([Path(env)] if env else []) + [_SIBLING_DATA]:
        if (candidate / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
            return candidate
    return None


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Runs set train.threads (torch.set_num_threads, process-wide): restore it after every test.
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def real_data_root() -> Path:
    """The data root holding real MNIST and Fashion-MNIST; skips the test when there is none."""
    root = _real_data_root()
    if root is None:
        pytest.skip(
            "real MNIST/Fashion-MNIST not found: set NEURONWISE_DATA to a folder holding "
            "MNIST/raw/*.gz and FashionMNIST/raw/*.gz (CI points it at ../shared/data)"
        )
    return root
