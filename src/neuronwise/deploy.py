"""Unstructured sparsity as real CPU speed: per layer, the kernel and thread count that win here.

``deploy(model, example_input, batch_size)`` returns an inference module built in three steps:

1. **Structure.** :func:`neuronwise.simplify` removes dead neurons (same function, smaller dense
   layers); the result is captured with ``torch.export`` (dynamic batch size) and replayed as a
   plain ``torch.fx`` graph of ATen calls (no export guards, no pytree codegen; common ops call
   their public bindings, which Python dispatches faster).
2. **Kernels.** For every ``linear`` and every ``conv2d`` with ``groups == 1`` the dense call and a
   sparse lowering (:class:`~neuronwise.sparse_layers.CSRLinear`, or im2col +
   :class:`~neuronwise.sparse_layers.CSRConv2d`), and for a ``linear`` with unused input features
   the dense product over the used ones (:class:`~neuronwise.sparse_layers.GatherLinear`), are
   timed side by side, interleaved, on the layer's real input at ``batch_size``, under each
   candidate thread count. A layer gets another kernel than dense only if its median time is
   lower and its output matches the dense one (max|Δ| ≤ 1e-5·max(1, max|y|)).
3. **End to end.** For each thread count (the caller's first), the all-dense graph and the mixed
   graph, and for networks with convolutions each also in ``channels_last`` memory format (input
   and conv weights; often much faster for oneDNN convolutions on CPU), are timed interleaved. The
   first option in that order within 5 % of the fastest wins, so a change must pay clearly. The
   first option, all dense and contiguous at the caller's thread count, is simplify alone: the
   result is never slower than it (up to timing noise).

The chosen thread count lives in the returned :class:`DeployedModel`: its ``forward`` sets it and
restores the caller's ``torch.get_num_threads()`` afterwards. Timings are medians of interleaved
rounds (a loaded machine shifts all candidates alike); the choice is only as good as the machine
and load it was made on.
"""

from __future__ import annotations

import dataclasses
import io
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .io import atomic_torch_save
from .simplify import simplify
from .sparse_layers import CSRConv2d, CSRLinear, GatherLinear

__all__ = ["DeployedModel", "LayerChoice", "deploy", "load_deployed", "save_deployed"]

_FORMAT = "neuronwise.deploy/1"
_MARGIN = 0.05  # relative speed-up an option needs over those listed before it
_LINEAR = F.linear
_CONV2D = torch.conv2d
# ATen overloads of the exported graph and the public bindings with the same signature, which
# Python calls several microseconds faster (it matters at batch 1).
_BINDINGS = {
    torch.ops.aten.linear.default: _LINEAR, torch.ops.aten.conv2d.default: _CONV2D,
    torch.ops.aten.relu.default: torch.relu, torch.ops.aten.flatten.using_ints: torch.flatten,
    torch.ops.aten.max_pool2d.default: torch.max_pool2d,
}


@dataclass(frozen=True)
class LayerChoice:
    """One row of the deployment table. Times are medians in milliseconds at the chosen threads:
    dense, CSR (``sparse_ms``) and dense over the used input features only (``gather_ms``, for a
    ``Linear`` with unused inputs); None where that kernel does not apply or was not exact."""

    name: str
    op: str
    shape: tuple[int, ...]
    density: float
    kernel: str
    dense_ms: float
    sparse_ms: float | None
    gather_ms: float | None = None


class DeployedModel(nn.Module):
    """Inference module returned by :func:`deploy`: a graph of dense/CSR layers run at ``threads``
    intra-op threads (set for its own forward only), with 4-D inputs and convolution weights in
    ``channels_last`` memory format if that timed faster."""

    def __init__(self, graph: fx.GraphModule, threads: int, layers: Sequence[LayerChoice],
                 program: bytes, channels_last: bool = False) -> None:
        super().__init__()
        self.graph_module = graph
        self.threads = threads
        self.layers = list(layers)
        self.channels_last = channels_last
        self._program = program  # the simplified dense model (torch.export), for save_deployed

    def forward(self, *args: Tensor) -> Tensor:
        previous = torch.get_num_threads()
        if previous == self.threads:
            return self.graph_module(*args)
        torch.set_num_threads(self.threads)
        try:
            return self.graph_module(*args)
        finally:
            torch.set_num_threads(previous)

    def table(self) -> str:
        """The per-layer choices as aligned text: density, kernel, dense vs sparse time."""
        header = (f"{'layer':<24} {'op':<7} {'shape':<18} {'density':>8} {'kernel':>7} "
                  f"{'dense ms':>9} {'csr ms':>9} {'gather ms':>9}")
        layout = "channels_last" if self.channels_last else "contiguous (NCHW)"
        lines = [f"threads {self.threads}, memory format {layout}", header]
        for row in self.layers:
            sparse, gather = ("-" if t is None else f"{t:.4f}" for t in (row.sparse_ms,
                                                                         row.gather_ms))
            lines.append(f"{row.name:<24} {row.op:<7} {'x'.join(map(str, row.shape)):<18} "
                         f"{100 * row.density:>7.2f}% {row.kernel:>7} {row.dense_ms:>9.4f} "
                         f"{sparse:>9} {gather:>9}")
        return "\n".join(lines)


def deploy(model: nn.Module, example_input: Tensor, batch_size: int = 32,
           threads: Iterable[int] | None = None, repeats: int = 30,
           kernel: str = "auto", channels_last: bool | None = None) -> DeployedModel:
    """``model`` without dead neurons, each layer dense or CSR and a thread count, whichever times
    fastest at ``batch_size`` on this machine (see the module docstring).

    Args:
        model: the trained sparse network (not modified); must be ``torch.fx`` traceable.
        example_input: one input (batch dimension first); only its shape matters.
        batch_size: the batch size to optimise for.
        threads: candidate intra-op thread counts (default: 1 and the current setting; more
            threads rarely pay for layers this small, and waking them costs milliseconds on a busy
            machine).
        repeats: timed rounds per comparison (medians are compared).
        kernel: ``"auto"`` (timed choice), or ``"csr"`` / ``"gather"`` / ``"dense"`` to force one
            kernel on every layer where it applies and is exact (threads are still timed).
        channels_last: None (timed, for networks with convolutions), or force the memory format.
    """
    if kernel not in ("auto", "csr", "gather", "dense"):
        raise ValueError(
            f"Invalid kernel: {kernel!r} (expected 'auto', 'csr', 'gather' or 'dense')")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size!r} (expected an integer >= 1)")
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats} (expected >= 1)")
    current = torch.get_num_threads()
    candidates = sorted(set(threads) if threads is not None else {1, current},
                        key=lambda count: (count != current, count))  # the caller's count first
    if not candidates or any(not isinstance(t, int) or t < 1 for t in candidates):
        raise ValueError(f"Invalid threads: {candidates!r} (expected positive integers)")
    small = simplify(model, example_input)
    example = example_input[:1].detach()
    program = torch.export.export(
        small.eval(), (example.repeat(2, *[1] * (example.dim() - 1)),),  # batch 1 would specialise
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    dense = _plain_graph(program)
    batch = example.expand(batch_size, *example.shape[1:]).contiguous().normal_(
        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sites = _layer_inputs(dense, batch)
        has_conv = batch.dim() == 4 and any(node.target is _CONV2D for node, _ in sites)
        layouts = (False, True) if channels_last is None and has_conv else (bool(channels_last),)
        options = []
        for count in candidates:
            with _threads(count):
                rows = [_choose(node, args, repeats, kernel) for node, args in sites]
            variants = [rows]
            if kernel == "auto" and any(row.kernel != "dense" for row in rows):
                variants.insert(0, [_as_dense(row) for row in rows])  # in case the mix loses
            for variant in variants:
                kernels = {row.name: row.kernel for row in variant}
                for layout in layouts:
                    options.append(DeployedModel(_lower(dense, kernels, layout), count, variant,
                                                 buffer.getvalue(), layout))
        times = (_interleaved([lambda m=m: m(batch) for m in options], repeats)
                 if len(options) > 1 else [0.0])
    # The first option (caller's threads, all dense, contiguous, ...) within the margin of the
    # fastest: a change must pay clearly, not by timing noise.
    return next(o for o, t in zip(options, times) if t <= (1 + _MARGIN) * min(times))


def save_deployed(model: DeployedModel, path: str | os.PathLike) -> None:
    """Save ``model`` atomically: the simplified dense program (``torch.export``), the thread count
    and the per-layer choices. :func:`load_deployed` reads it with ``weights_only=True``."""
    atomic_torch_save({
        "format": _FORMAT,
        "program": torch.frombuffer(bytearray(model._program), dtype=torch.uint8),
        "threads": model.threads,
        "channels_last": model.channels_last,
        "layers": [{**asdict(row), "shape": list(row.shape)} for row in model.layers],
    }, path)


def load_deployed(path: str | os.PathLike) -> DeployedModel:
    """The :class:`DeployedModel` saved by :func:`save_deployed` (needs no model source code)."""
    state = torch.load(path, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a deployed model (expected format {_FORMAT!r})")
    program = bytes(state["program"].numpy().tobytes())
    layers = [LayerChoice(**{**row, "shape": tuple(row["shape"])}) for row in state["layers"]]
    dense = _plain_graph(torch.export.load(io.BytesIO(program)))
    kernels = {row.name: row.kernel for row in layers}
    graph = _lower(dense, kernels, state["channels_last"])
    return DeployedModel(graph, state["threads"], layers, program, state["channels_last"])


def _plain_graph(program: torch.export.ExportedProgram) -> fx.GraphModule:
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
                and _BINDINGS.get(source.target) in (_LINEAR, _CONV2D)
                and len(source.users) == 1):
            values[node].target = torch.relu_  # a layer's fresh output, used once: no new tensor
    result = fx.map_arg(output, lambda n: values[n])
    graph.output(result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result)
    plain = fx.GraphModule(exported, graph)
    plain.delete_all_unused_submodules()
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    return plain.eval()


def _is_site(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in (_LINEAR, _CONV2D):
        return False
    weight = node.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return False
    bias = node.args[2] if len(node.args) > 2 else None
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return (bias is None or bias.op == "get_attr") and not node.kwargs.get("bias") and groups == 1


def _site_name(node: fx.Node) -> str:
    return node.args[1].target.removesuffix(".weight")


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps the concrete arguments of every linear/conv2d call."""

    def __init__(self, graph: fx.GraphModule) -> None:
        super().__init__(graph)
        self.sites: list[tuple[fx.Node, tuple]] = []

    def run_node(self, node: fx.Node):
        if _is_site(node):
            args, _ = self.fetch_args_kwargs_from_env(node)
            self.sites.append((node, args))
        return super().run_node(node)


def _layer_inputs(graph: fx.GraphModule, batch: Tensor) -> list[tuple[fx.Node, tuple]]:
    recorder = _Recorder(graph)
    recorder.run(batch)
    return recorder.sites


def _sparse_module(node: fx.Node, args: tuple, kernel: str) -> nn.Module:
    weight, bias = args[1], args[2] if len(args) > 2 else None
    if kernel == "gather":
        return GatherLinear(weight, bias)
    if node.target is _LINEAR:
        return CSRLinear(weight, bias)
    return CSRConv2d(weight, bias, *args[3:6])


def _choose(node: fx.Node, args: tuple, repeats: int, kernel: str) -> LayerChoice:
    weight, x = args[1], args[0]
    name = _site_name(node)
    op = "linear" if node.target is _LINEAR else "conv2d"
    density = float(torch.count_nonzero(weight)) / max(1, weight.numel())

    def dense_call() -> Tensor:
        return node.target(*args)

    if weight.layout != torch.strided or weight.dtype not in (torch.float32, torch.float64):
        dense_ms = 1e3 * _interleaved([dense_call], repeats)[0]
        return LayerChoice(name, op, tuple(weight.shape), density, "dense", dense_ms, None)
    names = ["csr"]
    if op == "linear" and bool((weight == 0).all(0).any()):
        names.append("gather")  # some input features are never used
    reference = dense_call()
    modules = {}
    for candidate in names:
        module = _sparse_module(node, args, candidate)
        output = module(x)
        if reference.shape == output.shape and (reference.numel() == 0 or float(
                (reference - output).abs().max()) <= 1e-5 * max(1.0, float(reference.abs().max()))):
            modules[candidate] = module
    seconds = _interleaved([dense_call, *(lambda m=m: m(x) for m in modules.values())], repeats)
    times = dict(zip(["dense", *modules], seconds))
    if kernel == "auto":
        chosen = min(times, key=times.get)
    else:
        chosen = kernel if kernel in times else "dense"
    return LayerChoice(name, op, tuple(weight.shape), density, chosen, 1e3 * times["dense"],
                       1e3 * times["csr"] if "csr" in times else None,
                       1e3 * times["gather"] if "gather" in times else None)


def _as_dense(row: LayerChoice) -> LayerChoice:
    return dataclasses.replace(row, kernel="dense")


def _lower(dense: fx.GraphModule, kernels: dict[str, str], channels_last: bool) -> fx.GraphModule:
    """``dense`` itself, or a copy whose layers named in ``kernels`` with ``"csr"``/``"gather"``
    call that module and, with ``channels_last``, whose 4-D inputs and weights are in that memory
    format."""
    if not channels_last and set(kernels.values()) <= {"dense"}:
        return dense
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    root = nn.Module()
    for name, attribute in [*dense.named_parameters(), *dense.named_buffers()]:
        if channels_last and attribute.dim() == 4:
            attribute = attribute.detach().contiguous(memory_format=torch.channels_last)
        _set(root, name, attribute)
    for node in dense.graph.nodes:
        if node.op == "placeholder" and channels_last:
            placeholder = graph.node_copy(node)
            values[node] = graph.call_method("contiguous", (placeholder,),
                                             {"memory_format": torch.channels_last})
        elif _is_site(node) and kernels.get(_site_name(node), "dense") != "dense":
            target = f"{kernels[_site_name(node)]}_" + _site_name(node).replace(".", "_")
            args = tuple(_get(dense, a.target) if isinstance(a, fx.Node) and a.op == "get_attr"
                         else a for a in node.args)
            root.add_module(target, _sparse_module(node, args, kernels[_site_name(node)]))
            values[node] = graph.call_module(target, (values[node.args[0]],))
        else:
            values[node] = graph.node_copy(node, lambda n: values[n])
    lowered = fx.GraphModule(root, graph)
    lowered.graph.eliminate_dead_code()
    lowered.delete_all_unused_submodules()
    lowered.recompile()
    return lowered.eval()


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


class _threads:
    """Context manager: ``torch.set_num_threads(count)`` inside, the previous count restored."""

    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.previous)


def _interleaved(calls: Sequence[Callable[[], object]], repeats: int, warmup: int = 3
                 ) -> list[float]:
    """Median seconds per call of each of ``calls``, timed round-robin (same background load)."""
    times: list[list[float]] = [[] for _ in calls]
    for round_index in range(warmup + repeats):
        for index, call in enumerate(calls):
            start = time.perf_counter()
            call()
            if round_index >= warmup:
                times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
