"""Channel coupling analysis on a ``torch.fx`` graph: which channels must go together, and which
of them are dead (removable without changing the function).

Every tensor node with a channel dimension (dim 1) gets one id per channel. Operations couple ids
(a union-find): channel-wise ops (activations, BN, pooling, dropout, ``x[:, :, a:b]``) map channel
c to c; ``add``/``sub``/``mul`` of equally wide tensors couple channel c of every operand (residual
streams, squeeze-and-excitation scales); ``torch.cat`` along dim 1 maps input k's channel c to
offset_k + c; ``chunk``/``split`` the reverse; a chain of ``view``/``reshape``/``transpose``/
``permute``/``flatten`` that returns to the input's shape and moves whole channels (channel shuffle)
is a permutation P, found by running the chain on an index tensor; a flatten (N, C, *S) → (N, C·ΠS)
maps channel c to its block of ΠS features; a depthwise conv (groups = C_in, m = C_out / C_in)
couples input c with outputs c·m … c·m+m−1; a zero channel padding shifts channels.

``Linear``/``Conv2d`` (any groups) are *producers*: row k is dead when its weights are all zero,
and then outputs the constant b_k. A group of coupled channels is removable when every producer
row in it is dead and nothing pins it: the model input or output, a ``get_attr`` constant, an
operation outside this vocabulary ("opaque", e.g. attention), a module with weights called
twice, a ``pinned`` module. Its value is then a per-channel constant (a map after zero-padded
pooling) whatever the input, computed by running the graph with every producer replaced by its
bias (``_ConstantInterpreter``, float64), and consumers fold it into their biases.

A grouped (not depthwise) conv must lose the same number of input and output channels in every
group: removable channels beyond the smallest per-group count are kept. Every tensor keeps at least
one channel (zero-width tensors break BatchNorm and exporters).
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

__all__ = ["Analysis", "analyse", "capture", "couple", "propagate_shapes", "trace"]

_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)  # fmt: skip
_NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
_CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardtanh, F.hardswish,
    F.hardsigmoid, torch.sigmoid, torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout2d,
}  # fmt: skip
_CHANNELWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone"}
_SCALAR_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.mul, torch.div}
_SUM_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MOVE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten"}
_MOVE_FUNCTIONS = {torch.transpose, torch.reshape, torch.permute, torch.flatten}
_REDUCE_METHODS = {"mean", "sum", "amax"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax}
_SPLIT_FUNCTIONS = {torch.chunk, torch.split, torch.tensor_split}
PRODUCERS = ("linear", "grouped", "depthwise")


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


def shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if shape(a) else None)
    return found


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The operation of a node in words, e.g. ``MultiheadAttention`` or ``torch.cat``."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return f"{getattr(node.target, '__module__', '') or ''}.{node.target.__name__}".lstrip(".")
    return node.op


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` capture of a deep copy of ``model`` in eval mode (stochastic depth and dropout
    trace as what they compute at inference); one clear error if it cannot be traced."""
    copied = copy.deepcopy(model).eval()
    try:
        return fx.symbolic_trace(copied).eval()
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Invalid model: {type(model).__name__} cannot be traced by torch.fx ({first}); "
            "simplify needs a graph without data-dependent control flow"
        ) from None


def dim_arg(node: fx.Node, index: int, ndim: int, default: Any = 0) -> Any:
    d = arg(node, index, "dim", default)
    return d + ndim if isinstance(d, int) and d < 0 else d


def is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten of (N, C, *S) into (N, C·ΠS) whose size adapts to the channel count."""
    src, out = shape(node.args[0]) if node.args else None, shape(node)
    if src is None or out is None or len(src) < 3 or len(out) != 2 or out[0] != src[0]:
        return False
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        return arg(node, 1, "start_dim", 0) == 1 and arg(node, 2, "end_dim", -1) == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        return len(sizes) == 2 and sizes[1] == -1
    return False


def channel_pad(node: fx.Node) -> tuple[int, int] | None:
    """(front, back) channel padding of a zero-valued constant ``F.pad`` of a 4-D tensor."""
    if node.op != "call_function" or node.target not in (F.pad, torch._C._nn.pad):
        return None
    pad = arg(node, 1, "pad")
    mode, value = arg(node, 2, "mode", "constant"), arg(node, 3, "value", None)
    src = shape(node.args[0])
    if src is None or len(src) != 4 or mode != "constant" or value not in (None, 0, 0.0):
        return None
    if not isinstance(pad, (tuple, list)) or len(pad) > 6 or not all(isinstance(p, int) for p in pad):
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


def _is_spatial_reduce(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` and the like: a reduction over dimensions ≥ 2 only."""
    src = shape(node.args[0]) if node.args else None
    op_ok = (node.op == "call_method" and node.target in _REDUCE_METHODS) or (
        node.op == "call_function" and node.target in _REDUCE_FUNCTIONS
    )
    if not op_ok or src is None or len(src) < 3:
        return False
    dims = arg(node, 1, "dim")
    dims = (dims,) if isinstance(dims, int) else dims
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return False
    return all((d + len(src) if d < 0 else d) >= 2 for d in dims)


def _is_inference_stochastic_depth(node: fx.Node) -> bool:
    """torchvision's ``stochastic_depth(x, p, mode, training=False)`` (an fx leaf): the identity."""
    target = node.target if node.op == "call_function" else None
    return (
        getattr(target, "__name__", "") == "stochastic_depth"
        and (getattr(target, "__module__", "") or "").startswith("torchvision")
        and arg(node, 3, "training", True) is False
    )


def _split_sizes(node: fx.Node) -> list[int] | None:
    """Channel sizes of the pieces of a ``chunk``/``split`` along dim 1, else None."""
    is_split = (node.op == "call_function" and node.target in _SPLIT_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("chunk", "split")
    )
    meta = node.meta.get("tensor_meta")
    src = shape(node.args[0]) if node.args else None
    if not is_split or src is None or not isinstance(meta, (tuple, list)):
        return None
    if dim_arg(node, 2, len(src)) != 1 or not all(isinstance(m, TensorMetadata) for m in meta):
        return None
    return [m.shape[1] for m in meta]


def _elementwise_pair(node: fx.Node, functions: set, methods: tuple[str, ...]) -> bool:
    """A binary op of two tensors of the output's width and rank (broadcast elsewhere)."""
    hit = (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )
    out, targs = shape(node), tensor_args(node)
    if not hit or out is None or len(targs) != 2:
        return False
    return all(len(shape(a)) == len(out) and shape(a)[1] == out[1] for a in targs)


def classify(node: fx.Node, modules: dict[str, nn.Module], calls: Counter) -> str:
    """Role of a node in channel analysis: producer (linear, grouped, depthwise), channelwise,
    norm, sum, mul, cat, split, item, pad, flatten, meta, opaque, ..."""
    targs = tensor_args(node)
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_method" and node.target in ("size", "dim"):
        return "meta"
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim"):
        return "meta"
    if _split_sizes(node) is not None:
        return "split"
    out = shape(node)
    if out is None:
        if node.op == "call_function" and node.target is operator.getitem and not targs:
            return "meta"  # an element of a size, or a piece of an unsupported tuple (pinned)
        return "opaque"
    if len(out) < 2:
        return "opaque"
    if node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and shape(src) is None and isinstance(node.args[1], int):
            return "item" if _split_sizes(src) is not None else "opaque"
        if _keeps_channels(node):
            return "channelwise"
    if node.op == "call_module":
        m = modules[node.target]
        shared = calls[node.target] != 1
        if isinstance(m, _CHANNELWISE_MODULES) and len(targs) == 1:
            return "channelwise"  # stateless: every call is its own node
        if shared:
            return "opaque"
        if type(m) is nn.Linear and len(out) == 2:
            return "linear"
        if type(m) is nn.Conv2d and m.padding_mode == "zeros":
            if m.groups == 1:
                return "linear"
            return "depthwise" if m.groups == m.in_channels else "grouped"
        if isinstance(m, _NORM_MODULES) and len(targs) == 1:
            return "norm"
        return "opaque"
    if is_flatten(node, modules):
        return "flatten"
    if channel_pad(node) is not None:
        return "pad"
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        pieces = arg(node, 0, "tensors")
        if dim_arg(node, 1, len(out)) == 1 and all(
            isinstance(p, fx.Node) and shape(p) is not None and len(shape(p)) == len(out)
            for p in pieces
        ):
            return "cat"
        return "opaque"
    if _elementwise_pair(node, _SUM_FUNCTIONS, ("add", "add_", "sub", "sub_")):
        return "sum"
    if _elementwise_pair(node, _MUL_FUNCTIONS, ("mul", "mul_")):
        return "mul"
    if _is_spatial_reduce(node) or _is_inference_stochastic_depth(node):
        return "channelwise"
    scalar_op = node.op == "call_function" and node.target in _SCALAR_OPS
    channelwise = (
        (node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS)
        or (node.op == "call_method" and node.target in _CHANNELWISE_METHODS)
        or (node.op == "call_method" and node.target in ("add", "add_", "mul", "mul_"))
        or scalar_op
    )
    if channelwise and len(targs) == 1 and node.args and node.args[0] is targs[0]:
        return "channelwise"
    return "opaque"


def _is_move(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _MOVE_METHODS) or (
        node.op == "call_function" and node.target in _MOVE_FUNCTIONS
    )


def _run_op(node: fx.Node, env: dict[str, Any]) -> Any:
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a.name])
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _permutations(
    nodes: list[fx.Node], kinds: dict[str, str], values: dict[str, Any]
) -> dict[str, tuple[fx.Node, list[int], list[fx.Node]]]:
    """Chains of view/reshape/transpose/... that return to their input's shape and move whole
    channels (channel shuffle): end node name → (input node, permutation, interior nodes)."""
    found: dict[str, tuple[fx.Node, list[int], list[fx.Node]]] = {}
    interior: set[str] = set()
    for end in reversed(nodes):
        if not _is_move(end) or end.name in interior or shape(end) is None:
            continue
        chain, src = [end], end.args[0]
        while isinstance(src, fx.Node) and _is_move(src) and len(src.users) == 1:
            chain.insert(0, src)
            src = src.args[0]
        if len(chain) < 2 or shape(src) is None or shape(src) != shape(end) or len(shape(end)) < 3:
            continue
        s = shape(src)
        if s[0] != 1:
            continue
        env = dict(values)
        spatial = int(torch.tensor(s[2:]).prod())
        env[src.name] = torch.arange(s[1] * spatial, dtype=torch.float64).view(1, *s[1:])
        for node in chain:
            env[node.name] = _run_op(node, env)
        moved = env[end.name].reshape(s[1], spatial).long()
        source = moved // spatial
        if not torch.equal(moved % spatial, torch.arange(spatial).expand(s[1], spatial)):
            continue
        if not torch.equal(source, source[:, :1].expand_as(source)):
            continue
        found[end.name] = (src, source[:, 0].tolist(), chain[:-1])
        interior.update(n.name for n in chain[:-1])
    for name in interior:
        kinds[name] = "interior"
    for name in found:
        kinds[name] = "permute"
    return found


class _ConstantInterpreter(fx.Interpreter):
    """Runs the graph with every producer replaced by its bias: the value of each dead channel,
    whatever the input (other channels' values are meaningless and ignored)."""

    def __init__(self, gm: fx.GraphModule, producers: set[str]):
        super().__init__(gm)
        self.producers = producers
        self.values: dict[str, Any] = {}

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


@dataclass
class Analysis:
    """The coupling of a traced graph and its removable channels.

    ``removed[node]``: channel indices of that node's output that go; ``values[node]``: float64
    value of each node with producers replaced by their biases (meaningful on dead channels);
    ``blockers[root]``: (node name, reason) that keeps a coupled group; ``members[node]``: ids.
    """

    gm: fx.GraphModule
    modules: dict[str, nn.Module]
    kinds: dict[str, str]
    offsets: dict[str, int]
    uf: _UnionFind
    values: dict[str, Any]
    permutations: dict[str, tuple[fx.Node, list[int], list[fx.Node]]]
    blockers: dict[int, tuple[str, str]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)

    def ids(self, node: fx.Node) -> range:
        return range(self.offsets[node.name], self.offsets[node.name] + shape(node)[1])

    def root(self, node: fx.Node, channel: int) -> int:
        return self.uf.find(self.offsets[node.name] + channel)

    def block(self, i: int, node: fx.Node, reason: str) -> None:
        self.blockers.setdefault(self.uf.find(i), (node.name, reason))


def _couple(a: Analysis, nodes: list[fx.Node], calls: Counter) -> list[tuple[int, fx.Node, str]]:
    """Union coupled channel ids; return the structural pins (id, node, reason)."""
    pins: list[tuple[int, fx.Node, str]] = []
    uf = a.uf
    for n in nodes:
        kind, targs = a.kinds[n.name], tensor_args(n)
        if kind in ("linear", "grouped"):
            continue
        if kind == "depthwise":
            m = shape(n)[1] // shape(targs[0])[1]
            for c, j in enumerate(a.ids(targs[0])):
                for i in range(a.offsets[n.name] + c * m, a.offsets[n.name] + (c + 1) * m):
                    uf.union(i, j)
        elif kind in ("channelwise", "norm", "sum", "mul"):
            for t in targs if kind in ("sum", "mul") else targs[:1]:
                for i, j in zip(a.ids(n), a.ids(t)):
                    uf.union(i, j)
        elif kind == "cat":
            start = a.offsets[n.name]
            for piece in arg(n, 0, "tensors"):
                for j in a.ids(piece):
                    uf.union(start, j)
                    start += 1
        elif kind == "item":
            split, index = n.args
            start = sum(_split_sizes(split)[:index])
            for c, i in enumerate(a.ids(n)):
                uf.union(i, a.offsets[split.args[0].name] + start + c)
        elif kind == "pad":
            front = channel_pad(n)[0]
            for c, j in enumerate(a.ids(targs[0])):
                uf.union(a.offsets[n.name] + front + c, j)
        elif kind == "flatten":
            src = targs[0]
            block = shape(n)[1] // shape(src)[1]
            for c, j in enumerate(a.ids(src)):
                for i in range(a.offsets[n.name] + c * block, a.offsets[n.name] + (c + 1) * block):
                    uf.union(i, j)
        elif kind == "permute":
            src, perm, _ = a.permutations[n.name]
            for i, c in zip(a.ids(n), perm):
                uf.union(i, a.offsets[src.name] + c)
        elif kind not in ("meta", "split", "interior"):
            if kind == "opaque":
                reason = f"unsupported operation {describe(n, a.modules)}"
                if n.op == "call_module" and calls[n.target] > 1:
                    reason = f"module {n.target} with weights called {calls[n.target]} times"
            else:
                reason = {"placeholder": "model input", "output": "model output"}.get(
                    kind, "graph constant"
                )
            for t in targs + ([n] if n.name in a.offsets else []):
                pins.extend((i, n, reason) for i in a.ids(t))
    return pins


def couple(gm: fx.GraphModule, calls: Counter, example: Tensor) -> Analysis:
    """Classify, evaluate constants and couple the channels of ``gm`` (whose nodes carry
    ``tensor_meta`` from ShapeProp on ``example``, batch size 1); structural pins are blockers."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    kinds = {n.name: classify(n, modules, calls) for n in nodes}
    const_gm = copy.deepcopy(gm).double().eval()
    producers = {n.name for n in nodes if kinds[n.name] in PRODUCERS}
    interp = _ConstantInterpreter(const_gm, producers)
    interp.run(torch.zeros_like(example, dtype=torch.float64))
    permutations = _permutations(nodes, kinds, interp.values)
    offsets, total = {}, 0
    for n in nodes:
        s = shape(n)
        if s is not None and len(s) >= 2 and kinds[n.name] != "interior":
            offsets[n.name] = total
            total += s[1]
    a = Analysis(gm, modules, kinds, offsets, _UnionFind(total), interp.values, permutations)
    for i, node, reason in _couple(a, nodes, calls):
        a.block(i, node, reason)
    return a


def analyse(
    gm: fx.GraphModule,
    calls: Counter,
    pinned_targets: set[str],
    prune_residual_stream: bool,
    example: Tensor,
) -> Analysis:
    """:func:`couple`, then block every group with a live producer row, a pinned module or (with
    ``prune_residual_stream=False``) an add, and settle the removable channels of every node."""
    a = couple(gm, calls, example)
    nodes = list(gm.graph.nodes)
    summed = {a.uf.find(i) for n in nodes if a.kinds[n.name] == "sum" for i in a.ids(n)}
    for n in nodes:
        if a.kinds[n.name] not in PRODUCERS:
            continue
        for c, (i, live) in enumerate(zip(a.ids(n), live_rows(a.modules[n.target]))):
            if n.target in pinned_targets:
                a.block(i, n, f"pinned module {n.target}")
            elif live:
                a.block(i, n, f"live channel {c} of {n.target}")
            elif not prune_residual_stream and a.uf.find(i) in summed:
                a.block(i, n, "residual stream (prune_residual_stream=False)")
    _settle(a, nodes)
    return a


def live_rows(layer: nn.Module) -> list[bool]:
    """Per output row of a Linear/Conv2d: whether any weight is non-zero."""
    weight = layer.weight.detach()
    return weight.reshape(weight.shape[0], -1).ne(0).any(dim=1).tolist()


def _removed(a: Analysis, node: fx.Node) -> list[int]:
    return [c for c, i in enumerate(a.ids(node)) if a.uf.find(i) not in a.blockers]


def _settle(a: Analysis, nodes: list[fx.Node]) -> None:
    """Keep one channel per tensor and equal per-group counts in grouped convs, to a fixpoint."""
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n.name in a.offsets and not any(a.uf.find(i) in a.blockers for i in a.ids(n)):
                a.block(a.offsets[n.name], n, "a tensor keeps at least one channel")
                changed = True
            if a.kinds[n.name] != "grouped":
                continue
            groups = a.modules[n.target].groups
            for t in (n, tensor_args(n)[0]):
                width = shape(t)[1] // groups
                lost = [[c for c in _removed(a, t) if c // width == g] for g in range(groups)]
                fewest = min(len(g) for g in lost)
                for g in lost:
                    for c in g[fewest:]:
                        a.block(a.offsets[t.name] + c, n, "grouped conv keeps equal groups")
                        changed = True
    a.removed = {n.name: _removed(a, n) for n in nodes if n.name in a.offsets}


def capture(model: nn.Module, example_input: Tensor) -> tuple[fx.GraphModule, Counter, Tensor]:
    """Trace ``model``; count the calls of each module; one sample of ``example_input``."""
    gm = trace(model)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    return gm, calls, example_input[:1].detach()


def propagate_shapes(gm: fx.GraphModule, example: Tensor) -> None:
    gm.graph.lint()
    gm.recompile()
    ShapeProp(gm).propagate(example)
