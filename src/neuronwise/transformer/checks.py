"""The checks of :mod:`neuronwise.transformer.simplify`: each module's recorded call, and whether
a rebuilt module computes what the old one does (float64, recorded and random inputs)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from neuronwise._utils import without_compile
from neuronwise.transformer.modules import MultiheadAttention

__all__ = ["record_calls", "run64", "same_function"]


def record_calls(model: nn.Module, example: Tensor) -> dict[str, tuple[tuple, dict]]:
    """Each module's (args, kwargs) in one forward; modules called more than once are left out."""
    calls: dict[str, tuple[tuple, dict]] = {}
    repeated: set[str] = set()

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name in calls:
                repeated.add(name)
            calls[name] = tree_map(_detach, (args, kwargs))

        return hook

    handles = [
        m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in model.named_modules()
    ]
    try:
        with torch.no_grad(), without_compile():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return {n: c for n, c in calls.items() if n not in repeated}


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _inputs(call: tuple[tuple, dict]) -> list[tuple[tuple, dict]]:
    """The recorded call, and one with every floating tensor replaced by N(0, 1) noise."""
    generator = torch.Generator().manual_seed(0)

    def noise(x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x.device)
        return x

    return [call, tree_map(noise, call)]


def _double(x: Any) -> Any:
    return x.double() if isinstance(x, Tensor) and x.is_floating_point() else x


def run64(module: nn.Module, call: tuple[tuple, dict]) -> list[Tensor | None]:
    args, kwargs = tree_map(_double, call)
    with torch.no_grad():
        out = copy.deepcopy(module).double().eval()(*args, **kwargs)
    return tree_flatten(out)[0]


def same_function(old: nn.Module, new: nn.Module, call: tuple[tuple, dict]) -> bool:
    """``new`` computes what ``old`` does, in float64 on the recorded and a random input.

    The tolerance, 100 ulps of the parameters' dtype relative to the output's size, admits the
    rounding of folded biases to that dtype and nothing of a different function.
    """
    dtype = next((p.dtype for p in old.parameters() if p.is_floating_point()), torch.float32)
    tolerance = 100 * torch.finfo(dtype).eps
    for inputs in _inputs(call):
        expected, got = run64(old, inputs), run64(new, inputs)
        if isinstance(old, (nn.MultiheadAttention, MultiheadAttention)):  # weights: not kept
            expected, got = expected[:1], got[:1]
        if len(expected) != len(got):
            return False
        for a, b in zip(expected, got):
            if (a is None) != (b is None):
                return False
            if a is None or not isinstance(a, Tensor):
                continue
            if a.shape != b.shape or (a - b).abs().max() > tolerance * (1 + a.abs().max()):
                return False
    return True
