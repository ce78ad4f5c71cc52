"""Unstructured sparsity as real CPU speed: per layer, the kernel and thread count that win here.

``deploy(model, example_input, batch_size)`` returns an inference module built in three steps:

1. **Structure.** :func:`neuronwise.simplify` removes dead neurons (same function, smaller dense
   layers); the result is captured with ``torch.export`` (dynamic batch size) and replayed as a
   plain ``torch.fx`` graph of ATen calls (:mod:`neuronwise.deploy_graph`), compiled into one
   Python function without per-layer module dispatch. The dense kernel of a ``linear`` on a
   matrix input is ``torch.addmm(b, x, Wᵀ)`` with ``Wᵀ`` stored transposed (faster than
   ``F.linear`` here, the same product).
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
   first option, all dense and contiguous at the caller's thread count, is simplify's function
   with the dense kernels only: the result is never slower than it (up to timing noise).

The chosen thread count lives in the returned :class:`DeployedModel`: its ``forward`` sets it and
restores the caller's ``torch.get_num_threads()`` afterwards. Timings are medians of interleaved
rounds (a loaded machine shifts all candidates alike); the choice is only as good as the machine
and load it was made on.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, fx, nn

from .deploy_graph import (
    CONV2D,
    LINEAR,
    compile_graph,
    layer_inputs,
    lower,
    plain_graph,
    site_name,
    sparse_module,
)
from .io import atomic_torch_save
from .simplify import simplify

__all__ = ["DeployedModel", "LayerChoice", "deploy", "load_deployed", "save_deployed"]

_FORMAT = "neuronwise.deploy/1"
_MARGIN = 0.05  # relative speed-up an option needs over those listed before it


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
    ``channels_last`` memory format if that timed faster. ``graph_module`` holds the graph and its
    tensors; ``forward`` runs it compiled into one function over the same tensors
    (:func:`~neuronwise.deploy_graph.compile_graph`)."""

    def __init__(self, graph: fx.GraphModule, threads: int, layers: Sequence[LayerChoice],
                 program: bytes, channels_last: bool = False) -> None:
        super().__init__()
        self.graph_module = graph
        self.threads = threads
        self.layers = list(layers)
        self.channels_last = channels_last
        self._program = program  # the simplified dense model (torch.export), for save_deployed
        self._run = compile_graph(graph)

    def forward(self, *args: Tensor) -> Tensor:
        previous = torch.get_num_threads()
        if previous == self.threads:
            return self._run(*args)
        torch.set_num_threads(self.threads)
        try:
            return self._run(*args)
        finally:
            torch.set_num_threads(previous)

    def _apply(self, fn, recurse=True):
        # ``.to()``, ``.double()``, ... replace the tensors: the compiled function must see them
        result = super()._apply(fn, recurse)
        self._run = compile_graph(self.graph_module)
        return result

    def __getstate__(self) -> dict:  # copies and pickles rebuild the function over their tensors
        state = self.__dict__.copy()
        del state["_run"]
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._run = compile_graph(self.graph_module)

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
    dense = plain_graph(program)
    batch = example.expand(batch_size, *example.shape[1:]).contiguous().normal_(
        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sites = layer_inputs(dense, batch)
        has_conv = batch.dim() == 4 and any(node.target is CONV2D for node, _ in sites)
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
                    options.append(DeployedModel(lower(dense, kernels, layout), count, variant,
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
    dense = plain_graph(torch.export.load(io.BytesIO(program)))
    kernels = {row.name: row.kernel for row in layers}
    graph = lower(dense, kernels, state["channels_last"])
    return DeployedModel(graph, state["threads"], layers, program, state["channels_last"])


def _choose(node: fx.Node, args: tuple, repeats: int, kernel: str) -> LayerChoice:
    weight, x = args[1], args[0]
    name = site_name(node)
    op = "linear" if node.target is LINEAR else "conv2d"
    density = float(torch.count_nonzero(weight)) / max(1, weight.numel())

    bias = args[2] if len(args) > 2 else None
    if op == "linear" and x.dim() == 2 and weight.layout == torch.strided:
        # the dense kernel of ``lower``: addmm with Wᵀ stored transposed
        transposed = weight.t().contiguous()
        dense_call = (functools.partial(torch.mm, x, transposed) if bias is None
                      else functools.partial(torch.addmm, bias, x, transposed))
    else:
        dense_call = functools.partial(node.target, *args)
    if weight.layout != torch.strided or weight.dtype not in (torch.float32, torch.float64):
        dense_ms = 1e3 * _interleaved([dense_call], repeats)[0]
        return LayerChoice(name, op, tuple(weight.shape), density, "dense", dense_ms, None)
    names = ["csr"]
    if op == "linear" and bool((weight == 0).all(0).any()):
        names.append("gather")  # some input features are never used
    reference = dense_call()
    modules = {}
    for candidate in names:
        module = sparse_module(op, args, candidate)
        output = module(x)
        if reference.shape == output.shape and (reference.numel() == 0 or float(
                (reference - output).abs().max()) <= 1e-5 * max(1.0, float(reference.abs().max()))):
            modules[candidate] = module
    seconds = _interleaved([dense_call, *(functools.partial(m.forward, x) for m in modules.values())],
                           repeats)
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
