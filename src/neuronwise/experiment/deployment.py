"""``neuronwise deploy RUN``: a run's model with timed dense/CSR kernels, measured against the dense
model and against simplify alone, next to the MACs ratios."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import neuronwise as nw
from neuronwise.deploy import DeployedModel
from neuronwise.io import atomic_write_text
from neuronwise.latency import measure_latency

from .rundir import RunDir
from .tools import load_run_model

BATCHES = (1, 32, 256)


def mac_counts(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Forward MACs at batch 1: dense, after simplify (dense layers), and non-zero weights only."""
    return {"dense": nw.metrics.macs(model, example),
            "simplified": nw.metrics.macs(nw.simplify(model, example), example),
            "nonzero": nw.metrics.macs(model, example, nonzero=True)}


def compare_latency(model: nn.Module, example: Tensor, batches: Sequence[int] = BATCHES,
                    repeats: int = 50, extra: dict[str, Callable[[int], nn.Module]] | None = None,
                    clock: str = "wall") -> tuple[list[dict], dict[int, DeployedModel]]:
    """Per batch size: ``deploy`` for that size, then the dense model, simplify alone, the deployed
    model (and ``extra[name](batch)`` modules) timed interleaved; medians in ms of ``clock``
    (``measure_latency``).

    Returns the rows and the deployed model of each batch size.
    """
    small = nw.simplify(model, example)
    rows, deployed_models = [], {}
    for batch in batches:
        deployed = nw.deploy(model, example, batch_size=batch)
        deployed_models[batch] = deployed
        others = {name: build(batch) for name, build in (extra or {}).items()}
        inputs = example.expand(batch, *example.shape[1:]).contiguous().normal_(
            generator=torch.Generator().manual_seed(batch))
        names = ["dense", "simplified", "deployed", *others]
        seconds = measure_latency([model, small, deployed, *others.values()], inputs,
                                  repeats=repeats, clock=clock)
        row = {"batch": batch, "threads": deployed.threads,
               "kernels": {r.name: r.kernel for r in deployed.layers}}
        row.update({f"{name}_ms": 1e3 * s for name, s in zip(names, seconds)})
        row.update({f"speedup_vs_{name}": s / seconds[2] for name, s in zip(names, seconds)
                    if name != "deployed"})
        rows.append(row)
    return rows, deployed_models


def deploy_run(run_dir: str | Path, batch_size: int = 32, export: str | None = None,
               checkpoint: str = "last", repeats: int = 50) -> str:
    """Deploy a run's model for ``batch_size``; save it (``deployed.pt``) and ``deploy.json`` in
    ``export`` (default: the run directory); report latencies at batch 1, 32, 256."""
    if batch_size < 1:
        raise ValueError(f"Invalid --batch-size: {batch_size} (expected >= 1)")
    _, model, example = load_run_model(run_dir, checkpoint)
    batches = tuple(sorted({*BATCHES, batch_size}))
    rows, deployed_models = compare_latency(model, example, batches, repeats)
    deployed = deployed_models[batch_size]
    folder = Path(export) if export else RunDir(run_dir).path
    folder.mkdir(parents=True, exist_ok=True)
    nw.save_deployed(deployed, folder / "deployed.pt")
    macs = mac_counts(model, example)
    with torch.no_grad():
        difference = float((model(example) - deployed(example)).abs().max())
    summary = {"batch_size": batch_size, "macs": macs, "latency": rows,
               "layers": [vars(r) for r in deployed.layers],
               "max_abs_output_difference": difference}
    atomic_write_text(folder / "deploy.json", json.dumps(summary, indent=2, default=list) + "\n")
    ratios = {key: macs["dense"] / max(1, macs[key]) for key in ("simplified", "nonzero")}
    lines = [f"deployed model saved: {folder / 'deployed.pt'} (for batch {batch_size})",
             deployed.table(),
             (f"MACs (batch 1): dense {macs['dense']:,}, simplified {macs['simplified']:,} "
              f"(x{ratios['simplified']:.2f}), non-zero {macs['nonzero']:,} "
              f"(x{ratios['nonzero']:.2f})"),
             "latency (median ms; each batch size deployed for itself, all timed interleaved):"]
    for row in rows:
        lines.append(f"  batch {row['batch']:<4} dense {row['dense_ms']:.4f}  simplified "
                     f"{row['simplified_ms']:.4f}  deployed {row['deployed_ms']:.4f} "
                     f"(threads {row['threads']}):  x{row['speedup_vs_dense']:.2f} vs dense, "
                     f"x{row['speedup_vs_simplified']:.2f} vs simplify alone")
    lines.append(f"  max |output difference| {difference:.3g}")
    return "\n".join(lines)
