"""torchvision's model definitions without its compiled operators.

torchvision's package ``__init__`` registers meta/autograd kernels for its C++ operators (``nms``,
``roi_align``, ...); with a torch build whose ``torchvision::`` library did not load (a CPU wheel
mismatch), that fails with "operator torchvision::nms does not exist", although the classification
models use none of those operators. :func:`models` pre-empts the two registration modules and
imports the real model files: the architectures are torchvision's own, not copies.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["models"]

_REGISTRATIONS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def models() -> types.ModuleType:
    """``torchvision.models``; ImportError when torchvision is not installed."""
    if "torchvision" not in sys.modules:
        importlib.util.find_spec("torchvision") or _missing()
        try:
            return importlib.import_module("torchvision.models")
        except RuntimeError:  # the operator registrations failed: retry without them
            for name in [
                n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")
            ]:
                del sys.modules[name]
            for name in _REGISTRATIONS:
                sys.modules[name] = types.ModuleType(name)
    return importlib.import_module("torchvision.models")


def _missing() -> None:
    raise ImportError("torchvision is not installed (pip install 'neuronwise[vision]')")
