"""Transformers in neuronwise: attention heads and FFN units as neurons, and their removal.

- :mod:`~neuronwise.transformer.groups`: the one definition of a transformer's neurons.
- :mod:`~neuronwise.transformer.simplify`: removal of dead heads, units and blocks.
- :mod:`~neuronwise.transformer.modules`: the attention and constant modules it builds.
"""

from neuronwise.transformer.groups import AttentionHeads, FeedForwardUnits, neuron_groups
from neuronwise.transformer.modules import (
    AddConstant,
    Attention,
    ConstantBranch,
    MeanAttention,
    MultiheadAttention,
)
from neuronwise.transformer.simplify import compose_kept, convert_attention, simplify_transformer

__all__ = [
    "AddConstant",
    "Attention",
    "AttentionHeads",
    "ConstantBranch",
    "FeedForwardUnits",
    "MeanAttention",
    "MultiheadAttention",
    "compose_kept",
    "convert_attention",
    "neuron_groups",
    "simplify_transformer",
]
