"""Interoperability with ``torch.nn.utils.prune``.

``torch.nn.utils.prune`` keeps a pruned parameter ``name`` as a parameter ``name_orig``, a buffer
``name_mask`` and a forward pre-hook that recomputes ``name = name_orig * name_mask``. neuronwise
keeps plain parameters whose pruned entries are exact zeros, held there by a
:class:`~neuronwise.pruning.ParameterMask`. These functions convert between the two forms:

- :func:`import_torch_prune`: finalise every reparametrisation (as ``prune.remove``) and return a
  ``ParameterMask`` holding torch's masks, ready for ``Lobster``/``SeReNe``/``PruneOnPlateau``;
- :func:`export_torch_prune`: put a ``ParameterMask`` back into ``name_orig``/``name_mask`` form,
  e.g. to continue with ``prune.global_unstructured`` or tools that expect it;
- :func:`finalize`: ``prune.remove`` on every reparametrised parameter of a model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from neuronwise._utils import unwrap
from neuronwise.masks import PRUNABLE_MODULES, ParameterMask, prunable_parameters


def _reparametrized(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every parameter pruned by torch.nn.utils.prune."""
    found = []
    for module_name, module in unwrap(model).named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append((module_name, module, hook._tensor_name))
    return found


def _qualified(module_name: str, name: str) -> str:
    return f"{module_name}.{name}" if module_name else name


def finalize(model: nn.Module) -> list[str]:
    """Make torch.nn.utils.prune pruning permanent, like ``prune.remove`` on every parameter.

    Each ``name_orig``/``name_mask`` pair becomes a plain parameter ``name = name_orig * name_mask``
    and the forward pre-hook is removed. Returns the qualified names finalised, in
    ``named_modules()`` order.
    """
    names = []
    for module_name, module, name in _reparametrized(model):
        prune.remove(module, name)
        names.append(_qualified(module_name, name))
    return names


def import_torch_prune(
    model: nn.Module, modules: Iterable[type[nn.Module]] = PRUNABLE_MODULES
) -> ParameterMask:
    """Finalise a model pruned with torch.nn.utils.prune and return its masks as a ParameterMask.

    The mask covers the parameters of ``modules`` (as ``Lobster``'s default set): a parameter that
    torch pruned carries torch's mask exactly (an entry left by torch with value 0 stays free to
    move); any other parameter is masked where it is zero now, as ``ParameterMask`` does. A pruned
    parameter outside ``modules`` raises ``ValueError``, since the mask could not keep it at zero.
    """
    modules = tuple(modules)
    found = _reparametrized(model)
    outside = [_qualified(m, n) for m, module, n in found if not isinstance(module, modules)]
    if outside:
        raise ValueError(
            f"Invalid modules: pruned parameters {outside} are not in modules of type "
            f"{modules} (pass modules= including their types)"
        )
    masks = {
        _qualified(m, n): getattr(module, f"{n}_mask").detach().bool() for m, module, n in found
    }
    finalize(model)
    covered = prunable_parameters(model, modules)
    mask = ParameterMask([p for _, p in covered], zeros_at_start="masked")
    mask.masks = [
        masks[name].to(p.device).clone() if name in masks else current
        for (name, p), current in zip(covered, mask.masks)
    ]
    return mask


@torch.no_grad()
def export_torch_prune(
    model: nn.Module, mask: ParameterMask, only_pruned: bool = False
) -> list[str]:
    """Reparametrise ``model`` with ``prune.custom_from_mask`` from a neuronwise ``ParameterMask``.

    Every parameter of ``mask`` that belongs to ``model`` gets ``name_orig``/``name_mask``
    (``only_pruned=True``: only those with at least one masked entry); a parameter already pruned by
    torch combines both masks, as torch does. The mask must be ``params`` granularity or have been
    built from the same model. Returns the qualified names exported.
    """
    if not isinstance(mask, ParameterMask):
        raise TypeError(f"Invalid mask: {type(mask).__name__} (expected ParameterMask)")
    owners = {}
    for module_name, module in unwrap(model).named_modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (module_name, module, name))
    missing = [i for i, p in enumerate(mask.params) if id(p) not in owners]
    if missing:
        raise ValueError(
            f"Invalid mask: tensors at positions {missing} are not parameters of the model"
        )
    exported = []
    for param, keep in zip(mask.params, mask.masks):
        if only_pruned and bool(keep.all()):
            continue
        module_name, module, name = owners[id(param)]
        if name.endswith("_orig") and hasattr(module, f"{name[:-5]}_mask"):
            name = name[: -len("_orig")]  # already pruned by torch: combine with its mask
        prune.custom_from_mask(module, name, keep.to(param.device))
        exported.append(_qualified(module_name, name))
    return exported
