"""NEq: neurons at equilibrium skip their updates (Bragagnolo et al., NeurIPS 2022; METHODS.md §5).

- :mod:`.equilibrium`: :class:`NEq`, velocities and the choice of frozen neurons;
- :mod:`.similarity`: φ, how much each neuron's outputs on the validation subset moved;
- :mod:`.frozen`: keeping frozen rows still through an optimizer step, one hook class per mode;
- :mod:`.backward`: real backward savings for frozen rows (``skip_frozen_grads``).
"""

from .equilibrium import HOOKED_TYPES, HYPERPARAMETERS, MODES, SELECTIONS, VELOCITIES, NEq
from .frozen import FrozenRows
from .similarity import cosine

__all__ = [
    "HOOKED_TYPES",
    "HYPERPARAMETERS",
    "MODES",
    "SELECTIONS",
    "VELOCITIES",
    "FrozenRows",
    "NEq",
    "cosine",
]
