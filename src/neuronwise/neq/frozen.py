"""Keeping NEq's frozen neurons still through an optimizer step: one hook class per mode.

A frozen neuron's parameters are rows of its module's parameters (weight row, bias entry; BN/LN
γ_k, β_k). Around every ``optimizer.step()`` a pre-hook and a post-hook act on those rows:

- ``"grad"`` (:class:`GradHook`): zero their gradients; momentum or weight decay may still move them;
- ``"restore"`` (:class:`RestoreHook`): save them before the step, copy them back after, for any
  optimizer;
- ``"optim"`` (:class:`OptimHook`, SGD/Adam/AdamW): zero their gradients, put their values back and
  zero their momentum / Adam first moment, so that they are bit-identical and no stale momentum
  moves them later; Adam's second moment decays (β₂·v), and with coupled (L2) weight decay its
  pre-step rows are restored before that decay, since the step fed wd·p into it.

A parameter that autograd skipped (``skip_frozen_grads``: its whole layer is frozen, ``requires_grad``
off) gets a zero gradient, so that Adam's step count and decay stay those of the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class FrozenRows:
    """The frozen neurons of one parameter in the current epoch."""

    param: Tensor  # a hooked module's weight, bias, γ or β
    neurons: int  # neurons of that module, one row each (LayerNorm's rows flattened)
    index: Tensor  # indices of the frozen rows, on the parameter's device
    skipped: bool  # autograd skips the parameter this epoch (skip_frozen_grads)

    def rows(self, tensor: Tensor) -> Tensor:
        """``tensor`` (the parameter, its gradient or an optimizer state) indexed by neuron."""
        return tensor if tensor.shape[0] == self.neurons else tensor.view(-1)


@dataclass
class SavedRows:
    """What the pre-step hook keeps of one parameter's frozen rows for the post-step hook."""

    frozen: FrozenRows
    values: Tensor  # the rows before the step
    beta2: float | None = None  # set when Adam's second moment is to be decayed by hand (L2 decay)
    second_moment: Tensor | None = None  # exp_avg_sq rows before the step (None: no state yet)
    max_second_moment: Tensor | None = None  # max_exp_avg_sq rows before the step (AMSGrad)


class GradHook:
    """``mode="grad"``: frozen rows get zero gradients; nothing is saved or put back."""

    zero_grads = True

    def before_step(
        self, optimizer: torch.optim.Optimizer, rows: list[FrozenRows]
    ) -> list[SavedRows]:
        saved = []
        for frozen in rows:
            param = frozen.param
            if param.grad is None:
                if not frozen.skipped:
                    continue  # the optimizer skips it: nothing moves
                param.grad = torch.zeros_like(param)
            elif self.zero_grads:
                frozen.rows(param.grad).index_fill_(0, frozen.index, 0)
            entry = self.save(optimizer, frozen)
            if entry is not None:
                saved.append(entry)
        return saved

    def save(self, optimizer: torch.optim.Optimizer, frozen: FrozenRows) -> SavedRows | None:
        return None

    def after_step(self, optimizer: torch.optim.Optimizer, saved: list[SavedRows]) -> None:
        for entry in saved:
            self.put_back(optimizer, entry)

    def put_back(self, optimizer: torch.optim.Optimizer, entry: SavedRows) -> None:
        pass


class RestoreHook(GradHook):
    """``mode="restore"``: frozen rows are saved before the step and copied back after it."""

    zero_grads = False

    def save(self, optimizer: torch.optim.Optimizer, frozen: FrozenRows) -> SavedRows | None:
        return SavedRows(frozen, frozen.rows(frozen.param).index_select(0, frozen.index))

    def put_back(self, optimizer: torch.optim.Optimizer, entry: SavedRows) -> None:
        frozen = entry.frozen
        frozen.rows(frozen.param).index_copy_(0, frozen.index, entry.values)


class OptimHook(RestoreHook):
    """``mode="optim"`` (SGD, Adam, AdamW): as restore, plus zero gradients and optimizer state.

    One instance per step: it holds the optimizer's parameter → group map of that step.
    """

    zero_grads = True

    def before_step(
        self, optimizer: torch.optim.Optimizer, rows: list[FrozenRows]
    ) -> list[SavedRows]:
        self._groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        return super().before_step(optimizer, rows)

    def save(self, optimizer: torch.optim.Optimizer, frozen: FrozenRows) -> SavedRows | None:
        entry = super().save(optimizer, frozen)
        group = self._groups.get(id(frozen.param))
        if (
            group is not None
            and isinstance(optimizer, torch.optim.Adam)
            and group["weight_decay"] != 0
            and not _decoupled(optimizer, group)
        ):
            # L2 decay would feed wd·p into the second moment: keep its pre-step rows.
            state = optimizer.state.get(frozen.param, {})
            entry.beta2 = group["betas"][1]
            if "exp_avg_sq" in state:
                entry.second_moment = frozen.rows(state["exp_avg_sq"]).index_select(0, frozen.index)
            if "max_exp_avg_sq" in state:
                entry.max_second_moment = frozen.rows(state["max_exp_avg_sq"]).index_select(
                    0, frozen.index
                )
        return entry

    def put_back(self, optimizer: torch.optim.Optimizer, entry: SavedRows) -> None:
        super().put_back(optimizer, entry)
        frozen = entry.frozen
        state = optimizer.state.get(frozen.param, {})
        for key in ("momentum_buffer", "exp_avg"):
            if state.get(key) is not None:
                frozen.rows(state[key]).index_fill_(0, frozen.index, 0)
        if entry.beta2 is None:
            return
        square = frozen.rows(state["exp_avg_sq"])
        before = entry.second_moment
        decayed = torch.zeros_like(square[frozen.index]) if before is None else before
        square.index_copy_(0, frozen.index, decayed * entry.beta2)
        if "max_exp_avg_sq" in state:
            maximum = frozen.rows(state["max_exp_avg_sq"])
            previous = entry.max_second_moment
            previous = torch.zeros_like(decayed) if previous is None else previous
            maximum.index_copy_(0, frozen.index, torch.maximum(previous, decayed * entry.beta2))


HOOKS: dict[str, type[GradHook]] = {"grad": GradHook, "restore": RestoreHook, "optim": OptimHook}


def supports_optim_mode(optimizer: torch.optim.Optimizer) -> bool:
    """Whether :class:`OptimHook` knows ``optimizer``'s state (SGD, Adam, AdamW)."""
    return isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam))


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))


class StepHooks:
    """The pre- and post-step hooks on one optimizer; ``remove()`` like a ``RemovableHandle``.

    ``rows()`` gives the current frozen rows and ``mode()`` the mode, both read at every step, so
    that a ``load_state_dict`` between steps takes effect.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rows: Callable[[], list[FrozenRows]],
        mode: Callable[[], str],
    ):
        self.rows = rows
        self.mode = mode
        self._saved: list[SavedRows] = []
        self._hook: GradHook | None = None
        self.handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    @torch.no_grad()
    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._hook = HOOKS[self.mode()]()
        self._saved = self._hook.before_step(optimizer, self.rows())

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.after_step(optimizer, self._saved)
        self._saved, self._hook = [], None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
