"""Measured CPU latency of each run's final model, simplified, for comparisons with ``latency:``.

Structured methods are judged by what their pruning buys at inference. A comparison that sets
``latency: {batch: B, repeats: R}`` gets, per finished run, ``RUN/latency.json``: the run's final
model (``last.pt``, epoch = the budget; the models of the selected epochs are not kept by a run, so
the selection table and this one describe different epochs) is simplified
(:func:`neuronwise.simplify`: dead neurons removed, same outputs) and timed against itself
unsimplified (the dense architecture, same weights) with
:func:`neuronwise.latency.measure_latency`, ``clock="cpu"``, one thread, both models interleaved,
the median of R rounds on a batch of B inputs. ``speedup`` = dense / simplified time of that one
interleaved measurement, so measurements taken under different machine loads stay comparable.

A run is measured once (the file is a record beside ``metrics.jsonl``); a run without ``last.pt``
(records copied without checkpoints) and without ``latency.json`` is reported as not measured.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import torch

from neuronwise.io import atomic_write_text

from .compare import REMAINING, Comparison, run_name
from .plots import png, pyplot

FILE = "latency.json"
# The simplified model must compute the same function (relative to the output scale).
_TOLERANCE = 1e-4


def measure_run(directory: Path, batch: int, repeats: int) -> dict:
    """Simplify the run's final model, time it against the unsimplified one; the record."""
    from neuronwise import metrics
    from neuronwise.latency import measure_latency
    from neuronwise.simplify import simplify

    from .tools import load_run_model

    _, model, example = load_run_model(directory, "last")
    small = simplify(model, example)
    inputs = example.expand(batch, *example.shape[1:]).contiguous().normal_(
        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(inputs)
        difference = float((small(inputs) - reference).abs().max() / reference.abs().max())
    if difference > _TOLERANCE:
        raise RuntimeError(f"{directory}: the simplified model's outputs differ by {difference:.2e} "
                           "(relative) from the model's")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense_s, small_s = measure_latency([model, small], inputs, repeats=repeats, clock="cpu")
    finally:
        torch.set_num_threads(threads)
    alive, total = metrics.count_neurons(model)["total"]
    return {
        "checkpoint": "last.pt", "batch": batch, "repeats": repeats,
        "clock": "cpu", "threads": 1, "dense_ms": 1e3 * dense_s, "simplified_ms": 1e3 * small_s,
        "speedup": dense_s / small_s, "neurons_alive": alive, "neurons_total": total,
        "params_dense": metrics.count_parameters(model, "all"),
        "params_simplified": metrics.count_parameters(small, "all"),
        "max_relative_output_difference": difference,
        "torch": torch.__version__, "machine": platform.machine(),
    }


def measure_missing(comparison: Comparison, runs: Path, log=print) -> None:
    """Write ``latency.json`` for every finished run of ``comparison`` that has none yet."""
    if comparison.latency is None:
        return
    for method in comparison.methods:
        for seed in comparison.seeds:
            directory = runs / run_name(comparison, method, seed)
            if _recorded_epoch(directory) == comparison.epochs:
                continue  # measured (a record of a shorter budget is measured again)
            if not (directory / "last.pt").is_file() or _last_epoch(directory) != comparison.epochs:
                continue  # not finished: last.pt is not the final model
            record = {"epoch": comparison.epochs,
                      **measure_run(directory, **comparison.latency)}
            atomic_write_text(directory / FILE, json.dumps(record, indent=2) + "\n")
            log(f"compare: {directory.name}: simplified final model x{record['speedup']:.2f} "
                f"(CPU time, batch {record['batch']})")


def _history(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line]


def _recorded_epoch(directory: Path) -> int | None:
    path = directory / FILE
    return json.loads(path.read_text(encoding="utf-8"))["epoch"] if path.is_file() else None


def _last_epoch(directory: Path) -> int:
    return max((line["epoch"] for line in _history(directory)), default=0)


def read_latency(comparison: Comparison, runs: Path) -> dict[str, list[dict]]:
    """Per method, the latency records of its finished runs in seed order, each with its
    ``seed`` and the remaining % and test error % of its final line of metrics.jsonl."""
    found: dict[str, list[dict]] = {}
    for method in comparison.methods:
        for seed in comparison.seeds:
            directory = runs / run_name(comparison, method, seed)
            last = [r for r in _history(directory) if r["epoch"] == comparison.epochs]
            if last and _recorded_epoch(directory) == comparison.epochs:
                record = json.loads((directory / FILE).read_text(encoding="utf-8"))
                found.setdefault(method, []).append({
                    **record, "seed": seed, "remaining_percent": last[0][REMAINING],
                    "test_error_percent": 100.0 - last[0]["test_accuracy"]})
    return found


def mean_std(values: list[float], digits: int = 2) -> str:
    spread = f"{statistics.stdev(values):.{digits}f}" if len(values) > 1 else "n/a"
    return f"{statistics.fmean(values):.{digits}f} ± {spread}"


def latency_table(comparison: Comparison, found: dict[str, list[dict]], finished: dict[str, int],
                  plot: str | None) -> list[str]:
    """Markdown lines: per method, mean ± std over the measured runs of the final model."""
    batch = comparison.latency["batch"]
    lines = ["", (f"Final models (epoch {comparison.epochs}, `last.pt`; not the selected epochs "
                  f"above), simplified: dead neurons removed, then CPU time of one forward at "
                  f"batch {batch}, one thread, interleaved with the same model unsimplified "
                  f"(median of {comparison.latency['repeats']} rounds; module "
                  f"`neuronwise.experiment.compare_latency`). Speed-up = unsimplified / "
                  f"simplified time; parameters counted after simplify (all tensors)."), "",
             "| method | n | remaining % | neurons alive | parameters | test error % | speed-up × |",
             "|---|---|---|---|---|---|---|"]
    for method in comparison.methods:
        records = found.get(method, [])
        if not records:
            lines.append(f"| {method} | 0/{finished.get(method, 0)} | not measured | — | — | — "
                         "| — |")
            continue
        column = {key: [float(r[key]) for r in records] for key in (
            "remaining_percent", "neurons_alive", "params_simplified", "test_error_percent",
            "speedup")}
        lines.append(f"| {method} | {len(records)}/{finished.get(method, 0)} "
                     f"| {mean_std(column['remaining_percent'])} "
                     f"| {mean_std(column['neurons_alive'], 1)} "
                     f"| {mean_std(column['params_simplified'], 0)} "
                     f"| {mean_std(column['test_error_percent'])} "
                     f"| {mean_std(column['speedup'])} |")
    if plot:
        lines += ["", f"![{comparison.name}: test error vs CPU latency]({plot})"]
    return lines


def latency_png(comparison: Comparison, found: dict[str, list[dict]]) -> bytes:
    """Final test error vs the simplified model's CPU time as % of the unsimplified one: each
    run a dot, each method's mean ± std a bar."""
    figure, axis = pyplot().subplots(figsize=(6, 3.8))
    for method, records in found.items():
        x = [100.0 / r["speedup"] for r in records]
        y = [r["test_error_percent"] for r in records]
        dots = axis.scatter(x, y, s=12, alpha=0.5)
        spread = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        axis.errorbar([statistics.fmean(x)], [statistics.fmean(y)], xerr=[spread(x)],
                      yerr=[spread(y)], marker="o", capsize=3, color=dots.get_facecolor()[0],
                      label=method)
    axis.set_xlabel(f"CPU time of the simplified model, % of the unsimplified "
                    f"(batch {comparison.latency['batch']}, 1 thread)")
    axis.set_ylabel("test error % (final epoch)")
    axis.set_title(f"{comparison.name}: final models, {comparison.epochs} epochs per run\n"
                   "dots: runs; bars: mean ± std", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return png(figure)
