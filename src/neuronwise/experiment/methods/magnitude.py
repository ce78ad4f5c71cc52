"""Magnitude baselines: one-shot (+ masked fine-tuning), iterative (Han et al. 2015) or gradual
(Zhu & Gupta 2017), a global ranking over the method's prunable parameters; with granularity
``neurons`` the same schedules prune whole neurons (structured baselines): row-L1 norms (Li et al.
2017, :func:`neuronwise.l1_structured_prune`) or Torch-Pruning's group L1
(:func:`neuronwise.structured_tp.tp_group_l1_prune`), a neuron mask holding them at zero."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from torch import Tensor, nn

import neuronwise as nw
from neuronwise.structured_tp import load_torch_pruning, tp_group_l1_prune

from .base import MethodCallback, MethodContext, Metric
from .plateau import shared_modules
from .registry import register
from .schedules import PruningConfig

KINDS = ("oneshot", "iterative", "gradual")
NEURON_RANKINGS = ("l1-layer", "l1-global", "l1-groups", "tp-group-l1")


class MagnitudePruningCallback(MethodCallback):
    """Prunes to ``sparsity`` by global magnitude: once after ``start_epoch`` (0: before
    training), or ``fraction`` of the survivors every ``every`` epochs (iterative), or along the
    cubic schedule from ``start_epoch`` to ``end_epoch`` (gradual), lowest ``importance`` first
    (default |w|). The mask is shared with ``regularizer`` if given, else applied here after every
    optimizer step.

    ``granularity="neurons"``: ``sparsity`` (and the iterative ``fraction``) count dead neurons of
    the Linear/Conv2d layers but the classifier, ranked by ``neuron_ranking``: ``l1-layer``/
    ``l1-global``/``l1-groups`` = :func:`neuronwise.l1_structured_prune` with that scope,
    ``tp-group-l1`` = :func:`~neuronwise.structured_tp.tp_group_l1_prune` (per layer); the mask
    is then a neuron mask."""

    metrics = (Metric("target_sparsity", "target fraction of zeros (granularity neurons: of dead "
                      "neurons) of this epoch's pruning"),)

    def __init__(self, kind: Literal["oneshot", "iterative", "gradual"], sparsity: float = 0.9,
                 fraction: float = 0.2, start_epoch: int = 0, end_epoch: int = 10, every: int = 1,
                 regularizer: MethodCallback | None = None,
                 modules: tuple[type[nn.Module], ...] | None = None,
                 importance: Callable[[Tensor], Tensor] = nw.pruning.magnitude,
                 granularity: Literal["params", "neurons"] = "params",
                 neuron_ranking: str = "l1-layer") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Invalid kind: {kind!r} (expected one of {list(KINDS)})")
        if granularity not in nw.masks.GRANULARITIES:
            raise ValueError(f"Invalid granularity: {granularity!r} "
                             f"(expected one of {list(nw.masks.GRANULARITIES)})")
        if neuron_ranking not in NEURON_RANKINGS:
            raise ValueError(f"Invalid neuron_ranking: {neuron_ranking!r} "
                             f"(expected one of {list(NEURON_RANKINGS)})")
        if granularity == "neurons" and importance is not nw.pruning.magnitude:
            raise ValueError("Invalid importance with granularity 'neurons': whole neurons are "
                             "ranked by neuron_ranking (expected importance magnitude)")
        if granularity == "neurons" and neuron_ranking == "tp-group-l1":
            load_torch_pruning()  # a missing extra fails now, before training
        self.granularity, self.neuron_ranking = granularity, neuron_ranking
        self.kind = kind
        self.sparsity, self.fraction = sparsity, fraction
        self.start_epoch, self.end_epoch, self.every = start_epoch, end_epoch, every
        self.regularizer = regularizer
        self._modules = modules
        self.importance = importance
        self.done = False

    @classmethod
    def from_config(cls, config: PruningConfig,
                    regularizer: MethodCallback | None = None) -> MagnitudePruningCallback:
        return cls(config.schedule, sparsity=config.sparsity, fraction=config.fraction,
                   start_epoch=config.start_epoch, end_epoch=config.end_epoch,
                   every=config.every, regularizer=regularizer,
                   importance=nw.pruning.get_importance(config.importance),
                   granularity=config.granularity, neuron_ranking=config.neuron_ranking)

    @property
    def modules(self) -> tuple[type[nn.Module], ...]:
        return shared_modules(self._modules, self.regularizer)

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        shared = self.regularizer.mask if self.regularizer is not None else None
        if shared is not None and shared.granularity != self.granularity:
            raise ValueError(f"Invalid granularity: {self.granularity!r} differs from the "
                             f"{shared.granularity!r} mask of the method it shares")
        self.apply_mask = shared is None
        coupled = self.granularity == "neurons" and self.neuron_ranking == "l1-groups"
        self.shared_mask = shared or nw.ParameterMask(
            context.model, self.modules, self.granularity,
            example_input=context.example_input if coupled else None)
        model, mask, modules = context.model, self.shared_mask, self.modules
        prune = self._prune_neurons if self.granularity == "neurons" else None
        if self.kind == "iterative":
            self.method = nw.IterativeMagnitudePruning(
                model, fraction=self.fraction, every=self.every,
                final_sparsity=self.sparsity, modules=modules, mask=mask,
                importance=self.importance, prune=prune)
        elif self.kind == "gradual":
            self.method = nw.GradualMagnitudePruning(
                model, final_sparsity=self.sparsity, start_step=self.start_epoch,
                frequency=self.every,
                num_updates=max(1, (self.end_epoch - self.start_epoch) // self.every),
                modules=modules, mask=mask, importance=self.importance, prune=prune)

    @property
    def mask(self):
        return getattr(self, "shared_mask", None)

    def on_fit_start(self) -> None:
        # One-shot at start_epoch 0 prunes the (e.g. pretrained, model.init_from) model up front.
        if self.kind == "oneshot" and self.start_epoch == 0 and not self.done:
            self._prune_once()

    def _prune_once(self) -> None:
        if self.granularity == "neurons":
            self._prune_neurons(self.sparsity)
            self.shared_mask.update()
        else:
            nw.global_magnitude_prune(self.context.model, self.sparsity, modules=self.modules,
                                      mask=self.shared_mask, importance=self.importance)
        self.done = True

    def _prune_neurons(self, fraction: float) -> None:
        """Whole neurons of the Linear/Conv2d layers but the classifier, to ``fraction`` dead
        (kept below 1: every layer keeps a neuron)."""
        fraction = min(fraction, 1.0 - 1e-9)
        model, example = self.context.model, self.context.example_input
        if self.neuron_ranking == "tp-group-l1":
            tp_group_l1_prune(model, fraction, example)
        else:
            nw.l1_structured_prune(model, fraction, scope=self.neuron_ranking.removeprefix("l1-"),
                                   example_input=example)

    def after_optimizer_step(self) -> None:
        if self.apply_mask:
            self.shared_mask.apply()

    def on_epoch_end(self, record: dict) -> None:
        if self.kind == "oneshot":
            if not self.done and record["epoch"] >= self.start_epoch:
                self._prune_once()
                record["target_sparsity"] = self.sparsity
            return
        target = self.method.step()
        if target is not None:
            record["target_sparsity"] = target

    def state_dict(self) -> dict:
        if self.kind == "oneshot":
            return {"done": self.done, "mask": self.shared_mask.state_dict()}
        return self.method.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.kind == "oneshot":
            self.done = bool(state["done"])
            self.shared_mask.load_state_dict(state["mask"])
        else:
            self.method.load_state_dict(state)

    def teardown(self) -> None:
        pass  # the schedules hold no hooks


for _kind in KINDS:
    register(_kind, MagnitudePruningCallback, kind="pruning")
