"""Helpers shared by the library's modules: one home for each, imported by its public name.

Private to the package (the leading underscore of the module), but every name in it is meant to
be imported across modules: eval-mode contexts, batch splitting, the classifier lookup, argument
validators, ``foreach`` grouping and neuron counts.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "by_device_and_dtype",
    "check_foreach",
    "check_fraction",
    "check_int",
    "check_lam",
    "check_model_and_example",
    "check_modules",
    "check_nonnegative",
    "clone_state",
    "evaluating",
    "find_classifier",
    "graph_break",
    "is_number",
    "layer_neurons",
    "load_hyperparameters",
    "split_batch",
    "unwrap",
    "use_foreach",
    "watch_hooks",
    "without_compile",
]


# ---------------------------------------------------------------------------------------- modes


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then give every module back its own flag.

    Flags are restored per module (submodules may have been in a mode different from the
    root's), even if the block raises.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------------------------------- data


def clone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy of a ``state_dict``: every tensor cloned."""
    return {key: value.detach().clone() for key, value in state.items()}


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` from a loader's batch, or a TypeError that says what was found."""
    if not isinstance(batch, (tuple, list)):
        raise TypeError(
            f"Invalid batch: {type(batch).__name__} (expected an (inputs, labels) pair)"
        )
    if len(batch) != 2:
        raise TypeError(
            f"Invalid batch: {type(batch).__name__} of length {len(batch)} "
            "(expected an (inputs, labels) pair)"
        )
    inputs, labels = batch
    if not isinstance(inputs, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(
            f"Invalid batch: ({type(inputs).__name__}, {type(labels).__name__}) "
            "(expected a pair of tensors)"
        )
    return inputs, labels


# ---------------------------------------------------------------------------------------- models


def find_classifier(
    model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear,)
) -> tuple[str, nn.Module] | None:
    """The classifier head: the last module of ``types`` in ``named_modules()`` order, or None.

    The one convention of the library (``models.classifier_name``, NEq's default exclusion,
    PSP-entropy's class count, the structured pruner's output layer).
    """
    found = None
    for name, module in unwrap(model).named_modules():
        if isinstance(module, types):
            found = (name, module)
    return found


def layer_neurons(module: nn.Module) -> int:
    """Neurons of a layer: output rows/channels of Linear/Conv2d/BatchNorm2d, LayerNorm elements.

    A LayerNorm has one neuron per normalized element, ∏ ``normalized_shape`` (its γ_k, β_k);
    modules of other types hold none (0).
    """
    if isinstance(module, nn.LayerNorm):
        return math.prod(module.normalized_shape)
    if isinstance(module, nn.BatchNorm2d):
        return module.num_features
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module.weight.shape[0]
    return 0


# ---------------------------------------------------------------------------------------- compile
# torch.compile (dynamo) meets a method three ways: its wrapper renames every module, graphs it
# cached may skip hooks added later, and a hook it traces sees graph-internal tensors. One helper
# for each; docs/guide/methods.md ("torch.compile") says what the user sees.


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s and DDP's wrappers (any nesting), or ``model``.

    Methods name layers and parameters after it: ``conv1``, never ``_orig_mod.conv1`` (the
    ``OptimizedModule`` of ``torch.compile(model)``) or ``module.conv1`` (DDP), so the states of
    compiled, distributed and plain runs load into one another. Hooks are registered on it too;
    the wrapper runs the same submodules.
    """
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing was compiled
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def watch_hooks() -> None:
    """Make compiled models notice forward hooks added or removed after they were compiled.

    Call before registering hooks that fire in training forwards. Dynamo does not guard on a
    module's hook dictionaries while they are empty (``torch._dynamo.config.
    skip_nnmodule_hook_guards``, True by default), so a graph traced before a hook existed, for
    this model or another of its class, is reused and the hook never fires. This turns the guards
    on for the process (once; hook changes then recompile the graphs that depend on them) and
    drops every graph compiled without them (``torch._dynamo.reset()``: other compiled code
    compiles again at its next call).
    """
    import torch._dynamo  # here, not at the top: a second to import (an optimizer step imports it)

    config = torch._dynamo.config
    if config.skip_nnmodule_hook_guards:
        config.skip_nnmodule_hook_guards = False
        torch._dynamo.reset()


def graph_break() -> None:
    """Call first in a forward hook: under ``torch.compile``, the hook then runs as Python.

    The graph ends before the hooked module's call, which then runs eagerly with its hooks, so
    they see real tensors: an output kept to differentiate the logits by (SeReNe) is then on
    autograd's path to them, which a tensor inside a compiled graph is not (autograd would see
    the graph as one node, with that output beside the logits). A no-op outside compilation.
    """
    if _compiling():
        torch._dynamo.graph_break()


def _compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    if check is not None:
        return check()
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and dynamo.is_compiling()


@contextmanager
def without_compile() -> Iterator[None]:
    """Run the block's forwards as plain Python, even those of a model compiled in place.

    For passes that hook a model for one forward (PSP-entropy, NEq's Ξ, FLOP counts): their
    hooks then fire, with no graph recompiled or reused (``torch.compiler.set_stance
    ("force_eager")``, torch >= 2.6). Free when dynamo was never imported.
    """
    if "torch._dynamo" not in sys.modules or not hasattr(torch.compiler, "set_stance"):
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


# ---------------------------------------------------------------------------------------- foreach


def use_foreach(foreach: bool | None, tensors: list[Tensor]) -> bool:
    """Whether to run the ``torch._foreach_*`` kernels: ``foreach``, or by default all on CUDA.

    As torch.optim: the foreach kernels pay off on CUDA; elsewhere they are the plain loop.
    """
    return all(t.is_cuda for t in tensors) if foreach is None else foreach


def by_device_and_dtype(*lists: list[Tensor]) -> Iterable[tuple[list[Tensor], ...]]:
    """Split parallel lists into groups sharing the first list's device and dtype (foreach needs it)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = {}
    for items in zip(*lists):
        group = groups.setdefault((items[0].device, items[0].dtype), tuple([] for _ in lists))
        for store, item in zip(group, items):
            store.append(item)
    return groups.values()


# ---------------------------------------------------------------------------------------- state


def load_hyperparameters(
    owner: object, state_dict: Mapping[str, Any], checks: Mapping[str, Callable[[Any], Any]]
) -> None:
    """``owner.<name> = check(state_dict[name])`` for every ``name`` of ``checks``, in order.

    A name missing from ``state_dict`` (a checkpoint older than the hyperparameter) keeps the
    constructor's value, as ``torch.optim`` param groups keep defaults they did not save.
    """
    for name, check in checks.items():
        if name in state_dict:
            setattr(owner, name, check(state_dict[name]))


# ---------------------------------------------------------------------------------------- validators


def is_number(value: Any) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {minimum})")
    return value


def check_fraction(name: str, value: Any) -> float:
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in [0, 1])")
    return float(value)


def check_nonnegative(name: str, value: Any) -> float:
    if not is_number(value) or not value >= 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected >= 0)")
    return float(value)


def check_lam(lam: Any) -> float:
    """The regularization strength λ: a finite number ≥ 0."""
    if not is_number(lam) or not 0 <= lam < math.inf:
        raise ValueError(f"Invalid lam: {lam!r} (expected >= 0)")
    return float(lam)


def check_foreach(foreach: Any) -> bool | None:
    if foreach not in (None, True, False):
        raise ValueError(f"Invalid foreach: {foreach!r} (expected None, True or False)")
    return foreach


def check_modules(modules: Any) -> tuple[type[nn.Module], ...]:
    """A non-empty tuple of ``nn.Module`` subclasses (one class is accepted too)."""
    if isinstance(modules, type):
        modules = (modules,)
    modules = tuple(modules)
    if not modules or not all(isinstance(m, type) and issubclass(m, nn.Module) for m in modules):
        raise TypeError(f"Invalid modules: {modules!r} (expected a tuple of nn.Module subclasses)")
    return modules


def check_model_and_example(model: Any, example_input: Any) -> None:
    """``model`` is an ``nn.Module`` and ``example_input`` a tensor with a batch dimension."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: {type(model).__name__} (expected torch.nn.Module)")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ValueError(
            f"Invalid example_input: {getattr(example_input, 'shape', example_input)!r} "
            "(expected a tensor with a batch dimension)"
        )

