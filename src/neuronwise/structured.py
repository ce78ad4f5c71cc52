"""Structured magnitude pruning: whole neurons with the smallest L1 norm (Li et al., ICLR 2017).

Neuron k of a ``Linear``/``Conv2d`` layer (METHODS.md §0: an output row or output channel with its
bias entry) is scored by the L1 norm of its incoming weights, the weight viewed as (out, −1)::

    s_k = Σ_j |W[k, j]|        (biases are not scored)

as Li et al., "Pruning Filters for Efficient ConvNets", score a filter by Σ|kernel weights|. A
pruned neuron has its weight row and its bias entry set to exactly zero; ``neuronwise.simplify``
then removes it physically, and a ``ParameterMask(model, modules, granularity="neurons")`` keeps it
at zero during fine-tuning. A BatchNorm after a pruned conv is not touched: its channel becomes the
constant β − γμ/σ, which ``simplify`` folds into the consumers, as for SeReNe's dead neurons.

Another neuron importance (:mod:`neuronwise.pruning.importance`, e.g. ``neuron_taylor``) can replace
the L1 norm: ``importance`` maps a layer to one score per neuron, the lowest pruned first.

Three scopes:

- ``"layer"`` (default): in each layer l, the round(fraction·N_l) lowest-scored neurons are
  pruned — one uniform ratio for every layer (Torch-Pruning's default; Li et al. pick per-layer
  ratios by a sensitivity analysis, which a caller can emulate with ``ignore`` and several calls);
  every layer keeps at least one neuron.
- ``"global"``: scores are divided by the mean non-zero score of the layer (raw L1 norms
  are not comparable across layers of different fan-in and scale; the mean is Torch-Pruning's
  ``normalizer="mean"``), and the round(fraction·Σ_l N_l) lowest are pruned over all layers, the
  highest-scored neuron of each layer excepted (no layer collapses).

- ``"groups"`` (needs ``example_input``): the unit is a coupled channel group
  (:func:`neuronwise.structure.channel_groups`: a residual stream's channel in every producer, a
  depthwise conv's channel with the conv feeding it, ...), scored by the mean over its producer
  rows of s_k / mean(non-zero s of the layer); the round(fraction·G) lowest of the G prunable
  groups are pruned in all their producers at once, so ``simplify`` removes every one of them
  (per layer, a neuron pruned alone in a residual stream stays, as a live channel elsewhere
  couples it). A group with a row in an ignored layer is not prunable; no layer loses its last
  live neuron.

``fraction`` is the target share of dead neurons (groups for ``"groups"``), counted over all neurons of the layers, the
already dead ones included (their score is 0, so they go first): calling with increasing fractions
between fine-tuning rounds gives iterative pruning. Ties break by index. The classifier — by default
the last ``Linear``/``Conv2d`` in ``named_modules()`` order — is never pruned; pass ``ignore`` when
that is not the output layer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._utils import find_classifier, unwrap
from .masks import ParameterMask, check_mask
from .pruning.importance import NeuronImportance, neuron_l1, neuron_scores
from .structure import channel_groups

SCOPES = ("layer", "global", "groups")
STRUCTURED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

__all__ = ["SCOPES", "l1_structured_prune", "neuron_l1_norms"]


def _prunable_layers(
    model: nn.Module, ignore: nn.Module | Iterable[nn.Module] | None
) -> list[tuple[str, nn.Module]]:
    model = unwrap(model)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, STRUCTURED_MODULES)]
    if not layers:
        raise ValueError("Invalid model: it has no Linear or Conv2d layer")
    if ignore is None:
        ignored = {id(find_classifier(model, STRUCTURED_MODULES)[1])}
    else:
        ignore = [ignore] if isinstance(ignore, nn.Module) else list(ignore)
        for module in ignore:
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"Invalid ignore: element of type {type(module).__name__} (expected nn.Module)"
                )
        ignored = {id(m) for m in ignore}
    layers = [(n, m) for n, m in layers if id(m) not in ignored]
    if not layers:
        raise ValueError("Invalid ignore: every Linear/Conv2d layer is ignored (nothing to prune)")
    return layers


@torch.no_grad()
def neuron_l1_norms(
    model: nn.Module, ignore: nn.Module | Iterable[nn.Module] | None = None
) -> dict[str, Tensor]:
    """s_k = Σ_j |W[k, j]| for each neuron of each prunable layer, keyed by the layer's name.

    Prunable layers are the ``Linear``/``Conv2d`` modules not in ``ignore`` (default: all but the
    last one, the classifier). Values are float64 vectors of length ``out_features``/
    ``out_channels``; a dead neuron scores 0.
    """
    return {name: neuron_l1(layer) for name, layer in _prunable_layers(model, ignore)}


def _lowest(scores: Tensor, count: int) -> Tensor:
    # stable: ties (dead neurons first of all) break by index, so the count is exact
    return torch.argsort(scores, stable=True)[:count]


def _lowest_groups(
    model: nn.Module,
    layers: dict[str, nn.Module],
    scores: dict[str, Tensor],
    fraction: float,
    example_input: Tensor | None,
) -> dict[str, Tensor]:
    """Rows per layer of the round(fraction·G) lowest-scored prunable coupled channel groups."""
    if example_input is None:
        raise ValueError("Invalid example_input: None (scope='groups' needs an input batch)")
    producers = (nn.Linear, nn.Conv2d)
    normalized = {}
    for name, score in scores.items():
        alive = score[score != 0]
        normalized[name] = (score / alive.mean() if alive.numel() else score).tolist()
    candidates = []
    for group in channel_groups(model, example_input):
        rows = [
            (name, c)
            for name, side, c in group.members
            if side == "out" and isinstance(model.get_submodule(name), producers)
        ]
        if group.blocked_by is None and rows and all(name in layers for name, _ in rows):
            score = sum(normalized[name][c] for name, c in rows) / len(rows)
            candidates.append((score, len(candidates), rows))
    left = {name: int((score != 0).sum()) for name, score in scores.items()}
    chosen: dict[str, list[int]] = {name: [] for name in layers}
    count = round(fraction * len(candidates))
    for _, _, rows in sorted(candidates):
        if count == 0:
            break
        live = Counter(name for name, c in rows if scores[name][c] != 0)
        if any(left[name] - n < 1 for name, n in live.items()):
            continue  # the last live neuron of a layer
        for name, c in rows:
            chosen[name].append(c)
        left.update({name: left[name] - n for name, n in live.items()})
        count -= 1
    return {name: torch.tensor(rows, dtype=torch.long) for name, rows in chosen.items()}


@torch.no_grad()
def l1_structured_prune(
    model: nn.Module,
    fraction: float,
    scope: str = "layer",
    ignore: nn.Module | Iterable[nn.Module] | None = None,
    mask: ParameterMask | None = None,
    importance: NeuronImportance = neuron_l1,
    example_input: Tensor | None = None,
) -> dict[str, int]:
    """Zero the weight rows and biases of the lowest-scored neurons until ``fraction`` are dead.

    Scores s_k = ``importance(layer)`` (default the L1 norm of the incoming weights).
    ``scope="layer"``: round(fraction·N_l) dead neurons in each layer l (at most N_l − 1).
    ``scope="global"``: round(fraction·Σ_l N_l) dead neurons over all layers, ranked by
    s_k / mean(non-zero s of the layer), each layer's best neuron kept. Neurons that are
    already dead stay dead and count towards the target; nothing is revived. ``scope="groups"``:
    round(fraction·G) coupled channel groups of the model run on ``example_input``, each zeroed in
    every producer. Updates ``mask`` if given. Returns the number of alive neurons per pruned layer
    (by name).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"Invalid fraction: {fraction!r} (expected a number in [0, 1))")
    if not 0 <= fraction < 1:
        raise ValueError(f"Invalid fraction: {fraction} (expected a number in [0, 1))")
    if scope not in SCOPES:
        raise ValueError(f"Invalid scope: {scope!r} (expected one of {SCOPES})")
    mask = check_mask(mask)
    layers = dict(_prunable_layers(model, ignore))
    scores = {name: neuron_scores(importance, layer) for name, layer in layers.items()}

    pruned: dict[str, Tensor] = {}
    if scope == "groups":
        pruned = _lowest_groups(model, layers, scores, fraction, example_input)
    elif scope == "layer":
        for name, score in scores.items():
            count = min(round(fraction * score.numel()), score.numel() - 1)
            pruned[name] = _lowest(score, count)
    else:
        normalized = []
        for score in scores.values():
            alive = score[score != 0]
            normalized.append(score / alive.mean() if alive.numel() else score.clone())
            normalized[-1][torch.argmax(score)] = torch.inf  # each layer keeps one neuron
        flat = torch.cat(normalized)
        count = round(fraction * flat.numel())
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[_lowest(flat, min(count, flat.numel() - len(normalized)))] = True
        for name, piece in zip(scores, chosen.split([s.numel() for s in scores.values()])):
            pruned[name] = piece.nonzero().flatten()

    alive_counts = {}
    for name, layer in layers.items():
        rows = pruned[name].to(layer.weight.device)
        layer.weight[rows] = 0
        if layer.bias is not None:
            layer.bias[rows] = 0
        weight = layer.weight.reshape(layer.weight.shape[0], -1)
        alive_counts[name] = int((weight != 0).any(dim=1).sum())
    if mask is not None:
        mask.update()
    return alive_counts
