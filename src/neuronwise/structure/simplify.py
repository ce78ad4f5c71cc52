"""Physical removal of dead neurons: a smaller network that computes the same function.

After structured sparsification (SeReNe, LOBSTER with neuron masks) many neurons have all incoming
weights exactly zero. ``simplify`` (after EIDOSLAB/simplify, *SoftwareX* 2022; METHODS §4) rebuilds
the network without them:

1. **Fuse BN** (``fuse_bn=True``) into the preceding ``Conv2d``/``Linear`` when that layer feeds only
   the BN, in float64: s = γ/√(σ²+ε), W' = s·W (per output channel), b' = s·(b − μ) + β.
2. **Analyse** (:mod:`.graph`): couple channels across the graph and find the removable groups; a
   dead channel k (weight row all zero) outputs the constant b_k, carried through channel-wise
   layers as a per-channel constant (a map after zero-padded pooling).
3. **Fold and remove.** Each consumer folds the removed inputs' constants into its bias: ``Linear``
   b'_j += Σ_k W_{jk} c_k; ``Conv2d`` b' += Σ_k W[:, k] ∗ c_k, non-uniform at zero-padded borders:
   then, for spatially uniform constants, a folded kernel applied to a ones image
   (:class:`BorderBiasConv2d`, any input size), else a bias map (:class:`BiasMapConv2d`). Dead rows (weights, biases, BN entries) and the
   consumers' input columns go; grouped convs keep their group structure, depthwise convs lose
   whole groups; ``chunk``/``split`` get the new sizes, channel padding the new widths, a channel
   permutation becomes one ``index_select``.

Residual streams: channels summed by an ``add`` form one group across all producers, removed when
dead in every producer (its constant, zero or not, folds into the consumers);
``prune_residual_stream=False`` keeps every summed channel (official behaviour).

The result is a new :class:`torch.fx.GraphModule`; the input model is not modified. Guarantee
(float32): max|Δy| ≤ 1e-5·max|y| and the same argmax, never bitwise equality. Bias maps (rare:
non-uniform constants, e.g. after zero-padded average pooling) fix the input size to the example's. :func:`explain` lists the dead channels that stay and why.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from neuronwise._utils import check_model_and_example, unwrap
from neuronwise.transformer.simplify import compose_kept, simplify_transformer

from .graph import (
    PRODUCERS,
    Analysis,
    analyse,
    arg,
    capture,
    channel_pad,
    live_rows,
    propagate_shapes,
    shape,
)

__all__ = ["BiasMapConv2d", "BorderBiasConv2d", "KeptChannel", "explain", "simplify"]

_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
EXAMPLE_KEY = "neuronwise_example_input"
Kept = dict[str, tuple[str, tuple[Tensor, ...] | None]]


class BiasMapConv2d(nn.Conv2d):
    """A ``Conv2d`` whose bias is a map (C_out, H_out, W_out): the folded output of removed channels,
    which zero padding makes position-dependent."""

    def __init__(self, conv: nn.Conv2d, bias_map: Tensor):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=False, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias_map = nn.Parameter(bias_map.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, None) + self.bias_map


class BorderBiasConv2d(nn.Conv2d):
    """A ``Conv2d`` plus the folded output of removed channels that were spatially uniform
    constants c_k: Σ_k c_k W[:, k] ∗ 1 under zero padding, i.e. ``conv2d(ones, K)`` with the
    folded kernel K[j] = Σ_k c_k W[j, k] (C_out × 1 × kh × kw parameters instead of a C_out × H × W
    map); exact at the borders and valid at any input size."""

    def __init__(self, conv: nn.Conv2d, border_kernel: Tensor):
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode="zeros",
            device=conv.weight.device, dtype=conv.weight.dtype,
        )  # fmt: skip
        self.border_kernel = nn.Parameter(border_kernel.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        ones = x.new_ones(1, 1, x.shape[-2], x.shape[-1])
        border = F.conv2d(ones, self.border_kernel, None, self.stride, self.padding, self.dilation)
        return self._conv_forward(x, self.weight, self.bias) + border


@dataclass(frozen=True)
class KeptChannel:
    """A dead output channel that :func:`simplify` keeps: ``layer``'s row ``channel``, kept because
    of ``blocked_by`` (a graph node) for ``reason``."""

    layer: str
    channel: int
    blocked_by: str
    reason: str


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _fuse_batchnorms(gm: fx.GraphModule, calls: Counter) -> set[str]:
    """Fold eval-mode BN into the preceding Conv2d/Linear (float64); return the fused targets."""
    modules = dict(gm.named_modules())
    fused = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _NORM_MODULES):
            continue
        bn, prev = modules[node.target], node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer = modules[prev.target]
        if type(layer) not in (nn.Conv2d, nn.Linear) or calls[prev.target] != 1:
            continue
        if bn.running_mean is None or calls[node.target] != 1:
            continue
        w = layer.weight.detach().double()
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
        bias = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if layer.bias is not None:
            bias = layer.bias.detach().double()
        new = copy.deepcopy(layer)
        new.weight = nn.Parameter((w * scale.view(-1, *[1] * (w.dim() - 1))).to(layer.weight))
        new.bias = nn.Parameter((bias * scale + shift).to(layer.weight))
        _set_submodule(gm, prev.target, new)
        modules[prev.target] = new
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        fused.add(prev.target)
    return fused


def _prepare(
    model: nn.Module,
    example_input: Tensor,
    fuse_bn: bool,
    pinned: Iterable[str | nn.Module],
    prune_residual_stream: bool,
) -> tuple[Analysis, set[str], Tensor, Kept]:
    check_model_and_example(model, example_input)
    model = unwrap(model)
    names = {id(m): name for name, m in model.named_modules()}
    known = set(names.values())
    pinned_targets = set()
    for p in pinned:
        name = names.get(id(p)) if isinstance(p, nn.Module) else p
        if not isinstance(name, str) or name not in known:
            raise ValueError(
                f"Invalid pinned entry: {p!r} (expected a module of model or its name)"
            )
        pinned_targets.add(name)
    # Attention heads and FFN units first (module level), then the channel graph.
    model, kept = simplify_transformer(model, example_input, return_kept=True,
                                       pinned=pinned_targets)
    gm, calls, example = capture(model, example_input)
    fused = _fuse_batchnorms(gm, calls) if fuse_bn else set()
    propagate_shapes(gm, example)
    analysis = analyse(gm, calls, pinned_targets, prune_residual_stream, example)
    return analysis, fused, example, kept


def simplify(
    model: nn.Module,
    example_input: Tensor,
    fuse_bn: bool = True,
    pinned: Iterable[str | nn.Module] = (),
    prune_residual_stream: bool = True,
    return_kept: bool = False,
) -> nn.Module | tuple[nn.Module, Kept]:
    """A new, smaller module without the dead neurons of ``model`` (evaluated in eval mode).

    Args:
        model: the network; it is deep-copied, never modified.
        example_input: one input batch, e.g. ``torch.zeros(1, 1, 28, 28)`` (only its shape matters).
        fuse_bn: fold BatchNorm into the preceding layer first (more neurons become removable).
        pinned: modules (or their names) whose output neurons are kept.
        prune_residual_stream: remove residual-stream channels that are dead in every producer.
        return_kept: also return ``kept``: new parameter name → (old parameter name, kept
            indices per dimension: ``()`` when unchanged, ``None`` when the parameter is new or
            rescaled), for :func:`remap_optimizer_state`.
    """
    a, fused, example, kept_before = _prepare(model, example_input, fuse_bn, pinned,
                                              prune_residual_stream)
    gm = a.gm
    kept: Kept = {}
    for node in list(gm.graph.nodes):
        kind = a.kinds[node.name]
        if kind in PRODUCERS:
            _rebuild_producer(a, node, node.target in fused, kept)
        elif kind == "norm" and a.removed[node.name]:
            _rebuild_norm(a, node, kept)
        elif kind == "pad" and a.removed[node.name]:
            _rebuild_pad(a, node)
        elif kind == "split" and a.removed[node.args[0].name]:
            _rebuild_split(a, node)
        elif kind == "permute" and a.removed[a.permutations[node.name][0].name]:
            _rebuild_permutation(a, node)
    for name, _ in gm.named_parameters():
        kept.setdefault(name, (name, ()))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    gm.meta[EXAMPLE_KEY] = torch.zeros_like(example)  # input shape for save_simplified
    return (gm, compose_kept(kept_before, kept)) if return_kept else gm


def explain(
    model: nn.Module,
    example_input: Tensor,
    fuse_bn: bool = True,
    pinned: Iterable[str | nn.Module] = (),
    prune_residual_stream: bool = True,
) -> list[KeptChannel]:
    """The dead output channels (all weights zero) that :func:`simplify` with the same arguments
    keeps, each with the graph node that blocked it and why, in graph order."""
    a, _, _, _ = _prepare(model, example_input, fuse_bn, pinned, prune_residual_stream)
    found, seen = [], set()
    for node in a.gm.graph.nodes:
        layer = a.modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or node.name not in a.offsets:
            continue
        lost = set(a.removed[node.name]) if a.kinds[node.name] in PRODUCERS else set()
        for c, live in enumerate(live_rows(layer)):
            if not live and c not in lost and (node.target, c) not in seen:
                seen.add((node.target, c))
                blocker, reason = a.blockers[a.root(node, c)]
                found.append(KeptChannel(node.target, c, blocker, reason))
    return found


def _index(keep: list[int], device: torch.device) -> Tensor:
    return torch.tensor(keep, dtype=torch.long, device=device)


def _folded_bias(
    a: Analysis, layer: nn.Module, src: fx.Node, cols_in: list[int], rows: Tensor
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Bias of the kept rows with the removed inputs' constants folded in (float64). When zero
    padding makes a conv's contribution position-dependent: a border kernel (uniform constants,
    :class:`BorderBiasConv2d`) or else a bias map (C_out, H, W) (:class:`BiasMapConv2d`)."""
    w64 = layer.weight.detach().double()
    bias = torch.zeros(w64.shape[0], dtype=torch.float64, device=w64.device)
    if layer.bias is not None:
        bias = layer.bias.detach().double()
    bias = bias.index_select(0, rows)
    if not cols_in:
        return bias, None, None
    const = torch.zeros_like(a.values[src.name])
    const[:, cols_in] = a.values[src.name][:, cols_in]
    const = const.to(w64.device)
    if isinstance(layer, nn.Linear):
        return bias + F.linear(const, w64)[0].index_select(0, rows), None, None
    contribution = layer._conv_forward(const, w64, None)[0].index_select(0, rows)
    corner = contribution[:, :1, :1]
    spread = (contribution - corner).abs().max()
    scale = max(contribution.abs().max().item(), 1e-300)
    if spread <= 1e-12 * scale:
        return bias + corner.flatten(), None, None
    per_channel = const[0].flatten(1)
    if torch.equal(per_channel, per_channel[:, :1].expand_as(per_channel)):
        # K[j] = Σ_l c_(group(j), l) W[j, l]: each row contracts with its own group's constants.
        groups, out_per = layer.groups, w64.shape[0] // layer.groups
        c = per_channel[:, 0].view(groups, -1)[torch.arange(w64.shape[0]) // out_per]
        kernel = torch.einsum("jluv,jl->juv", w64, c).unsqueeze(1).index_select(0, rows)
        ones = torch.ones(1, 1, *const.shape[2:], dtype=torch.float64, device=w64.device)
        border = F.conv2d(ones, kernel, None, layer.stride, layer.padding, layer.dilation)[0]
        if (border - contribution).abs().max() <= 1e-12 * scale:
            return bias, None, kernel
    return bias, contribution + bias.view(-1, 1, 1), None


def _rebuild_producer(a: Analysis, node: fx.Node, was_fused: bool, kept: Kept) -> None:
    """Fold the removed inputs' constants into the bias, then drop dead rows and removed columns
    (per group for grouped and depthwise convs: groups whose rows all go vanish)."""
    layer = a.modules[node.target]
    src = node.args[0]
    rows_out, cols_in = a.removed[node.name], a.removed[src.name]
    prefix = f"{node.target}."
    if not rows_out and not cols_in:
        if was_fused:  # rescaled by the BN: optimizer state does not carry over
            kept[prefix + "weight"] = kept[prefix + "bias"] = (prefix + "weight", None)
        return
    device, dtype = layer.weight.device, layer.weight.dtype
    lost_rows, lost_cols = set(rows_out), set(cols_in)
    keep_rows = [r for r in range(layer.weight.shape[0]) if r not in lost_rows]
    keep_cols = [c for c in range(shape(src)[1]) if c not in lost_cols]
    rows = _index(keep_rows, device)
    bias, bias_map, border_kernel = _folded_bias(a, layer, src, cols_in, rows)
    groups = getattr(layer, "groups", 1)
    if groups == 1:
        weight = (
            layer.weight.detach().index_select(0, rows).index_select(1, _index(keep_cols, device))
        )
        new_groups = 1
    else:
        out_per, in_per = layer.weight.shape[0] // groups, shape(src)[1] // groups
        alive = sorted({r // out_per for r in keep_rows})
        blocks = []
        for g in alive:
            g_rows = _index([r for r in keep_rows if r // out_per == g], device)
            g_cols = _index([c - g * in_per for c in keep_cols if c // in_per == g], device)
            blocks.append(layer.weight.detach().index_select(0, g_rows).index_select(1, g_cols))
        weight, new_groups = torch.cat(blocks), len(alive)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(len(keep_cols), len(keep_rows), bias=True, device=device, dtype=dtype)
    elif border_kernel is not None:
        new = BorderBiasConv2d(layer, border_kernel.to(dtype))
        kept[prefix + "border_kernel"] = (prefix + "weight", None)
    elif bias_map is None:
        new = copy.deepcopy(layer)
    else:
        new = BiasMapConv2d(layer, bias_map.to(dtype))
    if isinstance(new, nn.Conv2d):
        new.in_channels, new.out_channels, new.groups = len(keep_cols), len(keep_rows), new_groups
    new.weight = nn.Parameter(weight.clone())
    slices = (rows, _index(keep_cols, device)) if groups == 1 and not was_fused else None
    kept[prefix + "weight"] = (prefix + "weight", slices)
    if bias_map is not None:
        kept[prefix + "bias_map"] = (prefix + "weight", None)
    elif layer.bias is not None or torch.any(bias != 0):
        new.bias = nn.Parameter(bias.to(dtype))
        sliced = layer.bias is not None and not was_fused
        kept[prefix + "bias"] = (prefix + "bias", (rows,)) if sliced else (prefix + "weight", None)
    else:
        new.bias = None
    _set_submodule(a.gm, node.target, new)
    a.modules[node.target] = new


def _rebuild_norm(a: Analysis, node: fx.Node, kept: Kept) -> None:
    bn = a.modules[node.target]
    lost = set(a.removed[node.name])
    keep = _index([c for c in range(bn.num_features) if c not in lost], bn.running_mean.device)
    new = copy.deepcopy(bn)
    new.num_features = len(keep)
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            setattr(new, name, nn.Parameter(getattr(bn, name).detach().index_select(0, keep)))
            kept[f"{node.target}.{name}"] = (f"{node.target}.{name}", (keep,))
    for name in ("running_mean", "running_var"):
        setattr(new, name, getattr(bn, name).index_select(0, keep))
    _set_submodule(a.gm, node.target, new)
    a.modules[node.target] = new


def _rebuild_pad(a: Analysis, node: fx.Node) -> None:
    front, back = channel_pad(node)
    lost = set(a.removed[node.name])
    channels = shape(node)[1]
    new_front = front - sum(1 for c in range(front) if c in lost)
    new_back = back - sum(1 for c in range(channels - back, channels) if c in lost)
    pad = list(arg(node, 1, "pad"))
    pad[4:6] = [new_front, new_back]
    if len(node.args) > 1:
        node.args = (node.args[0], tuple(pad), *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "pad": tuple(pad)}


def _rebuild_split(a: Analysis, node: fx.Node) -> None:
    """``chunk``/``split`` along channels → ``torch.split`` with the kept pieces' sizes (the node
    is rewritten in place: later rebuilds find it by name)."""
    lost = set(a.removed[node.args[0].name])
    sizes, start = [], 0
    for m in node.meta["tensor_meta"]:
        width = m.shape[1]
        sizes.append(width - sum(1 for c in range(start, start + width) if c in lost))
        start += width
    node.op, node.target, node.args, node.kwargs = (
        "call_function",
        torch.split,
        (node.args[0], sizes, 1),
        {},
    )


def _rebuild_permutation(a: Analysis, node: fx.Node) -> None:
    """A channel-permuting chain (channel shuffle) → ``index_select`` of the kept channels (its
    last node rewritten in place)."""
    src, perm, interior = a.permutations[node.name]
    lost_src, lost_out = set(a.removed[src.name]), set(a.removed[node.name])
    rank = {c: i for i, c in enumerate(c for c in range(shape(src)[1]) if c not in lost_src)}
    order = [rank[perm[c]] for c in range(len(perm)) if c not in lost_out]
    name = f"_channel_order_{node.name}"
    a.gm.register_buffer(name, torch.tensor(order, dtype=torch.long))
    with a.gm.graph.inserting_before(node):
        index = a.gm.graph.get_attr(name)
    node.op, node.target, node.args, node.kwargs = (
        "call_function",
        torch.index_select,
        (src, 1, index),
        {},
    )
    for dead in reversed(interior):
        a.gm.graph.erase_node(dead)
