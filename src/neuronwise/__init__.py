"""neuronwise: sparse and efficient neural networks in PyTorch.

LOBSTER, SeReNe, NEq and PSP-entropy (EIDOS lab, University of Turin) as torch-native objects.
"""

__version__ = "0.1.0"
