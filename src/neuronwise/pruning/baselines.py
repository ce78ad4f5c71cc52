"""Magnitude-pruning baselines with global ranking over P (METHODS.md §6).

One-shot (:func:`global_magnitude_prune`), iterative (Han et al., 2015) and gradual (Zhu & Gupta,
2017) schedules; each ranks the entries of P by a parameter importance (default |w|,
:mod:`.importance`) and keeps the pruned ones at zero with a :class:`ParameterMask`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from neuronwise._utils import check_fraction, check_int, load_hyperparameters
from neuronwise.masks import PRUNABLE_MODULES, ParameterMask, check_mask, resolve_parameters

from .importance import ParameterImportance, magnitude, parameter_scores


@torch.no_grad()
def prune_to_sparsity(
    params: list[Tensor], sparsity: float, importance: ParameterImportance = magnitude
) -> float:
    """Zero the round(sparsity·N) lowest-scored entries of ``params``; return the largest such score.

    Scores are ``importance(p)`` (default |p|), ranked globally over all N entries. A stable sort
    breaks ties by position, so the count of zeros is exact (existing zeros, the smallest
    magnitudes, are part of it). Returns 0.0 when nothing is to be zeroed.
    """
    scores = torch.cat(
        [parameter_scores(importance, p).flatten().to(params[0].device) for p in params]
    )
    count = round(sparsity * scores.numel())
    if count == 0:
        return 0.0
    order = torch.argsort(scores, stable=True)[:count]
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    pruned[order] = True
    for p, piece in zip(params, pruned.split([p.numel() for p in params])):
        p.masked_fill_(piece.view_as(p).to(p.device), 0.0)
    return scores[order[-1]].item()


def global_magnitude_prune(
    model: nn.Module,
    sparsity: float,
    modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
    mask: ParameterMask | None = None,
    importance: ParameterImportance = magnitude,
) -> float:
    """One-shot global magnitude pruning: exactly round(sparsity·N) entries of P become zero.

    P = all parameters of ``modules`` (the LOBSTER tensor set, METHODS.md §6), N its size; the
    lowest scores (``importance``, default |w|) go first, ties by position. Updates ``mask`` if
    given. Returns the largest pruned score (0.0 if none).
    """
    sparsity = check_fraction("sparsity", sparsity)
    threshold = prune_to_sparsity(resolve_parameters(model, modules), sparsity, importance)
    if check_mask(mask) is not None:
        mask.update()
    return threshold


class IterativeMagnitudePruning:
    """Iterative magnitude pruning (Han et al., 2015) with global ranking over P.

    Call ``step()`` once per epoch, after training. Every ``every`` epochs a round zeroes a
    ``fraction`` of the surviving entries, so after r rounds the sparsity of P is
    1 − (1 − fraction)^r (capped at ``final_sparsity``; no more rounds once it is reached).
    Between rounds the model fine-tunes with ``self.mask`` applied after each optimizer step
    (``pruner.mask.attach(optimizer)``). Entries are ranked by ``importance`` (default |w|);
    ``prune``, if given, replaces that ranking: ``prune(target)`` brings the model to the target
    fraction its own way (e.g. whole neurons, :func:`neuronwise.l1_structured_prune`, with a
    neuron ``mask``).
    """

    def __init__(
        self,
        model: nn.Module,
        fraction: float = 0.2,
        every: int = 1,
        final_sparsity: float | None = None,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        mask: ParameterMask | None = None,
        importance: ParameterImportance = magnitude,
        prune: Callable[[float], object] | None = None,
    ) -> None:
        self.fraction = check_fraction("fraction", fraction)
        self.every = check_int("every", every, 1)
        self.final_sparsity = (
            None if final_sparsity is None else check_fraction("final_sparsity", final_sparsity)
        )
        self.params = resolve_parameters(model, modules)
        self.mask = check_mask(mask) or ParameterMask(model, modules)
        self.importance = importance
        self.prune = prune or (lambda s: prune_to_sparsity(self.params, s, self.importance))
        self.last_epoch = 0
        self.rounds = 0
        self.sparsity = 0.0

    @torch.no_grad()
    def step(self) -> float | None:
        """Advance one epoch; on a pruning epoch prune and return the new target sparsity."""
        self.last_epoch += 1
        if self.last_epoch % self.every:
            return None
        if self.final_sparsity is not None and self.sparsity >= self.final_sparsity:
            return None
        target = 1.0 - (1.0 - self.fraction) ** (self.rounds + 1)
        if self.final_sparsity is not None:
            target = min(target, self.final_sparsity)
        self.prune(target)
        self.mask.update()
        self.rounds += 1
        self.sparsity = target
        return target

    def state_dict(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "every": self.every,
            "final_sparsity": self.final_sparsity,
            "last_epoch": self.last_epoch,
            "rounds": self.rounds,
            "sparsity": self.sparsity,
            "mask": self.mask.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_hyperparameters(self, state_dict, {
            "fraction": lambda value: check_fraction("fraction", value),
            "every": lambda value: check_int("every", value, 1),
            "final_sparsity": lambda value: (
                None if value is None else check_fraction("final_sparsity", value)
            ),
        })
        self.last_epoch = int(state_dict["last_epoch"])
        self.rounds = int(state_dict["rounds"])
        self.sparsity = float(state_dict["sparsity"])
        self.mask.load_state_dict(state_dict["mask"])


class GradualMagnitudePruning:
    """Gradual magnitude pruning (Zhu & Gupta, 2017) with global ranking over P.

    Cubic schedule, with t0 = ``start_step``, Δt = ``frequency``, n = ``num_updates``::

        s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(n·Δt))³,   t0 ≤ t ≤ t0 + n·Δt

    Call ``step()`` once per training iteration (or per epoch, with t counted in epochs); the
    first call is t = 0. At t = t0, t0 + Δt, …, t0 + n·Δt the model is pruned to s_t (so s_i at
    t0 and s_f at the end); other calls do nothing. Between updates apply ``self.mask`` after each
    optimizer step (``pruner.mask.attach(optimizer)``). Entries are ranked by ``importance``
    (default |w|), or ``prune(s_t)`` prunes instead (as in :class:`IterativeMagnitudePruning`).
    """

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        frequency: int = 100,
        num_updates: int = 10,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        mask: ParameterMask | None = None,
        importance: ParameterImportance = magnitude,
        prune: Callable[[float], object] | None = None,
    ) -> None:
        self.final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"Invalid initial_sparsity: {initial_sparsity} "
                f"(expected <= final_sparsity = {final_sparsity})"
            )
        self.start_step = check_int("start_step", start_step, 0)
        self.frequency = check_int("frequency", frequency, 1)
        self.num_updates = check_int("num_updates", num_updates, 1)
        self.params = resolve_parameters(model, modules)
        self.mask = check_mask(mask) or ParameterMask(model, modules)
        self.importance = importance
        self.prune = prune or (lambda s: prune_to_sparsity(self.params, s, self.importance))
        self.last_step = -1

    def sparsity_at(self, t: int) -> float:
        """s_t of the cubic schedule, with t clamped to [t0, t0 + n·Δt]."""
        span = self.num_updates * self.frequency
        progress = min(max((t - self.start_step) / span, 0.0), 1.0)
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3
        )

    @torch.no_grad()
    def step(self) -> float | None:
        """Advance one step; on an update step prune to s_t and return it."""
        self.last_step += 1
        t = self.last_step - self.start_step
        if t < 0 or t > self.num_updates * self.frequency or t % self.frequency:
            return None
        sparsity = self.sparsity_at(self.last_step)
        self.prune(sparsity)
        self.mask.update()
        return sparsity

    def state_dict(self) -> dict[str, Any]:
        return {
            "final_sparsity": self.final_sparsity,
            "initial_sparsity": self.initial_sparsity,
            "start_step": self.start_step,
            "frequency": self.frequency,
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "mask": self.mask.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_hyperparameters(self, state_dict, {
            "final_sparsity": lambda value: check_fraction("final_sparsity", value),
            "initial_sparsity": lambda value: check_fraction("initial_sparsity", value),
            "start_step": lambda value: check_int("start_step", value, 0),
            "frequency": lambda value: check_int("frequency", value, 1),
            "num_updates": lambda value: check_int("num_updates", value, 1),
        })
        self.last_step = int(state_dict["last_step"])
        self.mask.load_state_dict(state_dict["mask"])
