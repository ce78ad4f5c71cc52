"""Torch-Pruning's group-L1 neuron ranking, applied as a neuron mask instead of physical removal.

Torch-Pruning (Fang et al., "DepGraph", CVPR 2023; ``pip install "neuronwise[baselines]"``) scores
channel k of a layer by its dependency group with ``GroupMagnitudeImportance(p=1)``: the mean, over
the group's members (the layer's output row k, the consumer's input column(s) k, ...), of their L1
norms, divided by the mean over the layer's channels. Its ``BasePruner`` with a per-layer ratio r
(local pruning, ``iterative_steps``) removes, at a step of target ratio r, the

    n = C − int(N·(1 − r))

lowest-scored of the C channels the layer still has (N: its channels before any pruning).

:func:`tp_group_l1_prune` picks the same channels but zeroes them (weight row and bias entry, held
by a neuron :class:`~neuronwise.masks.ParameterMask`) instead of cutting the tensors: parameter
shapes, optimizer state, checkpoints and the parameter count of the unpruned model stay valid, and
``neuronwise.simplify`` removes the channels afterwards. The scores are Torch-Pruning's own, computed
on a copy of the model from which the dead channels were first removed with Torch-Pruning itself,
so a live channel scores exactly as in the physically pruned model (its consumer columns of dead
channels are gone there too). Without momentum or weight decay, training the masked model is the
same computation as training the physically pruned one (a dead neuron outputs act(0) = 0 for ReLU/tanh
and its outgoing weights then get no gradient).

Only chains without coupled channels are handled (every group has a single producer layer, as in
LeNet-300/LeNet-5/VGG); a residual stream's coupled channels are refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._utils import unwrap
from .extras import missing_extra
from .masks import ParameterMask, check_mask
from .structured import _prunable_layers

__all__ = ["load_torch_pruning", "tp_group_l1_prune"]


def load_torch_pruning():
    try:
        import torch_pruning
    except ModuleNotFoundError as error:
        raise missing_extra(error, "Torch-Pruning's group-L1 ranking") from None
    return torch_pruning


def _out_function(tp, layer: nn.Module):
    return tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else \
        tp.prune_conv_out_channels


def tp_group_l1_prune(
    model: nn.Module,
    fraction: float,
    example_input: Tensor,
    ignore: nn.Module | Iterable[nn.Module] | None = None,
    mask: ParameterMask | None = None,
) -> dict[str, int]:
    """Zero the channels that Torch-Pruning's local group-L1 pruner removes at target ratio
    ``fraction`` in every prunable layer (``Linear``/``Conv2d`` except ``ignore``, by default the
    classifier): dead channels count as removed, then the n = C − int(N·(1 − fraction)) lowest
    live ones by ``GroupMagnitudeImportance(p=1)`` die; every layer keeps at least one. Updates
    ``mask`` if given; returns the alive neurons per pruned layer (by name)."""
    tp = load_torch_pruning()
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"Invalid fraction: {fraction!r} (expected a number in [0, 1))")
    if not 0 <= fraction < 1:
        raise ValueError(f"Invalid fraction: {fraction} (expected a number in [0, 1))")
    mask = check_mask(mask)
    model = unwrap(model)
    layers = dict(_prunable_layers(model, ignore))
    live = {name: (layer.weight.detach().reshape(layer.weight.shape[0], -1) != 0).any(dim=1)
            .nonzero().flatten().tolist() for name, layer in layers.items()}

    twin = copy.deepcopy(model).eval()
    twins = {name: twin.get_submodule(name) for name in layers}
    with torch.enable_grad():  # Torch-Pruning traces the graph with autograd
        graph = tp.DependencyGraph().build_dependency(twin, example_inputs=example_input,
                                                      verbose=False)
    for name, layer in twins.items():
        dead = sorted(set(range(layer.weight.shape[0])) - set(live[name]))
        if dead:
            graph.get_pruning_group(layer, _out_function(tp, layer), idxs=dead).prune()
    importance = tp.importance.GroupMagnitudeImportance(p=1)
    alive = {}
    for name, layer in layers.items():
        twin_layer = twins[name]
        group = graph.get_pruning_group(twin_layer, _out_function(tp, twin_layer),
                                        idxs=list(range(twin_layer.weight.shape[0])))
        producers = {dep.target.module for dep, _ in group
                     if graph.is_out_channel_pruning_fn(dep.handler)
                     and isinstance(dep.target.module, (nn.Linear, nn.Conv2d))}
        if producers != {twin_layer}:
            raise ValueError(f"Invalid model: layer {name!r} shares its channels with other "
                             "layers (coupled channels are not supported here)")
        count = len(live[name]) - max(1, int(layer.weight.shape[0] * (1 - fraction)))
        if count > 0:
            with torch.no_grad():
                scores = importance(group)
            lowest = torch.topk(scores, k=count, largest=False).indices.tolist()
            rows = torch.tensor([live[name][i] for i in lowest], dtype=torch.long)
            with torch.no_grad():
                layer.weight[rows.to(layer.weight.device)] = 0
                if layer.bias is not None:
                    layer.bias[rows.to(layer.bias.device)] = 0
        alive[name] = len(live[name]) - max(count, 0)
    if mask is not None:
        mask.update()
    return alive
