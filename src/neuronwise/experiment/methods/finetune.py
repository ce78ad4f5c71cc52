"""Masked fine-tuning of a pruned model: its zeros stay zero, everything else trains."""

from __future__ import annotations

from torch import nn

import neuronwise as nw

from .base import MethodCallback, MethodContext
from .registry import register


class MaskedFinetuneCallback(MethodCallback):
    """Fine-tunes the model it starts from (``model.init_from``: e.g. the last checkpoint of a
    SeReNe or LOBSTER run) with its pruned structure kept: every entry of the Linear/Conv2d
    weights and biases that is zero when training starts is masked, the mask re-applied after
    each optimizer step (w ← w·m, m = [w₀ ≠ 0]), so that momentum cannot revive it; the other
    entries train with the run's optimizer and no regularizer. Dead neurons and heads stay dead,
    and ``simplify`` removes the same parts as from the starting model."""

    @classmethod
    def from_config(cls, config: None, regularizer: MethodCallback | None = None,
                    ) -> MaskedFinetuneCallback:
        return cls()

    @property
    def modules(self) -> tuple[type[nn.Module], ...]:
        return nw.pruning.PRUNABLE_MODULES

    def setup(self, context: MethodContext) -> None:
        super().setup(context)
        self.method = nw.ParameterMask(context.model, self.modules, zeros_at_start="masked")

    @property
    def mask(self) -> nw.ParameterMask:
        return self.method

    def after_optimizer_step(self) -> None:
        self.method.apply()


register("finetune", MaskedFinetuneCallback)
