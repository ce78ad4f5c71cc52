"""Prune on a plateau of the validation loss: LOBSTER's and SeReNe's schedule (METHODS.md §1)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from neuronwise._utils import (
    check_int,
    check_modules,
    check_nonnegative,
    clone_state,
    load_hyperparameters,
    unwrap,
)
from neuronwise.masks import PRUNABLE_MODULES, ParameterMask, check_mask, prunable_parameters

from .importance import ParameterImportance, magnitude
from .threshold import ThresholdResult, threshold_search


class PruneOnPlateau:
    """Prune by threshold bisection whenever the validation loss plateaus (LOBSTER, SeReNe).

    Call ``step(val_loss)`` once per epoch, after evaluating. Plateau detector of METHODS.md §1
    (patience PWE, ``plateau_tolerance`` 0.01): if val_loss < best·(1 + plateau_tolerance) the bad
    count resets and, if val_loss < best, best and ``best_state`` (a copy of
    ``model.state_dict()``) are updated; otherwise the bad count grows. When it reaches
    ``patience``, ``best_state`` is loaded (weights and BN buffers; the optimizer state is not
    restored), the detector resets and :func:`threshold_search` (``tolerance`` = TWT) prunes P, the
    parameters of ``modules``, ranked by ``importance`` (default |w|, see :mod:`.importance`). So
    ``patience=0`` prunes every epoch, and only losses ≥ 1 % above the best since the last pruning
    count as bad.

    After every step the mask is rebuilt from the current zeros (official: each epoch; DECISION:
    also after each pruning) and applied. Pass the regularizer's mask, ``mask=reg.mask``, so that
    the regularizer keeps the new zeros; otherwise call ``pruner.mask.apply()`` after each
    optimizer step (or ``pruner.mask.attach(optimizer)``). If neither was done, pruned entries
    come back to life between epochs: ``step`` then warns once and zeroes them again before
    rebuilding the mask, so a pruning decision is never silently undone. ``granularity`` sets the
    kind of mask created when ``mask`` is None (default ``"params"``); with ``mask`` given it may
    only repeat the mask's own granularity (a mismatch is an error, never silently ignored); with ``granularity="neurons"``, ``example_input``
    (an input batch of the model) couples the neurons that ``simplify`` can only remove together
    (a residual stream's channel in every conv writing it, depthwise pairs): they are masked when
    all of them are dead (:class:`~neuronwise.pruning.ParameterMask`). Pass it for residual or
    depthwise models (torchvision ResNets, MobileNets); plain chains (LeNets, VGG) mask the same
    without it.

    ``val_loss`` and ``evaluate()`` are the caller's: under DDP, reduce them over ranks (e.g. with
    ``neuronwise.distributed.all_reduce_mean``) so that every rank prunes the same way.

    ``state_dict`` holds the hyperparameters (patience, tolerance, plateau_tolerance,
    safe_threshold) with the detector's state and the mask; ``importance`` is code, not state:
    pass it to the constructor again when resuming.
    """

    def __init__(
        self,
        model: nn.Module,
        evaluate: Callable[[], float] | None = None,
        patience: int = 20,
        tolerance: float = 0.05,
        plateau_tolerance: float = 0.01,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        granularity: str | None = None,
        safe_threshold: bool = False,
        mask: ParameterMask | None = None,
        importance: ParameterImportance = magnitude,
        example_input: Tensor | None = None,
    ) -> None:
        self.patience = check_int("patience", patience, 0)
        self.tolerance = check_nonnegative("tolerance", tolerance)
        self.plateau_tolerance = check_nonnegative("plateau_tolerance", plateau_tolerance)
        self.safe_threshold = bool(safe_threshold)
        self.importance = importance
        self.model = unwrap(model)  # best_state keys as an uncompiled model's
        self.evaluate = evaluate
        self.named_params = prunable_parameters(model, modules)
        if not self.named_params:
            raise ValueError(
                f"Invalid model: it has no parameters in modules of type {check_modules(modules)}"
            )
        if mask is not None and example_input is not None:
            raise ValueError(
                "Invalid example_input: it shapes the mask this pruner creates, but mask is given "
                "(build that mask with example_input instead)"
            )
        if mask is not None and granularity not in (None, check_mask(mask).granularity):
            raise ValueError(
                f"Invalid granularity: {granularity!r}, but the given mask is "
                f"{mask.granularity!r} (build the shared mask with granularity={granularity!r})"
            )
        self.mask = check_mask(mask) or ParameterMask(
            model, modules, granularity or "params", example_input=example_input
        )
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
                self.best_state = clone_state(self.model.state_dict())
        else:
            self.num_bad_epochs += 1

        result = None
        if self.num_bad_epochs >= self.patience:
            self.model.load_state_dict(self.best_state)
            self.best, self.best_state, self.num_bad_epochs = math.inf, None, 0
            result = threshold_search(
                self.model,
                evaluate,
                self.named_params,
                self.tolerance,
                self.safe_threshold,
                self.importance,
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
            self.mask.update()  # rebuilt after each pruning (METHODS.md §1)
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
        load_hyperparameters(self, state_dict, {
            "patience": lambda value: check_int("patience", value, 0),
            "tolerance": lambda value: check_nonnegative("tolerance", value),
            "plateau_tolerance": lambda value: check_nonnegative("plateau_tolerance", value),
            "safe_threshold": bool,
        })
        self.best = float(state_dict["best"])
        best_state = state_dict["best_state"]
        self.best_state = None if best_state is None else dict(best_state)
        self.num_bad_epochs = int(state_dict["num_bad_epochs"])
        self.last_epoch = int(state_dict["last_epoch"])
        self.history = [dict(record) for record in state_dict["history"]]
        self.mask.load_state_dict(state_dict["mask"])
