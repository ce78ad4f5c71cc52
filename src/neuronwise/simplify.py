"""Physical removal of dead neurons: a smaller network that computes the same function.

After structured sparsification (SeReNe, LOBSTER with neuron masks) many neurons have all incoming
weights exactly zero. ``simplify`` (after EIDOSLAB/simplify, *SoftwareX* 2022; METHODS §4) rebuilds
the network without them:

1. **Fuse BN** (``fuse_bn=True``) into the preceding ``Conv2d``/``Linear`` when that layer feeds only
   the BN, in float64: s = γ/√(σ²+ε), W' = s·W (per output channel), b' = s·(b − μ) + β.
2. **Propagate constants.** A dead neuron k (weight row all zero) outputs the constant b_k; through
   channel-wise layers (activations, unfused BN, pooling, dropout) it stays a per-channel constant
   (a map after zero-padded pooling). Each consumer folds it into its bias: ``Linear``
   b'_j += Σ_k W_{jk} c_k; ``Conv2d`` b' += Σ_k W[:, k] ∗ c_k, which is non-uniform at zero-padded
   borders and then becomes a bias map (:class:`BiasMapConv2d`).
3. **Remove** dead rows (weights, biases, BN entries) and the consumers' input columns; a ``Flatten``
   maps channel k to its block of H·W features.
4. **Residuals.** Channels summed by an ``add`` form one stream across all producers. A stream
   channel is removed only if it is exactly zero in every producer (so the sum is 0 everywhere);
   ``prune_residual_stream=False`` keeps every summed channel (official behaviour). Channel
   padding (option-A shortcut) is followed: padded channels are zero producers.

Channels that reach the model output, the input, an operation not listed above, or a ``pinned``
module's output are kept. The result is a new :class:`torch.fx.GraphModule`; the input model is not
modified. Guarantee (float32): max|Δy| ≤ 1e-5·max|y| and the same argmax, never bitwise equality.
Bias maps fix the spatial input size to the example's.

Graph capture uses ``torch.fx`` (in torch, no extra dependency): it records functional adds,
padding and slicing exactly, and its ``Interpreter`` computes the propagated constants on the same
graph. Torch-Pruning's dependency graph is not a dependency of ours and gives no value propagation.
The model must be symbolically traceable (no data-dependent control flow).
"""

from __future__ import annotations

import copy
import io
import operator
import os
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .io import atomic_write_bytes

__all__ = [
    "BiasMapConv2d",
    "export_onnx",
    "load_simplified",
    "remap_optimizer_state",
    "save_simplified",
    "simplify",
]

_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardtanh, F.hardswish,
    torch.sigmoid, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, torch.nn.functional.dropout2d,
}  # fmt: skip
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_SCALAR_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.mul, torch.div}
_ADD_OPS = {operator.add, operator.iadd, torch.add}
_EXAMPLE_KEY = "neuronwise_example_input"


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


class _UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if _shape(a) else None)
    return found


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten of (N, C, *S) into (N, C·ΠS) whose size adapts to the channel count."""
    src, out = _shape(node.args[0]) if node.args else None, _shape(node)
    if src is None or out is None or len(src) < 3 or len(out) != 2 or out[0] != src[0]:
        return False
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    if node.op == "call_method" and node.target == "flatten":
        return _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        return len(sizes) == 2 and sizes[1] == -1
    return False


def _channel_pad(node: fx.Node) -> tuple[int, int] | None:
    """(front, back) channel padding of a zero-valued constant ``F.pad`` of a 4-D tensor."""
    if node.op != "call_function" or node.target not in (F.pad, torch._C._nn.pad):
        return None
    pad = _arg(node, 1, "pad")
    mode, value = _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
    src = _shape(node.args[0])
    if src is None or len(src) != 4 or mode != "constant" or value not in (None, 0, 0.0):
        return None
    if (
        not isinstance(pad, (tuple, list))
        or len(pad) > 6
        or not all(isinstance(p, int) for p in pad)
    ):
        return None
    front, back = (pad[4], pad[5]) if len(pad) == 6 else (0, 0)
    return (front, back) if front >= 0 and back >= 0 else None


def _keeps_channels(node: fx.Node) -> bool:
    """Whether ``x[idx]`` leaves dimensions 0 and 1 whole (e.g. ``x[:, :, ::2, ::2]``)."""
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    whole = slice(None, None, None)
    rest_ok = all(isinstance(i, slice) for i in index[2:])
    return index[0] == whole and index[1] == whole and rest_ok


def _classify(node: fx.Node, modules: dict[str, nn.Module], calls: Counter) -> str:
    """Role of a node in channel analysis: producer, channel-wise, add, pad, flatten, meta, ..."""
    targs = _tensor_args(node)
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_method" and node.target == "size" and _arg(node, 1, "dim") == 0:
        return "meta"
    out = _shape(node)
    if out is None or len(out) < 2:
        return "opaque"
    if node.op == "call_module":
        m = modules[node.target]
        if calls[node.target] != 1:
            return "opaque"
        if type(m) is nn.Linear and len(out) == 2:
            return "linear"
        if type(m) is nn.Conv2d and m.groups == 1:
            return "linear"
        if isinstance(m, _NORM_MODULES) and len(targs) == 1:
            return "norm"
        if isinstance(m, _CHANNELWISE_MODULES) and len(targs) == 1:
            return "channelwise"
    if _is_flatten(node, modules):
        return "flatten"
    if _channel_pad(node) is not None:
        return "pad"
    if node.op == "call_function" and node.target is operator.getitem and _keeps_channels(node):
        return "channelwise"
    is_add = (node.op == "call_function" and node.target in _ADD_OPS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if is_add and len(targs) == 2 and all(_shape(a)[:2] == out[:2] for a in targs):
        return "add"
    scalar_op = node.op == "call_function" and node.target in _SCALAR_OPS
    channelwise = (
        (node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS)
        or (node.op == "call_method" and node.target in _CHANNELWISE_METHODS)
        or scalar_op
        or is_add
    )
    if channelwise and len(targs) == 1 and node.args and node.args[0] is targs[0]:
        return "channelwise"
    return "opaque"


def _fuse_batchnorms(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: Counter) -> set[str]:
    """Fold eval-mode BN into the preceding Conv2d/Linear (float64); return the fused targets."""
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


class _ConstantInterpreter(fx.Interpreter):
    """Runs the graph with every Linear/Conv2d producer replaced by its bias: the value of each
    dead channel, whatever the input (other channels' values are meaningless and ignored)."""

    def __init__(self, gm: fx.GraphModule, producers: set[str]):
        super().__init__(gm)
        self.producers = producers
        self.values: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.producers:
            bias = self.module.get_submodule(n.target).bias
            out = torch.zeros_like(out)
            if bias is not None:
                out += bias.detach().view(-1, *[1] * (out.dim() - 2))
        # A copy: an in-place operation later in the graph must not rewrite a recorded value.
        self.values[n.name] = out.clone() if isinstance(out, Tensor) else out
        return out


def _analyse(
    gm: fx.GraphModule,
    modules: dict[str, nn.Module],
    calls: Counter,
    pinned_targets: set[str],
    prune_residual_stream: bool,
    example_input: Tensor,
) -> tuple[dict[str, list[int]], dict[str, Tensor]]:
    """Per node, the removable channel indices; and the float64 constant values of every node."""
    nodes = list(gm.graph.nodes)
    kinds = {n.name: _classify(n, modules, calls) for n in nodes}
    offsets, total = {}, 0
    for n in nodes:
        shape = _shape(n)
        if shape is not None and len(shape) >= 2:
            offsets[n.name] = total
            total += shape[1]
    uf = _UnionFind(total)
    pinned = [False] * total
    summed = [False] * total
    producer_rows: list[tuple[fx.Node, int]] = []

    def ids(node: fx.Node) -> range:
        return range(offsets[node.name], offsets[node.name] + _shape(node)[1])

    for n in nodes:
        kind, targs = kinds[n.name], _tensor_args(n)
        if kind == "linear":
            if n.target in pinned_targets:
                for i in ids(n):
                    pinned[i] = True
            producer_rows.extend((n, c) for c in range(_shape(n)[1]))
        elif kind in ("channelwise", "norm", "add"):
            for a in targs:
                for i, j in zip(ids(n), ids(a)):
                    uf.union(i, j)
            if kind == "add":
                for i in ids(n):
                    summed[i] = True
        elif kind == "pad":
            front = _channel_pad(n)[0]
            for c, j in enumerate(ids(targs[0])):
                uf.union(offsets[n.name] + front + c, j)
        elif kind == "flatten":
            src = targs[0]
            block = _shape(n)[1] // _shape(src)[1]
            for c, j in enumerate(ids(src)):
                for i in range(offsets[n.name] + c * block, offsets[n.name] + (c + 1) * block):
                    uf.union(i, j)
        elif kind != "meta":
            # Input, output, constants and unknown operations keep every channel they touch.
            for a in targs + ([n] if n.name in offsets else []):
                for i in ids(a):
                    pinned[i] = True

    const_gm = copy.deepcopy(gm).double().eval()
    interp = _ConstantInterpreter(const_gm, {n.name for n in nodes if kinds[n.name] == "linear"})
    interp.run(torch.zeros_like(example_input, dtype=torch.float64))
    values = interp.values

    # A group of coupled channels is removable when nothing pins it, every producer row is dead
    # and, if an add sums it, its value is exactly zero at every member.
    blocked = [False] * total
    for i in range(total):
        if pinned[i]:
            blocked[uf.find(i)] = True
    for node, c in producer_rows:
        if torch.any(modules[node.target].weight[c] != 0):
            blocked[uf.find(offsets[node.name] + c)] = True
    is_summed = [False] * total
    for i in range(total):
        if summed[i]:
            is_summed[uf.find(i)] = True
    nonzero = [False] * total
    for n in nodes:
        if n.name in offsets and n.name in values:
            v = values[n.name]
            per_channel = v.transpose(0, 1).reshape(v.shape[1], -1).ne(0).any(dim=1).tolist()
            for c, nz in enumerate(per_channel):
                if nz:
                    nonzero[uf.find(offsets[n.name] + c)] = True
    for root in range(total):
        if is_summed[root] and (not prune_residual_stream or nonzero[root]):
            blocked[root] = True
    # A layer keeps at least one (dead) neuron: zero-width tensors break BatchNorm and exporters.
    for n in nodes:
        if n.name in offsets and all(not blocked[uf.find(i)] for i in ids(n)):
            blocked[uf.find(offsets[n.name])] = True
    removed = {
        n.name: [c for c, i in enumerate(ids(n)) if not blocked[uf.find(i)]]
        for n in nodes
        if n.name in offsets
    }
    return removed, values


def _index(keep: list[int], device: torch.device) -> Tensor:
    return torch.tensor(keep, dtype=torch.long, device=device)


def simplify(
    model: nn.Module,
    example_input: Tensor,
    fuse_bn: bool = True,
    pinned: Iterable[str | nn.Module] = (),
    prune_residual_stream: bool = True,
    return_kept: bool = False,
) -> nn.Module | tuple[nn.Module, dict[str, tuple[str, tuple[Tensor, ...] | None]]]:
    """A new, smaller module without the dead neurons of ``model`` (evaluated in eval mode).

    Args:
        model: the network; it is deep-copied, never modified.
        example_input: one input batch, e.g. ``torch.zeros(1, 1, 28, 28)`` (only its shape matters).
        fuse_bn: fold BatchNorm into the preceding layer first (more neurons become removable).
        pinned: modules (or their names) whose output neurons are kept.
        prune_residual_stream: remove residual-stream channels that are zero in every producer.
        return_kept: also return ``kept``: new parameter name → (old parameter name, kept
            indices per dimension: ``()`` when unchanged, ``None`` when the parameter is new or
            rescaled), for :func:`remap_optimizer_state`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: {type(model).__name__} (expected torch.nn.Module)")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ValueError(
            f"Invalid example_input: {getattr(example_input, 'shape', example_input)!r} "
            "(expected a tensor with a batch dimension)"
        )
    names = {id(m): name for name, m in model.named_modules()}
    pinned_targets = set()
    for p in pinned:
        name = names.get(id(p)) if isinstance(p, nn.Module) else p
        if name is None or not isinstance(name, str) or name not in dict(model.named_modules()):
            raise ValueError(
                f"Invalid pinned entry: {p!r} (expected a module of model or its name)"
            )
        pinned_targets.add(name)

    gm = fx.symbolic_trace(copy.deepcopy(model)).eval()
    example = example_input[:1].detach()
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    fused = _fuse_batchnorms(gm, modules, calls) if fuse_bn else set()
    gm.graph.lint()
    gm.recompile()
    ShapeProp(gm).propagate(example)
    removed, values = _analyse(
        gm, modules, calls, pinned_targets, prune_residual_stream, example.double()
    )

    kept: dict[str, tuple[str, tuple[Tensor, ...] | None]] = {}
    for node in list(gm.graph.nodes):
        kind = _classify(node, modules, calls)
        if kind == "linear":
            _rebuild_layer(gm, node, modules, removed, values, node.target in fused, kept)
        elif kind == "norm" and removed[node.name]:
            _rebuild_norm(gm, node, modules, removed, kept)
        elif kind == "pad" and removed[node.name]:
            front, back = _channel_pad(node)
            lost = set(removed[node.name])
            channels = _shape(node)[1]
            new_front = front - sum(1 for c in range(front) if c in lost)
            new_back = back - sum(1 for c in range(channels - back, channels) if c in lost)
            pad = list(_arg(node, 1, "pad"))
            pad[4:6] = [new_front, new_back]
            if len(node.args) > 1:
                node.args = (node.args[0], tuple(pad), *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "pad": tuple(pad)}
    for name, _ in gm.named_parameters():
        kept.setdefault(name, (name, ()))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    for node in gm.graph.nodes:
        node.meta.pop("tensor_meta", None)
    gm.meta[_EXAMPLE_KEY] = torch.zeros_like(example)  # input shape for save_simplified
    return (gm, kept) if return_kept else gm


def _rebuild_layer(
    gm: fx.GraphModule,
    node: fx.Node,
    modules: dict[str, nn.Module],
    removed: dict[str, list[int]],
    values: dict[str, Tensor],
    was_fused: bool,
    kept: dict[str, tuple[str, tuple[Tensor, ...] | None]],
) -> None:
    """Fold the removed inputs' constants into the bias, then drop dead rows and removed columns."""
    layer = modules[node.target]
    src = node.args[0]
    rows_out, cols_in = removed[node.name], removed[src.name]
    prefix = f"{node.target}."
    if not rows_out and not cols_in:
        if was_fused:  # rescaled by the BN: optimizer state does not carry over
            kept[prefix + "weight"] = kept[prefix + "bias"] = (prefix + "weight", None)
        return
    w64 = layer.weight.detach().double()
    bias = torch.zeros(w64.shape[0], dtype=torch.float64, device=w64.device)
    if layer.bias is not None:
        bias = layer.bias.detach().double()
    bias_map = None
    if cols_in:
        const = torch.zeros_like(values[src.name])
        const[:, cols_in] = values[src.name][:, cols_in]
        const = const.to(w64.device)
        if isinstance(layer, nn.Linear):
            bias = bias + F.linear(const, w64)[0]
        else:
            contribution = layer._conv_forward(const, w64, None)[0]
            corner = contribution[:, :1, :1]
            spread = (contribution - corner).abs().max()
            if spread <= 1e-12 * max(contribution.abs().max().item(), 1e-300):
                bias = bias + corner.flatten()
            else:
                bias_map = contribution + bias.view(-1, 1, 1)
    device = layer.weight.device
    lost_rows, lost_cols = set(rows_out), set(cols_in)
    keep_rows = [r for r in range(w64.shape[0]) if r not in lost_rows]
    keep_cols = [c for c in range(w64.shape[1]) if c not in lost_cols]
    rows, cols = _index(keep_rows, device), _index(keep_cols, device)
    dtype = layer.weight.dtype
    weight = layer.weight.detach().index_select(0, rows).index_select(1, cols)
    if isinstance(layer, nn.Linear):
        new = nn.Linear(len(keep_cols), len(keep_rows), bias=True, device=device, dtype=dtype)
    elif bias_map is None:
        new = copy.deepcopy(layer)
        new.in_channels, new.out_channels = len(keep_cols), len(keep_rows)
    else:
        new = BiasMapConv2d(layer, bias_map.index_select(0, rows).to(dtype))
        new.in_channels, new.out_channels = len(keep_cols), len(keep_rows)
    new.weight = nn.Parameter(weight.clone())
    kept[prefix + "weight"] = (prefix + "weight", None if was_fused else (rows, cols))
    if bias_map is not None:
        kept[prefix + "bias_map"] = (prefix + "weight", None)
    elif layer.bias is not None or torch.any(bias != 0):
        new.bias = nn.Parameter(bias.index_select(0, rows).to(dtype))
        sliced = layer.bias is not None and not was_fused
        kept[prefix + "bias"] = (prefix + "bias", (rows,)) if sliced else (prefix + "weight", None)
    else:
        new.bias = None
    _set_submodule(gm, node.target, new)
    modules[node.target] = new


def _rebuild_norm(
    gm: fx.GraphModule,
    node: fx.Node,
    modules: dict[str, nn.Module],
    removed: dict[str, list[int]],
    kept: dict[str, tuple[str, tuple[Tensor, ...] | None]],
) -> None:
    bn = modules[node.target]
    lost = set(removed[node.name])
    keep = _index([c for c in range(bn.num_features) if c not in lost], bn.running_mean.device)
    new = copy.deepcopy(bn)
    new.num_features = len(keep)
    for name in ("weight", "bias"):
        if getattr(bn, name) is not None:
            setattr(new, name, nn.Parameter(getattr(bn, name).detach().index_select(0, keep)))
            kept[f"{node.target}.{name}"] = (f"{node.target}.{name}", (keep,))
    for name in ("running_mean", "running_var"):
        setattr(new, name, getattr(bn, name).index_select(0, keep))
    _set_submodule(gm, node.target, new)
    modules[node.target] = new


def remap_optimizer_state(
    optimizer: torch.optim.Optimizer,
    old_model: nn.Module,
    new_model: nn.Module,
    kept: dict[str, tuple[str, tuple[Tensor, ...] | None]],
) -> None:
    """Point ``optimizer`` at ``new_model``'s parameters, slicing per-parameter state (SGD momentum,
    Adam moments) to the kept rows and columns.

    ``kept`` comes from ``simplify(..., return_kept=True)``. Parameters that are new or were rescaled
    (fused BN, bias maps) start with empty state in their source's parameter group; parameters of
    the old model that are gone (fused BN) leave the optimizer.
    """
    old = dict(old_model.named_parameters())
    group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    new_groups: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    new_state = {}
    for name, param in new_model.named_parameters():
        if name not in kept or kept[name][0] not in old:
            raise ValueError(f"Invalid kept: no source for new parameter {name!r}")
        source_name, index = kept[name]
        source = old[source_name]
        if id(source) not in group_of:
            continue
        new_groups[group_of[id(source)]].append(param)
        state = optimizer.state.get(source, {})
        if index is None or not state:
            continue
        sliced = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == source.shape:
                for dim, idx in enumerate(index):
                    value = value.index_select(dim, idx.to(value.device))
                sliced[key] = value.clone()
            else:
                sliced[key] = value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)
        new_state[param] = sliced
    for group, params in zip(optimizer.param_groups, new_groups):
        group["params"] = params
    optimizer.state.clear()
    optimizer.state.update(new_state)


def _batch_of_two(example_input: Tensor) -> Tensor:
    # torch.export specializes a dimension of size 1; two samples keep the batch size dynamic.
    return example_input[:1].detach().repeat(2, *[1] * (example_input.dim() - 1))


def _export(model: nn.Module, example_input: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim.DYNAMIC
    return torch.export.export(
        model.eval(), (_batch_of_two(example_input),), dynamic_shapes=({0: batch},)
    )


def _example_for(model: nn.Module, example_input: Tensor | None) -> Tensor:
    if example_input is not None:
        return example_input
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) or _EXAMPLE_KEY not in meta:
        raise ValueError(
            "Invalid example_input: None (required for a model that simplify() did not return)"
        )
    return meta[_EXAMPLE_KEY]


def save_simplified(
    model: nn.Module, path: str | os.PathLike, example_input: Tensor | None = None
) -> None:
    """Save structure and weights (``torch.export``, dynamic batch size) to ``path``, atomically.

    ``example_input`` defaults to a zero tensor shaped like the one given to :func:`simplify`.
    :func:`load_simplified` (or ``torch.export.load(path).module()``) needs neither neuronwise nor
    the model's source code. Loading unpickles, so load only files you trust.
    """
    buffer = io.BytesIO()
    torch.export.save(_export(model, _example_for(model, example_input)), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_simplified(path: str | os.PathLike) -> nn.Module:
    """The module saved by :func:`save_simplified` (inference only)."""
    return torch.export.load(path).module()


def export_onnx(model: nn.Module, example_input: Tensor | None, path: str | os.PathLike) -> None:
    """Export ``model`` to ONNX (dynamic batch size), atomically; needs ``onnx`` and ``onnxscript``.

    ``example_input`` may be None for a model returned by :func:`simplify`.
    """
    try:
        model.eval()
    except NotImplementedError:  # a load_simplified (torch.export) module: inference-only already
        pass
    program = torch.onnx.export(
        model,
        (_batch_of_two(_example_for(model, example_input)),),
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        dynamo=True,
        verbose=False,
    )
    atomic_write_bytes(path, program.model_proto.SerializeToString())
