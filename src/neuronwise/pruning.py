"""Masks, magnitude thresholds and pruning schedules (METHODS.md §1, §6).

Convention: a pruning method acts on P, all parameters (weights and biases) of the chosen module
types (default Linear, Conv2d and BatchNorm2d, the LOBSTER set); W ⊂ P are the tensors named
``weight`` (BN γ included), from which threshold statistics are taken. A pruned entry is an exact
zero, and a :class:`ParameterMask` keeps it at zero through any optimizer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from neuronwise._utils import (
    by_device_and_dtype,
    check_fraction,
    check_int,
    check_modules,
    check_nonnegative,
    use_foreach,
)

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
GRANULARITIES = ("params", "neurons")

ParamsLike = nn.Module | Iterable[Tensor] | Iterable[dict]


def prunable_parameters(
    model: nn.Module, modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES
) -> list[tuple[str, nn.Parameter]]:
    """Named parameters of every module of a type in ``modules``, in ``named_modules()`` order.

    Names are qualified as in ``model.named_parameters()``; a shared parameter appears once.
    """
    modules = check_modules(modules)
    seen: set[int] = set()
    named = []
    for module_name, module in model.named_modules():
        if not isinstance(module, modules):
            continue
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                named.append((f"{module_name}.{name}" if module_name else name, param))
    return named


def resolve_parameters(
    model_or_params: ParamsLike, modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES
) -> list[Tensor]:
    """The tensors a method acts on: a model's prunable parameters, or the given parameters.

    Accepts an ``nn.Module`` (parameters of ``modules``), or, like ``torch.optim``, an iterable of
    tensors or of param-group dicts (only their ``"params"`` are used; ``modules`` is ignored).
    """
    if isinstance(model_or_params, nn.Module):
        params = [p for _, p in prunable_parameters(model_or_params, modules)]
        if not params:
            raise ValueError(
                f"Invalid model: it has no parameters in modules of type {check_modules(modules)}"
            )
        return params
    if isinstance(model_or_params, Tensor):
        raise TypeError(
            "Invalid params: a single Tensor (expected an iterable of tensors or dicts)"
        )
    params, seen = [], set()
    for item in model_or_params:
        group = item["params"] if isinstance(item, dict) else item
        for p in [group] if isinstance(group, Tensor) else group:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"Invalid params: element of type {type(p).__name__} (expected Tensor)"
                )
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("Invalid params: empty (expected at least one tensor)")
    return params


def _version(tensor: Tensor) -> int | None:
    """The in-place modification counter of ``tensor``; None for inference tensors (no counter)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class ParameterMask:
    """Keeps pruned parameters at exactly zero.

    ``granularity="params"`` (default, official LOBSTER): mask = (p ≠ 0) per entry.
    ``granularity="neurons"`` (SeReNe): a neuron, i.e. an output row of a Linear/Conv2d weight with
    its bias entry, is masked when its weight row is all zero (all entries == 0, METHODS.md §3
    DECISION; the official code tests ``sum == 0``). Other entries of Linear/Conv2d weights and
    biases stay free, as in the official neuron mask; parameters of other modules (BatchNorm2d)
    keep per-entry masks. ``"neurons"`` needs the model, to pair weights with biases.

    The mask changes only in :meth:`update` (rebuilt from the current zeros). Call :meth:`apply`
    after every optimizer step, or :meth:`attach` the mask to the optimizer: re-applying it after
    each step is what makes momentum, weight decay and Adam moments unable to move pruned entries.

    ``masks`` are boolean; :meth:`apply` multiplies by cached copies in the parameters' dtype
    (multiplying a float tensor by a bool one is several times slower on CPU) and skips tensors
    with nothing masked. The cache follows any change of ``masks``, in place or reassigned.
    """

    def __init__(
        self,
        model_or_params: ParamsLike,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        granularity: str = "params",
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"Invalid granularity: {granularity!r} (expected one of {GRANULARITIES})"
            )
        if granularity == "neurons" and not isinstance(model_or_params, nn.Module):
            raise ValueError(
                "Invalid granularity: 'neurons' needs a model (to pair weight rows with biases), "
                f"got {type(model_or_params).__name__}"
            )
        self.granularity = granularity
        self.params = resolve_parameters(model_or_params, modules)
        # (index of a Linear/Conv2d weight, index of its bias or None) within self.params
        self._neurons: list[tuple[int, int | None]] = []
        if granularity == "neurons":
            index = {id(p): i for i, p in enumerate(self.params)}
            for module in model_or_params.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module.weight) in index:
                    bias = module.bias
                    bias_index = index.get(id(bias)) if bias is not None else None
                    self._neurons.append((index[id(module.weight)], bias_index))
        self.masks = []
        self.update()

    @property
    def masks(self) -> list[Tensor]:
        return self._masks

    @masks.setter
    def masks(self, masks: list[Tensor]) -> None:
        self._masks = masks
        self._factors: list[Tensor | None] = []
        self._factors_key: list[tuple[int, int | None]] = []

    def _current_factors(self) -> list[Tensor | None]:
        """Per parameter: its mask in the parameter's dtype, or None where nothing is masked."""
        key = [(id(mask), _version(mask)) for mask in self._masks]
        if None in (version for _, version in key) or key != self._factors_key:
            self._factors = [None if bool(mask.all()) else mask.to(p.dtype)
                             for p, mask in zip(self.params, self._masks)]
            self._factors_key = key
        return self._factors

    @torch.no_grad()
    def update(self) -> None:
        """Rebuild the mask from the parameters' current zeros."""
        masks = [p != 0 for p in self.params]
        for weight_index, bias_index in self._neurons:
            weight = self.params[weight_index]
            alive = (weight.reshape(weight.shape[0], -1) != 0).any(dim=1)
            row_shape = (-1,) + (1,) * (weight.dim() - 1)
            masks[weight_index] = alive.view(row_shape).expand_as(weight).clone()
            if bias_index is not None:
                masks[bias_index] = alive.clone()
        self.masks = masks

    @torch.no_grad()
    def apply(self, foreach: bool | None = None) -> None:
        """Zero the masked entries: ``p.mul_(mask)``."""
        pairs = [(p, f) for p, f in zip(self.params, self._current_factors()) if f is not None]
        if not pairs:
            return
        params, factors = (list(t) for t in zip(*pairs))
        if use_foreach(foreach, params):
            for group_params, group_factors in by_device_and_dtype(params, factors):
                torch._foreach_mul_(group_params, group_factors)
        else:
            for p, factor in pairs:
                p.mul_(factor)

    @torch.no_grad()
    def violations(self) -> int:
        """How many masked entries are non-zero (0 while the mask is applied after every step)."""
        return sum(int(((p != 0) & ~mask).sum()) for p, mask in zip(self.params, self.masks))

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the gradients of masked entries (optional: :meth:`apply` alone keeps them at 0)."""
        for p, factor in zip(self.params, self._current_factors()):
            if p.grad is not None and factor is not None:
                p.grad.mul_(factor)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Re-apply the mask after every ``optimizer.step()``; returns the hook's removable handle."""
        return optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["granularity"] != self.granularity:
            raise ValueError(
                f"Invalid granularity: {state_dict['granularity']!r} in state_dict "
                f"(this mask has {self.granularity!r})"
            )
        masks = state_dict["masks"]
        if len(masks) != len(self.params):
            raise ValueError(f"Invalid masks: {len(masks)} tensors (expected {len(self.params)})")
        for i, (mask, p) in enumerate(zip(masks, self.params)):
            if mask.shape != p.shape:
                raise ValueError(
                    f"Invalid masks[{i}]: shape {tuple(mask.shape)} (expected {tuple(p.shape)})"
                )
        self.masks = [m.to(device=p.device, dtype=torch.bool) for m, p in zip(masks, self.params)]


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not threshold >= 0:
        raise ValueError(f"Invalid threshold: {threshold} (expected >= 0)")
    return threshold


@torch.no_grad()
def prune_below(params: Iterable[Tensor], threshold: float) -> None:
    """Set p = 0 where |p| < threshold, for every tensor (one global threshold, no per-layer scaling)."""
    threshold = _check_threshold(threshold)
    for p in params:
        p.masked_fill_(p.abs() < threshold, 0.0)


class ThresholdStats(NamedTuple):
    """Threshold candidates of METHODS.md §1 step 2, from the non-zero magnitudes of W."""

    mean: float  # mean over tensors of each tensor's mean non-zero |w|
    min: float  # smallest non-zero |w|
    max: float  # largest |w|


@torch.no_grad()
def threshold_statistics(named_params: Iterable[tuple[str, Tensor]]) -> ThresholdStats:
    """mean_T, min_T, max_T over the tensors named ``weight``, skipping all-zero tensors.

    Skipping follows the METHODS.md §1 DECISION (the official code yields NaN for them).
    """
    means, lows, highs = [], [], []
    for name, p in named_params:
        if name.rsplit(".", 1)[-1] != "weight":
            continue
        magnitudes = p.detach().abs()
        magnitudes = magnitudes[magnitudes != 0]
        if magnitudes.numel():
            means.append(magnitudes.double().mean().item())
            lows.append(magnitudes.min().item())
            highs.append(magnitudes.max().item())
    if not means:
        raise ValueError(
            "Invalid params: no non-zero tensor named 'weight' to take thresholds from"
        )
    return ThresholdStats(sum(means) / len(means), min(lows), max(highs))


@dataclass
class ThresholdResult:
    """Outcome of :func:`threshold_search`."""

    threshold: float  # T applied permanently
    loss_before: float  # L0, the loss of the model before pruning
    loss_after: float  # the loss after prune(T) (reported only; the search does not check it)
    trials: list[tuple[float, float]] = field(default_factory=list)  # (threshold, loss) per trial
    remaining: int = 0  # non-zero entries of P after pruning
    total: int = 0  # entries of P


def _clone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def _count_nonzero(params: Iterable[Tensor]) -> int:
    return sum(int(torch.count_nonzero(p)) for p in params)


@torch.no_grad()
def threshold_search(
    model: nn.Module,
    evaluate: Callable[[], float],
    params: Iterable[tuple[str, Tensor]] | None = None,
    tolerance: float = 0.05,
    safe: bool = False,
) -> ThresholdResult:
    """Largest global magnitude threshold whose validation loss stays within ``tolerance`` (TWT).

    The bisection of METHODS.md §1 (official LOBSTER ``threshold_scheduler``), on P = ``params``
    (named; default :func:`prunable_parameters` of ``model``) and W ⊂ P named ``weight``:

    1. L0 = ``evaluate()``; bound = L0·(1 + tolerance).
    2. mean_T, min_T, max_T from :func:`threshold_statistics`.
    3. L_m = loss after prune(mean_T). If L_m < bound: (a, L_a, b, L_b) = (mean_T, L_m, max_T, ∞),
       else (min_T, L0, mean_T, L_m).
    4. While |L_a − L_b| ≥ 0.05·bound: c = (a + b)/2; stop with a if |c_prev − c| ≤ 1e-10;
       L_c = loss after prune(c); c replaces a if L_c ≤ bound, else b.
    5. T = (a + b)/2 (``safe=True``: a, the largest threshold verified within the bound), applied
       permanently.

    After each trial the whole ``model.state_dict()`` (weights and buffers) is restored exactly.
    ``evaluate()`` returns the validation loss of the model as it currently is (in eval mode; under
    DDP, reduced over ranks by the caller so that every rank takes the same decisions). One more
    call after pruning fills ``loss_after``.
    """
    if not tolerance >= 0:
        raise ValueError(f"Invalid tolerance: {tolerance} (expected >= 0)")
    named = list(params) if params is not None else prunable_parameters(model)
    tensors = [p for _, p in named]
    snapshot = _clone_state(model.state_dict())
    trials: list[tuple[float, float]] = []

    def trial(threshold: float) -> float:
        prune_below(tensors, threshold)
        loss = float(evaluate())
        model.load_state_dict(snapshot)
        trials.append((threshold, loss))
        return loss

    loss_before = float(evaluate())
    # The official expression (not L0·(1 + tolerance)), so that decisions match bit for bit.
    bound = loss_before + loss_before * tolerance
    stats = threshold_statistics(named)
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

    prune_below(tensors, threshold)
    return ThresholdResult(
        threshold=threshold,
        loss_before=loss_before,
        loss_after=float(evaluate()),
        trials=trials,
        remaining=_count_nonzero(tensors),
        total=sum(p.numel() for p in tensors),
    )


def check_mask(mask: Any) -> ParameterMask | None:
    """``mask`` itself if it is a :class:`ParameterMask` or None, else a TypeError."""
    if mask is not None and not isinstance(mask, ParameterMask):
        raise TypeError(f"Invalid mask: {type(mask).__name__} (expected ParameterMask or None)")
    return mask


class PruneOnPlateau:
    """Prune by threshold bisection whenever the validation loss plateaus (LOBSTER, SeReNe).

    Call ``step(val_loss)`` once per epoch, after evaluating. Plateau detector of METHODS.md §1
    (patience PWE, ``plateau_tolerance`` 0.01): if val_loss < best·(1 + plateau_tolerance) the bad
    count resets and, if val_loss < best, best and ``best_state`` (a copy of
    ``model.state_dict()``) are updated; otherwise the bad count grows. When it reaches
    ``patience``, ``best_state`` is loaded (weights and BN buffers; the optimizer state is not
    restored), the detector resets and :func:`threshold_search` (``tolerance`` = TWT) prunes P, the
    parameters of ``modules``. So ``patience=0`` prunes every epoch, and only losses ≥ 1 % above
    the best since the last pruning count as bad.

    After every step the mask is rebuilt from the current zeros (official: each epoch; DECISION:
    also after each pruning) and applied. Pass the regularizer's mask, ``mask=reg.mask``, so that
    the regularizer keeps the new zeros; otherwise call ``pruner.mask.apply()`` after each
    optimizer step (or ``pruner.mask.attach(optimizer)``). If neither was done, pruned entries
    come back to life between epochs: ``step`` then warns once and zeroes them again before
    rebuilding the mask, so a pruning decision is never silently undone. ``granularity`` sets the
    kind of mask created when ``mask`` is None.

    ``val_loss`` and ``evaluate()`` are the caller's: under DDP, reduce them over ranks (e.g. with
    ``neuronwise.distributed.all_reduce_mean``) so that every rank prunes the same way.
    """

    def __init__(
        self,
        model: nn.Module,
        evaluate: Callable[[], float] | None = None,
        patience: int = 20,
        tolerance: float = 0.05,
        plateau_tolerance: float = 0.01,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        granularity: str = "params",
        safe_threshold: bool = False,
        mask: ParameterMask | None = None,
    ) -> None:
        self.patience = check_int("patience", patience, 0)
        self.tolerance = check_nonnegative("tolerance", tolerance)
        self.plateau_tolerance = check_nonnegative("plateau_tolerance", plateau_tolerance)
        self.safe_threshold = bool(safe_threshold)
        self.model = model
        self.evaluate = evaluate
        self.named_params = prunable_parameters(model, modules)
        if not self.named_params:
            raise ValueError(
                f"Invalid model: it has no parameters in modules of type {check_modules(modules)}"
            )
        self.mask = check_mask(mask) or ParameterMask(model, modules, granularity)
        self.best = math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.num_bad_epochs = 0
        self.last_epoch = 0
        self.history: list[dict[str, Any]] = []
        self._warned_revival = False

    def _improves(self, loss: float) -> bool:
        # best + best·tol is the official expression; the inf test avoids inf·0 = nan at tol = 0.
        return self.best == math.inf or loss < self.best + self.best * self.plateau_tolerance

    @torch.no_grad()
    def step(
        self, val_loss: float, evaluate: Callable[[], float] | None = None
    ) -> ThresholdResult | None:
        """Record this epoch's validation loss; prune on a plateau and return the search result."""
        loss = float(val_loss)
        if not math.isfinite(loss):
            raise ValueError(f"Invalid val_loss: {loss} (expected a finite number)")
        evaluate = evaluate if evaluate is not None else self.evaluate
        if evaluate is None:
            raise ValueError("Invalid evaluate: None (pass it to PruneOnPlateau or to step())")
        self.last_epoch += 1
        self._enforce_mask()
        if self._improves(loss):
            self.num_bad_epochs = 0
            if loss < self.best:
                self.best = loss
                self.best_state = _clone_state(self.model.state_dict())
        else:
            self.num_bad_epochs += 1

        result = None
        if self.num_bad_epochs >= self.patience:
            self.model.load_state_dict(self.best_state)
            self.best, self.best_state, self.num_bad_epochs = math.inf, None, 0
            result = threshold_search(
                self.model, evaluate, self.named_params, self.tolerance, self.safe_threshold
            )
            self.history.append(
                {
                    "epoch": self.last_epoch,
                    "threshold": result.threshold,
                    "loss_before": result.loss_before,
                    "loss_after": result.loss_after,
                    "remaining": result.remaining,
                    "total": result.total,
                }
            )
        self.mask.update()
        self.mask.apply()
        return result

    def _enforce_mask(self) -> None:
        revived = self.mask.violations()
        if revived == 0:
            return
        if not self._warned_revival:
            warnings.warn(
                f"PruneOnPlateau: {revived} pruned parameters are non-zero again, zeroing them; "
                "share the mask with the regularizer (mask=reg.mask) or apply pruner.mask after "
                "each optimizer step (pruner.mask.attach(optimizer))",
                stacklevel=3,
            )
            self._warned_revival = True
        self.mask.apply()

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "tolerance": self.tolerance,
            "plateau_tolerance": self.plateau_tolerance,
            "safe_threshold": self.safe_threshold,
            "best": self.best,
            "best_state": None if self.best_state is None else dict(self.best_state),
            "num_bad_epochs": self.num_bad_epochs,
            "last_epoch": self.last_epoch,
            "history": [dict(record) for record in self.history],
            "mask": self.mask.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.patience = check_int("patience", state_dict["patience"], 0)
        self.tolerance = check_nonnegative("tolerance", state_dict["tolerance"])
        self.plateau_tolerance = check_nonnegative(
            "plateau_tolerance", state_dict["plateau_tolerance"]
        )
        self.safe_threshold = bool(state_dict["safe_threshold"])
        self.best = float(state_dict["best"])
        best_state = state_dict["best_state"]
        self.best_state = None if best_state is None else dict(best_state)
        self.num_bad_epochs = int(state_dict["num_bad_epochs"])
        self.last_epoch = int(state_dict["last_epoch"])
        self.history = [dict(record) for record in state_dict["history"]]
        self.mask.load_state_dict(state_dict["mask"])


@torch.no_grad()
def _prune_to_sparsity(params: list[Tensor], sparsity: float) -> float:
    """Zero the round(sparsity·N) smallest-magnitude entries of ``params``; return the largest one.

    A stable sort breaks ties by position, so the count of zeros is exact (existing zeros, the
    smallest magnitudes, are part of it). Returns 0.0 when nothing is to be zeroed.
    """
    magnitudes = torch.cat([p.detach().abs().flatten().to(params[0].device) for p in params])
    count = round(sparsity * magnitudes.numel())
    if count == 0:
        return 0.0
    order = torch.argsort(magnitudes, stable=True)[:count]
    pruned = torch.zeros_like(magnitudes, dtype=torch.bool)
    pruned[order] = True
    for p, piece in zip(params, pruned.split([p.numel() for p in params])):
        p.masked_fill_(piece.view_as(p).to(p.device), 0.0)
    return magnitudes[order[-1]].item()


def global_magnitude_prune(
    model: nn.Module,
    sparsity: float,
    modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
    mask: ParameterMask | None = None,
) -> float:
    """One-shot global magnitude pruning: exactly round(sparsity·N) entries of P become zero.

    P = all parameters of ``modules`` (the LOBSTER tensor set, METHODS.md §6), N its size; the
    smallest magnitudes go first, ties by position. Updates ``mask`` if given. Returns the
    largest pruned magnitude (0.0 if none).
    """
    sparsity = check_fraction("sparsity", sparsity)
    threshold = _prune_to_sparsity(resolve_parameters(model, modules), sparsity)
    if check_mask(mask) is not None:
        mask.update()
    return threshold


class IterativeMagnitudePruning:
    """Iterative magnitude pruning (Han et al., 2015) with global ranking over P.

    Call ``step()`` once per epoch, after training. Every ``every`` epochs a round zeroes a
    ``fraction`` of the surviving entries, so after r rounds the sparsity of P is
    1 − (1 − fraction)^r (capped at ``final_sparsity``; no more rounds once it is reached).
    Between rounds the model fine-tunes with ``self.mask`` applied after each optimizer step
    (``pruner.mask.attach(optimizer)``).
    """

    def __init__(
        self,
        model: nn.Module,
        fraction: float = 0.2,
        every: int = 1,
        final_sparsity: float | None = None,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        mask: ParameterMask | None = None,
    ) -> None:
        self.fraction = check_fraction("fraction", fraction)
        self.every = check_int("every", every, 1)
        self.final_sparsity = (
            None if final_sparsity is None else check_fraction("final_sparsity", final_sparsity)
        )
        self.params = resolve_parameters(model, modules)
        self.mask = check_mask(mask) or ParameterMask(model, modules)
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
        _prune_to_sparsity(self.params, target)
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
        self.fraction = check_fraction("fraction", state_dict["fraction"])
        self.every = check_int("every", state_dict["every"], 1)
        final = state_dict["final_sparsity"]
        self.final_sparsity = None if final is None else check_fraction("final_sparsity", final)
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
    optimizer step (``pruner.mask.attach(optimizer)``).
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
        _prune_to_sparsity(self.params, sparsity)
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
        self.final_sparsity = check_fraction("final_sparsity", state_dict["final_sparsity"])
        self.initial_sparsity = check_fraction("initial_sparsity", state_dict["initial_sparsity"])
        self.start_step = check_int("start_step", state_dict["start_step"], 0)
        self.frequency = check_int("frequency", state_dict["frequency"], 1)
        self.num_updates = check_int("num_updates", state_dict["num_updates"], 1)
        self.last_step = int(state_dict["last_step"])
        self.mask.load_state_dict(state_dict["mask"])
