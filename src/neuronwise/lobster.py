"""LOBSTER: loss-based sensitivity regularization (METHODS.md §2)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from neuronwise._utils import (
    by_device_and_dtype,
    check_foreach,
    check_lam,
    load_hyperparameters,
    use_foreach,
)
from neuronwise.masks import (
    PRUNABLE_MODULES,
    ParameterMask,
    ParamsLike,
    check_mask,
    resolve_parameters,
)

# Floor of max|g| in the rescaled variant, so that an all-zero gradient does not divide by zero.
_RESCALE_EPS = 1e-10
# 1 as a 0-d CPU tensor: ``torch.sub(_ONE, s, out=s)`` is 1 − s in one pass on any device and dtype.
_ONE = torch.ones(())


class Lobster:
    r"""LOBSTER regularizer (Tartaglione et al., *Neural Networks* 2022, arXiv 2011.09905).

    Shrinks the parameters to which the loss is insensitive. Call :meth:`step` right after
    ``optimizer.step()``; for every selected parameter p whose gradient g = ``p.grad`` (∂L/∂p from
    ``backward``, after AMP unscaling) is not None, with λ = ``lam``:

    .. math::
        \bar S = \mathrm{relu}(1 - |g|), \qquad p \leftarrow p - \lambda\, p\, \bar S,
        \qquad p \leftarrow p \odot \mathrm{mask}

    so parameters with |g| ≥ 1 are not decayed. This is the official rule (EIDOSLAB/LOBSTER,
    ``LOBSTER.py``): the decay is applied to the post-step weights with the pre-step gradient.

    - λ is not multiplied by the learning rate (official code, METHODS.md §2 DECISION);
      ``scale_by_lr=True`` uses λ·``lr`` (update ``reg.lr`` when a scheduler changes it).
    - ``rescaled=True`` (SeReNe repository copy): S̄ = 1 − |g| / max(max|g|, 1e-10), max per tensor.
    - Selected parameters: given a model, every parameter (weights and biases) of ``modules``
      (default Linear, Conv2d, BatchNorm2d); or an iterable of tensors or param groups.
    - ``mask`` keeps pruned entries at exactly 0 whatever the optimizer does; share it with the
      pruner, ``PruneOnPlateau(model, mask=reg.mask)``, so that new zeros are kept. Pass a
      ``ParameterMask(model, granularity="neurons", example_input=x)`` for neuron masks (coupled
      channels, e.g. of a residual stream, masked together). The default mask masks
      nothing until a pruning step (``zeros_at_start="free"``, METHODS.md §1 DECISION 2026-12), so
      zero-initialised parameters such as BatchNorm β train; ``zeros_at_start="masked"`` is the
      official rule (1 where p ≠ 0 at construction), e.g. for a model pruned before.
    - ``foreach``: use the ``torch._foreach_*`` kernels (default: when all parameters are on CUDA);
      the per-tensor loop defines the semantics and the two agree bit for bit. The loop builds S̄
      in a buffer kept between steps, as large as the largest selected parameter.
    - Gradients must be finite: after a step that AMP skipped for inf/nan gradients, skip
      :meth:`step` too.
    """

    def __init__(
        self,
        model_or_params: ParamsLike,
        lam: float = 1e-4,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        scale_by_lr: bool = False,
        lr: float | None = None,
        rescaled: bool = False,
        foreach: bool | None = None,
        mask: ParameterMask | None = None,
        zeros_at_start: str = "free",
    ) -> None:
        self.lam = check_lam(lam)
        self.scale_by_lr = bool(scale_by_lr)
        self.lr = _check_lr(lr, self.scale_by_lr)
        self.rescaled = bool(rescaled)
        self.foreach = check_foreach(foreach)
        self.params = resolve_parameters(model_or_params, modules)
        self.mask = check_mask(mask) or ParameterMask(self.params, zeros_at_start=zeros_at_start)
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._views: dict[int, Tensor] = {}  # id(parameter) -> its view of a buffer

    @property
    def strength(self) -> float:
        """The decay factor applied at each step: λ, or λ·lr when ``scale_by_lr``."""
        return self.lam * self.lr if self.scale_by_lr else self.lam

    def _scratch(self, p: Tensor) -> Tensor:
        """A buffer shaped like ``p``: a cached view of one buffer per device and dtype.

        The parameters are decayed one after another, so one buffer as large as the largest of
        them serves all: no allocation per step, and the memory of one parameter, as before.
        """
        view = self._views.get(id(p))
        if view is not None and view.shape == p.shape and view.dtype == p.dtype \
                and view.device == p.device:
            return view
        key = (p.device, p.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < p.numel():
            size = max(q.numel() for q in self.params if (q.device, q.dtype) == key)
            buffer = self._buffers[key] = torch.empty(size, dtype=p.dtype, device=p.device)
            self._views.clear()  # views of the old buffer would keep it alive
        view = self._views[id(p)] = buffer[: p.numel()].view(p.shape)
        return view

    def _decay_loop(self, params: list[Tensor], strength: float) -> None:
        # S̄ is built in a scratch buffer (no allocation per step) in three passes, 1 − |g| as one
        # subtraction from a 0-d one; the same roundings as relu(1 − |g|) written op by op.
        for p in params:
            insensitivity = self._scratch(p)
            torch.abs(p.grad, out=insensitivity)
            if self.rescaled:
                insensitivity.div_(insensitivity.max().clamp_min(_RESCALE_EPS))
            torch.sub(_ONE, insensitivity, out=insensitivity)
            if not self.rescaled:
                insensitivity.clamp_min_(0.0)
            p.addcmul_(p, insensitivity, value=-strength)

    def _decay_foreach(self, params: list[Tensor], strength: float) -> None:
        grads = [p.grad for p in params]
        for group_params, group_grads in by_device_and_dtype(params, grads):
            insensitivity = torch._foreach_abs(group_grads)
            if self.rescaled:
                maxima = [s.max().clamp_min(_RESCALE_EPS) for s in insensitivity]
                torch._foreach_div_(insensitivity, maxima)
                torch._foreach_neg_(insensitivity)
                torch._foreach_add_(insensitivity, 1.0)
            else:
                torch._foreach_neg_(insensitivity)
                torch._foreach_add_(insensitivity, 1.0)
                torch._foreach_clamp_min_(insensitivity, 0.0)
            torch._foreach_addcmul_(group_params, group_params, insensitivity, value=-strength)

    @torch.no_grad()
    def step(self) -> None:
        """Decay the insensitive parameters, then re-apply the mask."""
        params = [p for p in self.params if p.grad is not None and p.numel()]
        foreach = use_foreach(self.foreach, self.params)
        strength = self.strength
        if params and strength != 0:
            if foreach:
                self._decay_foreach(params, strength)
            else:
                self._decay_loop(params, strength)
        self.mask.apply(foreach=foreach)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters (``lam``, ``scale_by_lr``, ``lr``, ``rescaled``, ``foreach``) and mask."""
        return {
            "lam": self.lam,
            "scale_by_lr": self.scale_by_lr,
            "lr": self.lr,
            "rescaled": self.rescaled,
            "foreach": self.foreach,
            "mask": self.mask.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a hyperparameter it lacks (older states) keeps its value."""
        load_hyperparameters(self, state_dict, {
            "lam": check_lam,
            "scale_by_lr": bool,
            "lr": lambda lr: _check_lr(lr, self.scale_by_lr),
            "rescaled": bool,
            "foreach": check_foreach,
        })
        self.mask.load_state_dict(state_dict["mask"])


def _check_lr(lr: Any, required: bool) -> float | None:
    if lr is None:
        if required:
            raise ValueError("Invalid lr: None (expected a float > 0 when scale_by_lr=True)")
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"Invalid lr: {lr!r} (expected > 0)")
    return float(lr)
