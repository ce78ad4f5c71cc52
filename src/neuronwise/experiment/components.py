"""The parts of a run built from its config: device, datasets, optimizer, learning-rate schedule;
seeds and random-state capture."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch

from neuronwise import data as nwdata

from .config import Config, DataConfig


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(config: Config, parameters) -> torch.optim.Optimizer:
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(parameters, lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay, nesterov=o.nesterov)
    if o.name == "adam":
        return torch.optim.Adam(parameters, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(parameters, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(config: Config, optimizer):
    s = config.schedule
    lr = torch.optim.lr_scheduler
    if s.name == "plateau":
        return lr.ReduceLROnPlateau(optimizer, mode="min", factor=s.factor, patience=s.patience,
                                    threshold=s.threshold, cooldown=s.cooldown)
    if s.name == "multistep":
        return lr.MultiStepLR(optimizer, milestones=list(s.milestones), gamma=s.factor)
    if s.name == "step":
        return lr.StepLR(optimizer, step_size=s.step_size, gamma=s.factor)
    if s.name == "cosine":
        return lr.CosineAnnealingLR(optimizer, T_max=max(1, config.train.epochs))
    return None


def scheduler_state(scheduler) -> dict:
    state = dict(scheduler.state_dict())
    # MultiStepLR keeps a Counter, which weights_only loading refuses; a dict carries the same.
    if "milestones" in state:
        state["milestones"] = dict(state["milestones"])
    return state


def load_scheduler_state(scheduler, state: dict) -> None:
    state = dict(state)
    if "milestones" in state:
        state["milestones"] = Counter(state["milestones"])
    scheduler.load_state_dict(state)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device that works here (``auto``: CUDA when available)."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto"
                              else name)
        torch.empty(0, device=device)  # a missing device fails here, not mid-run
    except (RuntimeError, AssertionError) as error:  # AssertionError: torch without CUDA
        raise ValueError(f"train.device: {name!r} is not usable here "
                         f"({str(error).strip().splitlines()[0]})") from None
    return device


def load_datasets(data: DataConfig) -> tuple[nwdata.ArrayDataset, nwdata.ArrayDataset]:
    """The full training split and the test split of ``data.name`` (``limit_*`` applied)."""
    if nwdata.DATASETS.get(data.name) is None:
        raise ValueError(f"data.name: unknown dataset {data.name!r} "
                         f"(expected one of {sorted(nwdata.DATASETS)})")
    root = nwdata.resolve_root(data.root)
    train = nwdata.load(data.name, split="train", root=root, verify=data.verify)
    test = nwdata.load(data.name, split="test", root=root, verify=data.verify)
    if data.limit_train:
        train = train.subset(torch.arange(min(data.limit_train, len(train))))
    if data.limit_test:
        test = test.subset(torch.arange(min(data.limit_test, len(test))))
    return train, test
