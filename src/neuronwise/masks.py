"""Masks that keep pruned parameters at exactly zero, and the parameter sets methods act on.

Convention: a pruning method acts on P, all parameters (weights and biases) of the chosen module
types (default Linear, Conv2d and BatchNorm2d, the LOBSTER set); W ⊂ P are the tensors named
``weight`` (BN γ included), from which threshold statistics are taken. A pruned entry is an exact
zero, and a :class:`ParameterMask` keeps it at zero through any optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from neuronwise._utils import by_device_and_dtype, check_modules, unwrap, use_foreach
from neuronwise.structure.groups import channel_groups
from neuronwise.transformer.groups import AttentionHeads, neuron_groups

PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)
GRANULARITIES = ("params", "neurons")
ZEROS_AT_START = ("free", "masked")

ParamsLike = nn.Module | Iterable[Tensor] | Iterable[dict]


def prunable_parameters(
    model: nn.Module, modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES
) -> list[tuple[str, nn.Parameter]]:
    """Named parameters of every module of a type in ``modules``, in ``named_modules()`` order.

    Names are qualified as in ``model.named_parameters()`` of the module inside a
    ``torch.compile``/DDP wrapper; a shared parameter appears once.
    """
    modules = check_modules(modules)
    model = unwrap(model)
    seen: set[int] = set()
    named = []
    for module_name, module in model.named_modules():
        if not isinstance(module, modules):
            continue
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                named.append((f"{module_name}.{name}" if module_name else name, param))
    return named


def resolve_parameters(
    model_or_params: ParamsLike, modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES
) -> list[Tensor]:
    """The tensors a method acts on: a model's prunable parameters, or the given parameters.

    Accepts an ``nn.Module`` (parameters of ``modules``), or, like ``torch.optim``, an iterable of
    tensors or of param-group dicts (only their ``"params"`` are used; ``modules`` is ignored).
    """
    if isinstance(model_or_params, nn.Module):
        params = [p for _, p in prunable_parameters(model_or_params, modules)]
        if not params:
            raise ValueError(
                f"Invalid model: it has no parameters in modules of type {check_modules(modules)}"
            )
        return params
    if isinstance(model_or_params, Tensor):
        raise TypeError(
            "Invalid params: a single Tensor (expected an iterable of tensors or dicts)"
        )
    params, seen = [], set()
    for item in model_or_params:
        group = item["params"] if isinstance(item, dict) else item
        for p in [group] if isinstance(group, Tensor) else group:
            if not isinstance(p, Tensor):
                raise TypeError(
                    f"Invalid params: element of type {type(p).__name__} (expected Tensor)"
                )
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("Invalid params: empty (expected at least one tensor)")
    return params


def _version(tensor: Tensor) -> int | None:
    """The in-place modification counter of ``tensor``; None for inference tensors (no counter)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


class ParameterMask:
    """Keeps pruned parameters at exactly zero.

    ``granularity="params"`` (default, official LOBSTER): mask = (p ≠ 0) per entry.
    ``granularity="neurons"`` (SeReNe): a neuron, i.e. an output row of a Linear/Conv2d weight with
    its bias entry, is masked when its weight row is all zero (all entries == 0, METHODS.md §3
    DECISION; the official code tests ``sum == 0``). Other entries of Linear/Conv2d weights and
    biases stay free, as in the official neuron mask; parameters of other modules (BatchNorm2d)
    keep per-entry masks. An attention head (:mod:`neuronwise.transformer.groups`) is a neuron
    group: when its value rows are all zero, or its output-projection columns are (the two ways
    :func:`~neuronwise.transformer.simplify_transformer` finds a head dead), all its q, k, v rows,
    their biases and its projection columns are masked.
    ``"neurons"`` needs the model, to pair weights with biases.

    Coupled neurons (``example_input`` given, ``"neurons"`` only): the rows of a coupled channel
    group (:func:`neuronwise.structure.channel_groups` of the model run on ``example_input``: the
    channel of a residual stream in every conv that writes it, a depthwise conv's channel with the
    channel feeding it, a squeeze-and-excitation scale with the channel it scales) are masked
    together, when every one of them is all zero, and none while one of them is alive::

        masked(k) = ∧_{j ∈ group(k)} (W[j] = 0)       (producer rows j of k's group)

    A masked row is then one that ``simplify`` removes (unless its group reaches the model output
    or an unsupported operation); a row zeroed alone in a live group stays free, since removing it
    would not shrink the model. Plain chains (LeNets, VGG) have one row per group: the mask is the
    same with or without ``example_input``. Without it every row is its own group.

    ``zeros_at_start="free"`` (default, METHODS.md §1 DECISION 2026-12): nothing is masked until
    the first :meth:`update`, which a pruning step calls, so parameters that start at zero
    (BatchNorm β, zero-initialised γ) train freely; ``"masked"`` (official LOBSTER) masks the entries
    that are zero at construction (e.g. to keep a model pruned before the mask was built).

    The mask changes only in :meth:`update` (rebuilt from the current zeros). Call :meth:`apply`
    after every optimizer step, or :meth:`attach` the mask to the optimizer: re-applying it after
    each step is what makes momentum, weight decay and Adam moments unable to move pruned entries.

    ``masks`` are boolean; :meth:`apply` multiplies by cached copies in the parameters' dtype
    (multiplying a float tensor by a bool one is several times slower on CPU) and skips tensors
    with nothing masked. The cache follows any change of ``masks``, in place or reassigned.
    """

    def __init__(
        self,
        model_or_params: ParamsLike,
        modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES,
        granularity: str = "params",
        zeros_at_start: str = "free",
        example_input: Tensor | None = None,
    ) -> None:
        if zeros_at_start not in ZEROS_AT_START:
            raise ValueError(
                f"Invalid zeros_at_start: {zeros_at_start!r} (expected one of {ZEROS_AT_START})"
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"Invalid granularity: {granularity!r} (expected one of {GRANULARITIES})"
            )
        if granularity == "neurons" and not isinstance(model_or_params, nn.Module):
            raise ValueError(
                "Invalid granularity: 'neurons' needs a model (to pair weight rows with biases), "
                f"got {type(model_or_params).__name__}"
            )
        if example_input is not None and granularity != "neurons":
            raise ValueError(
                f"Invalid example_input: it couples neurons, but granularity is {granularity!r} "
                "(expected 'neurons')"
            )
        self.granularity = granularity
        self.zeros_at_start = zeros_at_start
        if isinstance(model_or_params, nn.Module):
            model_or_params = unwrap(model_or_params)
        self.params = resolve_parameters(model_or_params, modules)
        # (index of a Linear/Conv2d weight, index of its bias or None) within self.params
        self._neurons: list[tuple[int, int | None]] = []
        # (index of an attention in-projection weight, of its bias or None, of its output
        # projection's weight or None, its heads)
        self._heads: list[tuple[int, int | None, int | None, AttentionHeads]] = []
        if granularity == "neurons":
            index = {id(p): i for i, p in enumerate(self.params)}
            for module in model_or_params.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)) and id(module.weight) in index:
                    bias = module.bias
                    bias_index = index.get(id(bias)) if bias is not None else None
                    self._neurons.append((index[id(module.weight)], bias_index))
            named = dict(model_or_params.named_parameters())
            for group in neuron_groups(model_or_params):
                if isinstance(group, AttentionHeads) and id(named[group.in_weight]) in index:
                    bias = named.get(group.in_bias) if group.in_bias else None
                    bias_index = index.get(id(bias)) if bias is not None else None
                    out_index = index.get(id(named[group.out_weight]))
                    self._heads.append(
                        (index[id(named[group.in_weight])], bias_index, out_index, group))
        # Each coupled group of two or more rows: (index of a weight in self.params, row) pairs.
        self._coupled: list[list[tuple[int, int]]] = []
        if example_input is not None:
            self._coupled = _coupled_rows(model_or_params, example_input, self.params)
        if zeros_at_start == "masked":
            self.update()
        else:
            self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]

    @property
    def masks(self) -> list[Tensor]:
        return self._masks

    @masks.setter
    def masks(self, masks: list[Tensor]) -> None:
        self._masks = masks
        self._factors: list[Tensor | None] = []
        self._factors_key: list[tuple[int, int | None]] = []

    def _current_factors(self) -> list[Tensor | None]:
        """Per parameter: its mask in the parameter's dtype, or None where nothing is masked."""
        key = [(id(mask), _version(mask)) for mask in self._masks]
        if None in (version for _, version in key) or key != self._factors_key:
            self._factors = [None if bool(mask.all()) else mask.to(p.dtype)
                             for p, mask in zip(self.params, self._masks)]
            self._factors_key = key
        return self._factors

    @torch.no_grad()
    def update(self) -> None:
        """Rebuild the mask from the parameters' current zeros."""
        masks = [p != 0 for p in self.params]
        for weight_index, bias_index in self._neurons:
            weight = self.params[weight_index]
            alive = (weight.reshape(weight.shape[0], -1) != 0).any(dim=1)
            row_shape = (-1,) + (1,) * (weight.dim() - 1)
            masks[weight_index] = alive.view(row_shape).expand_as(weight).clone()
            if bias_index is not None:
                masks[bias_index] = alive.clone()
        self._keep_live_groups(masks)
        for weight_index, bias_index, out_index, heads in self._heads:
            weight = self.params[weight_index]
            values = heads.per_head(weight != 0)[2]  # (H, d, in): the value rows of each head
            alive = values.flatten(1).any(dim=1)
            if out_index is not None:  # (out, H, d): each head's projection columns
                columns = (self.params[out_index] != 0).view(-1, heads.num_heads, heads.head_dim)
                alive = alive & columns.any(dim=2).any(dim=0)
                masks[out_index] = masks[out_index] & alive.repeat_interleave(heads.head_dim)
            rows = heads.to_rows(alive)
            masks[weight_index] = masks[weight_index] & rows[:, None]
            if bias_index is not None:
                masks[bias_index] = masks[bias_index] & rows
        self.masks = masks

    def _keep_live_groups(self, masks: list[Tensor]) -> None:
        """Unmask the rows of every coupled group that has a live row (``masks`` in place)."""
        if not self._coupled:
            return
        biases = dict(self._neurons)
        alive = {w: masks[w].reshape(masks[w].shape[0], -1).any(dim=1).tolist() for w in biases}
        revived: dict[int, list[int]] = {}
        for rows in self._coupled:
            if any(alive[w][r] for w, r in rows):
                for w, r in rows:
                    if not alive[w][r]:
                        revived.setdefault(w, []).append(r)
        for w, rows in revived.items():
            index = torch.tensor(rows, device=masks[w].device)
            masks[w][index] = True
            if biases[w] is not None:
                masks[biases[w]][index] = True

    @torch.no_grad()
    def apply(self, foreach: bool | None = None) -> None:
        """Zero the masked entries: ``p.mul_(mask)``."""
        pairs = [(p, f) for p, f in zip(self.params, self._current_factors()) if f is not None]
        if not pairs:
            return
        params, factors = (list(t) for t in zip(*pairs))
        if use_foreach(foreach, params):
            for group_params, group_factors in by_device_and_dtype(params, factors):
                torch._foreach_mul_(group_params, group_factors)
        else:
            for p, factor in pairs:
                p.mul_(factor)

    @torch.no_grad()
    def violations(self) -> int:
        """How many masked entries are non-zero (0 while the mask is applied after every step)."""
        return sum(int(((p != 0) & ~mask).sum()) for p, mask in zip(self.params, self.masks))

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the gradients of masked entries (optional: :meth:`apply` alone keeps them at 0)."""
        for p, factor in zip(self.params, self._current_factors()):
            if p.grad is not None and factor is not None:
                p.grad.mul_(factor)

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Re-apply the mask after every ``optimizer.step()``; returns the hook's removable handle."""
        return optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"granularity": self.granularity, "masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["granularity"] != self.granularity:
            raise ValueError(
                f"Invalid granularity: {state_dict['granularity']!r} in state_dict "
                f"(this mask has {self.granularity!r})"
            )
        masks = state_dict["masks"]
        if len(masks) != len(self.params):
            raise ValueError(f"Invalid masks: {len(masks)} tensors (expected {len(self.params)})")
        for i, (mask, p) in enumerate(zip(masks, self.params)):
            if mask.shape != p.shape:
                raise ValueError(
                    f"Invalid masks[{i}]: shape {tuple(mask.shape)} (expected {tuple(p.shape)})"
                )
        self.masks = [m.to(device=p.device, dtype=torch.bool) for m, p in zip(masks, self.params)]


def _coupled_rows(
    model: nn.Module, example_input: Tensor, params: list[Tensor]
) -> list[list[tuple[int, int]]]:
    """The coupled channel groups of ``model`` (unwrapped) with two or more Linear/Conv2d rows
    among ``params``, as (index in ``params``, row) pairs."""
    index = {id(p): i for i, p in enumerate(params)}
    weights = {name: index[id(m.weight)] for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m.weight) in index}
    coupled = []
    for group in channel_groups(model, example_input):
        rows = [(weights[name], row) for name, side, row in group.members
                if side == "out" and name in weights]
        if len(rows) > 1:
            coupled.append(rows)
    return coupled


def check_mask(mask: Any) -> ParameterMask | None:
    """``mask`` itself if it is a :class:`ParameterMask` or None, else a TypeError."""
    if mask is not None and not isinstance(mask, ParameterMask):
        raise TypeError(f"Invalid mask: {type(mask).__name__} (expected ParameterMask or None)")
    return mask
