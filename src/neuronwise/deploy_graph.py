"""The graph that ``deploy`` runs: a simplified model as plain ATen calls, lowered and compiled.

- :func:`plain_graph`: an exported program (``torch.export``) as a plain ``torch.fx`` graph, with
  no export guards or pytree code, common ops calling their public bindings (which Python dispatches
  faster) and the ReLU of a layer's fresh output in place.
- :func:`layer_inputs`: the concrete arguments of every ``linear`` / ``conv2d`` call on one batch
  (what ``deploy`` times the kernels on).
- :func:`lower`: a copy of the graph in which chosen layers call a sparse module, every dense
  ``linear`` of a matrix input is ``torch.addmm(b, x, Wᵀ)`` with ``Wᵀ`` stored transposed and
  contiguous (the same product, y = x Wᵀ + b; measured 1.0–1.4× faster than ``F.linear`` on this
  CPU, most at batch 32, never slower), and optionally the input, convolution weights and every
  convolution's output are ``channels_last``.
- :func:`compile_graph`: the graph as one Python function whose tensors and sparse kernels are
  plain attributes of a namespace, not module attributes: no ``nn.Module`` dispatch per layer, which
  at batch 1 costs as much as the arithmetic of a small layer.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .sparse_layers import CSRConv2d, CSRLinear, GatherLinear

__all__ = [
    "CONV2D",
    "LINEAR",
    "compile_graph",
    "is_site",
    "layer_inputs",
    "lower",
    "plain_graph",
    "site_name",
    "sparse_module",
]

LINEAR = F.linear
CONV2D = torch.conv2d
# ATen overloads of the exported graph and the public bindings with the same signature.
_BINDINGS = {
    torch.ops.aten.linear.default: LINEAR, torch.ops.aten.conv2d.default: CONV2D,
    torch.ops.aten.relu.default: torch.relu, torch.ops.aten.flatten.using_ints: torch.flatten,
    torch.ops.aten.max_pool2d.default: torch.max_pool2d,
}


def plain_graph(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The exported graph as a plain fx module: no input guards, no pytree codegen, no grads."""
    exported = program.module()
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    output = None
    for node in exported.graph.nodes:
        if node.op == "call_module":  # export's input guard (``_guards_fn``)
            continue
        if node.op == "output":
            output = node.args[0]
            continue
        values[node] = graph.node_copy(node, lambda n: values[n])
        if node.op == "call_function" and node.target in _BINDINGS:
            values[node].target = _BINDINGS[node.target]
        source = node.args[0] if node.args else None
        if (values[node].target is torch.relu and isinstance(source, fx.Node)
                and _BINDINGS.get(source.target) in (LINEAR, CONV2D)
                and len(source.users) == 1):
            values[node].target = torch.relu_  # a layer's fresh output, used once: no new tensor
    result = fx.map_arg(output, lambda n: values[n])
    graph.output(result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result)
    plain = fx.GraphModule(exported, graph)
    plain.delete_all_unused_submodules()
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    return plain.eval()


def is_site(node: fx.Node) -> bool:
    """Whether ``node`` is a ``linear`` or ungrouped ``conv2d`` with stored weight (and bias)."""
    if node.op != "call_function" or node.target not in (LINEAR, CONV2D):
        return False
    weight = node.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return False
    bias = node.args[2] if len(node.args) > 2 else None
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return (bias is None or bias.op == "get_attr") and not node.kwargs.get("bias") and groups == 1


def site_name(node: fx.Node) -> str:
    return node.args[1].target.removesuffix(".weight")


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps the concrete arguments of every linear/conv2d call."""

    def __init__(self, graph: fx.GraphModule) -> None:
        super().__init__(graph)
        self.sites: list[tuple[fx.Node, tuple]] = []

    def run_node(self, node: fx.Node):
        if is_site(node):
            args, _ = self.fetch_args_kwargs_from_env(node)
            self.sites.append((node, args))
        return super().run_node(node)


def layer_inputs(graph: fx.GraphModule, batch: Tensor) -> list[tuple[fx.Node, tuple]]:
    """Each layer site of ``graph`` with its concrete arguments when ``graph`` runs ``batch``."""
    recorder = _Recorder(graph)
    recorder.run(batch)
    return recorder.sites


def sparse_module(op: str, args: tuple, kernel: str) -> nn.Module:
    """The ``kernel`` ("csr" or "gather") module computing ``op`` (linear/conv2d) on ``args``."""
    weight, bias = args[1], args[2] if len(args) > 2 else None
    if kernel == "gather":
        return GatherLinear(weight, bias)
    if op == "linear":
        return CSRLinear(weight, bias)
    return CSRConv2d(weight, bias, *args[3:6])


def _matrix_input(node: fx.Node) -> bool:
    value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return node.target is LINEAR and value is not None and value.dim() == 2


def lower(dense: fx.GraphModule, kernels: dict[str, str], channels_last: bool) -> fx.GraphModule:
    """A copy of ``dense`` whose layers named in ``kernels`` with ``"csr"``/``"gather"`` call that
    module, whose other linear layers of matrix inputs are ``addmm`` with a transposed weight and,
    with ``channels_last``, whose 4-D inputs, conv weights and conv outputs are in that memory
    format."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    root = nn.Module()
    transposed: dict[str, Tensor] = {}
    for node in dense.graph.nodes:
        kernel = kernels.get(site_name(node), "dense") if is_site(node) else None
        if node.op == "placeholder" and channels_last:
            placeholder = graph.node_copy(node)
            values[node] = graph.call_method("contiguous", (placeholder,),
                                             {"memory_format": torch.channels_last})
        elif kernel in ("csr", "gather"):
            target = f"{kernel}_" + site_name(node).replace(".", "_")
            args = tuple(_get(dense, a.target) if isinstance(a, fx.Node) and a.op == "get_attr"
                         else a for a in node.args)
            op = "linear" if node.target is LINEAR else "conv2d"
            root.add_module(target, sparse_module(op, args, kernel))
            values[node] = graph.call_module(target, (values[node.args[0]],))
        elif kernel == "dense" and _matrix_input(node):
            weight, bias = (node.args[1:3] + (None,))[:2]
            target = site_name(node).replace(".", "_") + "_weight_t"
            transposed[target] = _get(dense, weight.target).t().contiguous()
            operands = (values[node.args[0]], graph.get_attr(target))
            values[node] = (graph.call_function(torch.mm, operands) if bias is None else
                            graph.call_function(torch.addmm, (values[bias], *operands)))
            values[node].meta = dict(node.meta)
        else:
            values[node] = graph.node_copy(node, lambda n: values[n])
        if channels_last and node.op == "call_function" and node.target is CONV2D:
            # oneDNN returns NCHW for one input channel, and max pooling in NCHW measured up to
            # 27x slower than in NHWC here: keep every activation channels-last
            values[node] = graph.call_method("contiguous", (values[node],),
                                             {"memory_format": torch.channels_last})
    for node in list(graph.nodes):  # only the tensors still used: no dense copy beside a sparse one
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
        elif node.op == "get_attr":
            attribute = transposed.get(node.target)
            if attribute is None:
                attribute = _get(dense, node.target)
            if channels_last and attribute.dim() == 4:
                attribute = attribute.detach().contiguous(memory_format=torch.channels_last)
            _set(root, node.target, attribute)
    lowered = fx.GraphModule(root, graph)
    lowered.delete_all_unused_submodules()
    return lowered.eval()


def compile_graph(module: fx.GraphModule) -> Callable[..., Tensor]:
    """``module``'s forward as a plain function over a namespace holding its tensors and its
    submodules' ``forward`` methods (the same tensor objects: in-place updates stay visible)."""
    code = module.graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<deployed {id(module):x}>", "exec"), scope)  # noqa: S102
    root = types.SimpleNamespace()
    for node in module.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = _get(module, node.target)
            _set_plain(root, node.target, value.forward if node.op == "call_module" else value)
    return functools.partial(scope["forward"], root)


def _set_plain(root: types.SimpleNamespace, target: str, value) -> None:
    *path, leaf = target.split(".")
    for part in path:
        if not hasattr(root, part):
            setattr(root, part, types.SimpleNamespace())
        root = getattr(root, part)
    setattr(root, leaf, value)


def _get(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _set(root: nn.Module, target: str, value: Tensor) -> None:
    *path, leaf = target.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    if isinstance(value, nn.Parameter):
        root.register_parameter(leaf, value)
    else:
        root.register_buffer(leaf, value)
