"""Structure of a network: which channels are coupled, and a smaller network without the dead ones.

- :mod:`.graph`: ``torch.fx`` capture and channel coupling analysis (:func:`channel_groups`);
- :mod:`.simplify`: the rebuild without dead neurons (:func:`simplify`, :func:`explain`);
- :mod:`.export`: save/load/ONNX; :mod:`.optimizer`: optimizer state across a rebuild.
"""

from .export import export_onnx, load_simplified, save_simplified
from .groups import ChannelGroup, channel_groups
from .optimizer import remap_optimizer_state
from .simplify import BiasMapConv2d, BorderBiasConv2d, KeptChannel, explain, simplify

__all__ = [
    "BiasMapConv2d",
    "BorderBiasConv2d",
    "ChannelGroup",
    "KeptChannel",
    "channel_groups",
    "explain",
    "export_onnx",
    "load_simplified",
    "remap_optimizer_state",
    "save_simplified",
    "simplify",
]
