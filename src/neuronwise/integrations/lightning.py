"""Lightning callbacks for LOBSTER, SeReNe, PruneOnPlateau, NEq and any registered method.

Install with ``pip install "neuronwise[lightning]"``. Each callback drives the same method
callback that ``neuronwise run`` uses (``neuronwise.experiment.methods``): it is built from
hyperparameters, set up on the ``LightningModule`` at ``on_fit_start`` (after Lightning has moved
the model to its device and restored a checkpoint's weights), its hooks removed at ``teardown``,
and its state kept in Lightning checkpoints (``state_dict``/``load_state_dict``), so
``trainer.fit(model, ckpt_path=...)`` resumes it exactly. The library object is available as the
callback's ``method`` attribute (``Lobster``, ``SeReNe``, ``PruneOnPlateau`` or ``NEq``).

Hooks map one to one: ``on_before_backward`` → ``before_backward``, ``on_after_backward`` →
``after_backward``, an optimizer step post-hook → ``after_optimizer_step`` (so gradient
accumulation and AMP's skipped steps are respected), ``on_train_epoch_end`` (after the epoch's
validation) → ``on_epoch_end``, whose declared entries (``MethodCallback.metrics``) are logged
with ``pl_module.log_dict`` (dict entries as ``key/name``).

Example::

    lobster = LobsterCallback(lam=1e-4)
    pruning = PruneOnPlateauCallback(monitor="val_loss", regularizer=lobster, patience=20)
    trainer = lightning.Trainer(callbacks=[lobster, pruning])

Any registered method (your own included) runs the same way::

    callback = MethodCallbackAdapter(MyTaylorPruning(fraction=0.1))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuronwise import distributed, models
from neuronwise._utils import graph_break, watch_hooks
from neuronwise.experiment.methods import MethodCallback, MethodContext
from neuronwise.experiment.methods.lobster import LobsterCallback as _Lobster
from neuronwise.experiment.methods.neq import NEqCallback as _NEq
from neuronwise.experiment.methods.plateau import PlateauPruningCallback as _Plateau
from neuronwise.experiment.methods.serene import SeReNeCallback as _SeReNe
from neuronwise.experiment.records import scalars
from neuronwise.extras import missing_extra

try:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.apply_func import move_data_to_device
except ModuleNotFoundError as error:
    raise missing_extra(error, "neuronwise.integrations.lightning") from None

__all__ = ["LobsterCallback", "MethodCallbackAdapter", "NEqCallback", "PruneOnPlateauCallback",
           "SeReNeCallback"]


class MethodCallbackAdapter(pl.Callback):
    """Runs a :class:`~neuronwise.experiment.methods.MethodCallback` in a Lightning ``Trainer``.

    ``monitor``: the logged metric handed to the callback as the epoch's ``val_loss`` (needed by
    callbacks that decide on it; log it in ``validation_step``, with ``sync_dist=True`` under DDP).
    ``evaluate(trainer, pl_module)`` is the context's ``validation_loss`` (default
    :func:`validation_loss`). ``requires``: adapters whose callbacks must be set up first.
    """

    def __init__(self, callback: MethodCallback, monitor: str | None = None,
                 evaluate: Callable[[pl.Trainer, pl.LightningModule], float] | None = None,
                 requires: tuple[MethodCallbackAdapter, ...] = ()) -> None:
        if not isinstance(callback, MethodCallback):
            raise TypeError(f"Invalid callback: {type(callback).__name__} (expected a "
                            "MethodCallback)")
        self.callback = callback
        self.monitor = monitor
        self.evaluate = evaluate if evaluate is not None else validation_loss
        self.requires = tuple(requires)
        self._pending: dict[str, Any] | None = None
        self._handles: list[Any] = []
        self._fitting = False
        self._built = False  # set up at least once (its state is then the callback's)

    @property
    def method(self) -> Any:
        return self.callback.method

    def _context(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> MethodContext:
        return MethodContext(
            model=pl_module, optimizers=list(trainer.optimizers), device=pl_module.device,
            example_input=self._example_input(trainer, pl_module),
            validation_loss=lambda: self.evaluate(trainer, pl_module))

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        return None

    def ensure_built(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Set up (once per fit) the callback, restoring a checkpoint's or the last fit's state."""
        if not self._fitting:
            for other in self.requires:
                other.ensure_built(trainer, pl_module)
            previous = self.callback.state_dict() if self._built else None
            self.callback.setup(self._context(trainer, pl_module))
            self._built = True
            state = self._pending if self._pending is not None else previous
            if state is not None:
                self.callback.load_state_dict(state)
            self._pending = None
            self._fitting = True
            for optimizer in trainer.optimizers:
                self._handles.append(optimizer.register_step_post_hook(self._after_step))
            self._hook(trainer, pl_module)
            self.callback.on_fit_start()
        return self.method

    def _hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Register this fit's extra hooks in ``self._handles``."""

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.callback.after_optimizer_step()

    def _logits(self) -> Tensor | None:
        return None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ensure_built(trainer, pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           loss: Tensor) -> None:
        self.callback.before_backward(self._logits())

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.callback.after_backward()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record: dict[str, Any] = {"epoch": trainer.current_epoch + 1}
        if self.monitor is not None:
            if self.monitor not in trainer.callback_metrics:
                raise RuntimeError(
                    f"{type(self).__name__}: metric {self.monitor!r} was not logged this epoch "
                    f"(available: {sorted(trainer.callback_metrics)})")
            record["val_loss"] = float(trainer.callback_metrics[self.monitor])
        self.callback.on_epoch_end(record)
        # The entries the callback declares, as Lightning metrics (loggers, callback_metrics).
        declared = {m.key: record[m.key] for m in self.callback.metrics if m.key in record}
        values = {tag: float(value) for tag, value in scalars(declared)}
        values.update({k: float(v) for k, v in declared.items() if isinstance(v, bool)})
        if values:
            pl_module.log_dict(values, on_epoch=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._fitting:
            self.callback.teardown()
        self._fitting = False

    def state_dict(self) -> dict[str, Any]:
        if not self._built:
            return dict(self._pending or {})
        return self.callback.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start: keep the state until setup.
        if self._fitting:
            self.callback.load_state_dict(state_dict)
        else:
            self._pending = dict(state_dict)


class LobsterCallback(MethodCallbackAdapter):
    """Runs :class:`neuronwise.Lobster` after every optimizer step.

    p ← p − λ·p·relu(1 − |∂L/∂p|) for every parameter of ``modules``, then the mask. ``kwargs``
    go to ``Lobster`` (``scale_by_lr``, ``lr``, ``rescaled``, ``foreach``).
    """

    def __init__(self, lam: float = 1e-4, **kwargs: Any) -> None:
        super().__init__(_Lobster(lam=lam, **kwargs))
        self.modules = self.callback.modules


class _OutputRecorder:
    """Forward hook keeping the last grad-enabled output (a plain object: the model still pickles)."""

    def __init__(self) -> None:
        self.output: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        graph_break()  # SeReNe differentiates these logits: a real tensor, not a graph's inside
        if torch.is_grad_enabled():
            self.output = output


class SeReNeCallback(MethodCallbackAdapter):
    """Runs :class:`neuronwise.serene.SeReNe`: sensitivities before each backward, the step after.

    W[k] ← W[k] − λ·relu(1 − S_k)·W[k] per neuron k of the ``Linear``/``Conv2d`` layers. The
    logits are the output of the module named ``logits_module`` (default: the classifier, the last
    ``nn.Linear``; ``""`` means the LightningModule itself), recorded in the training forward and
    handed to ``SeReNe.compute`` in ``on_before_backward``. ``kwargs`` go to ``SeReNe``
    (``modules``, ``foreach``, ``mask``).
    """

    def __init__(self, lam: float = 1e-4, variant: str = "lower-bound",
                 logits_module: str | None = None, **kwargs: Any) -> None:
        super().__init__(_SeReNe(lam=lam, variant=variant, **kwargs))
        self.modules = self.callback.modules
        self.logits_module = logits_module
        self._recorder = _OutputRecorder()

    def _hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = self.logits_module
        if name is None:
            name = models.classifier_name(pl_module)
        named = dict(pl_module.named_modules())
        if name not in named:
            raise ValueError(f"Invalid logits_module: {name!r} is not a module of the model")
        watch_hooks()
        self._handles.append(named[name].register_forward_hook(self._recorder))

    def _logits(self) -> Tensor:
        logits, self._recorder.output = self._recorder.output, None
        if logits is None:
            raise RuntimeError(
                f"SeReNeCallback: no logits recorded from {self.logits_module or 'the classifier'!r}"
                " in this training step (set logits_module to the module producing them)"
            )
        return logits

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


class PruneOnPlateauCallback(MethodCallbackAdapter):
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
        if regularizer is not None and not isinstance(regularizer,
                                                      (LobsterCallback, SeReNeCallback)):
            raise TypeError(
                f"Invalid regularizer: {type(regularizer).__name__} "
                "(expected LobsterCallback, SeReNeCallback or None)"
            )
        callback = _Plateau(patience=patience, tolerance=tolerance, modules=modules,
                            regularizer=regularizer.callback if regularizer else None, **kwargs)
        super().__init__(callback, monitor=monitor, evaluate=evaluate,
                         requires=(regularizer,) if regularizer else ())
        self.regularizer = regularizer
        self.modules = callback.modules


class NEqCallback(MethodCallbackAdapter):
    """Runs :class:`neuronwise.NEq`: frozen neurons get no update; ``step()`` after each epoch.

    ``val_inputs`` are the inputs of the fixed validation subset Ξ (a tensor, in a fixed order);
    ``kwargs`` go to ``NEq`` (``eps``, ``mu``, ``velocity``, ``mode``, ``selection``, ...). The
    epoch-0 outputs are recorded at ``on_fit_start``.
    """

    def __init__(self, val_inputs: Tensor, **kwargs: Any) -> None:
        if not isinstance(val_inputs, Tensor):
            raise TypeError(f"Invalid val_inputs: {type(val_inputs).__name__} (expected a Tensor)")
        super().__init__(_NEq(val_inputs, **kwargs))
        self.val_inputs = val_inputs

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        return self.val_inputs[:1].to(pl_module.device)
