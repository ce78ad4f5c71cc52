"""Optimizer state across :func:`~neuronwise.structure.simplify`: slice it to the kept rows."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["remap_optimizer_state"]


def remap_optimizer_state(
    optimizer: torch.optim.Optimizer,
    old_model: nn.Module,
    new_model: nn.Module,
    kept: dict[str, tuple[str, tuple[Tensor, ...] | None]],
) -> None:
    """Point ``optimizer`` at ``new_model``'s parameters, slicing per-parameter state (SGD momentum,
    Adam moments) to the kept rows and columns.

    ``kept`` comes from ``simplify(..., return_kept=True)``. Parameters that are new or were rescaled
    (fused BN, bias maps) start with empty state in their source's parameter group; parameters of
    the old model that are gone (fused BN) leave the optimizer.
    """
    old = dict(old_model.named_parameters())
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    new_groups: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    new_state = {}
    for name, param in new_model.named_parameters():
        if name not in kept or kept[name][0] not in old:
            raise ValueError(f"Invalid kept: no source for new parameter {name!r}")
        source_name, index = kept[name]
        source = old[source_name]
        if id(source) not in group_of:
            continue
        new_groups[group_of[id(source)]].append(param)
        state = optimizer.state.get(source, {})
        if index is None or not state:
            continue
        sliced = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == source.shape:
                for dim, idx in enumerate(index):
                    value = value.index_select(dim, idx.to(value.device))
                sliced[key] = value.clone()
            else:
                sliced[key] = value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
        new_state[param] = sliced
    for group, params in zip(optimizer.param_groups, new_groups):
        group["params"] = params
    optimizer.state.clear()
    optimizer.state.update(new_state)
