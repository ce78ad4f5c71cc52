"""NEq (METHODS.md §5): neurons at equilibrium are frozen for the next epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

import neuronwise as nw
from neuronwise._utils import is_number

from ..schema import meta, setting
from .base import MethodCallback, MethodContext, Metric
from .registry import register


@dataclass
class NEqConfig:
    eps: float = setting(1e-3, "ε: a neuron with |velocity| below it is frozen next epoch",
                         bounds=">= 0")
    mu: float = setting(0.5, "μ: momentum of the velocity", bounds=">= 0")
    velocity: Literal["paper", "official"] = setting("paper", "velocity recurrence (METHODS.md §5)")
    val_size: float = setting(0.001, "share of the training set used as the fixed probe set Ξ",
                              bounds="in [0, 1]")
    selection: Literal["threshold", "random", "topk"] = setting("threshold",
                                                                "ε rule or a baseline")
    trained_fraction: float | None = setting(None, "random/topk baselines: share of neurons "
                                             "trained", bounds="in [0, 1]")
    trained_fractions: list | None = field(default=None, metadata=meta(
        "random/topk: share trained in epoch e at entry e-1 (the last repeats), instead of "
        "trained_fraction, e.g. to match NEq's per epoch"))
    warmup: int = setting(1, "epochs that train every neuron before freezing starts",
                          bounds=">= 0")
    mode: Literal["optim", "grad", "restore"] = setting("optim", "how frozen neurons are kept "
                                                        "still")
    skip_frozen_grads: bool = setting(False, "really skip frozen layers' / rows' weight gradients")


def _threshold_line(config: NEqConfig) -> tuple[str, float] | None:
    return (f"ε = {config.eps:g}", config.eps) if config.selection == "threshold" else None


class NEqCallback(MethodCallback):
    """Runs :class:`neuronwise.NEq`: frozen neurons get no update; ``step()`` after each epoch.

    ``val_inputs`` are the inputs of the fixed probe set Ξ (a tensor, in a fixed order); without
    them, ``val_size`` of the loop's training set is drawn with the run's seed. ``kwargs`` go to
    ``NEq`` (``eps``, ``mu``, ``velocity``, ``mode``, ``selection``, ...); ``seed`` defaults to the
    run's. The epoch-0 outputs are recorded at setup. ``trained_fractions`` (random/topk) gives the
    share trained in epoch e at entry e − 1 (the last entry repeats), set before each step that
    chooses that epoch's frozen set; ``neuronwise compare`` fills it with an NEq run's
    1 − ``frozen_percent`` / 100 per epoch to match its frozen share (the paper's protocol).
    """

    percentiles = (0, 10, 25, 50, 75, 90, 100)  # of |velocity|, recorded each epoch
    metrics = (
        Metric("frozen_percent", "NEq frozen neurons (%)", plot="line",
               file="frozen.png", summary="mean", summary_label="mean frozen neurons (NEq)",
               unit="%", console="frozen {frozen_percent:.1f}%"),
        Metric("frozen_per_layer", "NEq frozen neurons per layer (%)", plot="lines",
               file="frozen_layers.png"),
        Metric("backward_flops", "backward FLOPs of one iteration at batch 1, frozen set charged"),
        Metric("backward_saving_percent", "backward FLOPs saved by freezing (%)"),
        Metric("neq_time_s", "wall time of NEq.step (probe pass, velocities, next frozen set)",
               summary="time",
               summary_label="mean NEq probe pass per epoch (% of training time)"),
        Metric("velocity_quantiles", "NEq |velocity| over hooked neurons (percentiles)",
               plot="bands", file="velocity.png", reference=_threshold_line),
    )

    def __init__(self, val_inputs: Tensor | None = None, val_size: float | None = None,
                 trained_fractions: list | None = None, **kwargs: Any) -> None:
        super().__init__()
        if val_inputs is not None and not isinstance(val_inputs, Tensor):
            raise TypeError(f"Invalid val_inputs: {type(val_inputs).__name__} (expected a Tensor)")
        if val_inputs is None and val_size is None:
            raise ValueError("Invalid val_inputs: None (expected a Tensor, or val_size)")
        if trained_fractions is not None:
            if (not isinstance(trained_fractions, list) or not trained_fractions
                    or not all(is_number(p) and 0 <= p <= 1 for p in trained_fractions)):
                raise ValueError(f"Invalid trained_fractions: {trained_fractions!r} (expected a "
                                 f"non-empty list of numbers in [0, 1])")
            if kwargs.get("trained_fraction") is not None:
                raise ValueError("Invalid trained_fractions: set with trained_fraction "
                                 "(expected one of them)")
            kwargs["trained_fraction"] = float(trained_fractions[0])
        self.trained_fractions = trained_fractions
        self.val_inputs = val_inputs
        self.val_size = val_size
        self.kwargs = kwargs
        self.total_backward = 0
        self.handles: list = []

    @classmethod
    def from_config(cls, config: NEqConfig, regularizer=None) -> NEqCallback:
        return cls(val_size=config.val_size, eps=config.eps, mu=config.mu,
                   velocity=config.velocity, warmup=config.warmup, mode=config.mode,
                   selection=config.selection, trained_fraction=config.trained_fraction,
                   trained_fractions=config.trained_fractions,
                   skip_frozen_grads=config.skip_frozen_grads)

    @property
    def needs_unused_parameters(self) -> bool:
        # Real backward skipping takes fully frozen layers out of the graph for an epoch.
        return bool(self.kwargs.get("skip_frozen_grads"))

    def _probe_inputs(self, context: MethodContext) -> Tensor:
        if self.val_inputs is not None:
            return self.val_inputs
        train_set = context.train_set
        count = max(1, round(self.val_size * len(train_set)))
        generator = torch.Generator().manual_seed(context.seed)
        indices = torch.randperm(len(train_set), generator=generator)[:count]
        return train_set.subset(indices).images.to(context.device)

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        kwargs = {"seed": context.seed, **self.kwargs}
        self.method = nw.NEq(context.model, self._probe_inputs(context), **kwargs)
        self.handles = [self.method.attach(optimizer) for optimizer in context.optimizers]
        self.total_backward = nw.metrics.backward_flops(context.model, context.example_input)

    def on_epoch_end(self, record: dict) -> None:
        """Adds the epoch's NEq entries to ``record``.

        ``frozen_percent``, ``frozen_per_layer`` ({layer: %}), ``backward_flops`` and
        ``backward_saving_percent`` describe the frozen set used during the epoch that just ended
        (what the accounting charges); ``neq_time_s`` is the wall time of :meth:`NEq.step` (probe
        pass over Ξ, velocities, next frozen set) and ``neq_cpu_time_s`` its process CPU time;
        ``velocity_quantiles`` ({"p0": ..., "p100": ...}) are the percentiles of |v| over hooked
        neurons from that step, which choose the next epoch's frozen set. Quantiles rather than a histogram: |v| spans decades that differ
        between setups and may be exactly 0, which fixed log bins cannot hold.
        """
        neq = self.method
        record["frozen_percent"] = 100.0 * neq.frozen_fraction()
        record["frozen_per_layer"] = {
            name: 100.0 * fraction for name, fraction in neq.frozen_per_layer().items()
        }
        backward = neq.backward_flops(self.context.example_input)
        record["backward_flops"] = backward
        record["backward_saving_percent"] = 100.0 * (1 - backward / self.total_backward)
        if self.trained_fractions is not None:  # the share trained in the next epoch
            schedule = self.trained_fractions
            neq.trained_fraction = float(schedule[min(record["epoch"], len(schedule) - 1)])
        started, cpu_started = time.perf_counter(), time.process_time()
        neq.step()
        record["neq_time_s"] = round(time.perf_counter() - started, 6)
        record["neq_cpu_time_s"] = round(time.process_time() - cpu_started, 6)
        speeds = neq.velocity_quantiles([p / 100 for p in self.percentiles])
        record["velocity_quantiles"] = {f"p{p}": s for p, s in zip(self.percentiles, speeds)}


    def teardown(self) -> None:
        for handle in self.handles:
            handle.remove()
        super().teardown()


register("neq", NEqCallback, config=NEqConfig)
