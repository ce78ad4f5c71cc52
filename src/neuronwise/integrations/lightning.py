"""Lightning callbacks for LOBSTER, SeReNe, PruneOnPlateau and NEq.

Install with ``pip install "neuronwise[lightning]"``. Each callback builds the library object on
the ``LightningModule`` at ``on_fit_start`` (after Lightning has moved the model to its device
and restored a checkpoint's weights), hooks it into the optimizers, removes its hooks at
``teardown``, and keeps its state in Lightning checkpoints (``state_dict``/``load_state_dict``),
so ``trainer.fit(model, ckpt_path=...)`` resumes it exactly. The library object is available as
the callback's ``method`` attribute (``Lobster``, ``SeReNe``, ``PruneOnPlateau`` or ``NEq``).

The order within one epoch is the library's: each optimizer step is followed by the
regularizer's step (an optimizer step post-hook, so gradient accumulation and AMP's skipped steps
are respected); after the epoch's validation, ``on_train_epoch_end`` runs ``PruneOnPlateau.step``
and ``NEq.step``.

Example::

    lobster = LobsterCallback(lam=1e-4)
    pruning = PruneOnPlateauCallback(monitor="val_loss", regularizer=lobster, patience=20)
    trainer = lightning.Trainer(callbacks=[lobster, pruning])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuronwise import distributed, models
from neuronwise.extras import missing_extra
from neuronwise.lobster import Lobster
from neuronwise.neq import NEq
from neuronwise.pruning import PRUNABLE_MODULES, PruneOnPlateau
from neuronwise.serene import SeReNe

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
except ModuleNotFoundError as error:
    raise missing_extra(error, "neuronwise.integrations.lightning") from None

__all__ = ["LobsterCallback", "NEqCallback", "PruneOnPlateauCallback", "SeReNeCallback"]


class _MethodCallback(pl.Callback):
    """Builds one library object per fit and carries its state through checkpoints."""

    def __init__(self) -> None:
        self.method: Any = None
        self._pending: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._fitting = False

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def _hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register the hooks of this fit in ``self._handles``."""

    def ensure_built(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Build (once per fit) the library object, restoring a checkpoint's or the last fit's state."""
        if not self._fitting:
            previous = self.method.state_dict() if self.method is not None else None
            self.method = self._build(trainer, pl_module)
            state = self._pending if self._pending is not None else previous
            if state is not None:
                self.method.load_state_dict(state)
            self._pending = None
            self._fitting = True
            self._hook(trainer, pl_module)
        return self.method

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ensure_built(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._fitting and hasattr(self.method, "remove"):
            self.method.remove()
        self._fitting = False

    def state_dict(self) -> dict[str, Any]:
        if self.method is None:
            return dict(self._pending or {})
        return self.method.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start: keep the state until the object exists.
        if self._fitting:
            self.method.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)


class _RegularizerCallback(_MethodCallback):
    """A regularizer whose ``step()`` follows every optimizer step."""

    modules: tuple[type[nn.Module], ...]

    def _hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.method.step()


class LobsterCallback(_RegularizerCallback):
    """Runs :class:`neuronwise.Lobster` after every optimizer step.

    p ← p − λ·p·relu(1 − |∂L/∂p|) for every parameter of ``modules``, then the mask. ``kwargs``
    go to ``Lobster`` (``scale_by_lr``, ``lr``, ``rescaled``, ``foreach``).
    """

    def __init__(
        self,
        lam: float = 1e-4,
        modules: tuple[type[nn.Module], ...] = PRUNABLE_MODULES,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.modules = tuple(modules)
        # Validate now, on a stand-in, so that a bad value fails before the Trainer starts.
        self.kwargs = {"lam": lam, **kwargs}
        Lobster([torch.zeros(1)], **self.kwargs)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Lobster:
        return Lobster(pl_module, modules=self.modules, **self.kwargs)


class _OutputRecorder:
    """Forward hook keeping the last grad-enabled output (a plain object: the model still pickles)."""

    def __init__(self) -> None:
        self.output: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled():
            self.output = output


class SeReNeCallback(_RegularizerCallback):
    """Runs :class:`neuronwise.serene.SeReNe`: sensitivities before each backward, the step after.

    W[k] ← W[k] − λ·relu(1 − S_k)·W[k] per neuron k of the ``Linear``/``Conv2d`` layers. The
    logits are the output of the module named ``logits_module`` (default: the classifier, the last
    ``nn.Linear``; ``""`` means the LightningModule itself), recorded in the training forward and
    handed to ``SeReNe.compute`` in ``on_before_backward``. ``kwargs`` go to ``SeReNe``
    (``foreach``, ``mask``).
    """

    def __init__(
        self,
        lam: float = 1e-4,
        variant: str = "lower-bound",
        logits_module: str | None = None,
        modules: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.modules = tuple(modules)
        self.logits_module = logits_module
        self.kwargs = {"lam": lam, "variant": variant, **kwargs}
        SeReNe(nn.Linear(1, 1), **self.kwargs).remove()
        self._recorder = _OutputRecorder()

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> SeReNe:
        return SeReNe(pl_module, modules=self.modules, **self.kwargs)

    def _hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super()._hook(trainer, pl_module)
        name = self.logits_module
        if name is None:
            name = models.classifier_name(pl_module)
        named = dict(pl_module.named_modules())
        if name not in named:
            raise ValueError(f"Invalid logits_module: {name!r} is not a module of the model")
        self._handles.append(named[name].register_forward_hook(self._recorder))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        logits, self._recorder.output = self._recorder.output, None
        if logits is None:
            raise RuntimeError(
                f"SeReNeCallback: no logits recorded from {self.logits_module or 'the classifier'!r}"
                " in this training step (set logits_module to the module producing them)"
            )
        self.method.compute(logits)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._recorder.output = None
        super().teardown(trainer, pl_module, stage)


@torch.no_grad()
def validation_loss(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
    """Mean cross-entropy of ``pl_module(x)`` over the trainer's validation loaders, eval mode.

    Batches are ``(x, y)`` pairs; sums and counts are all-reduced, so every rank gets the same value.
    """
    loaders = trainer.val_dataloaders
    if loaders is None:
        raise RuntimeError("PruneOnPlateauCallback: the Trainer has no validation dataloader")
    if not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    training = {m: m.training for m in pl_module.modules()}
    totals = torch.zeros(2, dtype=torch.float64)
    try:
        pl_module.eval()
        for loader in loaders:
            for batch in loader:
                x, y = move_data_to_device(batch, pl_module.device)
                loss = F.cross_entropy(pl_module(x), y, reduction="sum")
                totals += torch.tensor([loss.item(), len(y)], dtype=torch.float64)
    finally:
        for module, mode in training.items():
            module.train(mode)
    totals = distributed.all_reduce_sum(totals)
    return float(totals[0] / totals[1])


class PruneOnPlateauCallback(_MethodCallback):
    """Runs :class:`neuronwise.PruneOnPlateau` at the end of each training epoch.

    The epoch's validation loss is ``trainer.callback_metrics[monitor]`` (log it in
    ``validation_step``, with ``sync_dist=True`` under DDP; validate every epoch). A plateau of
    ``patience`` epochs triggers the threshold bisection, which calls ``evaluate(trainer,
    pl_module)`` once per trial (default :func:`validation_loss`: cross-entropy over the validation
    loaders). With ``regularizer`` (a :class:`LobsterCallback` or :class:`SeReNeCallback`) the
    pruner shares its mask and, by default, its module types; without it the mask is re-applied
    after every optimizer step. ``kwargs`` go to ``PruneOnPlateau`` (``plateau_tolerance``,
    ``granularity``, ``safe_threshold``).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 20,
        tolerance: float = 0.05,
        regularizer: LobsterCallback | SeReNeCallback | None = None,
        evaluate: Callable[[pl.Trainer, pl.LightningModule], float] | None = None,
        modules: tuple[type[nn.Module], ...] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if regularizer is not None and not isinstance(regularizer, _RegularizerCallback):
            raise TypeError(
                f"Invalid regularizer: {type(regularizer).__name__} "
                "(expected LobsterCallback, SeReNeCallback or None)"
            )
        self.monitor = monitor
        self.regularizer = regularizer
        self.evaluate = evaluate if evaluate is not None else validation_loss
        if modules is None:
            modules = regularizer.modules if regularizer is not None else PRUNABLE_MODULES
        self.modules = tuple(modules)
        self.kwargs = {"patience": patience, "tolerance": tolerance, **kwargs}
        PruneOnPlateau(nn.Linear(1, 1), **self.kwargs)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PruneOnPlateau:
        mask = None
        if self.regularizer is not None:
            mask = self.regularizer.ensure_built(trainer, pl_module).mask
        return PruneOnPlateau(
            pl_module,
            evaluate=lambda: self.evaluate(trainer, pl_module),
            modules=self.modules,
            mask=mask,
            **self.kwargs,
        )

    def _hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.regularizer is None:
            self._handles.extend(self.method.mask.attach(o) for o in trainer.optimizers)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise RuntimeError(
                f"PruneOnPlateauCallback: metric {self.monitor!r} was not logged this epoch "
                f"(available: {sorted(trainer.callback_metrics)})"
            )
        self.method.step(float(trainer.callback_metrics[self.monitor]))


class NEqCallback(_MethodCallback):
    """Runs :class:`neuronwise.NEq`: frozen neurons get no update; ``step()`` after each epoch.

    ``val_inputs`` are the inputs of the fixed validation subset Ξ (a tensor, in a fixed order);
    ``kwargs`` go to ``NEq`` (``eps``, ``mu``, ``velocity``, ``mode``, ``selection``, ...). The
    epoch-0 outputs are recorded at ``on_fit_start``.
    """

    def __init__(self, val_inputs: Tensor, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(val_inputs, Tensor):
            raise TypeError(f"Invalid val_inputs: {type(val_inputs).__name__} (expected a Tensor)")
        self.val_inputs = val_inputs
        self.kwargs = kwargs

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> NEq:
        return NEq(pl_module, self.val_inputs, **self.kwargs)

    def _hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._handles.extend(self.method.attach(o) for o in trainer.optimizers)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.method.step()
