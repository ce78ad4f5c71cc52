"""neuronwise: sparse and efficient neural networks in PyTorch.

LOBSTER, SeReNe, NEq and PSP-entropy (EIDOS lab, University of Turin) as torch-native objects:
plain classes that take a model, with ``step()`` and ``state_dict()``, usable in any training loop.
"""

from neuronwise import data, distributed, metrics, models, pruning, sharpness, structure
from neuronwise.entropy import LayerEntropy, PSPEntropy, psp_entropy
from neuronwise.lobster import Lobster
from neuronwise.neq import NEq
from neuronwise.pruning import (
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    ParameterMask,
    PruneOnPlateau,
    global_magnitude_prune,
    threshold_search,
)
from neuronwise.serene import SeReNe
from neuronwise.simplify import simplify  # the function; the module is neuronwise.structure
from neuronwise.structure import export_onnx, load_simplified, save_simplified
from neuronwise.structured import l1_structured_prune, neuron_l1_norms

__version__ = "0.1.0"

__all__ = [
    "GradualMagnitudePruning",
    "IterativeMagnitudePruning",
    "LayerEntropy",
    "Lobster",
    "NEq",
    "PSPEntropy",
    "ParameterMask",
    "PruneOnPlateau",
    "SeReNe",
    "__version__",
    "data",
    "distributed",
    "export_onnx",
    "global_magnitude_prune",
    "l1_structured_prune",
    "load_simplified",
    "metrics",
    "models",
    "neuron_l1_norms",
    "pruning",
    "psp_entropy",
    "save_simplified",
    "sharpness",
    "simplify",
    "structure",
    "threshold_search",
]
