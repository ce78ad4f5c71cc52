"""Sharpness under weight noise and 1-D slices of the loss landscape (METHODS.md §6, study).

Both probes perturb the model's weights in place and restore them bit-identically before
returning; both evaluate in eval mode under ``no_grad`` and restore the training flags.
A loss is given either as a callable ``loss_fn(model) -> scalar`` or as a loader of
``(inputs, labels)`` pairs, whose mean cross-entropy over all samples is used (summed over DDP
ranks). Random numbers come from a ``torch.Generator`` seeded by ``seed`` on the CPU, so results
are deterministic and the same on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from neuronwise._utils import evaluating, split_batch, unwrap
from neuronwise.distributed import all_reduce_sum

__all__ = ["LandscapeSlice", "Sharpness", "landscape_slice", "sharpness"]

LossSource = Callable[[nn.Module], float | torch.Tensor] | Iterable


@dataclass(frozen=True)
class Sharpness:
    """Loss increases under weight noise.

    Attributes:
        base_loss: the loss of the unperturbed model.
        sigmas: the relative noise levels σ.
        mean: mean increase per σ (same order as ``sigmas``).
        std: sample standard deviation (n − 1) of the increase per σ; NaN for a single draw.
        increases: every increase, shape (len(sigmas), draws), float64.
    """

    base_loss: float
    sigmas: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    increases: torch.Tensor


@dataclass(frozen=True)
class LandscapeSlice:
    """Losses along a line in weight space: ``losses[i]`` is the loss at ``alphas[i]``."""

    alphas: torch.Tensor
    losses: torch.Tensor


@torch.no_grad()
def sharpness(
    model: nn.Module,
    loss_fn_or_loader: LossSource,
    sigma: Sequence[float] = (0.01, 0.05, 0.1),
    draws: int = 10,
    seed: int = 0,
    only_nonzero: bool = True,
) -> Sharpness:
    r"""Mean loss increase when Gaussian noise is added to the weights.

    For each draw and each parameter tensor w, :math:`w \leftarrow w + \sigma\,
    \mathrm{rms}(w)\,\varepsilon`, :math:`\varepsilon \sim N(0, I)`; the increase is
    L(perturbed) − L(w). With ``only_nonzero`` the noise touches only non-zero entries (pruned
    weights stay exactly 0) and rms(w) is taken over those entries. Every parameter of the model
    is perturbed; buffers (BN statistics) are not. One ε per draw is shared by all σ (common
    random numbers), so the σ are compared on the same directions.
    """
    sigmas = tuple(float(s) for s in sigma)
    if not sigmas or any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise ValueError(f"Invalid sigma: {sigma!r} (expected a non-empty sequence of values >= 0)")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"Invalid draws: {draws!r} (expected an int >= 1)")
    loss = _loss_function(loss_fn_or_loader)
    params = [p for p in model.parameters() if p.is_floating_point()]
    generator = torch.Generator().manual_seed(seed)
    increases = torch.empty(len(sigmas), draws, dtype=torch.float64)
    with evaluating(model), _restoring(params) as saved:
        masks = [p != 0 if only_nonzero else None for p in saved]
        scales = [_rms(w, m) for w, m in zip(saved, masks)]
        base = loss(model)
        for d in range(draws):
            state = generator.get_state()
            for i, s in enumerate(sigmas):
                # Replaying the generator gives every σ the same ε.
                generator.set_state(state)
                for p, w, m, r in zip(params, saved, masks, scales):
                    noise = torch.randn(w.shape, generator=generator, dtype=w.dtype)
                    noise = noise.to(w.device).mul_(s * r)
                    if m is not None:
                        noise.mul_(m)
                    p.copy_(w).add_(noise)
                increases[i, d] = loss(model) - base
    mean = increases.mean(dim=1)
    std = increases.std(dim=1) if draws > 1 else torch.full((len(sigmas),), math.nan)
    return Sharpness(
        base_loss=base,
        sigmas=sigmas,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        increases=increases,
    )


@torch.no_grad()
def landscape_slice(
    model: nn.Module,
    loss_fn: LossSource,
    direction: str | nn.Module = "random",
    alphas: Sequence[float] | torch.Tensor | None = None,
    seed: int = 0,
    only_nonzero: bool = True,
) -> LandscapeSlice:
    r"""Loss along a line through the model's weights θ.

    ``direction="random"``: θ(α) = θ + α·d with d a filter-normalized Gaussian direction
    (Li et al., NeurIPS 2018): for each weight of dimension ≥ 2, each output filter d_i is
    rescaled to ‖d_i‖ = ‖θ_i‖; 1-D parameters (biases, norm affines) get d = 0. With
    ``only_nonzero`` d is 0 on pruned weights and the norms are over surviving entries.
    Default α: 21 points in [−1, 1].

    ``direction=other_model`` (same parameter names and shapes): θ(α) = (1 − α)·θ_a + α·θ_b,
    applied to parameters and floating-point buffers (BN statistics), so α = 0 is this model
    and α = 1 the other. Default α: 21 points in [−0.5, 1.5].
    """
    loss = _loss_function(loss_fn)
    if isinstance(direction, nn.Module):
        tensors, targets = _interpolation_pairs(model, direction)
        default = (-0.5, 1.5)
    elif direction == "random":
        tensors = [p for p in model.parameters() if p.is_floating_point()]
        targets = None
        default = (-1.0, 1.0)
    else:
        raise ValueError(f"Invalid direction: {direction!r} (expected 'random' or an nn.Module)")
    if alphas is None:
        alphas = torch.linspace(default[0], default[1], 21, dtype=torch.float64)
    alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    if alphas.numel() == 0 or not torch.isfinite(alphas).all():
        raise ValueError(f"Invalid alphas: {alphas.tolist()} (expected finite values)")
    losses = torch.empty_like(alphas)
    with evaluating(model), _restoring(tensors) as saved:
        if targets is None:
            generator = torch.Generator().manual_seed(seed)
            targets = [_filter_normalized(w, generator, only_nonzero) for w in saved]
            for i, a in enumerate(alphas.tolist()):
                for t, w, d in zip(tensors, saved, targets):
                    t.copy_(w).add_(d, alpha=a)
                losses[i] = loss(model)
        else:
            for i, a in enumerate(alphas.tolist()):
                for t, w, b in zip(tensors, saved, targets):
                    t.copy_(w).mul_(1 - a).add_(b, alpha=a)
                losses[i] = loss(model)
    return LandscapeSlice(alphas=alphas, losses=losses)


def _loss_function(source: LossSource) -> Callable[[nn.Module], float]:
    if callable(source):
        return lambda model: float(source(model))
    if isinstance(source, Iterable):
        return lambda model: _mean_cross_entropy(model, source)
    raise TypeError(
        f"Invalid loss: {type(source).__name__} (expected a callable loss_fn(model) or a loader "
        "of (inputs, labels) pairs)"
    )


def _mean_cross_entropy(model: nn.Module, loader: Iterable) -> float:
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        inputs, labels = split_batch(batch)
        logits = model(inputs.to(device))
        totals[0] += nn.functional.cross_entropy(
            logits.float(), labels.to(device), reduction="sum"
        ).double()
        totals[1] += labels.shape[0]
    all_reduce_sum(totals)
    if totals[1] == 0:
        raise ValueError("Invalid loader: it yielded no samples")
    return float(totals[0] / totals[1])


def _rms(weight: torch.Tensor, mask: torch.Tensor | None) -> float:
    values = weight if mask is None else weight[mask]
    if values.numel() == 0:
        return 0.0
    return float(values.double().square().mean().sqrt())


def _filter_normalized(
    weight: torch.Tensor, generator: torch.Generator, only_nonzero: bool
) -> torch.Tensor:
    direction = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
    direction = direction.to(weight.device)
    if weight.dim() < 2:
        return direction.zero_()
    if only_nonzero:
        direction.mul_(weight != 0)
    rows = direction.view(weight.shape[0], -1)
    norms = rows.norm(dim=1, keepdim=True)
    target = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
    # A filter whose direction is all zero (fully pruned) stays zero instead of becoming NaN.
    scale = torch.where(norms > 0, target / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return (rows * scale).view_as(weight)


def _interpolation_pairs(
    model: nn.Module, other: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model, other = unwrap(model), unwrap(other)
    own = dict(model.named_parameters())
    own.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    theirs = dict(other.named_parameters())
    theirs.update((n, b) for n, b in other.named_buffers() if b.is_floating_point())
    if own.keys() != theirs.keys():
        raise ValueError(
            "Invalid direction: the models differ in tensors "
            f"{sorted(own.keys() ^ theirs.keys())} (expected the same architecture)"
        )
    shapes = [n for n in own if own[n].shape != theirs[n].shape]
    if shapes:
        raise ValueError(
            f"Invalid direction: tensors {shapes} differ in shape (expected the same architecture)"
        )
    names = [n for n in own if own[n].is_floating_point()]
    # Copies: the other model may share tensors with this one (or be it).
    return [own[n] for n in names], [
        theirs[n].detach().to(own[n].device, own[n].dtype, copy=True) for n in names
    ]


@contextmanager
def _restoring(tensors: list[torch.Tensor]):
    # Copies, not undo arithmetic: w + δ − δ is not always w in floating point.
    saved = [t.detach().clone() for t in tensors]
    try:
        yield saved
    finally:
        for t, s in zip(tensors, saved):
            t.copy_(s)
