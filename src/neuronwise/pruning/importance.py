"""Importance criteria: which entries or neurons a pruning schedule removes first.

A schedule (threshold bisection, plateau pruner, magnitude baselines, structured pruner) decides
*when* and *how much* to prune; a criterion decides *what*. Two kinds, as ``torch.nn.utils.prune``'s
``importance_scores`` and Torch-Pruning's importance classes:

- a **parameter importance** maps a parameter p to scores s of p's shape; the lowest scores are
  pruned first (entries with s < T for a threshold T, or the k lowest over all tensors);
- a **neuron importance** maps a ``Linear``/``Conv2d`` layer to one score per output neuron (weight
  row with its bias entry).

Built-ins (the defaults reproduce the schedules' historical behaviour bit for bit):

==================  =====================================================================
``magnitude``       s = |w| (LOBSTER, Han et al. 2015, Zhu & Gupta 2017)
``taylor``          s = |w · ∂L/∂w|, the first-order Taylor estimate of the loss change when w
                    is zeroed (Molchanov et al., ICLR 2017); uses the gradient in ``p.grad``
``neuron_l1``       s_k = Σ_j |W[k, j]| (Li et al., ICLR 2017), float64
``neuron_taylor``   s_k = Σ_j |W[k, j] · ∂L/∂W[k, j]|, float64
==================  =====================================================================

Criteria are looked up by name with :func:`get_importance`; :func:`register_importance` adds one
(a function in the caller's own file), as timm registers a model where it is defined.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

ParameterImportance = Callable[[Tensor], Tensor]
NeuronImportance = Callable[[nn.Module], Tensor]
KINDS = ("parameter", "neuron")

_REGISTRY: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}


def register_importance(name: str, kind: str = "parameter") -> Callable[[Callable], Callable]:
    """Decorator: make a criterion available as ``name`` to :func:`get_importance` (and configs)."""
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {KINDS})")
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid name: {name!r} (expected a non-empty string)")

    def register(function: Callable) -> Callable:
        if name in _REGISTRY[kind]:
            raise ValueError(f"Invalid name: {kind} importance {name!r} is already registered")
        _REGISTRY[kind][name] = function
        return function

    return register


def importance_names(kind: str = "parameter") -> list[str]:
    """The registered criteria of ``kind`` ("parameter" or "neuron"), sorted."""
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r} (expected one of {KINDS})")
    return sorted(_REGISTRY[kind])


def get_importance(importance: str | Callable, kind: str = "parameter") -> Callable:
    """The criterion ``importance`` names, or ``importance`` itself when it is callable."""
    if callable(importance):
        return importance
    names = importance_names(kind)
    if importance not in names:
        raise ValueError(f"Invalid importance: {importance!r} (expected a callable or one of {names})")
    return _REGISTRY[kind][importance]


def _gradient(param: Tensor) -> Tensor:
    if param.grad is None:
        raise ValueError(
            f"Invalid importance 'taylor': a parameter of shape {tuple(param.shape)} has no .grad "
            "(run a backward pass before pruning)"
        )
    return param.grad


def _row_sums(scores: Tensor) -> Tensor:
    """Per output row (dim 0) the float64 sum of ``scores``."""
    return scores.reshape(scores.shape[0], -1).double().sum(dim=1)


@register_importance("magnitude")
def magnitude(param: Tensor) -> Tensor:
    """s = |w|."""
    return param.detach().abs()


@register_importance("taylor")
def taylor(param: Tensor) -> Tensor:
    """s = |w · g|, g = ``param.grad`` (∂L/∂w of the last backward)."""
    return (param.detach() * _gradient(param)).abs()


@register_importance("l1", kind="neuron")
def neuron_l1(layer: nn.Module) -> Tensor:
    """s_k = Σ_j |W[k, j]| over the incoming weights of neuron k (biases are not scored)."""
    return _row_sums(magnitude(layer.weight))


@register_importance("taylor", kind="neuron")
def neuron_taylor(layer: nn.Module) -> Tensor:
    """s_k = Σ_j |W[k, j] · G[k, j]|, G = ``layer.weight.grad``."""
    return _row_sums(taylor(layer.weight))


@torch.no_grad()
def parameter_scores(importance: ParameterImportance, param: Tensor) -> Tensor:
    """``importance(param)``, checked to be a tensor of ``param``'s shape."""
    scores = importance(param)
    _check_scores(importance, scores, tuple(param.shape))
    return scores


@torch.no_grad()
def neuron_scores(importance: NeuronImportance, layer: nn.Module) -> Tensor:
    """``importance(layer)``, checked to hold one score per output neuron of ``layer``."""
    scores = importance(layer)
    _check_scores(importance, scores, (layer.weight.shape[0],))
    return scores


def _check_scores(importance: Any, scores: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(scores, Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        name = getattr(importance, "__name__", type(importance).__name__)
        raise ValueError(f"Invalid importance {name!r}: returned {got} (expected a tensor of shape {shape})")
