"""LOBSTER (METHODS.md §1): the sensitivity-driven decay after every optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

import neuronwise as nw

from ..schema import setting
from .base import MethodCallback, MethodContext
from .registry import register


@dataclass
class LobsterConfig:
    lam: float = setting(1e-4, "λ, strength of the sensitivity-driven decay (not multiplied by the "
                         "LR)", bounds=">= 0")
    scale_by_lr: bool = setting(False, "multiply λ by the learning rate (paper form)")
    rescaled: bool = setting(False, "sensitivity |g|/max|g| without relu (SeReNe repository "
                             "variant)")
    zeros_at_start: Literal["free", "masked"] = setting(
        "free", "free: the mask holds only what pruning zeroed (zero-initialised parameters such "
        "as BatchNorm β train); masked: official rule, zeros at the start stay zero")


class RegularizerCallback(MethodCallback):
    """A regularizer whose ``step()`` follows every optimizer step."""

    def after_optimizer_step(self) -> None:
        self.method.step()


class LobsterCallback(RegularizerCallback):
    """Runs :class:`neuronwise.Lobster` after every optimizer step.

    p ← p − λ·p·relu(1 − |∂L/∂p|) for every parameter of ``modules``, then the mask. ``kwargs``
    go to ``Lobster`` (``scale_by_lr``, ``lr``, ``rescaled``, ``foreach``); with ``scale_by_lr``
    and no ``lr``, the learning rate is that of the first optimizer at each step (so λ·lr follows
    the learning-rate schedule).
    """

    def __init__(self, lam: float = 1e-4,
                 modules: tuple[type[nn.Module], ...] = nw.pruning.PRUNABLE_MODULES, **kwargs: Any) -> None:
        super().__init__()
        self._modules = tuple(modules)
        self.kwargs = {"lam": lam, **kwargs}
        # Validate now, on a stand-in, so that a bad value fails before training starts (the
        # learning rate of scale_by_lr may come from the optimizer at setup).
        stand_in_lr = kwargs.get("lr") or (1.0 if kwargs.get("scale_by_lr") else None)
        nw.Lobster([torch.zeros(1)], **{**self.kwargs, "lr": stand_in_lr})

    @classmethod
    def from_config(cls, config: LobsterConfig, regularizer=None) -> LobsterCallback:
        return cls(lam=config.lam, scale_by_lr=config.scale_by_lr, rescaled=config.rescaled,
                   zeros_at_start=config.zeros_at_start)

    @property
    def modules(self) -> tuple[type[nn.Module], ...]:
        return self._modules

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        kwargs = dict(self.kwargs)
        if kwargs.get("scale_by_lr") and kwargs.get("lr") is None:
            kwargs["lr"] = context.optimizers[0].param_groups[0]["lr"]
        self.method = nw.Lobster(context.model, modules=self._modules, **kwargs)
        # Without a fixed lr, λ·lr follows the schedule: the optimizer's current learning rate.
        self._follow_lr = bool(kwargs.get("scale_by_lr")) and self.kwargs.get("lr") is None

    def after_optimizer_step(self) -> None:
        if self._follow_lr:
            self.method.lr = self.context.optimizers[0].param_groups[0]["lr"]
        self.method.step()


register("lobster", LobsterCallback, config=LobsterConfig)
