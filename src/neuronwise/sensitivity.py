"""Neuron sensitivity: how much the network output moves with each neuron's pre-activation.

SeReNe (Tartaglione et al., IEEE TNNLS 2022, arXiv 2102.03773) measures, for neuron k of a
``Linear``/``Conv2d`` layer with pre-activation output z (the module output, before BN and the
nonlinearity), the sensitivity of the C logits y to z_k. With α = 1/C (``num_classes``) and the mean
over samples n and spatial positions s:

- ``"lower-bound"`` (one backward of Σ_{n,c} y_{n,c} to the z's only):
  S_k = α · mean_{n,s} |Σ_c ∂y_{n,c}/∂z_{n,k,s}|
- ``"full"`` (C backwards): S_k = α · mean_{n,s} Σ_c |∂y_{n,c}/∂z_{n,k,s}|, the per-sample form;
  ``batch_mean=True`` differentiates the batch-mean logit instead (official code), i.e. S / B.
- ``"local"`` (no backward): S_k = 0 if mean_{n,s} z_{n,k,s} ≤ 0 else 1, so that the insensitivity
  relu(1 − S_k) is the sign test of the paper.

The derivatives come from ``torch.autograd.grad`` with ``retain_graph=True``: parameters' ``.grad``
are never touched and the graph stays usable for ``loss.backward()``. A per-sample derivative
∂y_{n,c}/∂z_{n,k,s} is taken as the derivative of Σ_m y_{m,c}; it is exact unless samples interact
(BatchNorm in training mode), where it includes the cross-sample terms, as in the official code.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import distributed
from ._utils import check_modules, graph_break, unwrap, watch_hooks

VARIANTS = ("lower-bound", "full", "local")


class _OutputRecorder:
    """Forward hook writing a module's grad-enabled output to ``outputs[name]``.

    A class rather than a closure so that a hooked model still pickles and deep-copies; a copy
    records into a fresh dictionary of its own, never into the original's.
    """

    def __init__(self, name: str, outputs: dict[str, Tensor]):
        self.name = name
        self.outputs = outputs

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> None:
        graph_break()  # under torch.compile, z must be a real tensor on the way to the logits
        if torch.is_grad_enabled():
            self.outputs[self.name] = output

    def __getstate__(self) -> dict:
        return {"name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.name, self.outputs = state["name"], {}


class NeuronActivations:
    """Forward hooks that keep each module's output z, still attached to the autograd graph.

    Only grad-enabled forwards are recorded (training steps, not ``no_grad`` evaluation); each new
    forward overwrites the previous z of that module. ``Linear`` neurons lie on the last dimension,
    ``Conv`` channels on dimension 1. Use as a context manager or call :meth:`remove`.

    Args:
        model: the network, or its ``torch.compile``/DDP wrapper; module names are those of the
            module inside (:func:`~neuronwise._utils.unwrap`).
        modules: module types whose outputs are recorded.
    """

    def __init__(
        self, model: nn.Module, modules: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Invalid model: {type(model).__name__} (expected torch.nn.Module)")
        modules = check_modules(modules)
        model = unwrap(model)
        watch_hooks()
        self.outputs: dict[str, Tensor] = {}
        self.channel_dims: dict[str, int] = {}
        self.modules: dict[str, nn.Module] = {}
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, modules):
                self.modules[name] = module
                self.channel_dims[name] = -1 if isinstance(module, nn.Linear) else 1
                recorder = _OutputRecorder(name, self.outputs)
                self._handles.append(module.register_forward_hook(recorder))
        if not self.modules:
            raise ValueError(f"Invalid model: no module of type {modules!r} to hook")

    def clear(self) -> None:
        """Drop the recorded outputs (and with them the graph they keep alive)."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the hooks; the model is left exactly as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _per_neuron_mean(tensor: Tensor, channel_dim: int) -> Tensor:
    """Mean over every dimension except the neuron dimension (samples and positions)."""
    channel_dim = channel_dim % tensor.dim()
    dims = [d for d in range(tensor.dim()) if d != channel_dim]
    return tensor.float().mean(dim=dims)


def neuron_sensitivity(
    logits: Tensor | None,
    activations: NeuronActivations | Mapping[str, Tensor],
    variant: str = "lower-bound",
    num_classes: int | None = None,
    batch_mean: bool = False,
) -> dict[str, Tensor]:
    """Per-neuron sensitivity S (a 1-D float tensor per module name) of the logits to each z.

    ``activations`` is a :class:`NeuronActivations` or a mapping name → z with neurons on dimension 1.
    ``logits`` (B, C) must come from the same forward; it is unused by ``"local"``. Under DDP the
    per-neuron means are averaged over ranks (a collective: call it on every rank).
    """
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r} (expected one of {VARIANTS})")
    if isinstance(activations, NeuronActivations):
        outputs, dims = activations.outputs, activations.channel_dims
    else:
        outputs, dims = dict(activations), {}
    if not outputs:
        raise ValueError(
            "Invalid activations: nothing recorded (run a grad-enabled forward of the hooked model first)"
        )
    names = list(outputs)
    zs = [outputs[n] for n in names]
    channel_dims = [dims.get(n, 1) for n in names]

    if variant == "local":
        means = [_per_neuron_mean(z.detach(), d) for z, d in zip(zs, channel_dims)]
        return {n: (distributed.all_reduce_mean(m) > 0).float() for n, m in zip(names, means)}

    if logits is None or logits.dim() != 2:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(f"Invalid logits: shape {shape} (expected (batch, classes))")
    classes = logits.shape[1] if num_classes is None else num_classes
    if classes < 1:
        raise ValueError(f"Invalid num_classes: {classes} (expected >= 1)")
    alpha = 1.0 / classes

    if variant == "lower-bound":
        grads = torch.autograd.grad(
            logits, zs, torch.ones_like(logits), retain_graph=True, allow_unused=True
        )
        totals = [torch.zeros_like(z) if g is None else g.abs() for z, g in zip(zs, grads)]
    else:
        totals = [torch.zeros_like(z, dtype=torch.float32) for z in zs]
        for c in range(logits.shape[1]):
            grads = torch.autograd.grad(
                logits[:, c].sum(), zs, retain_graph=True, allow_unused=True
            )
            for total, g in zip(totals, grads):
                if g is not None:
                    total.add_(g.abs())
        if batch_mean:
            totals = [t / logits.shape[0] for t in totals]
    result = {}
    for name, total, d in zip(names, totals, channel_dims):
        result[name] = distributed.all_reduce_mean(_per_neuron_mean(total, d)).mul_(alpha)
    return result
