"""PNG figures of the analyses (PSP-entropy histograms and class-wise maps, loss slices), drawn
off-screen with matplotlib (the ``report`` extra)."""

from __future__ import annotations

import io
from collections.abc import Mapping

import torch

from neuronwise.entropy import LayerEntropy
from neuronwise.sharpness import LandscapeSlice


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return buffer.getvalue()


def entropy_histograms_png(results: Mapping[str, Mapping[str, LayerEntropy]]) -> bytes:
    """One panel per layer with the histogram of H(u) of each model in ``results``
    (label → layer → entropy); several models are overlaid as outlines on shared bins."""
    plt = pyplot()
    names = list(next(iter(results.values())))
    figure, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    for axis, name in zip(axes[0], names):
        top = max(float(r[name].per_unit.max()) for r in results.values())
        bins = torch.linspace(0.0, max(top, 1e-3), 41).numpy()
        for label, layers in results.items():
            values = layers[name].per_unit.numpy()
            if len(results) == 1:
                axis.hist(values, bins=bins)
            else:
                axis.hist(values, bins=bins, histtype="step", linewidth=1.4,
                          label=f"{label} ({layers[name].mean:.2f})")
        title = name if len(results) > 1 else f"{name}: mean {layers[name].mean:.2f} bits"
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("H(u) (bits)")
        if len(results) > 1:
            axis.legend(fontsize=7)
    axes[0][0].set_ylabel("units")
    figure.tight_layout()
    return png(figure)


def classwise_png(panels: Mapping[str, LayerEntropy], layer: str) -> bytes:
    """Heatmaps of the class-wise matrix H_c(u) (units × classes) of ``layer``, one per model."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False,
                                layout="constrained")
    image = None
    for axis, (label, result) in zip(axes[0], panels.items()):
        image = axis.imshow(result.per_class.numpy(), aspect="auto", cmap="viridis",
                            vmin=0.0, vmax=1.0, interpolation="nearest")
        axis.set_xlabel("class")
        axis.set_title(f"{label}: {layer}" if len(panels) > 1 else f"{layer}: H_c(u)", fontsize=9)
    axes[0][0].set_ylabel("unit")
    figure.colorbar(image, ax=list(axes[0]), label="H_c(u) (bits)")
    return png(figure)


def landscape_png(curves: Mapping[str, LandscapeSlice], title: str, xlabel: str) -> bytes:
    """Loss along each slice in ``curves`` (label → slice) on one axis."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for label, curve in curves.items():
        axis.plot(curve.alphas.numpy(), curve.losses.numpy(), marker=".", label=label)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("loss (mean cross-entropy)")
    axis.set_title(title, fontsize=10)
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    if len(curves) > 1:
        axis.legend(fontsize=8)
    figure.tight_layout()
    return png(figure)
