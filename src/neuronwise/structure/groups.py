"""Coupled channel groups as public API: the channels that must be removed together.

What DepGraph's ``get_all_groups`` gives its users, from the same analysis :func:`simplify` uses
(:mod:`.graph`): a residual stream's channel in every producer, a depthwise conv's channel with its
input, a concatenation's pieces with the consumers' columns, a flattened channel with its block of
``Linear`` columns. Structured pruning removes a group as a whole or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .graph import PRODUCERS, capture, couple, propagate_shapes, tensor_args

__all__ = ["ChannelGroup", "channel_groups"]


@dataclass(frozen=True)
class ChannelGroup:
    """One set of coupled channels.

    ``members``: (module name, ``"out"`` or ``"in"``, index): output row ``index`` of a Linear/
    Conv2d/BatchNorm (weight row, bias, BN entries), or input column ``index`` of a Linear/Conv2d
    (for a grouped conv: the input channel). ``blocked_by``: (graph node, reason) when the group can
    never be removed (it reaches the model output or input, an unsupported operation, a module
    called twice), else None. Grouped (non-depthwise) convs add a constraint this does not show:
    every group of such a conv must lose as many channels as the others.
    """

    members: tuple[tuple[str, str, int], ...]
    blocked_by: tuple[str, str] | None


def channel_groups(model: nn.Module, example_input: Tensor) -> list[ChannelGroup]:
    """The coupled channel groups of ``model`` (BatchNorm not fused), in graph order of their
    first member; groups that touch no parameter are left out."""
    gm, calls, example = capture(model, example_input)
    propagate_shapes(gm, example)
    a = couple(gm, calls, example)
    members: dict[int, list[tuple[str, str, int]]] = {}
    for node in gm.graph.nodes:
        kind = a.kinds[node.name]
        if kind in PRODUCERS or kind == "norm":
            for c in range(len(a.ids(node))):
                members.setdefault(a.root(node, c), []).append((node.target, "out", c))
        if kind in ("linear", "grouped"):
            src = tensor_args(node)[0]
            for c in range(len(a.ids(src))):
                members.setdefault(a.root(src, c), []).append((node.target, "in", c))
    return [ChannelGroup(tuple(found), a.blockers.get(root)) for root, found in members.items()]
