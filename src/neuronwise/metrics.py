"""Counting parameters, non-zeros, neurons and operations, each under a named convention.

Parameters (METHODS.md §8): ``"paper"`` = weights and biases of ``nn.Linear`` and ``nn.Conv2d``
(EIDOSLAB/pruning-validation); ``"all"`` = every parameter; ``"lobster-log"`` = Linear, Conv2d and
BatchNorm2d (the LOBSTER training logs).

Neurons: ``"default"`` = Linear output rows and Conv2d output channels whose weight row holds a
non-zero (LOBSTER); ``"serene-log"`` adds non-zero BatchNorm2d γ entries and ConvTranspose2d output
channels (SeReNe logs); ``"neq"`` = every Conv2d, BatchNorm2d, LayerNorm (one per normalized
element) and Linear channel, pruned or not (NEq).

Operations, all at batch 1 in eval mode, measured with forward hooks (METHODS.md §5, §7):
forward FLOPs by the thop rules, Conv2d out_numel·(C_in/groups·k_h·k_w + [bias]), BatchNorm and
LayerNorm 2·out_numel, Linear in_features·out_numel; MACs = the Conv2d and Linear terms without
bias; non-zero MACs = Σ output positions × non-zero weights; backward FLOPs (NEq) = Σ_l 2·forward_l
·(1 − f_l), f_l the frozen fraction of layer l.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from neuronwise._utils import evaluating, layer_neurons, unwrap, without_compile

PARAMETER_CONVENTIONS = ("paper", "all", "lobster-log")
NEURON_CONVENTIONS = ("default", "serene-log", "neq")

_PARAMETER_MODULES: dict[str, tuple[type[nn.Module], ...]] = {
    "paper": (nn.Linear, nn.Conv2d),
    "lobster-log": (nn.Linear, nn.Conv2d, nn.BatchNorm2d),
}
# thop counts every batch-norm flavour alike; the NEq tables need only BatchNorm2d.
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm)
_FLOP_MODULES = (nn.Conv2d, nn.Linear, *_NORM_MODULES)

_SUMMARY_FIELDS = (
    ("params_paper", "parameters", "paper: Linear+Conv2d weights and biases"),
    ("nonzero_params_paper", "non-zero parameters", "paper: Linear+Conv2d weights and biases"),
    ("params_all", "parameters", "all: every parameter"),
    ("nonzero_params_all", "non-zero parameters", "all: every parameter"),
    ("neurons_alive", "neurons alive", "default: Linear rows/Conv2d channels, a non-zero weight"),
    ("neurons_total", "neurons", "default: Linear rows/Conv2d channels"),
    ("forward_flops", "forward FLOPs", "thop: Conv2d(+bias), BN, LN, Linear; batch 1, eval"),
    ("macs", "MACs", "Conv2d+Linear, no bias; batch 1, eval"),
    ("nonzero_macs", "non-zero MACs", "Conv2d+Linear, non-zero weights only; batch 1, eval"),
)


def _parameter_tensors(model: nn.Module, convention: str) -> list[Tensor]:
    if convention not in PARAMETER_CONVENTIONS:
        raise ValueError(
            f"Invalid convention: {convention!r} (expected one of {PARAMETER_CONVENTIONS})"
        )
    model = unwrap(model)
    if convention == "all":
        return list(model.parameters())
    types = _PARAMETER_MODULES[convention]
    tensors: dict[int, Tensor] = {}  # keyed by id: a shared parameter counts once
    for module in model.modules():
        if isinstance(module, types):
            for parameter in module.parameters(recurse=False):
                tensors[id(parameter)] = parameter
    return list(tensors.values())


def count_parameters(model: nn.Module, convention: str = "paper") -> int:
    """Number of parameter entries under ``convention`` (``"paper"``, ``"all"``, ``"lobster-log"``)."""
    return sum(p.numel() for p in _parameter_tensors(model, convention))


def count_nonzero(model: nn.Module, convention: str = "paper") -> int:
    """Number of non-zero parameter entries under ``convention`` (see :func:`count_parameters`)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in _parameter_tensors(model, convention))


def sparsity_report(model: nn.Module, convention: str = "paper") -> dict[str, float]:
    """Total and non-zero counts, remaining % = 100·nonzero/total, pruned %, total/nonzero ratio.

    The compression ratio is ``inf`` when every counted parameter is zero.
    """
    total = count_parameters(model, convention)
    if total == 0:
        raise ValueError(
            f"Invalid model: {type(model).__name__} has no parameters under convention "
            f"{convention!r}"
        )
    nonzero = count_nonzero(model, convention)
    remaining = 100.0 * nonzero / total
    return {
        "total": total,
        "nonzero": nonzero,
        "remaining_percent": remaining,
        "pruned_percent": 100.0 - remaining,
        "compression_ratio": total / nonzero if nonzero else math.inf,
    }


def _weight_rows(module: nn.Module, convention: str) -> Tensor | None:
    """One row per neuron of ``module`` (its incoming weights), or None if it holds no neurons."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module.weight.detach().reshape(module.weight.shape[0], -1)
    if convention != "serene-log":
        return None
    if isinstance(module, nn.ConvTranspose2d):
        # Weight (in, out/groups, k_h, k_w): gather each output channel's inputs across its group.
        weight = module.weight.detach()
        groups = module.groups
        weight = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
        return weight.transpose(1, 2).reshape(module.out_channels, -1)
    if isinstance(module, nn.BatchNorm2d) and module.weight is not None:
        return module.weight.detach().reshape(-1, 1)
    return None


def count_neurons(model: nn.Module, convention: str = "default") -> dict[str, tuple[int, int]]:
    """Per layer name ``(alive, total)`` neurons, plus ``"total"`` summed over layers.

    ``"default"``: Linear rows / Conv2d output channels, alive if any incoming weight is non-zero
    (biases ignored). ``"serene-log"``: also BatchNorm2d γ entries (alive if non-zero) and
    ConvTranspose2d output channels. ``"neq"``: Conv2d, BatchNorm2d, LayerNorm and Linear
    channels, all counted alive.
    """
    if convention not in NEURON_CONVENTIONS:
        raise ValueError(
            f"Invalid convention: {convention!r} (expected one of {NEURON_CONVENTIONS})"
        )
    counts: dict[str, tuple[int, int]] = {}
    for name, module in unwrap(model).named_modules():
        if convention == "neq":
            channels = layer_neurons(module)
            if channels:
                counts[name] = (channels, channels)
            continue
        rows = _weight_rows(module, convention)
        if rows is not None:
            counts[name] = (int((rows != 0).any(dim=1).sum()), rows.shape[0])
    counts["total"] = (sum(a for a, _ in counts.values()), sum(t for _, t in counts.values()))
    return counts


def _hooked_counts(
    model: nn.Module,
    example_input: Tensor,
    types: tuple[type[nn.Module], ...],
    measure: Callable[[nn.Module, Tensor], int],
) -> dict[str, int]:
    """Sum ``measure(module, output)`` per module of ``types`` over one eval forward at batch 1.

    Every module's training flag is restored afterwards, and the hooks are removed, even if the
    forward raises.
    """
    if not isinstance(example_input, Tensor) or example_input.dim() == 0:
        raise TypeError(
            f"Invalid example_input: {type(example_input).__name__} (expected a batched tensor)"
        )
    if example_input.shape[0] == 0:
        raise ValueError("Invalid example_input: empty batch (expected at least one sample)")
    counts: dict[str, int] = {}
    handles = []
    model = unwrap(model)

    def hook_for(name: str) -> Callable[[nn.Module, tuple, Tensor], None]:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            counts[name] += measure(module, output)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, types):
            counts[name] = 0
            handles.append(module.register_forward_hook(hook_for(name)))
    with torch.no_grad():
        hooked_eval_forward(model, handles, lambda: model(example_input[:1]))
    return counts


def hooked_eval_forward(model: nn.Module, handles: list, forward: Callable[[], object]) -> None:
    """Run ``forward()`` with ``model`` in eval mode, then remove ``handles`` and restore modes.

    Modes are restored per module, since submodules may have been in a mode different from the
    root's; both happen even if the forward raises.
    """
    try:
        with evaluating(model), without_compile():
            forward()
    finally:
        for handle in handles:
            handle.remove()


def _forward_ops(module: nn.Module, output: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kernel = module.in_channels // module.groups * math.prod(module.kernel_size)
        return output.numel() * (kernel + (module.bias is not None))
    if isinstance(module, nn.Linear):
        return module.in_features * output.numel()
    return 2 * output.numel()


def forward_flops(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Forward FLOPs per Conv2d, BatchNorm, LayerNorm and Linear layer (thop rules), plus ``"total"``.

    Measured on ``example_input[:1]`` in eval mode; a module called twice counts twice.
    """
    counts = _hooked_counts(model, example_input, _FLOP_MODULES, _forward_ops)
    counts["total"] = sum(counts.values())
    return counts


def _dense_macs(module: nn.Module, output: Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        return output.numel() * (
            module.in_channels // module.groups * math.prod(module.kernel_size)
        )
    return module.in_features * output.numel()


def _nonzero_macs(module: nn.Module, output: Tensor) -> int:
    positions = output.numel() // module.weight.shape[0]
    return positions * int(torch.count_nonzero(module.weight))


def macs(model: nn.Module, example_input: Tensor, nonzero: bool = False) -> int:
    """Forward multiply-accumulates of Conv2d and Linear layers, without bias, at batch 1.

    ``nonzero=True`` counts only non-zero weights: Σ_layers output positions × non-zero weights,
    the cost of an ideal sparse kernel.
    """
    measure = _nonzero_macs if nonzero else _dense_macs
    return sum(_hooked_counts(model, example_input, (nn.Conv2d, nn.Linear), measure).values())


def backward_flops(
    model: nn.Module, example_input: Tensor, frozen: Mapping[str, float] | None = None
) -> int:
    """NEq backward FLOPs of one iteration at batch 1: Σ_l 2·forward_l·(1 − f_l), rounded.

    Layers are those :func:`forward_flops` counts; ``frozen`` maps a layer name to the fraction
    f_l ∈ [0, 1] of its neurons frozen (missing layers: 0).
    """
    frozen = dict(frozen or {})
    for name, fraction in frozen.items():
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(
                f"Invalid frozen fraction for {name!r}: {fraction!r} (expected in [0, 1])"
            )
    counts = forward_flops(model, example_input)
    del counts["total"]
    unknown = sorted(set(frozen) - set(counts))
    if unknown:
        raise ValueError(
            f"Invalid frozen layer: {unknown[0]!r} (expected a Conv2d, BatchNorm, LayerNorm or "
            f"Linear module name of the model)"
        )
    return round(
        sum(2 * ops * (1.0 - float(frozen.get(name, 0.0))) for name, ops in counts.items())
    )


def summary(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Parameters and non-zeros (``paper`` and ``all``), default neurons, FLOPs and MACs.

    Keys: ``params_paper``, ``nonzero_params_paper``, ``params_all``, ``nonzero_params_all``,
    ``neurons_alive``, ``neurons_total``, ``forward_flops``, ``macs``, ``nonzero_macs``;
    :func:`format_summary` prints them with their conventions.
    """
    alive, total = count_neurons(model)["total"]
    return {
        "params_paper": count_parameters(model, "paper"),
        "nonzero_params_paper": count_nonzero(model, "paper"),
        "params_all": count_parameters(model, "all"),
        "nonzero_params_all": count_nonzero(model, "all"),
        "neurons_alive": alive,
        "neurons_total": total,
        "forward_flops": forward_flops(model, example_input)["total"],
        "macs": macs(model, example_input),
        "nonzero_macs": macs(model, example_input, nonzero=True),
    }


def format_summary(summary_dict: Mapping[str, int]) -> str:
    """An aligned text table of a :func:`summary` dict: quantity, value, convention."""
    missing = [key for key, _, _ in _SUMMARY_FIELDS if key not in summary_dict]
    if missing:
        raise ValueError(f"Invalid summary: missing {missing} (expected the dict of summary())")
    rows = [("quantity", "value", "convention")]
    rows += [(label, f"{summary_dict[key]:,}", text) for key, label, text in _SUMMARY_FIELDS]
    label_width = max(len(row[0]) for row in rows)
    value_width = max(len(row[1]) for row in rows)
    return "\n".join(
        f"{label:<{label_width}}  {value:>{value_width}}  {text}" for label, value, text in rows
    )
