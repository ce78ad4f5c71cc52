"""Inference layers that multiply by a sparse (CSR) weight: the sparse kernels of ``deploy``.

Both compute exactly the function of the dense layer they replace, with the sum over the inputs of
each output taken only over the stored non-zeros (a different summation order, so float32 results
agree to rounding, not bitwise):

- :class:`CSRLinear`: y = x Wᵀ + b computed as (W xᵀ + b 1ᵀ)ᵀ with W in CSR (rows = outputs), one
  ``torch.addmm`` with a sparse first operand and xᵀ copied row-major. The result is the transpose
  of a contiguous (out, batch) matrix, so a following ``CSRLinear`` receives a contiguous xᵀ for
  free.
- :class:`GatherLinear`: the dense product over the used inputs only, y = x[:, J] W[:, J]ᵀ + b with
  J = the columns of W holding a non-zero (dead input features, e.g. never-used border pixels).
- :class:`CSRConv2d`: im2col lowering. With cols = unfold(x) of shape (N, C·kh·kw, L) (L output
  positions), y[n, o, l] = Σ_j W[o, j] · cols[n, j, l] + b[o]; the batch is folded into the columns
  (C·kh·kw, N·L) so one sparse × dense product serves the whole batch. ``groups`` must be 1.

Weights are buffers (no gradient): these modules are for inference only.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CSRConv2d", "CSRLinear", "GatherLinear", "to_csr"]


def to_csr(weight: Tensor) -> Tensor:
    """``weight`` as a 2-D CSR matrix (rows = output neurons) holding only its non-zeros."""
    matrix = weight.detach().reshape(weight.shape[0], -1)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, nothing to act on
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.to_sparse_csr()


def _bias_column(bias: Tensor | None, rows: int, like: Tensor) -> Tensor:
    if bias is None:
        return torch.zeros(rows, 1, dtype=like.dtype, device=like.device)
    return bias.detach().reshape(rows, 1).clone()


def _matrix_shape(weight: Tensor) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"Invalid weight: shape {tuple(weight.shape)} (expected 2-D)")
    return weight.shape[0], weight.shape[1]


class CSRLinear(nn.Module):
    """``F.linear(x, weight, bias)`` for 2-D ``x`` with ``weight`` stored in CSR."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = _matrix_shape(weight)
        self.register_buffer("weight", to_csr(weight))
        self.register_buffer("bias", _bias_column(bias, weight.shape[0], weight))

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])  # leading dimensions are all batch, as in F.linear
        # MKL's CSR product is several times faster on a row-major xᵀ than on the transposed view
        # (measured 2.4-2.9x at batch 32-256), more than the copy costs; after a CSRLinear, xᵀ is
        # already contiguous and the copy is free
        out = torch.addmm(self.bias, self.weight, rows.t().contiguous()).t()
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


class CSRConv2d(nn.Module):
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` by im2col and a CSR product."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                 dilation=1) -> None:
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"Invalid weight: shape {tuple(weight.shape)} (expected 4-D)")
        if isinstance(padding, str):
            raise TypeError(f"Invalid padding: {padding!r} (expected integers)")
        self.out_channels = weight.shape[0]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = (
            nn.modules.utils._pair(v) for v in (stride, padding, dilation))
        self.register_buffer("weight", to_csr(weight))
        self.register_buffer("bias", _bias_column(bias, weight.shape[0], weight))

    def forward(self, x: Tensor) -> Tensor:
        batch, _, height, width = x.shape
        out_h, out_w = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip((height, width), self.padding, self.dilation,
                                        self.kernel_size, self.stride))
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C·kh·kw, N·L)
        out = torch.addmm(self.bias, self.weight, cols)  # (O, N·L)
        return out.view(self.out_channels, batch, out_h, out_w).transpose(0, 1)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return (f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, nnz={nnz}")


class GatherLinear(nn.Module):
    """``F.linear(x, weight, bias)`` computed densely over the input features that ``weight`` uses."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = _matrix_shape(weight)
        columns = (weight.detach() != 0).any(0).nonzero().flatten()
        self.register_buffer("columns", columns)
        self.register_buffer("weight", weight.detach()[:, columns].contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.index_select(-1, self.columns), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (used {self.columns.numel()}), "
                f"out_features={self.out_features}")
