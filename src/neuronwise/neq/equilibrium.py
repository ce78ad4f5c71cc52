"""NEq: neurons at equilibrium skip their updates (Bragagnolo et al., NeurIPS 2022; METHODS.md §5)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from neuronwise import metrics
from neuronwise._utils import find_classifier, is_number, layer_neurons, unwrap
from neuronwise.transformer.groups import AttentionHeads, neuron_groups

from .backward import FrozenGradSkip
from .frozen import FrozenRows, StepHooks, supports_optim_mode
from .similarity import validation_pass

HOOKED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Linear)
VELOCITIES = ("paper", "official")
MODES = ("optim", "grad", "restore")
SELECTIONS = ("threshold", "random", "topk")
# Saved in state_dict; the attribute of the constructor's ``velocity`` is ``velocity_form``.
HYPERPARAMETERS = ("eps", "mu", "velocity_form", "warmup", "mode", "selection", "trained_fraction",
                   "pinning", "batch_size", "skip_frozen_grads")


class NEq:
    r"""Freezes the neurons whose outputs on a fixed validation subset Ξ stopped changing.

    After each epoch t, for every hooked neuron i (output channel of ``Conv2d``/``BatchNorm2d``,
    output of ``Linear``, element of ``LayerNorm``; the classifier excluded) and its outputs y on Ξ
    (eval mode, float64):

    .. math::
        \phi_i^t = \operatorname{mean}_\xi \cos(y^t_{\xi,i,\cdot},\, y^{t-1}_{\xi,i,\cdot}),
        \qquad \Delta\phi^t = \phi^t - \phi^{t-1}, \quad \phi^0 := 1

    with the cosine over spatial positions (1 if both vectors are zero, 0 if exactly one is); for
    (N, C) outputs one cosine over the neuron's length-|Ξ| vector. The velocity (ε = ``eps``,
    μ = ``mu``) is

    - ``"paper"``: v^t = Δφ^t − μ v^{t−1}, v^0 = 0; frozen in epoch t+1 ⇔ |v^t| < ε;
    - ``"official"``: m^t = u^{t−1} + Δφ^t, u^t = μ m^t − Δφ^t, u^0 = 0; frozen ⇔ |m^t| ≤ ε.

    Both are v^t = Δφ^t + c^{t−1} with a carry c^t = −μ v^t (paper) or μ v^t − Δφ^t (official).
    Epochs 1..``warmup`` train every neuron; afterwards each :meth:`step` sets the next epoch's
    frozen set (recomputed each epoch; ``pinning`` keeps frozen neurons frozen). ``selection``
    ``"random"``/``"topk"`` instead freeze ⌊(1 − p)·C_l⌋ neurons per layer, p = ``trained_fraction``,
    drawn uniformly or with the smallest |v|.

    An attention in-projection (:mod:`neuronwise.transformer.groups`) has heads as neurons: y is
    head h's output (the output projection's input columns of h, over tokens and its d dimensions)
    and freezing h freezes its q, k and v rows.

    A frozen neuron's parameters (weight row, bias entry; BN/LN γ_k, β_k) get, with :meth:`attach`
    (``mode="optim"``, SGD/Adam/AdamW): no gradient, no weight decay, momentum / Adam first moment
    zeroed (Adam's second moment decays), so they stay bit-identical. ``"grad"`` only zeroes their
    gradients; ``"restore"`` copies their values back after any optimizer's step
    (:mod:`neuronwise.neq.frozen`). ``skip_frozen_grads=True`` also saves real backward work
    (:mod:`neuronwise.neq.backward`).

    ``state_dict`` holds the hyperparameters (``eps``, ``mu``, ``velocity``, ``warmup``, ``mode``,
    ``selection``, ``trained_fraction``, ``pinning``, ``batch_size``, ``skip_frozen_grads``) with
    the statistics, as ``torch.optim`` does; a state saved without them (older checkpoints) keeps
    the constructor's values. ``layers``, ``exclude`` and ``val_inputs`` define the hooked model and
    Ξ and must match (``layers`` is checked).

    Frozen sets are per neuron, not per coupled channel group
    (:func:`neuronwise.structure.channel_groups`), on purpose: freezing moves no structure. A frozen
    row still computes its forward, so holding any subset of rows still leaves every function valid;
    groups matter only where rows are removed (masks, ``simplify``). Equilibrium is a property of
    each layer's own output (a block's conv2 before the residual addition, not the stream), and
    the writers of one stream channel can be at rest and moving at once: coupling would either
    freeze a moving neuron or train a resting one, losing the saving, while the backward work
    skipped is per row either way.

    Similarity sums and counts are all-reduced (:mod:`neuronwise.distributed`), so every rank
    freezes the same neurons whether Ξ is split across ranks or replicated.

    Args:
        model: the network, or its DDP or ``torch.compile`` wrapper (compiled before or after;
            layer names are those of the module inside).
        val_inputs: the inputs of Ξ, in a fixed order, as one tensor (N, ...).
        eps: threshold ε ≥ 0.
        mu: velocity momentum μ in [0, 1].
        velocity: ``"paper"`` or ``"official"``.
        layers: names of the modules to hook (default: every Conv2d/BatchNorm2d/LayerNorm/Linear
            with parameters).
        exclude: names never hooked (default: the classifier, the last ``nn.Linear``).
        warmup: epochs at the start that train every neuron (≥ 1).
        mode: ``"optim"``, ``"grad"`` or ``"restore"``.
        selection: ``"threshold"``, ``"random"`` or ``"topk"``.
        trained_fraction: p for ``random``/``topk``.
        pinning: once frozen, frozen for good (``threshold`` only).
        seed: seed of the ``random`` draws.
        batch_size: samples of Ξ per forward.
        skip_frozen_grads: skip the weight-gradient work of frozen neurons.
    """

    def __init__(
        self,
        model: nn.Module,
        val_inputs: Tensor,
        eps: float = 1e-3,
        mu: float = 0.5,
        velocity: str = "paper",
        layers: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        warmup: int = 1,
        mode: str = "optim",
        selection: str = "threshold",
        trained_fraction: float | None = None,
        pinning: bool = False,
        seed: int = 0,
        batch_size: int = 256,
        skip_frozen_grads: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected an nn.Module)")
        if not isinstance(val_inputs, Tensor) or val_inputs.dim() == 0 or len(val_inputs) == 0:
            raise ValueError("Invalid val_inputs: expected a tensor with at least one sample")
        self.model = unwrap(model)
        self.val_inputs = val_inputs
        self._set_hyperparameters({
            "eps": eps, "mu": mu, "velocity_form": velocity, "warmup": warmup, "mode": mode,
            "selection": selection, "trained_fraction": trained_fraction, "pinning": pinning,
            "batch_size": batch_size, "skip_frozen_grads": skip_frozen_grads,
        })
        self.modules = self._select_modules(layers, exclude)
        self._heads = {
            g.in_module: g
            for g in neuron_groups(self.model)
            if isinstance(g, AttentionHeads) and g.in_module in self.modules
        }

        self._generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.previous: dict[str, Tensor] = {}
        self.similarity: dict[str, Tensor] = {}
        self.velocity: dict[str, Tensor] = {}
        self.carry: dict[str, Tensor] = {}
        self.frozen: dict[str, Tensor] = {}
        self.history: list[list[int]] = []
        self._skip = FrozenGradSkip()
        self.start()

    def _set_hyperparameters(self, values: dict[str, Any]) -> None:
        """Validate all of :data:`HYPERPARAMETERS` together (they constrain each other), then set."""
        eps, mu, velocity, warmup = (values[k] for k in ("eps", "mu", "velocity_form", "warmup"))
        mode, selection, fraction = values["mode"], values["selection"], values["trained_fraction"]
        pinning, batch_size = values["pinning"], values["batch_size"]
        if not is_number(eps) or not eps >= 0:
            raise ValueError(f"Invalid eps: {eps} (expected >= 0)")
        if not is_number(mu) or not 0 <= mu <= 1:
            raise ValueError(f"Invalid mu: {mu} (expected in [0, 1])")
        if velocity not in VELOCITIES:
            raise ValueError(f"Invalid velocity: {velocity!r} (expected one of {VELOCITIES})")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"Invalid warmup: {warmup} (expected an integer >= 1)")
        if mode not in MODES:
            raise ValueError(f"Invalid mode: {mode!r} (expected one of {MODES})")
        if selection not in SELECTIONS:
            raise ValueError(f"Invalid selection: {selection!r} (expected one of {SELECTIONS})")
        if selection == "threshold" and fraction is not None:
            raise ValueError(
                f"Invalid trained_fraction: {fraction} (expected None with selection 'threshold')"
            )
        if selection != "threshold" and (not is_number(fraction) or not 0 <= fraction <= 1):
            raise ValueError(
                f"Invalid trained_fraction: {fraction} (expected in [0, 1] with selection "
                f"{selection!r})"
            )
        if pinning and selection != "threshold":
            raise ValueError(f"Invalid pinning: True (expected False with selection {selection!r})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected an integer >= 1)")
        self.eps = float(eps)
        self.mu = float(mu)
        self.velocity_form = velocity
        self.warmup = warmup
        self.mode = mode
        self.selection = selection
        self.trained_fraction = None if fraction is None else float(fraction)
        self.pinning = bool(pinning)
        self.batch_size = batch_size
        self.skip_frozen_grads = bool(values["skip_frozen_grads"])

    def _neurons(self, name: str) -> int:
        heads = self._heads.get(name)
        return layer_neurons(self.modules[name]) if heads is None else heads.num_heads

    def _frozen_row_mask(self, name: str) -> Tensor:
        """Per row of the module's parameters: frozen (a head's mask spread over its rows)."""
        heads = self._heads.get(name)
        return self.frozen[name] if heads is None else heads.to_rows(self.frozen[name])

    def _select_modules(self, layers, exclude) -> dict[str, nn.Module]:
        named = dict(self.model.named_modules())
        if exclude is None:
            classifier = find_classifier(self.model)
            exclude = [] if classifier is None else [classifier[0]]
        exclude = set(exclude)
        for name in exclude:
            if name not in named:
                raise ValueError(f"Invalid exclude: no module named {name!r} in the model")
        if layers is None:
            names = [
                name
                for name, m in named.items()
                if isinstance(m, HOOKED_TYPES) and getattr(m, "weight", None) is not None
            ]
        else:
            names = list(layers)
            for name in names:
                module = named.get(name)
                if not isinstance(module, HOOKED_TYPES) or getattr(module, "weight", None) is None:
                    raise ValueError(
                        f"Invalid layers: {name!r} is not a Conv2d/BatchNorm2d/LayerNorm/Linear "
                        "with parameters in the model"
                    )
        selected = {name: named[name] for name in names if name not in exclude}
        if not selected:
            raise ValueError("Invalid layers: no module left to hook")
        return selected

    # ------------------------------------------------------------------ epochs

    def start(self) -> None:
        """Record the epoch-0 outputs on Ξ and reset all statistics (the constructor calls it)."""
        self._skip.release()
        self.previous, _ = validation_pass(
            self.model, self.modules, self.val_inputs, self.batch_size, heads=self._heads
        )
        self.epoch = 0
        self.history = []
        self.similarity, self.velocity, self.carry, self.frozen = {}, {}, {}, {}
        for name, module in self.modules.items():
            n = self._neurons(name)
            self.similarity[name] = torch.ones(n, dtype=torch.float64, device=module.weight.device)
            self.velocity[name] = torch.zeros_like(self.similarity[name])
            self.carry[name] = torch.zeros_like(self.similarity[name])
            self.frozen[name] = torch.zeros(n, dtype=torch.bool, device=module.weight.device)

    @torch.no_grad()
    def step(self) -> None:
        """After a training epoch: φ, Δφ, velocity, and the next epoch's frozen neurons."""
        self._skip.release()
        self.previous, similarity = validation_pass(
            self.model, self.modules, self.val_inputs, self.batch_size, self.previous, self._heads
        )
        self.history.append([int(f.sum()) for f in self.frozen.values()])
        self.epoch += 1
        for name, phi in similarity.items():
            delta = phi - self.similarity[name]
            velocity = delta + self.carry[name]
            if self.velocity_form == "paper":
                self.carry[name] = -self.mu * velocity
            else:
                self.carry[name] = self.mu * velocity - delta
            self.similarity[name] = phi
            self.velocity[name] = velocity
            frozen = self._select(velocity)
            if self.epoch < self.warmup:
                frozen.zero_()
            elif self.pinning:
                frozen |= self.frozen[name]
            self.frozen[name] = frozen
        self._apply_skip()

    def _select(self, velocity: Tensor) -> Tensor:
        if self.selection == "threshold":
            speed = velocity.abs()
            return speed < self.eps if self.velocity_form == "paper" else speed <= self.eps
        n = velocity.numel()
        # The tolerance keeps float rounding of 1 − p (e.g. 1 − 0.8) from dropping a neuron.
        count = math.floor((1 - self.trained_fraction) * n + 1e-9)
        if self.selection == "random":
            chosen = torch.randperm(n, generator=self._generator)[:count].to(velocity.device)
        else:
            chosen = torch.argsort(velocity.abs(), stable=True)[:count]
        frozen = torch.zeros(n, dtype=torch.bool, device=velocity.device)
        frozen[chosen] = True
        return frozen

    # ------------------------------------------------------------------ freezing

    def frozen_rows(self) -> list[FrozenRows]:
        """The frozen rows of every parameter of the hooked modules that has some."""
        rows = []
        skipped = {id(p) for p in self._skip.params}
        for name, module in self.modules.items():
            index = self._frozen_row_mask(name).nonzero().flatten()
            if index.numel() == 0:
                continue
            for param in module.parameters(recurse=False):
                rows.append(
                    FrozenRows(
                        param, layer_neurons(module), index.to(param.device), id(param) in skipped
                    )
                )
        return rows

    def attach(self, optimizer: torch.optim.Optimizer) -> StepHooks:
        """Make ``optimizer`` leave frozen neurons alone; returns a handle with ``remove()``.

        ``mode="optim"`` supports ``SGD``, ``Adam`` and ``AdamW``; any other optimizer falls back to
        ``"restore"`` with a warning. The mode is read at every step (a loaded state applies).
        """
        supported = supports_optim_mode(optimizer)
        if self.mode == "optim" and not supported:
            warnings.warn(
                f"NEq mode 'optim' supports SGD, Adam and AdamW, not {type(optimizer).__name__}: "
                "using mode 'restore' (frozen rows copied back after each step)",
                stacklevel=2,
            )

        def mode() -> str:
            return "restore" if self.mode == "optim" and not supported else self.mode

        return StepHooks(optimizer, self.frozen_rows, mode)

    def _apply_skip(self) -> None:
        if self.skip_frozen_grads:
            self._skip.apply(
                self.modules, {name: self._frozen_row_mask(name) for name in self.modules}
            )

    def remove(self) -> None:
        """Undo ``skip_frozen_grads`` on the model (hooks, ``requires_grad``) until the next step."""
        self._skip.release()

    # ------------------------------------------------------------------ reporting

    def frozen_per_layer(self) -> dict[str, float]:
        """Fraction of each hooked layer's neurons frozen in the current epoch."""
        return {name: float(f.double().mean()) for name, f in self.frozen.items()}

    def frozen_fraction(self) -> float:
        """Fraction of all hooked neurons frozen in the current epoch."""
        frozen = sum(int(f.sum()) for f in self.frozen.values())
        return frozen / sum(f.numel() for f in self.frozen.values())

    def _mean_fractions(self) -> dict[str, float]:
        if not self.history:
            return {name: 0.0 for name in self.modules}
        counts = torch.tensor(self.history, dtype=torch.float64).mean(0)
        return {name: float(c) / self._neurons(name) for name, c in zip(self.modules, counts)}

    def trained_neurons(self, average: bool = False) -> float:
        r"""Σ_l N_l (1 − f_l) over every Conv2d/BatchNorm2d/LayerNorm/Linear of the model.

        Unhooked layers (the classifier) count as always trained. ``average``: the mean over the
        epochs trained so far instead of the current epoch.
        """
        fractions = self._mean_fractions() if average else self.frozen_per_layer()
        total = 0.0
        for name, module in self.model.named_modules():
            if isinstance(module, HOOKED_TYPES) and getattr(module, "weight", None) is not None:
                total += layer_neurons(module) * (1 - fractions.get(name, 0.0))
        return total

    def backward_flops(self, example_input: Tensor, average: bool = False) -> float:
        """Backward ops at batch 1 charged for the current epoch (METHODS §5 convention).

        ``average``: mean over the epochs trained so far (R is linear in the frozen fractions, so
        this is R at the mean fractions). A FLOPs convention, not measured time.
        """
        fractions = self._mean_fractions() if average else self.frozen_per_layer()
        return metrics.backward_flops(self.model, example_input, frozen=fractions)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            **{name: getattr(self, name) for name in HYPERPARAMETERS},
            "layers": list(self.modules),
            "epoch": self.epoch,
            "previous": dict(self.previous),
            "similarity": dict(self.similarity),
            "velocity": dict(self.velocity),
            "carry": dict(self.carry),
            "frozen": dict(self.frozen),
            "history": [list(h) for h in self.history],
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["layers"]) != list(self.modules):
            raise ValueError(
                f"Invalid state: layers {list(state['layers'])} (expected {list(self.modules)})"
            )
        self._skip.release()
        self._set_hyperparameters(
            {name: state.get(name, getattr(self, name)) for name in HYPERPARAMETERS}
        )
        devices = {name: m.weight.device for name, m in self.modules.items()}
        self.epoch = int(state["epoch"])
        for key in ("previous", "similarity", "velocity", "carry", "frozen"):
            setattr(self, key, {n: t.to(devices[n]).clone() for n, t in state[key].items()})
        self.history = [list(h) for h in state["history"]]
        self._generator.set_state(state["generator"])
        self._apply_skip()

    # ------------------------------------------------------------------ reporting: velocities

    def velocity_quantiles(self, quantiles: Iterable[float]) -> list[float]:
        """Quantiles q ∈ [0, 1] of |v| pooled over all hooked neurons (linear interpolation).

        The velocities of the last :meth:`step`, which chose the current epoch's frozen set
        (``threshold``: frozen ⇔ |v| below ε); all zero before the first step.
        """
        q = list(quantiles)
        if not q or not all(is_number(x) and 0 <= x <= 1 for x in q):
            raise ValueError(f"Invalid quantiles: {q} (expected numbers in [0, 1])")
        speeds = torch.cat([v.detach().abs().flatten().cpu() for v in self.velocity.values()])
        return torch.quantile(speeds, torch.tensor(q, dtype=speeds.dtype)).tolist()
