"""neuronwise: sparse and efficient neural networks in PyTorch.

LOBSTER, SeReNe, NEq and PSP-entropy (EIDOS lab, University of Turin) as torch-native objects:
plain classes that take a model, with ``step()`` and ``state_dict()``, usable in any training loop.
"""

from neuronwise import data, distributed, metrics, models, pruning, sharpness
from neuronwise.entropy import LayerEntropy, PSPEntropy, psp_entropy
from neuronwise.lobster import Lobster
from neuronwise.neq import NEq
from neuronwise.serene import SeReNe
from neuronwise.simplify import simplify
from neuronwise.pruning import (
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    ParameterMask,
    PruneOnPlateau,
    global_magnitude_prune,
    threshold_search,
)

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
    "data",
    "distributed",
    "global_magnitude_prune",
    "metrics",
    "models",
    "psp_entropy",
    "pruning",
    "sharpness",
    "simplify",
    "threshold_search",
    "__version__",
]
