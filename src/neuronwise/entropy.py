"""PSP-entropy: how class-specific each pre-activation of a network is.

Tartaglione et al., "Pruning artificial neural networks: a way to find well-generalizing,
high-entropy sharp minima", ICANN 2020 (arXiv 2004.14765); METHODS.md §6.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neuronwise._utils import evaluating, find_classifier, split_batch, unwrap, without_compile
from neuronwise.distributed import all_reduce_sum
from neuronwise.transformer.groups import FeedForwardUnits, neuron_groups

__all__ = ["LayerEntropy", "PSPEntropy", "psp_entropy"]

# Probabilities are clamped to [_P_MIN, 1 - _P_MIN] (official code), so a unit that is always on or
# always off for a class contributes h(1e-4) ≈ 0.00147 bits, not 0.
_P_MIN = 1e-4
_UNIT_MODULES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerEntropy:
    """PSP statistics of one layer; units are the flattened per-sample output elements.

    Attributes:
        per_unit: H(u) = Σ_c H_c(u) in bits, shape (units,), float64. Classes with no sample are
            left out of the sum.
        per_class: H_c(u) in bits, shape (units, C), float64; NaN in the columns of classes with
            no sample.
        p_on: unclamped #{z_u > 0, y = c} / M_c, shape (units, C), float64; NaN for classes with no
            sample.
        class_counts: M_c, the samples of each class seen by this layer, shape (C,), int64; for
            FFN units pooled over tokens, the (sample, token) pairs.
        unit_shape: the per-sample output shape, e.g. (20, 24, 24), to view ``per_unit`` as a map.
    """

    per_unit: torch.Tensor
    per_class: torch.Tensor
    p_on: torch.Tensor
    class_counts: torch.Tensor
    unit_shape: tuple[int, ...]

    @property
    def mean(self) -> float:
        """Layer mean entropy, mean_u H(u), in bits."""
        return float(self.per_unit.mean())


class PSPEntropy:
    r"""Accumulates the on/off counts of pre-activations per class over batches (torchmetrics style).

    A unit u is one element of the output z of a ``Linear`` or ``Conv2d`` (before BN or the
    nonlinearity; logits included); for a conv, every channel × position is a unit. An FFN's
    hidden unit (:mod:`neuronwise.transformer.groups`: ``fc1`` rows) is one unit over all tokens:
    each (sample, token) pair is one observation, so M_c counts those pairs. With M_c the
    samples of class c and :math:`p_c(u) = \#\{z_u > 0, y = c\} / M_c`, clamped to
    [1e-4, 0.9999] as is :math:`1 - p_c(u)`,

    .. math::
        H_c(u) = -p_c \log_2 p_c - (1 - p_c) \log_2 (1 - p_c), \qquad H(u) = \sum_c H_c(u)

    (a plain sum over classes, at most C bits). z = 0 counts as off. Classes with M_c = 0 have no
    defined probability: they are skipped in the sum and reported as NaN.

    ``update`` runs the model on a batch in eval mode under ``no_grad`` with forward hooks that
    live only for that call, so the model is never left hooked and each module's training flag is
    restored. Only int64 counts are kept (C × units per layer), so memory does not depend on the
    number of batches. ``compute`` sums the counts over DDP ranks (every rank must have run
    ``update`` at least once).

    Args:
        model: the network.
        layers: names (from ``named_modules()``) of Linear/Conv2d modules; default all of them.
        num_classes: C; default the ``out_features`` of the last Linear (the classifier).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        num_classes: int | None = None,
    ) -> None:
        model = unwrap(model)
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, _UNIT_MODULES)}
        if layers is None:
            if not candidates:
                raise ValueError("Invalid model: it has no Linear or Conv2d module")
            names = list(candidates)
        else:
            if isinstance(layers, str):
                raise TypeError(f"Invalid layers: {layers!r} (expected a sequence of names)")
            names = list(layers)
            unknown = [n for n in names if n not in candidates]
            if unknown:
                raise ValueError(
                    f"Invalid layers: {unknown} are not Linear/Conv2d modules of the model "
                    f"(valid: {list(candidates)})"
                )
            if not names:
                raise ValueError("Invalid layers: [] (expected at least one name)")
        if num_classes is None:
            classifier = find_classifier(model)
            if classifier is None:
                raise ValueError("Invalid num_classes: None (the model has no Linear to infer it)")
            num_classes = classifier[1].out_features
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Invalid num_classes: {num_classes!r} (expected an int >= 1)")
        self.model = model
        self.layers = names
        self.num_classes = num_classes
        self._modules = {n: candidates[n] for n in names}
        self._pooled = {g.fc1 for g in neuron_groups(model) if isinstance(g, FeedForwardUnits)}
        self._on: dict[str, torch.Tensor] = {}
        self._samples: dict[str, torch.Tensor] = {}
        self._unit_shape: dict[str, tuple[int, ...]] = {}

    def reset(self) -> None:
        """Forget all counts."""
        self._on.clear()
        self._samples.clear()
        self._unit_shape.clear()

    @torch.no_grad()
    def update(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Run the model on ``inputs`` (eval mode) and count; returns the model's output."""
        labels = _check_labels(labels, self.num_classes)
        handles = [
            module.register_forward_hook(self._make_hook(name, labels))
            for name, module in self._modules.items()
        ]
        try:
            with evaluating(self.model), without_compile():
                return self.model(inputs)
        finally:
            for handle in handles:
                handle.remove()

    def _make_hook(self, name: str, labels: torch.Tensor):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if output.dim() < 1 or output.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"Invalid batch: module {name!r} produced shape {tuple(output.shape)} for "
                    f"{labels.shape[0]} labels (expected a leading batch dimension)"
                )
            unit_shape, positions = tuple(output.shape[1:]), 1
            if name in self._pooled:  # (batch, tokens…, units): tokens are observations
                unit_shape, positions = (output.shape[-1],), output[0].numel() // output.shape[-1]
            if name not in self._on:
                units = math.prod(unit_shape)
                self._on[name] = torch.zeros(
                    self.num_classes, units, dtype=torch.int64, device=output.device
                )
                self._samples[name] = torch.zeros(
                    self.num_classes, dtype=torch.int64, device=output.device
                )
                self._unit_shape[name] = unit_shape
            elif unit_shape != self._unit_shape[name]:
                raise ValueError(
                    f"Invalid batch: module {name!r} produced units of shape {unit_shape}, "
                    f"earlier {self._unit_shape[name]} (units must keep one shape)"
                )
            y = labels.to(output.device)
            active = (output.reshape(output.shape[0], positions, -1) > 0).float().sum(dim=1)
            onehot = nn.functional.one_hot(y, self.num_classes).float()
            # 0/1 products summed in float32 are exact below 2**24 samples per batch, and a matmul
            # never materialises a (batch × units) int64 tensor; autocast would round the sums.
            with torch.autocast(output.device.type, enabled=False):
                self._on[name] += (onehot.T @ active).to(torch.int64)
                self._samples[name] += onehot.sum(dim=0).to(torch.int64) * positions

        return hook

    def compute(self) -> dict[str, LayerEntropy]:
        """Entropies of every layer that has run, summed over ranks; the counts stay as they are."""
        missing = [n for n in self.layers if n not in self._on]
        if missing:
            raise RuntimeError(
                f"no counts for layers {missing}: call update() with batches that run them first"
            )
        result = {}
        for name in self.layers:
            on = all_reduce_sum(self._on[name].clone()).cpu()
            samples = all_reduce_sum(self._samples[name].clone()).cpu()
            result[name] = _layer_entropy(on, samples, self._unit_shape[name])
        return result

    def state_dict(self) -> dict:
        """The counts of this rank (not reduced), to resume a long pass."""
        return {
            "num_classes": self.num_classes,
            "layers": {
                name: {
                    "on": self._on[name].clone(),
                    "samples": self._samples[name].clone(),
                    "unit_shape": list(self._unit_shape[name]),
                }
                for name in self._on
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["num_classes"] != self.num_classes:
            raise ValueError(
                f"Invalid state_dict: num_classes {state_dict['num_classes']} "
                f"(expected {self.num_classes})"
            )
        unknown = [n for n in state_dict["layers"] if n not in self._modules]
        if unknown:
            raise ValueError(f"Invalid state_dict: layers {unknown} (valid: {self.layers})")
        self.reset()
        for name, entry in state_dict["layers"].items():
            self._on[name] = entry["on"].clone().to(torch.int64)
            self._samples[name] = entry["samples"].clone().to(torch.int64)
            self._unit_shape[name] = tuple(entry["unit_shape"])


def psp_entropy(
    model: nn.Module,
    loader: Iterable,
    layers: Sequence[str] | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
) -> dict[str, LayerEntropy]:
    """PSP-entropy of each Linear/Conv2d layer over ``loader`` (see :class:`PSPEntropy`).

    ``loader`` yields ``(inputs, labels)`` with integer class labels. Batches are moved to
    ``device`` (default: that of the model's first parameter); the model itself is not moved.
    One pass, eval mode, ``no_grad``; the model's training flags are restored afterwards.
    """
    metric = PSPEntropy(model, layers=layers, num_classes=num_classes)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    for batch in loader:
        inputs, labels = split_batch(batch)
        metric.update(inputs.to(device), labels.to(device))
    return metric.compute()


def _check_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"Invalid labels: dtype {labels.dtype}, shape {tuple(labels.shape)} "
            "(expected 1-D integer class indices)"
        )
    labels = labels.to(torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Invalid labels: range [{int(labels.min())}, {int(labels.max())}] "
            f"(expected within [0, {num_classes - 1}])"
        )
    return labels


def _layer_entropy(
    on: torch.Tensor, samples: torch.Tensor, unit_shape: tuple[int, ...]
) -> LayerEntropy:
    seen = samples > 0
    total = samples.to(torch.float64).unsqueeze(1)
    p_on = torch.where(seen.unsqueeze(1), on.to(torch.float64) / total, math.nan)
    # p_off from the off count, clamped on its own, as the definition states.
    p_off = torch.where(seen.unsqueeze(1), (total - on) / total, math.nan)
    p = p_on.clamp(_P_MIN, 1 - _P_MIN)
    q = p_off.clamp(_P_MIN, 1 - _P_MIN)
    per_class = -(p * torch.log2(p) + q * torch.log2(q))
    per_unit = per_class[seen].sum(dim=0)
    return LayerEntropy(
        per_unit=per_unit,
        per_class=per_class.T.contiguous(),
        p_on=p_on.T.contiguous(),
        class_counts=samples,
        unit_shape=unit_shape,
    )
