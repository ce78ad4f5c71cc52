"""SeReNe: neuron-level sensitivity regularization (Tartaglione et al., IEEE TNNLS 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._utils import (
    by_device_and_dtype,
    check_foreach,
    check_lam,
    load_hyperparameters,
    unwrap,
    use_foreach,
)
from .masks import ParameterMask, check_mask
from .sensitivity import VARIANTS, NeuronActivations, neuron_sensitivity
from .transformer.groups import AttentionHeads, FeedForwardUnits, neuron_groups

# 1 as a 0-d CPU tensor: ``torch.sub(_ONE, s)`` is 1 − s on any device and dtype, one kernel.
_ONE = torch.ones(())


class SeReNe:
    r"""Decays all incoming weights of each insensitive neuron together, after ``optimizer.step()``.

    For every ``Linear``/``Conv2d`` neuron k with sensitivity S_k (:func:`neuron_sensitivity`,
    α = 1/C) and insensitivity S̄_k = relu(1 − S_k), with each weight viewed as (out, −1):

    .. math::
        W[k] \leftarrow W[k] - \lambda \, \bar S_k \, W[k]

    then the mask sets pruned parameters (weights and biases of these modules) back to zero.

    Transformers (:mod:`neuronwise.transformer.groups`): an attention head h is one neuron group,
    with S_h the mean of its value rows' S_k (the mean of |Σ_c ∂y/∂v| over samples, tokens and the
    head's d value dimensions); an FFN unit j is fc1's row j. The output projections (attention
    ``proj``, FFN ``fc2``) write the residual stream, which LayerNorm couples: their rows are not
    neurons. Their columns belong to the group that feeds them, and the whole group decays
    together by its S̄: the head's q, k, v rows and its d output-projection columns, the unit's
    fc1 row and fc2 column. So every weight decays with exactly one neuron's S̄, as in an MLP, and
    a head cannot keep its function by growing the projection columns while its value rows
    shrink (the product v·proj is invariant to rescaling one factor). ``nn.MultiheadAttention``'s
    packed in-projection has no module to hook: convert it first
    (:func:`neuronwise.transformer.convert_attention`), else its heads are not decayed. Biases
    and BatchNorm are not regularized. λ is not multiplied by the learning rate (official code). The
    update uses the weights after the optimizer step and the sensitivity of the forward before it,
    as in the official pipeline (METHODS §1, §3).

    Each iteration::

        logits = model(x)                 # hooks record every z
        reg.compute(logits)               # extra backward(s) to the z's; .grad untouched
        F.cross_entropy(logits, y).backward()
        optimizer.step()
        reg.step()

    ``compute`` must run before ``optimizer.step()``: autograd refuses to differentiate through
    weights that were changed in place. It can run before or after ``loss.backward(retain_graph=True)``.
    Several ``compute`` calls before one ``step`` (gradient accumulation) average their sensitivities.
    Share the mask with the pruner so that its new zeros are kept:
    ``PruneOnPlateau(model, evaluate, modules=(nn.Linear, nn.Conv2d), mask=reg.mask)``.

    Args:
        model: the network, or its DDP or ``torch.compile`` wrapper (compiled before or after;
            names are those of the module inside).
        lam: regularization strength λ ≥ 0.
        variant: ``"lower-bound"`` (default), ``"full"`` or ``"local"``.
        modules: regularized module types.
        foreach: use the multi-tensor kernels (default: on CUDA only, as ``torch.optim``).
        mask: the :class:`~neuronwise.pruning.ParameterMask` to apply (default: a new one over the
            weights and biases of ``modules``, built with ``zeros_at_start``); pass
            ``ParameterMask(model, (nn.Linear, nn.Conv2d), granularity="neurons", example_input=x)``
            for neuron masks (``example_input``: a residual stream's channel, a depthwise pair, is
            masked in every conv that writes it, only once all are dead, so that every masked
            neuron is one ``simplify`` removes; plain chains mask the same without it).
        zeros_at_start: ``"free"`` (default): nothing is masked until a pruning step;
            ``"masked"`` (official): entries that are zero now stay zero (see ``ParameterMask``).
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        variant: str = "lower-bound",
        modules: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
        foreach: bool | None = None,
        mask: ParameterMask | None = None,
        zeros_at_start: str = "free",
    ):
        self.lam = check_lam(lam)
        self.variant = _check_variant(variant)
        self.foreach = check_foreach(foreach)
        model = unwrap(model)
        self.activations = NeuronActivations(model, modules)
        self.mask = check_mask(mask) or ParameterMask(model, modules,
                                                      zeros_at_start=zeros_at_start)
        # Transformer groups: input-side module name -> group, output-side name -> input side's.
        # (None: nn.MultiheadAttention's packed in-projection, no module to hook and decay.)
        self._groups: dict[str, AttentionHeads | FeedForwardUnits] = {}
        self._outputs: dict[str, str | None] = {}
        for g in neuron_groups(model):
            source, sink = (g.in_module, g.out_module) if isinstance(g, AttentionHeads) else (
                g.fc1, g.fc2)
            self._outputs[sink] = source
            if source is not None:
                self._groups[source] = g
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def compute(self, logits: Tensor | None = None) -> dict[str, Tensor]:
        """Accumulate the sensitivities of the last forward and return them (name → S).

        ``logits`` is unused by ``"local"``. The recorded z's are released afterwards.
        """
        if not self.activations.outputs:
            raise RuntimeError(
                "SeReNe.compute: no recorded activations (call it after a grad-enabled forward "
                "of the model passed to SeReNe, once per forward)"
            )
        sensitivity = neuron_sensitivity(logits, self.activations, self.variant)
        self.activations.clear()
        for name, s in sensitivity.items():
            if name in self._sums:
                self._sums[name].add_(s)
            else:
                self._sums[name] = s.clone()
        self._count += 1
        return sensitivity

    @torch.no_grad()
    def step(self) -> None:
        """Apply W[k] ← W[k] − λ·relu(1 − S_k)·W[k] (a transformer group's output-projection
        columns with it), then keep pruned parameters at zero."""
        if self._count == 0:
            raise RuntimeError(
                "SeReNe.step: no sensitivity (call reg.compute(logits) after the forward and "
                "before optimizer.step())"
            )
        weights, factors = [], []
        for name, module in self.activations.modules.items():
            w = module.weight
            if name in self._outputs:  # output side of a group: columns, the group's S̄
                insensitivity = self._group_insensitivity(self._outputs[name], columns=True)
                if insensitivity is not None:
                    weights.append(w)
                    factors.append(insensitivity.to(w).view(1, -1))  # broadcast per column
                continue
            if name not in self._sums:
                continue
            insensitivity = self._group_insensitivity(name, columns=False).to(w)
            weights.append(w)
            factors.append(insensitivity.view(-1, *([1] * (w.dim() - 1))))  # broadcast per row
        foreach = use_foreach(self.foreach, weights + self.mask.params)
        if foreach:
            factors = [f.expand_as(w) for f, w in zip(factors, weights)]  # foreach needs shapes
            for group_weights, group_factors in by_device_and_dtype(weights, factors):
                torch._foreach_addcmul_(
                    group_weights, group_factors, group_weights, value=-self.lam
                )
        else:
            for w, f in zip(weights, factors):
                w.addcmul_(f, w, value=-self.lam)
        self.mask.apply(foreach=foreach)
        self._sums = {}
        self._count = 0

    def _group_insensitivity(self, name: str | None, columns: bool) -> Tensor | None:
        """relu(1 − S) of module ``name``'s neurons (its rows), or, with ``columns``, of the group
        whose input side ``name`` is, one entry per output-side column; None without a
        sensitivity."""
        if name is None or name not in self._sums:
            return None
        total = self._sums[name]
        # S = the mean over the compute() calls (x / 1 == x: one call needs no division)
        sensitivity = total if self._count == 1 else total / self._count
        group = self._groups.get(name)
        if isinstance(group, AttentionHeads):
            per_head = group.value_mean(sensitivity)
            sensitivity = (per_head.repeat_interleave(group.head_dim) if columns
                           else group.to_rows(per_head))
        return torch.sub(_ONE, sensitivity).relu_()

    def remove(self) -> None:
        """Remove the forward hooks from the model."""
        self.activations.remove()

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters (``lam``, ``variant``, ``foreach``), pending sensitivity sums, mask."""
        return {
            "lam": self.lam,
            "variant": self.variant,
            "foreach": self.foreach,
            "sums": {k: v.clone() for k, v in self._sums.items()},
            "count": self._count,
            "mask": self.mask.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a hyperparameter it lacks (older states) keeps its value."""
        missing = {"sums", "count", "mask"} - set(state_dict)
        if missing:
            raise ValueError(f"Invalid SeReNe state_dict: missing keys {sorted(missing)}")
        unknown = set(state_dict["sums"]) - set(self.activations.modules)
        if unknown:
            raise ValueError(
                f"Invalid SeReNe state_dict: modules {sorted(unknown)} are not regularized here"
            )
        load_hyperparameters(self, state_dict, {
            "lam": check_lam,
            "variant": _check_variant,
            "foreach": check_foreach,
        })
        self.mask.load_state_dict(state_dict["mask"])
        self._count = int(state_dict["count"])
        self._sums = {
            k: v.clone().to(self.activations.modules[k].weight.device)
            for k, v in state_dict["sums"].items()
        }


def _check_variant(variant: Any) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r} (expected one of {VARIANTS})")
    return variant
