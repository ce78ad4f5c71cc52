"""Config → library objects: the trainer callbacks for LOBSTER, SeReNe, NEq and pruning schedules.

Each callback is a thin adapter over the public API (the same calls a user writes in a plain loop).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

import neuronwise as nw
from neuronwise import pruning

from .trainer import Callback

if TYPE_CHECKING:
    from .trainer import Trainer


class _LibraryCallback(Callback):
    """A callback whose state is the ``state_dict`` of the library object it wraps."""

    wraps = "regularizer"  # the attribute holding that object

    def state_dict(self) -> dict:
        return getattr(self, self.wraps).state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            getattr(self, self.wraps).load_state_dict(state)


class _RegularizerCallback(_LibraryCallback):
    def after_optimizer_step(self, trainer: Trainer) -> None:
        self.regularizer.step()


class LobsterCallback(_RegularizerCallback):
    name = "lobster"

    def __init__(self, trainer: Trainer):
        c = trainer.config.lobster
        self.regularizer = nw.Lobster(trainer.model, lam=c.lam, scale_by_lr=c.scale_by_lr,
                                      lr=trainer.config.optim.lr if c.scale_by_lr else None,
                                      rescaled=c.rescaled)


class SeReNeCallback(_RegularizerCallback):
    name = "serene"

    def __init__(self, trainer: Trainer):
        c = trainer.config.serene
        self.regularizer = nw.SeReNe(trainer.model, lam=c.lam, variant=c.variant)

    def before_backward(self, trainer: Trainer, logits: torch.Tensor) -> None:
        self.regularizer.compute(logits)


class NEqCallback(_LibraryCallback):
    name = "neq"
    wraps = "neq"
    percentiles = (0, 10, 25, 50, 75, 90, 100)  # of |velocity|, recorded each epoch

    def __init__(self, trainer: Trainer):
        c = trainer.config.neq
        count = max(1, round(c.val_size * len(trainer.train_set)))
        generator = torch.Generator().manual_seed(trainer.config.train.seed)
        indices = torch.randperm(len(trainer.train_set), generator=generator)[:count]
        inputs = trainer.train_set.subset(indices).images.to(trainer.device)
        self.neq = nw.NEq(trainer.model, inputs, eps=c.eps, mu=c.mu, velocity=c.velocity,
                          warmup=c.warmup, mode=c.mode, selection=c.selection,
                          trained_fraction=c.trained_fraction,
                          skip_frozen_grads=c.skip_frozen_grads, seed=trainer.config.train.seed)
        self.neq.attach(trainer.optimizer)
        self.example_input = trainer.example_input
        self.total_backward = nw.metrics.backward_flops(trainer.model, trainer.example_input)

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        """Adds the epoch's NEq entries to ``record``.

        ``frozen_percent``, ``frozen_per_layer`` ({layer: %}), ``backward_flops`` and
        ``backward_saving_percent`` describe the frozen set used during the epoch that just ended
        (what the accounting charges); ``neq_time_s`` is the wall time of :meth:`NEq.step` (probe
        pass over Ξ, velocities, next frozen set); ``velocity_quantiles`` ({"p0": ..., "p100": ...})
        are the percentiles of |v| over hooked neurons from that step, which choose the next
        epoch's frozen set. Quantiles rather than a histogram: |v| spans decades that differ
        between setups and may be exactly 0, which fixed log bins cannot hold.
        """
        record["frozen_percent"] = 100.0 * self.neq.frozen_fraction()
        record["frozen_per_layer"] = {
            name: 100.0 * fraction for name, fraction in self.neq.frozen_per_layer().items()
        }
        backward = self.neq.backward_flops(self.example_input)
        record["backward_flops"] = backward
        record["backward_saving_percent"] = 100.0 * (1 - backward / self.total_backward)
        started = time.perf_counter()
        self.neq.step()
        record["neq_time_s"] = round(time.perf_counter() - started, 6)
        speeds = self.neq.velocity_quantiles([p / 100 for p in self.percentiles])
        record["velocity_quantiles"] = {f"p{p}": s for p, s in zip(self.percentiles, speeds)}


class PlateauPruningCallback(_LibraryCallback):
    """LOBSTER/SeReNe's PruneOnPlateau on the validation loss (METHODS.md §1)."""

    name = "pruning"
    wraps = "pruner"

    def __init__(self, trainer: Trainer, modules, mask=None):
        c = trainer.config.pruning
        self.pruner = pruning.PruneOnPlateau(
            trainer.model, evaluate=trainer.validation_loss, patience=c.patience,
            tolerance=c.tolerance, plateau_tolerance=c.plateau_tolerance, modules=modules,
            granularity=c.granularity, safe_threshold=c.safe_threshold, mask=mask)
        # A regularizer applies its own (shared) mask; alone, the pruner's mask is applied here.
        self.apply_mask = mask is None

    def after_optimizer_step(self, trainer: Trainer) -> None:
        if self.apply_mask:
            self.pruner.mask.apply()

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        result = self.pruner.step(record["val_loss"])
        record["pruned"] = result is not None
        if result is not None:
            record["threshold"] = float(result.threshold)
            record["prune_loss_before"] = float(result.loss_before)
            record["prune_loss_after"] = float(result.loss_after)


class MagnitudePruningCallback(Callback):
    """Magnitude baselines: one-shot (+ masked fine-tuning), iterative (Han et al. 2015) or
    gradual (Zhu & Gupta 2017), global ranking over the method's prunable parameters."""

    name = "pruning"

    def __init__(self, trainer: Trainer, modules, mask=None):
        c = trainer.config.pruning
        self.kind = c.schedule
        self.mask = mask or pruning.ParameterMask(trainer.model, modules)
        self.apply_mask = mask is None
        self.modules = modules
        if self.kind == "iterative":
            self.schedule = pruning.IterativeMagnitudePruning(
                trainer.model, fraction=c.fraction, every=c.every, final_sparsity=c.sparsity,
                modules=modules, mask=self.mask)
        elif self.kind == "gradual":
            self.schedule = pruning.GradualMagnitudePruning(
                trainer.model, final_sparsity=c.sparsity, start_step=c.start_epoch,
                frequency=c.every,
                num_updates=max(1, (c.end_epoch - c.start_epoch) // c.every),
                modules=modules, mask=self.mask)
        self.done = False

    def on_fit_start(self, trainer: Trainer) -> None:
        # One-shot at start_epoch 0 prunes the (e.g. pretrained, model.init_from) model up front.
        if self.kind == "oneshot" and trainer.config.pruning.start_epoch == 0 and not self.done:
            self._prune_once(trainer)

    def _prune_once(self, trainer: Trainer) -> None:
        pruning.global_magnitude_prune(trainer.model, trainer.config.pruning.sparsity,
                                       modules=self.modules, mask=self.mask)
        self.done = True

    def after_optimizer_step(self, trainer: Trainer) -> None:
        if self.apply_mask:
            self.mask.apply()

    def on_epoch_end(self, trainer: Trainer, record: dict) -> None:
        if self.kind == "oneshot":
            if not self.done and trainer.epoch + 1 >= trainer.config.pruning.start_epoch:
                self._prune_once(trainer)
                record["target_sparsity"] = trainer.config.pruning.sparsity
            return
        target = self.schedule.step()
        if target is not None:
            record["target_sparsity"] = target

    def state_dict(self) -> dict:
        if self.kind == "oneshot":
            return {"done": self.done, "mask": self.mask.state_dict()}
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.kind == "oneshot":
            self.done = bool(state["done"])
            self.mask.load_state_dict(state["mask"])
        else:
            self.schedule.load_state_dict(state)


_PRUNABLE = {
    "lobster": (nn.Linear, nn.Conv2d, nn.BatchNorm2d),
    "serene": (nn.Linear, nn.Conv2d),
}


def build_callbacks(trainer: Trainer) -> list[Callback]:
    """The callbacks a config asks for, in the order the trainer calls them."""
    c = trainer.config
    callbacks: list[Callback] = []
    if c.method == "lobster":
        callbacks.append(LobsterCallback(trainer))
    elif c.method == "serene":
        callbacks.append(SeReNeCallback(trainer))
    elif c.method == "neq":
        callbacks.append(NEqCallback(trainer))
    modules = _PRUNABLE.get(c.method, _PRUNABLE["lobster"])
    # The regularizer keeps the pruner's zeros through its shared mask.
    mask = getattr(getattr(callbacks[0], "regularizer", None), "mask", None) if callbacks else None
    if c.pruning.schedule == "plateau":
        callbacks.append(PlateauPruningCallback(trainer, modules, mask))
    elif c.pruning.schedule != "none":
        callbacks.append(MagnitudePruningCallback(trainer, modules, mask))
    return callbacks
