"""Real backward savings for NEq: weight gradients of the active output rows only.

A partially frozen ``Conv2d``/``Linear`` keeps its full forward, but its output is re-rooted on
:class:`ActiveRowsGrad`, whose backward computes the input gradient as usual and the weight and bias
gradients only for the active rows (output channels); frozen rows get exact zeros, i.e. the
masked-gradient reference of METHODS.md §5. Fully frozen layers need no help: their parameters get
``requires_grad_(False)`` for the epoch, and autograd then also skips input-gradient work that
nothing upstream needs.

:func:`avoidable_backward_flops` states how much of the backward any implementation could skip,
so that the measured saving can be read against it (``benchmarks/neq_backward.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from neuronwise import metrics
from neuronwise._utils import graph_break, unwrap, watch_hooks

# When the split backward beats autograd's, as a cost model in multiply-adds fitted on CPU
# (AVX-512, one thread, batch 32 and 100; benchmarks/neq_backward.py --layers,
# docs/results/neq_backward.txt). With P output positions (samples × spatial positions), K inputs
# per row (in_features, or C_in·k_h·k_w) and R rows of which A are active:
#   autograd: P·K·pad(R);   split: P·K·pad(A) + 16·K·R + 24·(K·A + P·A + [conv with input grad]·P·R)
#   + 2**22
# pad(n) rounds a Conv2d's rows up to oneDNN's block of output channels, one vector register
# (16 floats with AVX-512, 8 below): its weight-gradient time follows whole blocks. The other terms
# are the split's extra memory traffic (zeroing the full-size gradient ≈ 16 multiply-adds per
# element, each copied element ≈ 24: active weight rows scattered, active output-gradient channels
# gathered, and a convolution's output gradient read by a second kernel call when the input
# gradient is computed apart) and the Python autograd Function, ≈ 50 µs per layer and step.
# The split must promise 10 % less work than autograd, a margin for the model's error.
# A first Conv2d (no input gradient) with at most a quarter of its rows active always splits: one
# smaller kernel call, measured 0.7–1.1× autograd's time (LeNet-5 conv1, ResNet-20 stem).
# Other devices are not measured: there the split runs with at most half of the rows active.
# Channels-last (NHWC) conv outputs never split on CPU (measured slower).
ZERO_COST = 16
COPY_COST = 24
FUNCTION_COST = 2**22
SPLIT_MARGIN = 0.9
FIRST_LAYER_SHARE = 0.25
OTHER_DEVICE_SHARE = 0.5


def supports_active_rows(module: nn.Module) -> bool:
    """Whether :class:`ActiveRowsGrad` can stand in for ``module``'s backward at all."""
    if isinstance(module, nn.Linear):
        return True
    # Grouped convs mix channels across groups, and non-zero padding modes or string padding pad the
    # input outside the convolution call: both would need their own backward.
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def split_pays(module: nn.Module, active: int, x: Tensor, output: Tensor) -> bool:
    """Whether a split backward over ``active`` of ``module``'s rows pays for this input and output.

    The cost model is fitted on CPU (see the comment above); other devices split at most half of
    the rows, unmeasured.
    """
    weight = module.weight
    rows = weight.shape[0]
    if weight.device.type != "cpu":
        return active <= OTHER_DEVICE_SHARE * rows
    if not output.is_contiguous() and output.is_contiguous(memory_format=torch.channels_last):
        # NHWC: gathering channels is a strided copy and the smaller kernel call saves nothing
        # (benchmarks/neq_backward.py --channels-last: up to 17 % slower); keep autograd's.
        return False
    conv = isinstance(module, nn.Conv2d)
    if conv and not x.requires_grad and active <= FIRST_LAYER_SHARE * rows:
        return True
    fan_in = math.prod(weight.shape[1:])
    positions = output.numel() // rows
    block = 1
    if conv:
        block = 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8
    copied = fan_in * active + positions * active
    if conv and x.requires_grad:
        copied += positions * rows
    split = positions * fan_in * math.ceil(active / block) * block + ZERO_COST * fan_in * rows
    split += COPY_COST * copied + FUNCTION_COST
    return split < SPLIT_MARGIN * positions * fan_in * math.ceil(rows / block) * block


def _scatter_rows(shape: torch.Size, index: Tensor, rows: Tensor) -> Tensor:
    """Zeros of ``shape`` with ``rows`` at ``index`` along dim 0.

    ``index_add_`` into zeros equals a copy for distinct indices and runs faster than
    ``index_copy_`` on CPU.
    """
    return rows.new_zeros(shape).index_add_(0, index, rows)


def _zero_other_rows(grad: Tensor | None, active: Tensor) -> Tensor | None:
    """``grad`` with every row outside ``active`` (along dim 0) set to zero, in place."""
    if grad is not None:
        frozen = torch.ones(grad.shape[0], dtype=torch.bool, device=grad.device)
        grad.index_fill_(0, frozen.index_fill_(0, active, False).nonzero().flatten(), 0)
    return grad


class ActiveRowsGrad(torch.autograd.Function):
    """Identity on ``output``; backward: full input gradient, weight/bias gradients of ``active`` rows.

    ``output`` is the detached result of the module's own forward, so the forward runs once; the
    module's original graph is never used. ``conv`` holds (stride, padding, dilation) for
    ``Conv2d`` and is ``None`` for ``Linear``. With ``split`` the weight gradient is computed for
    the active rows only; without, in full and then zeroed outside them (one kernel call, for
    shapes where two cost more).
    """

    @staticmethod
    def forward(
        ctx: Any,
        output: Tensor,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        active: Tensor,
        conv: tuple | None,
        split: bool,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, active)
        ctx.conv = conv
        ctx.split = split
        ctx.has_bias = bias is not None
        # Marked dirty (not returned as a view) so that in-place ops such as ReLU(inplace=True)
        # after the layer stay legal.
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        x, weight, active = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        grad_x = grad_w = grad_b = None
        if ctx.conv is None:
            grad_2d = grad_output.reshape(-1, weight.shape[0])
            x_2d = x.reshape(-1, weight.shape[1])
            if need_x:
                grad_x = (grad_2d @ weight).reshape(x.shape)
            if ctx.split:
                grad_active = grad_2d.index_select(1, active)
                if need_w:
                    grad_w = _scatter_rows(weight.shape, active, grad_active.t() @ x_2d)
                if need_b:
                    grad_b = _scatter_rows(weight.shape[:1], active, grad_active.sum(0))
            else:
                grad_w = grad_2d.t() @ x_2d if need_w else None
                grad_b = grad_2d.sum(0) if need_b else None
        else:
            stride, padding, dilation = ctx.conv
            args = (stride, padding, dilation, False, [0, 0], 1)
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            if not ctx.split:
                grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    grad_output, x, weight, bias_sizes, *args, [need_x, need_w, need_b]
                )
            else:
                if need_x:
                    grad_x = torch.ops.aten.convolution_backward(
                        grad_output, x, weight, None, *args, [True, False, False]
                    )[0]
                if need_w or need_b:
                    count = active.numel()
                    # Only the weight's shape matters for its gradient: a narrow view, no copy.
                    _, grad_w_active, grad_b_active = torch.ops.aten.convolution_backward(
                        grad_output.index_select(1, active),
                        x,
                        weight.narrow(0, 0, count),
                        [count] if ctx.has_bias else None,
                        *args,
                        [False, need_w, need_b],
                    )
                    if need_w:
                        grad_w = _scatter_rows(weight.shape, active, grad_w_active)
                    if need_b:
                        grad_b = _scatter_rows(weight.shape[:1], active, grad_b_active)
        if not ctx.split:
            grad_w, grad_b = _zero_other_rows(grad_w, active), _zero_other_rows(grad_b, active)
        return None, grad_x, grad_w, grad_b, None, None, None


class FrozenGradSkip:
    """NEq's ``skip_frozen_grads`` on a model, for one epoch's frozen neurons.

    Fully frozen layers: ``requires_grad_(False)`` on their parameters. Partly frozen Conv2d/Linear:
    an :class:`ActiveRowsHook` that, per forward, splits the backward where :func:`split_pays`
    and otherwise keeps autograd's own (the optimizer hooks then mask the frozen rows).
    :meth:`release` undoes both.
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.params: list[nn.Parameter] = []

    def apply(self, modules: Mapping[str, nn.Module], frozen: Mapping[str, Tensor]) -> None:
        watch_hooks()
        for name, module in modules.items():
            mask = frozen[name]
            if bool(mask.all()):
                for param in module.parameters(recurse=False):
                    if param.requires_grad:
                        param.requires_grad_(False)
                        self.params.append(param)
            elif bool(mask.any()) and supports_active_rows(module):
                active = (~mask).nonzero().flatten().to(module.weight.device)
                # Prepended, so that other forward hooks see the re-rooted output.
                self.handles.append(
                    module.register_forward_hook(
                        ActiveRowsHook(active, mask_unsplit=False), prepend=True
                    )
                )

    def release(self) -> None:
        for handle in self.handles:
            handle.remove()
        for param in self.params:
            param.requires_grad_(True)
        self.handles, self.params = [], []


class ActiveRowsHook:
    """Forward hook routing a module's output through :class:`ActiveRowsGrad`.

    Whether the split pays (:func:`split_pays`) depends on the input, so it is decided per call.
    Where it does not, ``mask_unsplit`` chooses between autograd's backward through
    :class:`ActiveRowsGrad` with the rows outside ``active`` zeroed (``True``: frozen rows always
    get zero gradients) and the module's own backward, untouched (``False``, for callers that
    mask later, as NEq's optimizer hooks do). A plain object holding the active-row indices, so a
    hooked model still deep-copies and pickles.
    """

    def __init__(self, active: Tensor, mask_unsplit: bool = True):
        self.active = active
        self.mask_unsplit = mask_unsplit

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        graph_break()  # the split is decided on real tensors, and its autograd node is ours
        if not torch.is_grad_enabled() or not module.weight.requires_grad:
            return None
        x = args[0]
        split = split_pays(module, self.active.numel(), x, output)
        if not (split or self.mask_unsplit):
            return None
        conv = None
        if isinstance(module, nn.Conv2d):
            conv = (list(module.stride), list(module.padding), list(module.dilation))
        return ActiveRowsGrad.apply(
            output.detach(), x, module.weight, module.bias, self.active, conv, split
        )


def avoidable_backward_flops(
    model: nn.Module, example_input: Tensor, frozen: Mapping[str, float] | None = None
) -> dict[str, int]:
    r"""Backward FLOPs autograd runs at batch 1, and the part that frozen neurons make avoidable.

    Per layer l that :func:`neuronwise.metrics.forward_flops` counts, with forward ops F_l (§5's
    thop rules) and frozen fraction f_l (``frozen``, missing layers 0), the backward splits into a
    parameter-gradient part F_l and an input-gradient part F_l (§5's 2·F_l). The input-gradient
    part runs only if the layer's input depends on a trainable parameter, read from autograd's
    ``requires_grad`` in one eval-mode forward; a layer with f_l = 1 holds no trainable parameter.

    - ``dense``: Σ_l F_l·[parameters] + F_l·[input needs a gradient], every parameter trainable.
    - ``avoidable``: Σ_l f_l·F_l (parameter gradients of frozen neurons) + F_l·[input needs a
      gradient when dense but not with the frozen layers]. BatchNorm (in training) derives its
      input gradient from the sums that are its parameter gradients, so those count as avoidable
      only together with its input gradient.

    Input gradients are judged per layer, not per channel: when the first layer is partly frozen,
    the next layer's input gradient towards the channels of its frozen neurons, which nothing
    needs, counts as needed (and :class:`ActiveRowsGrad` computes it).
    """
    model = unwrap(model)
    frozen = dict(frozen or {})
    counts = metrics.forward_flops(model, example_input)
    del counts["total"]
    unknown = sorted(set(frozen) - set(counts))
    if unknown:
        raise ValueError(
            f"Invalid frozen layer: {unknown[0]!r} (expected a Conv2d, BatchNorm, LayerNorm or "
            "Linear module name of the model)"
        )
    for name, fraction in frozen.items():
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(
                f"Invalid frozen fraction for {name!r}: {fraction!r} (expected in [0, 1])"
            )
    fully_frozen = {name for name, fraction in frozen.items() if float(fraction) == 1.0}
    dense_input = _inputs_need_grad(model, example_input, counts, set())
    frozen_input = _inputs_need_grad(model, example_input, counts, fully_frozen)
    dense = avoidable = 0.0
    for name, ops in counts.items():
        module = model.get_submodule(name)
        has_parameters = any(True for _ in module.parameters(recurse=False))
        dense += ops * (has_parameters + dense_input[name])
        avoidable += ops * (dense_input[name] and not frozen_input[name])
        batch_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        if has_parameters and not (batch_norm and frozen_input[name]):
            avoidable += ops * float(frozen.get(name, 0.0))
    return {"dense": round(dense), "avoidable": round(avoidable)}


def _inputs_need_grad(
    model: nn.Module, example_input: Tensor, names: Iterable[str], fully_frozen: set[str]
) -> dict[str, bool]:
    """Per module name: whether its input depends on a trainable parameter (eval, batch 1).

    Every parameter counts as trainable except those of the modules in ``fully_frozen``; the
    model's own parameters and ``requires_grad`` flags are left untouched.
    """
    needs = dict.fromkeys(names, False)
    parameters = {}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            parameters[key] = parameter.detach().requires_grad_(module_name not in fully_frozen)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            needs[name] |= bool(args) and isinstance(args[0], Tensor) and args[0].requires_grad

        return hook

    handles = [model.get_submodule(name).register_forward_hook(hook_for(name)) for name in needs]
    with torch.enable_grad():
        metrics.hooked_eval_forward(
            model, handles,
            lambda: torch.func.functional_call(model, parameters, (example_input[:1],)))
    return needs
