"""Global threshold pruning and the LOBSTER threshold bisection (METHODS.md §1).

Entries are ranked by a parameter importance (default |w|, :mod:`.importance`): pruning at
threshold T zeroes every entry whose score is below T, one global T for all tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from neuronwise._utils import clone_state
from neuronwise.masks import prunable_parameters

from .importance import ParameterImportance, magnitude, parameter_scores


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not threshold >= 0:
        raise ValueError(f"Invalid threshold: {threshold} (expected >= 0)")
    return threshold


@torch.no_grad()
def prune_below(
    params: Iterable[Tensor], threshold: float, importance: ParameterImportance = magnitude
) -> None:
    """Set p = 0 where importance(p) < threshold (|p| by default), for every tensor.

    One global threshold, no per-layer scaling.
    """
    threshold = _check_threshold(threshold)
    for p in params:
        p.masked_fill_(parameter_scores(importance, p) < threshold, 0.0)


class ThresholdStats(NamedTuple):
    """Threshold candidates of METHODS.md §1 step 2, from the non-zero scores (|w|) of W."""

    mean: float  # mean over tensors of each tensor's mean non-zero score
    min: float  # smallest non-zero score
    max: float  # largest score


def _statistics(named_scores: Iterable[tuple[str, Tensor]]) -> ThresholdStats:
    means, lows, highs = [], [], []
    for name, scores in named_scores:
        if name.rsplit(".", 1)[-1] != "weight":
            continue
        scores = scores[scores != 0]
        if scores.numel():
            means.append(scores.double().mean().item())
            lows.append(scores.min().item())
            highs.append(scores.max().item())
    if not means:
        raise ValueError(
            "Invalid params: no non-zero tensor named 'weight' to take thresholds from"
        )
    return ThresholdStats(sum(means) / len(means), min(lows), max(highs))


@torch.no_grad()
def threshold_statistics(
    named_params: Iterable[tuple[str, Tensor]], importance: ParameterImportance = magnitude
) -> ThresholdStats:
    """mean_T, min_T, max_T of the scores (default |w|) of the tensors named ``weight``.

    Zero scores are left out, and all-zero tensors skipped (METHODS.md §1 DECISION; the official
    code yields NaN for them).
    """
    return _statistics((name, parameter_scores(importance, p)) for name, p in named_params)


@dataclass
class ThresholdResult:
    """Outcome of :func:`threshold_search`."""

    threshold: float  # T applied permanently
    loss_before: float  # L0, the loss of the model before pruning
    loss_after: float  # the loss after prune(T) (reported only; the search does not check it)
    trials: list[tuple[float, float]] = field(default_factory=list)  # (threshold, loss) per trial
    remaining: int = 0  # non-zero entries of P after pruning
    total: int = 0  # entries of P


@torch.no_grad()
def threshold_search(
    model: nn.Module,
    evaluate: Callable[[], float],
    params: Iterable[tuple[str, Tensor]] | None = None,
    tolerance: float = 0.05,
    safe: bool = False,
    importance: ParameterImportance = magnitude,
) -> ThresholdResult:
    """Largest global threshold whose validation loss stays within ``tolerance`` (TWT).

    The bisection of METHODS.md §1 (official LOBSTER ``threshold_scheduler``), on P = ``params``
    (named; default :func:`prunable_parameters` of ``model``) and W ⊂ P named ``weight``, with
    prune(T) zeroing the entries whose score s = ``importance(p)`` (default |p|) is below T:

    1. L0 = ``evaluate()``; bound = L0·(1 + tolerance).
    2. mean_T, min_T, max_T from :func:`threshold_statistics` of the scores.
    3. L_m = loss after prune(mean_T). If L_m < bound: (a, L_a, b, L_b) = (mean_T, L_m, max_T, ∞),
       else (min_T, L0, mean_T, L_m).
    4. While |L_a − L_b| ≥ 0.05·bound: c = (a + b)/2; stop with a if |c_prev − c| ≤ 1e-10;
       L_c = loss after prune(c); c replaces a if L_c ≤ bound, else b.
    5. T = (a + b)/2 (``safe=True``: a, the largest threshold verified within the bound), applied
       permanently.

    Scores are taken once, before the first trial. After each trial the whole
    ``model.state_dict()`` (weights and buffers) is restored exactly. ``evaluate()`` returns the
    validation loss of the model as it currently is (in eval mode; under DDP, reduced over ranks
    by the caller so that every rank takes the same decisions). One more call after pruning fills
    ``loss_after``.
    """
    if not tolerance >= 0:
        raise ValueError(f"Invalid tolerance: {tolerance} (expected >= 0)")
    named = list(params) if params is not None else prunable_parameters(model)
    tensors = [p for _, p in named]
    scores = [parameter_scores(importance, p) for p in tensors]
    snapshot = clone_state(model.state_dict())
    trials: list[tuple[float, float]] = []

    def prune(threshold: float) -> None:
        for p, s in zip(tensors, scores):
            p.masked_fill_(s < threshold, 0.0)

    def trial(threshold: float) -> float:
        prune(threshold)
        loss = float(evaluate())
        model.load_state_dict(snapshot)
        trials.append((threshold, loss))
        return loss

    loss_before = float(evaluate())
    # The official expression (not L0·(1 + tolerance)), so that decisions match bit for bit.
    bound = loss_before + loss_before * tolerance
    stats = _statistics((name, s) for (name, _), s in zip(named, scores))
    loss_mean = trial(stats.mean)
    if loss_mean < bound:
        a, loss_a, b, loss_b = stats.mean, loss_mean, stats.max, math.inf
    else:
        a, loss_a, b, loss_b = stats.min, loss_before, stats.mean, loss_mean

    previous = math.inf
    while abs(loss_a - loss_b) >= 0.05 * bound:
        center = (a + b) / 2
        if abs(previous - center) <= 1e-10:
            threshold = a
            break
        previous = center
        loss = trial(center)
        if loss <= bound:
            a, loss_a = center, loss
        else:
            b, loss_b = center, loss
    else:
        threshold = a if safe else (a + b) / 2

    prune(threshold)
    return ThresholdResult(
        threshold=threshold,
        loss_before=loss_before,
        loss_after=float(evaluate()),
        trials=trials,
        remaining=sum(int(torch.count_nonzero(p)) for p in tensors),
        total=sum(p.numel() for p in tensors),
    )
