"""Post-training commands on a run directory: load a run's model; ``simplify`` (remove dead
neurons, measure latency, save, export ONNX)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

import neuronwise as nw
from neuronwise import data as nwdata
from neuronwise.io import atomic_write_text

from .config import Config
from .rundir import RunDir, RunDirError, load_checkpoint


def load_run_model(
    run_dir: str | Path, checkpoint: str = "last"
) -> tuple[Config, torch.nn.Module, torch.Tensor]:
    """Rebuild a run's model from its config.yaml, load ``last.pt`` or ``best.pt`` into it, and
    return it in eval mode with a zero example input of the trained shape (batch 1)."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise RunDirError(f"{run.path}: run directory not found")
    config = run.read_config()
    path = run.best_path if checkpoint == "best" else run.last_path
    state = load_checkpoint(path)
    spec = state.get("model_spec") or _registry_spec(config)
    model = nw.models.create(config.model.name, **spec, **config.model.kwargs)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise RunDirError(f"{path}: checkpoint does not fit model {config.model.name!r} ({first})")
    example = torch.zeros(1, spec["in_channels"], spec["image_size"], spec["image_size"])
    return config, model.eval(), example


def _registry_spec(config: Config) -> dict:
    info = nwdata.DATASETS[config.data.name]
    return {"num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size}


def _test_loader(config: Config, data_root: str | None, limit: int | None = None):
    test = nwdata.load(config.data.name, split="test", root=nwdata.resolve_root(
        data_root or config.data.root))
    if limit:
        test = test.subset(torch.arange(min(limit, len(test))))
    return nwdata.TensorLoader(test, batch_size=config.data.eval_batch_size)


def explain_run(run_dir: str | Path, checkpoint: str = "last") -> str:
    """Per layer, the dead neurons that ``simplify`` keeps and the graph node that blocked them."""
    from neuronwise.structure import explain

    _, model, example = load_run_model(run_dir, checkpoint)
    blocked: dict[tuple[str, str, str], list[int]] = {}
    for k in explain(model, example):
        blocked.setdefault((k.layer, k.blocked_by, k.reason), []).append(k.channel)
    lines = [f"dead neurons kept by simplify: {sum(map(len, blocked.values())) or 'none'}"]
    for (layer, node, reason), channels in blocked.items():
        lines.append(f"  {layer}: {len(channels)} ({', '.join(map(str, channels[:12]))}"
                     f"{', ...' if len(channels) > 12 else ''}) blocked by {node}: {reason}")
    return "\n".join(lines)


def simplify_run(run_dir: str | Path, export: str | None = None, checkpoint: str = "last",
                 repeats: int = 50) -> str:
    """Simplify a run's model; save it (``simplified.pt``), measure it, optionally export ONNX."""
    from neuronwise.latency import measure_latency
    from neuronwise.simplify import export_onnx, save_simplified, simplify

    _, model, example = load_run_model(run_dir, checkpoint)
    small = simplify(model, example)
    run = RunDir(run_dir)
    save_simplified(small, run.path / "simplified.pt")
    summary = {"dense": nw.metrics.summary(model, example),
               "simplified": nw.metrics.summary(small, example)}
    with torch.no_grad():
        reference, output = model(example), small(example)
    summary["max_abs_output_difference"] = float((reference - output).abs().max())
    layers = nw.metrics.count_neurons(model)
    del layers["total"]
    summary["neurons_per_layer"] = {name: {"alive": alive, "total": total}
                                    for name, (alive, total) in layers.items()}
    layouts = {"": (model, small)}
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        # Conv nets also in NHWC, CPU's faster layout for them (benchmarks/memory_format.py).
        layouts["channels_last_"] = tuple(copy.deepcopy(m).to(memory_format=torch.channels_last)
                                          for m in (model, small))
    inputs = {batch: example.expand(batch, *example.shape[1:]).contiguous().normal_(
        generator=torch.Generator().manual_seed(0)) for batch in (1, 256)}
    for layout, pair in layouts.items():
        for batch in (1, 256):
            dense_s, small_s = measure_latency(list(pair), inputs[batch], repeats=repeats)
            summary[f"latency_{layout}batch{batch}_ms"] = {
                "dense": 1e3 * dense_s, "simplified": 1e3 * small_s, "speedup": dense_s / small_s}
    if export:
        export_onnx(small, example, export)
        summary["onnx"] = str(export)
    atomic_write_text(run.path / "simplify.json", json.dumps(summary, indent=2) + "\n")
    d, s = summary["dense"], summary["simplified"]
    lines = [f"simplified model saved: {run.path / 'simplified.pt'}"]
    for key in sorted(d):
        lines.append(f"  {key:<28} {d[key]:>14,} -> {s[key]:>14,}")
    for layout in layouts:
        for batch in (1, 256):
            t = summary[f"latency_{layout}batch{batch}_ms"]
            lines.append(f"  latency {layout.replace('_', ' ')}batch {batch:<4} (median) "
                         f"{t['dense']:.3f} ms -> {t['simplified']:.3f} ms  (x{t['speedup']:.2f})")
    lines.append("  alive neurons per layer " + ", ".join(
        f"{name} {n['alive']}/{n['total']}" for name, n in summary["neurons_per_layer"].items()))
    lines.append(f"  max |output difference| {summary['max_abs_output_difference']:.3g}")
    if export:
        lines.append(f"  ONNX: {export}")
    return "\n".join(lines)
