"""Pruning schedules and importance criteria (METHODS.md §1, §6).

A schedule decides when and how much to prune; an importance criterion (:mod:`.importance`,
default |w|) decides what. Modules:

- :mod:`.threshold`: global threshold pruning and the LOBSTER threshold bisection;
- :mod:`.plateau`: :class:`PruneOnPlateau`, bisection whenever the validation loss plateaus;
- :mod:`.baselines`: one-shot, iterative and gradual magnitude baselines;
- :mod:`.importance`: the criteria (``magnitude``, ``taylor``, ``neuron_l1``, ``neuron_taylor``).

Masks and parameter resolution live in :mod:`neuronwise.masks` and are re-exported here.
"""

from neuronwise.masks import (
    GRANULARITIES,
    PRUNABLE_MODULES,
    ParameterMask,
    ParamsLike,
    check_mask,
    prunable_parameters,
    resolve_parameters,
)

from .baselines import (
    GradualMagnitudePruning,
    IterativeMagnitudePruning,
    global_magnitude_prune,
    prune_to_sparsity,
)
from .importance import (
    NeuronImportance,
    ParameterImportance,
    get_importance,
    importance_names,
    magnitude,
    neuron_l1,
    neuron_taylor,
    register_importance,
    taylor,
)
from .plateau import PruneOnPlateau
from .threshold import (
    ThresholdResult,
    ThresholdStats,
    prune_below,
    threshold_search,
    threshold_statistics,
)

__all__ = [
    "GRANULARITIES",
    "PRUNABLE_MODULES",
    "GradualMagnitudePruning",
    "IterativeMagnitudePruning",
    "NeuronImportance",
    "ParameterImportance",
    "ParameterMask",
    "ParamsLike",
    "PruneOnPlateau",
    "ThresholdResult",
    "ThresholdStats",
    "check_mask",
    "get_importance",
    "global_magnitude_prune",
    "importance_names",
    "magnitude",
    "neuron_l1",
    "neuron_taylor",
    "prunable_parameters",
    "prune_below",
    "prune_to_sparsity",
    "register_importance",
    "resolve_parameters",
    "taylor",
    "threshold_search",
    "threshold_statistics",
]
