"""Save, load and ONNX-export a simplified model (``torch.export``, dynamic batch size)."""

from __future__ import annotations

import io
import os

import torch
from torch import Tensor, nn

from ..io import atomic_write_bytes
from .simplify import EXAMPLE_KEY

__all__ = ["export_onnx", "load_simplified", "save_simplified"]


def _batch_of_two(example_input: Tensor) -> Tensor:
    # torch.export specializes a dimension of size 1; two samples keep the batch size dynamic.
    return example_input[:1].detach().repeat(2, *[1] * (example_input.dim() - 1))


def _export(model: nn.Module, example_input: Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim.DYNAMIC
    return torch.export.export(
        model.eval(), (_batch_of_two(example_input),), dynamic_shapes=({0: batch},)
    )


def _example_for(model: nn.Module, example_input: Tensor | None) -> Tensor:
    if example_input is not None:
        return example_input
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) or EXAMPLE_KEY not in meta:
        raise ValueError(
            "Invalid example_input: None (required for a model that simplify() did not return)"
        )
    return meta[EXAMPLE_KEY]


def save_simplified(
    model: nn.Module, path: str | os.PathLike, example_input: Tensor | None = None
) -> None:
    """Save structure and weights (``torch.export``, dynamic batch size) to ``path``, atomically.

    ``example_input`` defaults to a zero tensor shaped like the one given to :func:`simplify`.
    :func:`load_simplified` (or ``torch.export.load(path).module()``) needs neither neuronwise nor
    the model's source code. Loading unpickles, so load only files you trust.
    """
    buffer = io.BytesIO()
    torch.export.save(_export(model, _example_for(model, example_input)), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_simplified(path: str | os.PathLike) -> nn.Module:
    """The module saved by :func:`save_simplified` (inference only)."""
    return torch.export.load(path).module()


def export_onnx(model: nn.Module, example_input: Tensor | None, path: str | os.PathLike) -> None:
    """Export ``model`` to ONNX (dynamic batch size), atomically; needs ``onnx`` and ``onnxscript``.

    ``example_input`` may be None for a model returned by :func:`simplify`.
    """
    try:
        model.eval()
    except NotImplementedError:  # a load_simplified (torch.export) module: inference-only already
        pass
    program = torch.onnx.export(
        model,
        (_batch_of_two(_example_for(model, example_input)),),
        dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
        dynamo=True,
        verbose=False,
    )
    atomic_write_bytes(path, program.model_proto.SerializeToString())
