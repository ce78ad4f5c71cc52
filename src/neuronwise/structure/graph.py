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
import linecache
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from neuronwise._utils import unwrap

from .vocabulary import (
    PRODUCERS,
    arg,
    channel_pad,
    classify,
    describe,
    permutations,
    shape,
    split_sizes,
    tensor_args,
)

__all__ = ["Analysis", "analyse", "capture", "couple", "propagate_shapes", "trace"]


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


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` capture of a deep copy of ``model`` in eval mode (stochastic depth and dropout
    trace as what they compute at inference); one clear error if it cannot be traced."""
    copied = copy.deepcopy(unwrap(model)).eval()
    try:
        return fx.symbolic_trace(copied).eval()
    except Exception as error:  # noqa: BLE001 - fx raises TraceError, TypeError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Invalid model: {type(model).__name__} cannot be traced by torch.fx ({first})"
            f"{_user_frame(error.__traceback__)}; simplify needs a graph without data-dependent "
            "control flow"
        ) from None


def _user_frame(tb: TracebackType | None) -> str:
    """`` at FILE:LINE: code`` of the innermost traceback frame outside torch, if any."""
    torch_dir = os.path.dirname(torch.__file__)
    found = ""
    for frame, line in traceback.walk_tb(tb):
        path = frame.f_code.co_filename
        if not path.startswith(torch_dir) and path != __file__:
            code = (linecache.getline(path, line) or "").strip()
            found = f" at {os.path.basename(path)}:{line}: {code}"
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
    ``blockers[root]``: (node name, reason) that keeps a coupled group; ``ids(node)``: the ids of
    a node's channels (offset by ``offsets[node]``), grouped by ``uf``.
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
            start = sum(split_sizes(split)[:index])
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
            for t in targs + [n]:
                if t.name in a.offsets:  # a 1-D tensor (e.g. a bare parameter) has no channels
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
    shuffles = permutations(nodes, kinds, interp.values)
    offsets, total = {}, 0
    for n in nodes:
        s = shape(n)
        if s is not None and len(s) >= 2 and kinds[n.name] != "interior":
            offsets[n.name] = total
            total += s[1]
    a = Analysis(gm, modules, kinds, offsets, _UnionFind(total), interp.values, shuffles)
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
