"""CSR inference layers: the dense layer's function for any sparsity pattern."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronwise.sparse_layers import CSRConv2d, CSRLinear, GatherLinear


def sparse_weight(shape, density, generator, dead_rows=(), dead_columns=()):
    weight = torch.randn(*shape, generator=generator)
    weight *= torch.rand(*shape, generator=generator) < density
    weight[list(dead_rows)] = 0.0
    if dead_columns:
        weight[:, list(dead_columns)] = 0.0
    return weight


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40), columns=st.integers(1, 60), batch=st.integers(1, 9),
    density=st.floats(0.0, 1.0), bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_csr_linear_matches_linear_on_random_patterns(rows, columns, batch, density, bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight = sparse_weight((rows, columns), density, g)
    b = torch.randn(rows, generator=g) if bias else None
    x = torch.randn(batch, columns, generator=g)
    expected = F.linear(x, weight, b)
    out = CSRLinear(weight, b)(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max()))


def test_csr_linear_empty_rows_and_columns_and_all_zero_weight():
    g = torch.Generator().manual_seed(0)
    weight = sparse_weight((7, 11), 0.6, g, dead_rows=[0, 3, 6], dead_columns=[1, 2, 10])
    bias = torch.arange(7.0)
    x = torch.randn(5, 11, generator=g)
    out = CSRLinear(weight, bias)(x)
    torch.testing.assert_close(out, F.linear(x, weight, bias))
    torch.testing.assert_close(out[:, [0, 3, 6]], bias[[0, 3, 6]].expand(5, 3))  # rows of bias only
    # a fully dead layer computes its bias, and zero without one
    dead = CSRLinear(torch.zeros(4, 6), torch.tensor([1.0, -2.0, 0.0, 3.5]))
    assert dead.weight.values().numel() == 0
    torch.testing.assert_close(dead(x[:, :6]), torch.tensor([1.0, -2.0, 0.0, 3.5]).expand(5, 4))
    assert torch.equal(CSRLinear(torch.zeros(4, 6))(x[:, :6]), torch.zeros(5, 4))


def test_csr_linear_keeps_leading_dimensions():
    g = torch.Generator().manual_seed(1)
    weight = sparse_weight((6, 8), 0.3, g)
    x = torch.randn(2, 3, 8, generator=g)
    torch.testing.assert_close(CSRLinear(weight)(x), F.linear(x, weight))


@settings(max_examples=20, deadline=None)
@given(
    out_channels=st.integers(1, 8), in_channels=st.integers(1, 5), kernel=st.integers(1, 4),
    stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
    batch=st.integers(1, 3), density=st.floats(0.0, 1.0), bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_csr_conv2d_matches_conv2d(out_channels, in_channels, kernel, stride, padding, dilation,
                                   batch, density, bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight = sparse_weight((out_channels, in_channels, kernel, kernel), density, g)
    b = torch.randn(out_channels, generator=g) if bias else None
    x = torch.randn(batch, in_channels, 9, 10, generator=g)
    expected = F.conv2d(x, weight, b, stride, padding, dilation)
    out = CSRConv2d(weight, b, stride, padding, dilation)(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max()))


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="expected 2-D"):
        CSRLinear(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="expected 4-D"):
        CSRConv2d(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="Invalid padding"):
        CSRConv2d(torch.zeros(2, 3, 3, 3), padding="same")


def test_gather_linear_uses_only_the_used_columns():
    g = torch.Generator().manual_seed(2)
    weight = sparse_weight((6, 10), 0.7, g, dead_columns=[0, 4, 9])
    bias = torch.randn(6, generator=g)
    layer = GatherLinear(weight, bias)
    assert layer.columns.tolist() == [c for c in range(10) if (weight[:, c] != 0).any()]
    x = torch.randn(3, 10, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias))
    x[:, [0, 4, 9]] = float("nan")  # unused inputs are never read
    assert torch.isfinite(layer(x)).all()
