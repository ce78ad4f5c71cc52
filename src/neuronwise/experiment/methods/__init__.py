"""Methods that ``neuronwise run`` and the Lightning integration train with, by registered name.

One file per method defines its config section, its callback and its registration
(``lobster.py``, ``serene.py``, ``neq.py``, ``finetune.py``; the pruning schedules ``plateau.py`` and
``magnitude.py``). The contract is in ``base.py``, the registry in ``registry.py``; a package of
your own registers through the entry-point group ``neuronwise.methods``
(docs/architecture.md, "Adding a method").
"""

# Importing a method's file registers it; this order is the order of the config sections.
# isort: off
from . import lobster, serene, neq, finetune, plateau, magnitude  # noqa: F401
# isort: on
from .base import MethodCallback, MethodContext, Metric
from .registry import (
    ENTRY_POINT_GROUP,
    Registration,
    build_callbacks,
    declared_metrics,
    get,
    names,
    register,
    registrations,
    sections,
    unregister,
)
from .schedules import PruningConfig

__all__ = [
    "ENTRY_POINT_GROUP",
    "MethodCallback",
    "MethodContext",
    "Metric",
    "PruningConfig",
    "Registration",
    "build_callbacks",
    "declared_metrics",
    "get",
    "names",
    "register",
    "registrations",
    "sections",
    "unregister",
]
