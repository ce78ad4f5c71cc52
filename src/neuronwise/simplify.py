"""Compatibility path: ``neuronwise.simplify`` lives in :mod:`neuronwise.structure`."""

from .structure import (  # noqa: F401
    BiasMapConv2d,
    export_onnx,
    load_simplified,
    remap_optimizer_state,
    save_simplified,
    simplify,
)
