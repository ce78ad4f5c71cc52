"""Real backward savings for NEq: weight gradients of the active output rows only.

A partially frozen ``Conv2d``/``Linear`` keeps its full forward, but its output is re-rooted on
:class:`ActiveRowsGrad`, whose backward computes the input gradient as usual and the weight and bias
gradients only for the active rows (output channels); frozen rows get exact zeros, i.e. the
masked-gradient reference of METHODS.md §5. Fully frozen layers need no help: their parameters get
``requires_grad_(False)`` for the epoch, and autograd then also skips input-gradient work that
nothing upstream needs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# Above this share of active rows the split backward (input gradient and active-row weight gradient
# as two calls, plus index copies) measured no faster than autograd's single call on CPU
# (benchmarks/neq_backward.py): such layers keep the full backward, masked by the optimizer hooks.
MAX_ACTIVE_SHARE = 0.25


def uses_active_rows(module: nn.Module, active: int) -> bool:
    """Whether ``module`` with ``active`` trained rows gets :class:`ActiveRowsGrad`."""
    if active > MAX_ACTIVE_SHARE * module.weight.shape[0]:
        return False
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


class ActiveRowsGrad(torch.autograd.Function):
    """Identity on ``output``; backward: full input gradient, weight/bias gradients of ``active`` rows.

    ``output`` is the detached result of the module's own forward, so the forward runs once; the
    module's original graph is never used. ``conv`` holds (stride, padding, dilation) for
    ``Conv2d`` and is ``None`` for ``Linear``.
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
    ) -> Tensor:
        ctx.save_for_backward(x, weight, active)
        ctx.conv = conv
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
            if need_x:
                grad_x = (grad_2d @ weight).reshape(x.shape)
            grad_active = grad_2d.index_select(1, active)
            if need_w:
                grad_w = torch.zeros_like(weight)
                grad_w.index_copy_(0, active, grad_active.t() @ x.reshape(-1, weight.shape[1]))
            if need_b:
                grad_b = weight.new_zeros(weight.shape[0])
                grad_b.index_copy_(0, active, grad_active.sum(0))
        else:
            stride, padding, dilation = ctx.conv
            args = (stride, padding, dilation, False, [0, 0], 1)
            if need_x:
                grad_x = torch.ops.aten.convolution_backward(
                    grad_output, x, weight, None, *args, [True, False, False]
                )[0]
            if need_w or need_b:
                count = active.numel()
                # Only the weight's shape matters for the weight gradient: a narrow view avoids a copy.
                _, grad_w_active, grad_b_active = torch.ops.aten.convolution_backward(
                    grad_output.index_select(1, active),
                    x,
                    weight.narrow(0, 0, count),
                    [count] if ctx.has_bias else None,
                    *args,
                    [False, need_w, need_b],
                )
                if need_w:
                    grad_w = torch.zeros_like(weight)
                    grad_w.index_copy_(0, active, grad_w_active)
                if need_b:
                    grad_b = weight.new_zeros(weight.shape[0])
                    grad_b.index_copy_(0, active, grad_b_active)
        return None, grad_x, grad_w, grad_b, None, None


class ActiveRowsHook:
    """Forward hook routing a module's output through :class:`ActiveRowsGrad`.

    A plain object holding only the active-row indices, so a hooked model still deep-copies and
    pickles.
    """

    def __init__(self, active: Tensor):
        self.active = active

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not module.weight.requires_grad:
            return None
        conv = None
        if isinstance(module, nn.Conv2d):
            conv = (list(module.stride), list(module.padding), list(module.dilation))
        return ActiveRowsGrad.apply(
            output.detach(), args[0], module.weight, module.bias, self.active, conv
        )
