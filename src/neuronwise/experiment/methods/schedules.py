"""The ``pruning:`` config section, shared by every registered pruning schedule.

A schedule is selected by ``pruning.schedule`` (``plateau.py``, ``magnitude.py``); each reads the
keys it needs and ignores the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import neuronwise as nw

from ..schema import setting
from .registry import names


@dataclass
class PruningConfig:
    """Pruning schedule: ``plateau`` is LOBSTER/SeReNe's PruneOnPlateau (§1 of METHODS.md)."""

    schedule: str = setting("none", "schedule", choices=lambda: names("pruning"))
    patience: int = setting(20, "plateau: PWE, bad epochs (loss ≥ best·(1+plateau_tolerance)) to "
                            "prune", bounds=">= 0")
    tolerance: float = setting(0.05, "plateau: TWT, allowed relative val-loss increase of a "
                               "pruning", bounds=">= 0")
    plateau_tolerance: float = setting(0.01, "plateau: relative margin under which a loss is not "
                                       "\"bad\"", bounds=">= 0")
    importance: str = setting("magnitude", "criterion ranking the entries, lowest pruned first: a "
                              "registered parameter importance (magnitude: |w|; taylor: "
                              "|w·∂L/∂w| from the last step's gradient)",
                              choices=lambda: nw.pruning.importance_names("parameter"))
    granularity: Literal["params", "neurons"] = setting(
        "params", "mask per entry or per whole neuron, also the mask LOBSTER/SeReNe share with "
        "the pruner (a neuron mask takes the channels coupled by residual additions or depthwise "
        "convs together); oneshot/iterative/gradual with neurons prune whole neurons, sparsity "
        "and fraction then count neurons (ranked by neuron_ranking)")
    neuron_ranking: Literal["l1-layer", "l1-global", "l1-groups", "tp-group-l1"] = setting(
        "l1-layer", "oneshot/iterative/gradual, granularity neurons: l1-SCOPE = row-L1 norms "
        "(neuronwise.l1_structured_prune, scope layer/global/groups); tp-group-l1 = "
        "Torch-Pruning's group-L1 importance per layer, as a neuron mask (needs the baselines "
        "extra)")
    safe_threshold: bool = setting(False, "plateau: use the largest threshold verified within TWT")
    sparsity: float = setting(0.9, "oneshot/iterative/gradual: target fraction of zeros",
                              bounds="in [0, 1]")
    fraction: float = setting(0.2, "iterative: share of surviving parameters removed per round",
                              bounds="in [0, 1]")
    start_epoch: int = setting(0, "oneshot: prune after this epoch (0: before training); "
                               "gradual: start", bounds=">= 0")
    end_epoch: int = setting(10, "gradual: epoch at which the target sparsity is reached")
    every: int = setting(1, "iterative/gradual: epochs between pruning rounds", bounds="> 0")
