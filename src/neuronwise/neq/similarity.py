r"""NEq's similarity φ: how much each neuron's outputs on the validation subset Ξ moved (METHODS §5).

For neuron i with outputs y on Ξ (eval mode, float64):

.. math::
    \phi_i^t = \operatorname{mean}_\xi \cos(y^t_{\xi,i,\cdot},\, y^{t-1}_{\xi,i,\cdot})

with the cosine over spatial positions (1 if both vectors are zero, 0 if exactly one is); for
(N, C) outputs one cosine over the neuron's length-|Ξ| vector. Sums and counts are all-reduced
(:mod:`neuronwise.distributed`), so every rank derives the same φ.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from neuronwise import distributed
from neuronwise._utils import evaluating, layer_neurons, without_compile
from neuronwise.transformer.groups import AttentionHeads


def cosine(dot: Tensor, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    """Cosine from ⟨a, b⟩, |a|², |b|²: 1 when both vectors are zero, 0 when exactly one is."""
    zero_a, zero_b = norm_a == 0, norm_b == 0
    denominator = torch.where(zero_a | zero_b, torch.ones_like(norm_a), norm_a * norm_b).sqrt()
    value = torch.where(zero_a | zero_b, torch.zeros_like(dot), dot / denominator)
    return torch.where(zero_a & zero_b, torch.ones_like(value), value)


def neuron_outputs(module: nn.Module, output: Tensor) -> Tensor:
    """Output as (N, C) or (N, C, S): samples, neurons, flattened positions."""
    n = output.shape[0]
    if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
        return output.reshape(n, output.shape[1], -1)
    if output.dim() == 2:
        return output
    # Linear and LayerNorm put neurons last; the middle dims (tokens, positions) are positions.
    return output.reshape(n, -1, layer_neurons(module)).transpose(1, 2)


def head_outputs(heads: AttentionHeads, output: Tensor) -> Tensor:
    """Attention output before the output projection (N, …, H·d) as (N, H, positions·d)."""
    n = output.shape[0]
    per_head = output.reshape(n, -1, heads.num_heads, heads.head_dim).transpose(1, 2)
    return per_head.reshape(n, heads.num_heads, -1)


class _InputHook:
    """Forward pre-hook handing a module's input on as the "output" of a head group."""

    def __init__(self, hook):
        self.hook = hook

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.hook(module, args, args[0])


@torch.no_grad()
def validation_pass(
    model: nn.Module,
    modules: dict[str, nn.Module],
    inputs: Tensor,
    batch_size: int,
    previous: dict[str, Tensor] | None = None,
    heads: dict[str, AttentionHeads] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Eval-mode forward over Ξ = ``inputs``: the outputs per module and, with ``previous``, φ.

    A module named in ``heads`` (an attention in-projection) has one neuron per head, whose
    outputs are the head's columns of the output projection's input (:func:`head_outputs`).

    Statistics per module, shape (3, C), summed over samples and ranks: per-sample cosine sum,
    sample count, 0 for (N, C, S) outputs; ⟨a, b⟩, |a|², |b|² for (N, C) outputs. Returns
    ``(outputs, similarity)``; ``similarity`` is empty without ``previous``.
    """
    total = len(inputs)
    outputs: dict[str, Tensor] = {}
    seen: dict[str, int] = {}
    stats: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            group = (heads or {}).get(name)
            current = (
                neuron_outputs(module, output) if group is None else head_outputs(group, output)
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
            if previous is None:
                return
            before = previous[name][start : seen[name]]
            if before.shape != current.shape:
                raise RuntimeError(
                    f"NEq: output of {name!r} changed shape: {tuple(before.shape)} -> "
                    f"{tuple(current.shape)} (each hooked module must run once per forward)"
                )
            a, b = current.double(), before.double()
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

    handles = []
    for name, module in modules.items():
        if name in (heads or {}):
            out = model.get_submodule(heads[name].out_module)
            handles.append(out.register_forward_pre_hook(_InputHook(hook_for(name))))
        else:
            handles.append(module.register_forward_hook(hook_for(name)))
    device = next(model.parameters()).device
    try:
        with evaluating(model), without_compile():
            for start in range(0, total, batch_size):
                model(inputs[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if seen.get(name) != total]
    if missing:
        raise RuntimeError(f"NEq: hooked modules did not see every input of Ξ once: {missing}")
    if previous is None:
        return outputs, {}
    names = list(modules)
    # One collective for all layers: every rank then derives identical φ.
    reduced = distributed.all_reduce_sum(torch.cat([stats[n] for n in names], dim=1))
    similarity = {}
    for name, chunk in zip(names, reduced.split([stats[n].shape[1] for n in names], dim=1)):
        spatial = outputs[name].dim() == 3
        similarity[name] = chunk[0] / chunk[1] if spatial else cosine(*chunk)
    return outputs, similarity
