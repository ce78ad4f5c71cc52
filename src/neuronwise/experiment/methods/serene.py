"""SeReNe (METHODS.md §3): neuron sensitivities before each backward, the decay after each step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

import neuronwise as nw

from ..schema import setting
from .base import MethodContext, stand_in
from .lobster import RegularizerCallback
from .registry import register


@dataclass
class SeReNeConfig:
    lam: float = setting(1e-4, "λ, strength of the neuron-level decay", bounds=">= 0")
    variant: Literal["lower-bound", "full", "local"] = setting("lower-bound",
                                                               "neuron sensitivity form")
    zeros_at_start: Literal["free", "masked"] = setting(
        "free", "free: the mask holds only what pruning zeroed (zero-initialised parameters such "
        "as BatchNorm β train); masked: official rule, zeros at the start stay zero")


class SeReNeCallback(RegularizerCallback):
    """Runs :class:`neuronwise.SeReNe`: sensitivities from the logits before each backward, the
    step after each optimizer step.

    W[k] ← W[k] − λ·relu(1 − S_k)·W[k] per neuron k of the ``modules`` layers. ``kwargs`` go to
    ``SeReNe`` (``foreach``, ``mask``).
    """

    def __init__(self, lam: float = 1e-4, variant: str = "lower-bound",
                 modules: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
                 **kwargs: Any) -> None:
        super().__init__()
        self._modules = tuple(modules)
        self.kwargs = {"lam": lam, "variant": variant, **kwargs}
        nw.SeReNe(stand_in(), **self.kwargs).remove()  # validates before training starts

    @classmethod
    def from_config(cls, config: SeReNeConfig, regularizer=None) -> SeReNeCallback:
        return cls(lam=config.lam, variant=config.variant, zeros_at_start=config.zeros_at_start)

    @property
    def modules(self) -> tuple[type[nn.Module], ...]:
        return self._modules

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        self.method = nw.SeReNe(context.model, modules=self._modules, **self.kwargs)

    def before_backward(self, logits: Tensor) -> None:
        self.method.compute(logits)


register("serene", SeReNeCallback, config=SeReNeConfig)
