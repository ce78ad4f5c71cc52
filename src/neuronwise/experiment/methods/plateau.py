"""PruneOnPlateau (METHODS.md §1–2): a global magnitude threshold when the validation loss stalls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

import neuronwise as nw

from .base import MethodCallback, MethodContext, Metric, stand_in
from .registry import register
from .schedules import PruningConfig


class PlateauPruningCallback(MethodCallback):
    """Runs :class:`neuronwise.PruneOnPlateau` on each epoch's validation loss.

    A plateau of ``patience`` epochs triggers the threshold bisection, which evaluates the
    validation loss once per trial (``evaluate``, default the loop's ``validation_loss``). With
    ``regularizer`` (a method callback with a ``mask``, e.g. LOBSTER or SeReNe) the pruner shares
    its mask and, by default, its module types; a ``granularity`` other than that mask's replaces
    the regularizer's mask by one of that granularity (coupled on the loop's example input); without it the mask is applied here after every
    optimizer step. ``kwargs`` go to ``PruneOnPlateau`` (``plateau_tolerance``, ``granularity``,
    ``safe_threshold``, ``importance``, ``example_input``); a neuron mask created here couples
    neurons on the loop's example input by default (see ``ParameterMask``).
    """

    metrics = (
        Metric("pruned", "a pruning happened at the end of this epoch", summary="count",
               summary_label="pruning events", console="pruned at T={threshold:.3g}"),
        Metric("threshold", "magnitude threshold of the pruning"),
        Metric("prune_loss_before", "validation loss before the pruning"),
        Metric("prune_loss_after", "validation loss after the pruning"),
    )

    def __init__(self, patience: int = 20, tolerance: float = 0.05,
                 regularizer: MethodCallback | None = None,
                 evaluate: Callable[[], float] | None = None,
                 modules: tuple[type[nn.Module], ...] | None = None, **kwargs: Any) -> None:
        super().__init__()
        if regularizer is not None and not isinstance(regularizer, MethodCallback):
            raise TypeError(f"Invalid regularizer: {type(regularizer).__name__} (expected a "
                            "method callback or None)")
        self.regularizer = regularizer
        self.evaluate = evaluate
        self._modules = modules
        self.kwargs = {"patience": patience, "tolerance": tolerance, **kwargs}
        # validates before training starts (an example input belongs to the real model)
        nw.PruneOnPlateau(stand_in(), **{k: v for k, v in self.kwargs.items()
                                         if k != "example_input"})

    @classmethod
    def from_config(cls, config: PruningConfig,
                    regularizer: MethodCallback | None = None) -> PlateauPruningCallback:
        return cls(patience=config.patience, tolerance=config.tolerance,
                   plateau_tolerance=config.plateau_tolerance, granularity=config.granularity,
                   safe_threshold=config.safe_threshold, regularizer=regularizer,
                   importance=nw.pruning.get_importance(config.importance))

    @property
    def modules(self) -> tuple[type[nn.Module], ...]:
        return shared_modules(self._modules, self.regularizer)

    @property
    def mask(self) -> Any:
        return self.method.mask if self.method is not None else None

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        kwargs = dict(self.kwargs)
        granularity = kwargs.get("granularity")
        coupled = granularity == "neurons" and context.example_input is not None
        self.shared_mask = self.regularizer.mask if self.regularizer is not None else None
        if self.shared_mask is not None and granularity not in (None, self.shared_mask.granularity):
            # the run's pruning granularity decides the mask the regularizer shares with the pruner
            self.shared_mask = nw.ParameterMask(
                context.model, self.modules, granularity,
                zeros_at_start=self.shared_mask.zeros_at_start,
                example_input=context.example_input if coupled else None)
            self.regularizer.method.mask = self.shared_mask
        elif self.shared_mask is None and coupled:
            # coupled neurons: a residual stream's channel is masked only when it can go
            kwargs.setdefault("example_input", context.example_input)
        self.method = nw.PruneOnPlateau(
            context.model, evaluate=self.evaluate or context.validation_loss,
            modules=self.modules, mask=self.shared_mask, **kwargs)

    def after_optimizer_step(self) -> None:
        # A regularizer applies its own (shared) mask; alone, the pruner's mask is applied here.
        if self.shared_mask is None:
            self.method.mask.apply()

    def on_epoch_end(self, record: dict) -> None:
        result = self.method.step(record["val_loss"])
        record["pruned"] = result is not None
        if result is not None:
            record["threshold"] = float(result.threshold)
            record["prune_loss_before"] = float(result.loss_before)
            record["prune_loss_after"] = float(result.loss_after)


def shared_modules(modules: tuple[type[nn.Module], ...] | None,
                   regularizer: MethodCallback | None) -> tuple[type[nn.Module], ...]:
    """The module types a schedule prunes: given, else its regularizer's, else the default set."""
    if modules is not None:
        return tuple(modules)
    if regularizer is not None and regularizer.modules is not None:
        return regularizer.modules
    return nw.pruning.PRUNABLE_MODULES


register("plateau", PlateauPruningCallback, kind="pruning", needs_validation=True)
