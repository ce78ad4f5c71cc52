"""``neuronwise analyze RUN``: PSP-entropy per layer and sharpness of a run's model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from neuronwise.io import atomic_write_bytes, atomic_write_text

from .rundir import RunDir
from .tools import _test_loader, load_run_model


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def analyze_run(run_dir: str | Path, entropy: bool = True, sharpness: bool = False,
                checkpoint: str = "last", data_root: str | None = None) -> str:
    """PSP-entropy per layer (JSON + histograms + class-wise heatmap) and/or sharpness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (entropy or sharpness):
        entropy = True
    config, model = load_run_model(run_dir, checkpoint)
    loader = _test_loader(config, data_root)
    out = RunDir(run_dir).path / "analysis"
    summary: dict = {"checkpoint": checkpoint}
    lines = []
    if entropy:
        from neuronwise.entropy import psp_entropy

        layers = psp_entropy(model, loader)
        summary["psp_entropy_bits"] = {
            name: {"mean": r.mean, "units": int(r.per_unit.numel())} for name, r in layers.items()}
        figure, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), squeeze=False)
        for axis, (name, result) in zip(axes[0], layers.items()):
            axis.hist(result.per_unit.numpy(), bins=40)
            axis.set_title(f"{name}: mean {result.mean:.2f} bits", fontsize=9)
            axis.set_xlabel("H(u) (bits)")
        figure.tight_layout()
        atomic_write_bytes(out / "entropy_hist.png", _png(figure))
        plt.close(figure)
        # The class-wise matrix of the widest hidden Linear layer (LeNet-5 fc1: 500 x 10).
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:-1]
        if linear:
            name = max(linear, key=lambda n: layers[n].per_unit.numel())
            figure, axis = plt.subplots(figsize=(5, 4))
            image = axis.imshow(layers[name].per_class.numpy(), aspect="auto", cmap="viridis")
            axis.set_xlabel("class")
            axis.set_ylabel("unit")
            axis.set_title(f"{name}: H_c(u) (bits)")
            figure.colorbar(image)
            figure.tight_layout()
            atomic_write_bytes(out / "entropy_classwise.png", _png(figure))
            plt.close(figure)
        lines += [f"  {n:<24} mean H {r.mean:.4f} bits over {r.per_unit.numel():,} units"
                  for n, r in layers.items()]
    if sharpness:
        from neuronwise.sharpness import sharpness as measure_sharpness

        result = measure_sharpness(model, loader)
        summary["sharpness"] = {"base_loss": result.base_loss, "sigmas": list(result.sigmas),
                                "mean_increase": list(result.mean), "std": list(result.std)}
        lines += [f"  sharpness sigma={s}: loss +{m:.4f} (std {d:.4f})"
                  for s, m, d in zip(result.sigmas, result.mean, result.std)]
    atomic_write_text(out / "analysis.json", json.dumps(summary, indent=2) + "\n")
    return "\n".join([f"analysis written: {out}"] + lines)
