"""Optional dependencies ("extras"): a missing one is reported with the command that adds it.

The core install is lean (torch, numpy, pyyaml, tqdm, matplotlib, pillow); ONNX export,
the Lightning callbacks, TensorBoard logging and the Torch-Pruning baselines each need an extra,
e.g. ``pip install "neuronwise[onnx]"``.
"""

from __future__ import annotations

import importlib.util

# Top-level module -> the extra of pyproject.toml that installs it.
EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx",
          "lightning": "lightning", "tensorboard": "tensorboard", "torch_pruning": "baselines"}


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra to install."""


def missing_extra(error: ModuleNotFoundError, feature: str) -> ModuleNotFoundError:
    """``error`` as a :class:`MissingExtraError` naming ``feature`` and the extra, when the
    missing module belongs to one (else ``error`` itself)."""
    root = (error.name or "").split(".")[0]
    if root not in EXTRAS:
        return error
    return MissingExtraError(f"{feature} needs the optional package {root!r}: "
                             f'pip install "neuronwise[{EXTRAS[root]}]"', name=error.name)


def require(modules: tuple[str, ...], feature: str) -> None:
    """Raise :class:`MissingExtraError` for the first of ``modules`` that is not installed."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a broken entry
            found = False
        if not found:
            raise missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module),
                                feature)
