"""Post-training commands on a run directory: ``simplify`` (remove dead neurons, measure, export)
and ``analyze`` (PSP-entropy, sharpness)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

import neuronwise as nw
from neuronwise import data as nwdata
from neuronwise.io import atomic_write_bytes, atomic_write_text

from .config import Config
from .rundir import RunDir, RunDirError, load_checkpoint


def load_run_model(run_dir: str | Path, checkpoint: str = "last") -> tuple[Config, torch.nn.Module]:
    """Rebuild a run's model from its config.yaml and load ``last.pt`` or ``best.pt`` into it."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunDirError(f"{run.path}: run directory not found")
    config = run.read_config()
    info = nwdata.DATASETS[config.data.name]
    model = nw.models.create(config.model.name, num_classes=info.num_classes,
                             in_channels=info.in_channels, image_size=info.image_size,
                             **config.model.kwargs)
    path = run.best_path if checkpoint == "best" else run.last_path
    state = load_checkpoint(path)["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise RunDirError(f"{path}: checkpoint does not fit model {config.model.name!r} ({first})")
    return config, model.eval()


def _example_input(config: Config) -> torch.Tensor:
    info = nwdata.DATASETS[config.data.name]
    return torch.zeros(1, info.in_channels, info.image_size, info.image_size)


def _test_loader(config: Config, data_root: str | None, limit: int | None = None):
    test = nwdata.load(config.data.name, split="test", root=nwdata.resolve_root(
        data_root or config.data.root))
    if limit:
        test = test.subset(torch.arange(min(limit, len(test))))
    return nwdata.TensorLoader(test, batch_size=config.data.eval_batch_size)


def simplify_run(run_dir: str | Path, export: str | None = None, checkpoint: str = "last",
                 repeats: int = 50) -> str:
    """Simplify a run's model; save it (``simplified.pt``), measure it, optionally export ONNX."""
    from neuronwise.simplify import export_onnx, save_simplified, simplify

    from neuronwise.latency import measure_latency

    config, model = load_run_model(run_dir, checkpoint)
    example = _example_input(config)
    small = simplify(model, example)
    run = RunDir(run_dir)
    save_simplified(small, run.path / "simplified.pt")
    summary = {"dense": nw.metrics.summary(model, example),
               "simplified": nw.metrics.summary(small, example)}
    with torch.no_grad():
        reference, output = model(example), small(example)
    summary["max_abs_output_difference"] = float((reference - output).abs().max())
    for batch in (1, 256):
        inputs = example.expand(batch, *example.shape[1:]).contiguous().normal_(
            generator=torch.Generator().manual_seed(0))
        dense_s, small_s = measure_latency([model, small], inputs, repeats=repeats)
        summary[f"latency_batch{batch}_ms"] = {"dense": 1e3 * dense_s, "simplified": 1e3 * small_s,
                                               "speedup": dense_s / small_s}
    if export:
        export_onnx(small, example, export)
        summary["onnx"] = str(export)
    atomic_write_text(run.path / "simplify.json", json.dumps(summary, indent=2) + "\n")
    d, s = summary["dense"], summary["simplified"]
    lines = [f"simplified model saved: {run.path / 'simplified.pt'}"]
    for key in sorted(d):
        lines.append(f"  {key:<28} {d[key]:>14,} -> {s[key]:>14,}")
    for batch in (1, 256):
        t = summary[f"latency_batch{batch}_ms"]
        lines.append(f"  latency batch {batch:<4} (median) {t['dense']:.3f} ms -> "
                     f"{t['simplified']:.3f} ms  (x{t['speedup']:.2f})")
    lines.append(f"  max |output difference| {summary['max_abs_output_difference']:.3g}")
    if export:
        lines.append(f"  ONNX: {export}")
    return "\n".join(lines)


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
