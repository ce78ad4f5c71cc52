"""The CIFAR reproduction configs run end to end on generated CIFAR-format files (1 tiny epoch)."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronwise.data import DATASETS
from neuronwise.experiment.cli import main

REPO = Path(__file__).resolve().parents[1]
CIFAR_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*cifar*.yaml"))


def write_fake_cifar(root: Path, name: str, per_file: int = 12) -> None:
    """Files in the official python-pickle layout, random pixels and labels."""
    info = DATASETS[name]
    rng = np.random.default_rng(0)
    for file in info.files:
        if file.role == "meta":
            content = {"label_names": [str(i) for i in range(info.num_classes)]}
        else:
            content = {"data": rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8),
                       info.label_key: rng.integers(0, info.num_classes, size=per_file).tolist()}
        path = root / info.directory / file.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(content, protocol=2))


def test_there_are_cifar_configs():
    names = {p.stem for p in CIFAR_CONFIGS}
    assert {"resnet32_cifar10", "vgg16_cifar10"} <= names


@pytest.mark.parametrize("config", CIFAR_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_cifar_config_runs_one_epoch(tmp_path, config):
    write_fake_cifar(tmp_path / "data", "cifar10")
    run = tmp_path / "run"
    code = main(["run", str(config), "--run-dir", str(run), "--data-root", str(tmp_path / "data"),
                 "--set", "data.verify=false", "--set", "train.epochs=1",
                 "--set", "data.batch_size=10", "--set", "train.device=cpu",
                 "--set", "data.limit_train=20", "--set", "data.limit_test=10"])
    assert code == 0
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1
