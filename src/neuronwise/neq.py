"""NEq: neurons at equilibrium skip their updates (Bragagnolo et al., NeurIPS 2022; METHODS.md §5)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed, metrics
from ._utils import evaluating, find_classifier, is_number, layer_neurons
from .neq_backward import ActiveRowsHook, supports_active_rows
from .transformer.groups import AttentionHeads, neuron_groups

HOOKED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Linear)
VELOCITIES = ("paper", "official")
MODES = ("optim", "grad", "restore")
SELECTIONS = ("threshold", "random", "topk")


def _rows(param: Tensor, neurons: int) -> Tensor:
    """``param`` indexed by neuron along dim 0 (LayerNorm over several dims is flattened)."""
    return param if param.shape[0] == neurons else param.view(-1)


def _channels(module: nn.Module, output: Tensor) -> Tensor:
    """Output as (N, C) or (N, C, S): samples, neurons, flattened positions."""
    n = output.shape[0]
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
        return output.reshape(n, output.shape[1], -1)
    if output.dim() == 2:
        return output
    # Linear and LayerNorm put neurons last; the middle dims (tokens, positions) are positions.
    return output.reshape(n, -1, layer_neurons(module)).transpose(1, 2)


def _head_channels(heads: AttentionHeads, output: Tensor) -> Tensor:
    """Attention output before the output projection (N, …, H·d) as (N, H, positions·d)."""
    n = output.shape[0]
    per_head = output.reshape(n, -1, heads.num_heads, heads.head_dim).transpose(1, 2)
    return per_head.reshape(n, heads.num_heads, -1)


class _HeadOutputs:
    """Forward pre-hook on an output projection handing its input (the heads' outputs) on."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.hook(module, args, args[0])


def cosine(dot: Tensor, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    """Cosine from ⟨a, b⟩, |a|², |b|²: 1 when both vectors are zero, 0 when exactly one is."""
    zero_a, zero_b = norm_a == 0, norm_b == 0
    denominator = torch.where(zero_a | zero_b, torch.ones_like(norm_a), norm_a * norm_b).sqrt()
    value = torch.where(zero_a | zero_b, torch.zeros_like(dot), dot / denominator)
    return torch.where(zero_a & zero_b, torch.ones_like(value), value)


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
    gradients; ``"restore"`` copies their values back after any optimizer's step.
    ``skip_frozen_grads=True`` also saves real backward work (see :mod:`neuronwise.neq_backward`).

    Similarity sums and counts are all-reduced (:mod:`neuronwise.distributed`), so every rank
    freezes the same neurons whether Ξ is split across ranks or replicated.

    Args:
        model: the network (an unwrapped module or its DDP wrapper).
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
        if selection == "threshold" and trained_fraction is not None:
            raise ValueError(
                f"Invalid trained_fraction: {trained_fraction} (expected None with selection "
                "'threshold')"
            )
        if selection != "threshold" and (
            not is_number(trained_fraction) or not 0 <= trained_fraction <= 1
        ):
            raise ValueError(
                f"Invalid trained_fraction: {trained_fraction} (expected in [0, 1] with selection "
                f"{selection!r})"
            )
        if pinning and selection != "threshold":
            raise ValueError(f"Invalid pinning: True (expected False with selection {selection!r})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size} (expected an integer >= 1)")

        self.model = (
            model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        )
        self.val_inputs = val_inputs
        self.eps = float(eps)
        self.mu = float(mu)
        self.velocity_form = velocity
        self.warmup = warmup
        self.mode = mode
        self.selection = selection
        self.trained_fraction = None if trained_fraction is None else float(trained_fraction)
        self.pinning = bool(pinning)
        self.batch_size = batch_size
        self.skip_frozen_grads = bool(skip_frozen_grads)
        self.modules = self._select_modules(layers, exclude)
        # A hooked attention in-projection is frozen per head: q, k, v rows together, by the
        # similarity of the head's output (the output projection's input columns).
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
        self._skip_handles: list[Any] = []
        self._skip_params: list[nn.Parameter] = []
        self.start()

    def _neurons(self, name: str) -> int:
        heads = self._heads.get(name)
        return layer_neurons(self.modules[name]) if heads is None else heads.num_heads

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

    # ------------------------------------------------------------------ validation pass

    @torch.no_grad()
    def _validation_pass(self, compare: bool) -> dict[str, Tensor]:
        """Eval-mode forward over Ξ: new outputs, and (if ``compare``) φ per module.

        Statistics per module, shape (3, C), summed over samples and ranks: per-sample cosine sum,
        sample count, 0 for (N, C, S) outputs; ⟨a, b⟩, |a|², |b|² for (N, C) outputs.
        """
        total = len(self.val_inputs)
        outputs: dict[str, Tensor] = {}
        seen: dict[str, int] = {}
        stats: dict[str, Tensor] = {}

        def hook_for(name: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
                heads = self._heads.get(name)
                current = (
                    _channels(module, output) if heads is None else _head_channels(heads, output)
                )
                if name not in outputs:
                    outputs[name] = current.new_empty((total, *current.shape[1:]))
                    seen[name] = 0
                start, seen[name] = seen[name], seen[name] + current.shape[0]
                if seen[name] > total or outputs[name].shape[1:] != current.shape[1:]:
                    raise RuntimeError(
                        f"NEq: {name!r} produced more or differently shaped outputs than the "
                        "inputs of Ξ (each hooked module must run once per forward)"
                    )
                outputs[name][start : seen[name]] = current
                if not compare:
                    return
                previous = self.previous[name][start : seen[name]]
                if previous.shape != current.shape:
                    raise RuntimeError(
                        f"NEq: output of {name!r} changed shape: {tuple(previous.shape)} -> "
                        f"{tuple(current.shape)} (each hooked module must run once per forward)"
                    )
                a, b = current.double(), previous.double()
                dims = -1 if a.dim() == 3 else 0
                sums = torch.stack([(a * b).sum(dims), (a * a).sum(dims), (b * b).sum(dims)])
                if a.dim() == 3:
                    per_sample = cosine(*sums)
                    sums = torch.stack(
                        [
                            per_sample.sum(0),
                            torch.full_like(per_sample[0], a.shape[0]),
                            torch.zeros_like(per_sample[0]),
                        ]
                    )
                stats[name] = stats[name] + sums if name in stats else sums

            return hook

        handles = [
            m.register_forward_hook(hook_for(name))
            if name not in self._heads
            else self.model.get_submodule(self._heads[name].out_module).register_forward_pre_hook(
                _HeadOutputs(hook_for(name))
            )
            for name, m in self.modules.items()
        ]
        device = next(self.model.parameters()).device
        try:
            with evaluating(self.model):
                for start in range(0, total, self.batch_size):
                    self.model(self.val_inputs[start : start + self.batch_size].to(device))
        finally:
            for handle in handles:
                handle.remove()
        missing = [name for name in self.modules if seen.get(name) != total]
        if missing:
            raise RuntimeError(f"NEq: hooked modules did not see every input of Ξ once: {missing}")
        self.previous = outputs
        if not compare:
            return {}
        names = list(self.modules)
        # One collective for all layers: every rank then derives identical φ.
        reduced = distributed.all_reduce_sum(torch.cat([stats[n] for n in names], dim=1))
        similarity = {}
        for name, chunk in zip(names, reduced.split([stats[n].shape[1] for n in names], dim=1)):
            spatial = self.previous[name].dim() == 3
            similarity[name] = chunk[0] / chunk[1] if spatial else cosine(*chunk)
        return similarity

    # ------------------------------------------------------------------ epochs

    def start(self) -> None:
        """Record the epoch-0 outputs on Ξ and reset all statistics (the constructor calls it)."""
        self._release_skip()
        self._validation_pass(compare=False)
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
        self._release_skip()
        similarity = self._validation_pass(compare=True)
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

    def _frozen_rows(self) -> list[tuple[Tensor, int, Tensor, bool]]:
        """(parameter, neurons, frozen row indices, skipped by autograd) per partly frozen parameter."""
        rows = []
        skipped = {id(p) for p in self._skip_params}
        for name, module in self.modules.items():
            index = self.frozen[name].nonzero().flatten()
            if index.numel() == 0:
                continue
            neurons = layer_neurons(module)
            if name in self._heads:
                index = self._heads[name].rows(index.cpu())
            for param in module.parameters(recurse=False):
                rows.append((param, neurons, index.to(param.device), id(param) in skipped))
        return rows

    def attach(self, optimizer: torch.optim.Optimizer) -> _Handles:
        """Make ``optimizer`` leave frozen neurons alone; returns a handle with ``remove()``.

        ``mode="optim"`` supports ``SGD``, ``Adam`` and ``AdamW``; any other optimizer falls back to
        ``"restore"`` with a warning.
        """
        mode = self.mode
        if mode == "optim" and not isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam)):
            warnings.warn(
                f"NEq mode 'optim' supports SGD, Adam and AdamW, not {type(optimizer).__name__}: "
                "using mode 'restore' (frozen rows copied back after each step)",
                stacklevel=2,
            )
            mode = "restore"
        saved: list[tuple] = []

        @torch.no_grad()
        def pre_hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            saved.clear()
            groups = {id(p): g for g in opt.param_groups for p in g["params"]}
            for param, neurons, index, skipped in self._frozen_rows():
                if param.grad is None:
                    if not skipped:
                        continue  # the optimizer skips it: nothing moves
                    # Autograd skipped it; a zero gradient keeps Adam's step count and decay exact.
                    param.grad = torch.zeros_like(param)
                elif mode != "restore":
                    _rows(param.grad, neurons).index_fill_(0, index, 0)
                if mode == "grad":
                    continue
                rows = _rows(param, neurons)
                entry = [param, neurons, index, rows.index_select(0, index), None, None]
                group = groups.get(id(param))
                if (
                    mode == "optim"
                    and group is not None
                    and isinstance(opt, torch.optim.Adam)
                    and group["weight_decay"] != 0
                    and not _decoupled(opt, group)
                ):
                    # L2 decay would feed wd·p into the second moment: keep its pre-step rows.
                    state = opt.state.get(param, {})
                    for slot, key in ((4, "exp_avg_sq"), (5, "max_exp_avg_sq")):
                        if key in state:
                            entry[slot] = _rows(state[key], neurons).index_select(0, index)
                    entry.append(group)
                saved.append(entry)

        @torch.no_grad()
        def post_hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            for entry in saved:
                param, neurons, index, values = entry[:4]
                _rows(param, neurons).index_copy_(0, index, values)
                if mode != "optim":
                    continue
                state = opt.state.get(param, {})
                for key in ("momentum_buffer", "exp_avg"):
                    if state.get(key) is not None:
                        _rows(state[key], neurons).index_fill_(0, index, 0)
                if len(entry) == 7:
                    beta2 = entry[6]["betas"][1]
                    square = _rows(state["exp_avg_sq"], neurons)
                    decayed = torch.zeros_like(square[index]) if entry[4] is None else entry[4]
                    square.index_copy_(0, index, decayed * beta2)
                    if "max_exp_avg_sq" in state:
                        maximum = _rows(state["max_exp_avg_sq"], neurons)
                        previous = torch.zeros_like(decayed) if entry[5] is None else entry[5]
                        maximum.index_copy_(0, index, torch.maximum(previous, decayed * beta2))
            saved.clear()

        return _Handles(
            [
                optimizer.register_step_pre_hook(pre_hook),
                optimizer.register_step_post_hook(post_hook),
            ]
        )

    def _apply_skip(self) -> None:
        """Fully frozen layers: no ``requires_grad``; partly frozen Conv2d/Linear: active-row grads.

        Per forward, where the split backward does not pay (:func:`.neq_backward.split_pays`),
        the layer keeps autograd's own backward and the optimizer hooks mask its frozen rows.
        """
        if not self.skip_frozen_grads:
            return
        for name, module in self.modules.items():
            frozen = self.frozen[name]
            if bool(frozen.all()):
                for param in module.parameters(recurse=False):
                    if param.requires_grad:
                        param.requires_grad_(False)
                        self._skip_params.append(param)
            elif bool(frozen.any()) and supports_active_rows(module):
                active = (~frozen).nonzero().flatten()
                if name in self._heads:
                    active = self._heads[name].rows(active.cpu())
                active = active.to(module.weight.device)
                # Prepended, so that other forward hooks see the re-rooted output.
                self._skip_handles.append(
                    module.register_forward_hook(
                        ActiveRowsHook(active, mask_unsplit=False), prepend=True
                    )
                )

    def _release_skip(self) -> None:
        for handle in self._skip_handles:
            handle.remove()
        for param in self._skip_params:
            param.requires_grad_(True)
        self._skip_handles, self._skip_params = [], []

    def remove(self) -> None:
        """Undo ``skip_frozen_grads`` on the model (hooks, ``requires_grad``) until the next step."""
        self._release_skip()

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
        self._release_skip()
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


class _Handles:
    """Removable handle over several hooks, like ``torch.utils.hooks.RemovableHandle``."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
