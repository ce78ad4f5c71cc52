"""The vocabulary of the channel analysis: what each ``torch.fx`` node does to channels (dim 1).

:func:`classify` gives a node's role: a producer (``linear``: Linear or Conv2d with groups = 1;
``grouped``; ``depthwise``: groups = C_in), ``norm`` (BatchNorm), ``channelwise`` (activations,
pooling, dropout, ``x[:, :, a:b]``, spatial reductions, inference-time stochastic depth, scalar
arithmetic), ``sum``/``mul`` (two operands of the output's width), ``cat``/``split``/``item``
along channels, ``pad`` (zero channel padding), ``flatten`` ((N, C, *S) → (N, C·ΠS)), ``meta``
(size queries), ``opaque`` (anything else, e.g. attention: its channels are kept). Stateless
modules are channel-wise at every call; a module with weights called twice is opaque.
:func:`permutations` finds channel shuffles: chains of view/reshape/transpose/... that return to
their input's shape and move whole channels, by running the chain on an index tensor.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

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


def split_sizes(node: fx.Node) -> list[int] | None:
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
    if split_sizes(node) is not None:
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
        index = node.args[1]
        if (
            isinstance(src, fx.Node)
            and shape(src) is None
            and isinstance(index, int)
            and index >= 0
        ):
            return "item" if split_sizes(src) is not None else "opaque"
        if _keeps_channels(node):
            return "channelwise"
    if node.op == "call_module":
        m = modules[node.target]
        shared = calls[node.target] != 1
        if isinstance(m, _CHANNELWISE_MODULES) and len(targs) == 1:
            return "channelwise"  # stateless: every call is its own node
        if is_flatten(node, modules):  # nn.Flatten (stateless too)
            return "flatten"
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


def permutations(
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
