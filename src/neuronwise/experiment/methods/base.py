"""The method contract: a callback built from hyperparameters, set up on a model, driven by hooks.

A method callback is the one adapter between a library object (``Lobster``, ``SeReNe``, ``NEq``,
a pruning schedule) and a training loop. :class:`~neuronwise.experiment.trainer.Trainer` and the
Lightning integration drive the same callback classes:

1. ``__init__`` takes hyperparameters only and validates them (``from_config`` builds one from a
   config section);
2. ``setup(context)`` builds the library object on the model (the loop has built the model and
   its optimizer; no checkpoint state is loaded yet);
3. ``load_state_dict`` (on resume), then ``on_fit_start``;
4. every training step: forward → ``before_backward(logits)`` → backward → ``after_backward`` →
   optimizer step → ``after_optimizer_step``;
5. every epoch, after evaluation: ``on_epoch_end(record)``, which may add the entries that the
   class declares in :attr:`MethodCallback.metrics`;
6. ``teardown`` removes the hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn


@dataclass
class MethodContext:
    """What a method may use of the loop that runs it (not the loop itself).

    ``validation_loss()`` evaluates the model on the validation set (eval mode, mode restored);
    ``train_set`` is a :class:`neuronwise.data.Dataset` (``None`` outside ``neuronwise run``);
    ``seed`` is the run's seed.
    """

    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    device: torch.device
    example_input: Tensor
    validation_loss: Callable[[], float] | None = None
    train_set: Any = None
    seed: int = 0


@dataclass(frozen=True)
class Metric:
    """An entry that a callback adds to each epoch's record, and how the report shows it.

    ``plot``: ``"line"`` (one number per epoch), ``"lines"`` (a ``{name: number}`` mapping per
    epoch, one line per name) or ``"bands"`` (percentiles ``{"p0": ..., "p100": ...}``, drawn as
    10–90 % and 25–75 % bands, median and extremes, log scale), in the file ``file``.
    ``summary``: ``"mean"`` (mean over epochs, with ``unit``), ``"count"`` (epochs where the entry
    is true) or ``"time"`` (mean seconds and their share of ``train_time_s``), in a row labelled
    ``summary_label``. ``console``: a format string over the record, appended to the epoch's log
    line when the entry is present and not ``False``. ``reference``: for ``"bands"``, a function of
    the method's config section giving a horizontal line ``(label, value)`` or ``None``.
    """

    key: str
    description: str
    plot: Literal["line", "lines", "bands"] | None = None
    file: str | None = None
    summary: Literal["mean", "count", "time"] | None = None
    summary_label: str = ""
    unit: str = ""
    console: str | None = None
    reference: Callable[[Any], tuple[str, float] | None] | None = field(default=None,
                                                                         compare=False)


class MethodCallback:
    """Base class of method callbacks; every hook does nothing by default.

    ``method`` is the library object built by :meth:`setup`; its ``state_dict`` is the callback's,
    so that a checkpoint resumes the method exactly. ``mask`` (a ``ParameterMask`` or ``None``) is
    the mask the method keeps applied, which a pruning schedule shares; ``modules`` the module
    types it acts on.
    """

    name = "callback"  # the checkpoint key; the registry sets it to the registered name
    metrics: tuple[Metric, ...] = ()

    def __init__(self) -> None:
        self.method: Any = None
        self.context: MethodContext | None = None

    @classmethod
    def from_config(cls, config: Any, regularizer: MethodCallback | None = None) -> MethodCallback:
        """Build from the registered config section; ``regularizer`` is the run's method callback
        (pruning schedules share its mask)."""
        raise NotImplementedError(f"{cls.__name__} does not build from a config")

    @property
    def needs_unused_parameters(self) -> bool:
        """True when some parameters may get no gradient in a step (DDP must then look for them)."""
        return False

    @property
    def mask(self) -> Any:
        return getattr(self.method, "mask", None)

    @property
    def modules(self) -> tuple[type[nn.Module], ...] | None:
        return None

    def setup(self, context: MethodContext) -> None:
        self.context = context

    def on_fit_start(self) -> None:
        pass

    def before_backward(self, logits: Tensor) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def on_epoch_end(self, record: dict) -> None:
        """Called after evaluation (``record`` holds ``epoch`` and ``val_loss``), before the
        learning-rate schedule; may add the declared entries to ``record``."""

    def teardown(self) -> None:
        if hasattr(self.method, "remove"):
            self.method.remove()

    def state_dict(self) -> dict:
        return self.method.state_dict() if self.method is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.method.load_state_dict(state)


def stand_in() -> nn.Module:
    """A one-weight layer to validate a method's hyperparameters on before the model exists
    (``skip_init``: drawing no random numbers, so that a run's random stream is unchanged)."""
    return nn.utils.skip_init(nn.Linear, 1, 1)
