"""Transformers in neuronwise: attention heads and FFN units as neurons, and their removal."""

from neuronwise.transformer.modules import (
    AddConstant,
    Attention,
    ConstantBranch,
    MultiheadAttention,
)

__all__ = ["AddConstant", "Attention", "ConstantBranch", "MultiheadAttention"]
