"""The report of ``neuronwise study``: ``study.json``, ``study.md`` and PNG plots from the stages'
analysis records (``study.py`` trains and analyses the stages)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from neuronwise.entropy import LayerEntropy
from neuronwise.io import atomic_write_bytes, atomic_write_text
from neuronwise.sharpness import LandscapeSlice

from .analysis import entropy_summary
from .plots import classwise_png, entropy_histograms_png, landscape_png, png, pyplot

if TYPE_CHECKING:
    from .study import StudyConfig


def _entropies(record: dict) -> dict[str, LayerEntropy]:
    return {n: LayerEntropy(e["per_unit"], e["per_class"], e["p_on"], e["class_counts"],
                            tuple(e["unit_shape"])) for n, e in record["entropy"].items()}


def _slice(entry: dict) -> LandscapeSlice:
    return LandscapeSlice(entry["alphas"], entry["losses"])


def _commits_text(commits: dict[str, str | None]) -> str:
    if len(set(commits.values())) == 1:
        return f"commit `{next(iter(commits.values()))}`"
    return "commits: " + ", ".join(f"{s} `{c}`" for s, c in commits.items())


def _std_text(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def write_report(study: StudyConfig, study_dir: Path, records: dict[str, dict],
                 sparsity: float, command: str | None = None) -> Path:
    """``study.json``, ``study.md`` and the PNG plots from the stages' analysis records."""
    sigmas = [float(s) for s in study.analysis.sigmas]
    summaries = {s: r["summary"] for s, r in records.items()}
    entropies = {stage: _entropies(r) for stage, r in records.items()}
    layers = list(entropies["dense"])
    commits = {}
    for stage in records:
        info = study_dir / stage / "run_info.json"
        if info.exists():
            commits[stage] = json.loads(info.read_text()).get("commit")
    table = {}
    for stage, r in records.items():
        s = summaries[stage]
        table[stage] = {
            "test_error_percent": s["error"], "test_loss": s["loss"],
            "sparsity_percent": 100 * r["sparsity"], "zeros": r["zeros"], "total": r["total"],
            "remaining_percent_paper": r["remaining_percent_paper"],
            "neurons_alive": r["neurons_alive"], "neurons_total": r["neurons_total"],
            "psp_entropy_bits": entropy_summary(entropies[stage]), "sharpness": s["sharpness"],
            "transfer": r["transfer"],
        }
    report = {"name": study.name, "command": command, "commits": commits,
              "target_sparsity_percent": 100 * sparsity, "transfer_dataset": study.transfer.dataset,
              "study": study.to_dict(), "stages": table}
    atomic_write_text(study_dir / "study.json", json.dumps(report, indent=2) + "\n")

    plots = {
        "entropy_means.png": _entropy_bars_png(entropies, layers),
        "entropy_hist.png": entropy_histograms_png(entropies),
        "classwise.png": classwise_png(
            {s: e[records[s]["classwise_layer"]] for s, e in entropies.items()},
            records["dense"]["classwise_layer"]),
        "sharpness.png": _sharpness_png(summaries, sigmas),
        "landscape.png": landscape_png({s: _slice(r["landscape"]) for s, r in records.items()},
                                       "random filter-normalized direction (surviving weights)",
                                       "α"),
        "to_dense.png": landscape_png(
            {s: _slice(r["to_dense"]) for s, r in records.items() if r["to_dense"]},
            "line from each pruned model (α = 0) to the dense one (α = 1)", "α"),
    }
    if study.transfer.dataset is not None:
        plots["transfer.png"] = _transfer_png(records, study.transfer.dataset)
    for name, image in plots.items():
        atomic_write_bytes(study_dir / name, image)

    lines = [f"# One-shot vs gradual pruning: {study.name}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    base = records["dense"]
    lines += [
        f"From one dense model (`dense/`, {study.dense_epochs} epochs), gradual LOBSTER pruning "
        f"(`gradual/`) ran {study.budget_epochs} epochs and reached **{100 * sparsity:.3f}%** "
        f"sparsity ({records['gradual']['zeros']:,} of {base['total']:,} parameters of "
        "Linear/Conv2d/BatchNorm2d are zero). One-shot global magnitude pruning to the same "
        f"count plus masked fine-tuning (`oneshot/`) and {study.iterative_rounds} iterative "
        f"magnitude rounds (`iterative/`) had the same {study.budget_epochs} epochs. Every "
        "number is measured on the final (`last.pt`) model on the test set; "
        + _commits_text(commits) + ".", "",
        "| stage | test error % | sparsity % (P) | remaining % ('paper') | neurons alive |"
        + (f" transfer → {study.transfer.dataset} acc. % |" if study.transfer.dataset else ""),
        "|---|---|---|---|---|" + ("---|" if study.transfer.dataset else ""),
    ]
    for stage, row in table.items():
        transfer = (f" {row['transfer']['test_accuracy']:.2f} |"
                    if study.transfer.dataset else "")
        lines.append(f"| {stage} | {row['test_error_percent']:.2f} | "
                     f"{row['sparsity_percent']:.3f} | {row['remaining_percent_paper']:.3f} | "
                     f"{row['neurons_alive']}/{row['neurons_total']} |{transfer}")
    lines += ["", ("PSP-entropy per layer in bits: mean H(u) over all units / over the units on "
                   "at least once (fraction of units never on):"), "",
              "| stage | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for stage, row in table.items():
        cells = [f"{e['mean']:.3f} / {e['live_mean']:.3f} ({e['never_on_fraction']:.2f})"
                 for e in (row["psp_entropy_bits"][n] for n in layers)]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    probe_samples = (f"the first {study.analysis.limit:,} test samples"
                     if study.analysis.limit else "the test set")
    lines += ["", (f"Sharpness: mean loss increase (± sample std) over {study.analysis.draws} "
              f"draws of noise σ·rms(w) on surviving weights, on {probe_samples}:"), "",
              "| stage | base loss | " + " | ".join(f"σ = {s}" for s in sigmas) + " |",
              "|---|---|" + "---|" * len(sigmas)]
    for stage, row in table.items():
        s = row["sharpness"]
        cells = [f"{m:.4f} ± {_std_text(d)}" for m, d in zip(s["mean_increase"], s["std"])]
        lines.append(f"| {stage} | {s['base_loss']:.4f} | " + " | ".join(cells) + " |")
    lines += ["", ("The paper's claim (unverified): gradual pruning beats one-shot and reaches "
              "narrow (sharp), well-generalizing minima with less class-specific features "
              "(higher PSP-entropy), which should transfer better. A low layer mean is ambiguous: "
              "dead units sit at the entropy floor, so the mean over live units is shown "
              "beside it."), ""]
    captions = {
        "entropy_means.png": "Mean PSP-entropy per layer",
        "entropy_hist.png": "Histograms of H(u) per layer",
        "classwise.png": "Class-wise matrix H_c(u)",
        "sharpness.png": "Sharpness curves",
        "landscape.png": "Loss along a random direction",
        "to_dense.png": "Loss on the line to the dense model",
        "transfer.png": "Transfer: linear probe on frozen features",
    }
    lines += [f"![{captions[name]}]({name})" for name in plots]
    path = study_dir / "study.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _entropy_bars_png(entropies: dict[str, dict[str, LayerEntropy]], layers: list[str]) -> bytes:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(1.6 + 1.5 * len(layers), 3.6))
    width = 0.8 / len(entropies)
    for i, (stage, layer_entropy) in enumerate(entropies.items()):
        positions = [j + (i - (len(entropies) - 1) / 2) * width for j in range(len(layers))]
        axis.bar(positions, [layer_entropy[n].mean for n in layers], width, label=stage)
    axis.set_xticks(range(len(layers)), layers)
    axis.set_ylabel("mean H(u) (bits)")
    axis.set_title("PSP-entropy per layer", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return png(figure)


def _sharpness_png(summaries: dict[str, dict], sigmas: list[float]) -> bytes:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for stage, s in summaries.items():
        std = [0.0 if d is None else d for d in s["sharpness"]["std"]]
        axis.errorbar(sigmas, s["sharpness"]["mean_increase"], yerr=std, marker="o", capsize=3,
                      label=stage)
    axis.set_xscale("log")
    axis.set_xlabel("σ (noise std relative to rms(w))")
    axis.set_ylabel("mean loss increase")
    axis.set_title("Sharpness", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return png(figure)


def _transfer_png(records: dict[str, dict], dataset: str) -> bytes:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.4))
    stages = list(records)
    values = [records[s]["transfer"]["test_accuracy"] for s in stages]
    axis.bar(stages, values)
    for x, v in enumerate(values):
        axis.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    axis.set_ylim(max(0.0, min(values) - 10), 100)
    axis.set_ylabel("test accuracy (%)")
    axis.set_title(f"linear probe on frozen features, {dataset}", fontsize=10)
    figure.tight_layout()
    return png(figure)
