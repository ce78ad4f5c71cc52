"""Records of a training comparison (``kind: training``): methods that prune nothing, e.g. NEq and
its random / top-k baselines against dense training.

A run's result is the best-validation epoch among its last K epochs (:func:`.compare.select_last`);
its row of ``comparisons.csv`` has the same columns as a pruning comparison's (remaining 100 %).

**Time to reference** (``time_to_reference: {method: M, margin: D}``): with ā the mean test
accuracy of M's results (the rows, over M's finished seeds), a run's time is its first epoch e with
test accuracy ≥ ā − D, reported as e and as the cumulative training time up to it,

    T(e) = Σ_{i ≤ e} (t_train(i) + t_probe(i)),

where t_train is the epoch's training loop (``train_time_s``) and t_probe NEq's step after it
(``neq_time_s``: probe pass over Ξ, velocities, next frozen set; 0 for a method without one), on
two clocks: wall time, and the process's CPU time (``train_cpu_time_s`` + ``neq_cpu_time_s``),
which leaves out the time slices other processes of a shared machine take. The validation and test
evaluations are not counted (the same for every method, and not part of training). It is a
measurement on the test set, not a selection.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from neuronwise.io import atomic_write_bytes, atomic_write_text

from .compare import Comparison, run_name
from .compare_latency import mean_std
from .compare_report import _history, _write_index, comparison_rows, write_csv

# (wall, CPU) keys of the training loop and of a method's step after it, per metrics.jsonl line.
CLOCKS = {"wall": ("train_time_s", "neq_time_s"), "cpu": ("train_cpu_time_s", "neq_cpu_time_s")}


def cumulative_time(history: list[dict], clock: str) -> list[float] | None:
    """T(1), T(2), … on ``clock`` ("wall" or "cpu"); None if a line lacks the training time."""
    train, step = CLOCKS[clock]
    total, times = 0.0, []
    for line in sorted(history, key=lambda r: r["epoch"]):
        if train not in line:
            return None
        total += line[train] + line.get(step, 0.0)
        times.append(total)
    return times


def reference_accuracy(comparison: Comparison, rows: list[dict]) -> float | None:
    """ā − D: the reference method's mean test accuracy of its rows minus the margin."""
    spec = comparison.time_to_reference
    errors = [float(r["test_error_percent"]) for r in rows if r["method"] == spec["method"]]
    return 100.0 - statistics.fmean(errors) - spec["margin"] if errors else None


def first_at(history: list[dict], accuracy: float) -> dict | None:
    """The first line (by epoch) with test accuracy ≥ ``accuracy``, with its cumulative times."""
    ordered = sorted(history, key=lambda r: r["epoch"])
    wall, cpu = cumulative_time(ordered, "wall"), cumulative_time(ordered, "cpu")
    for index, line in enumerate(ordered):
        if line["test_accuracy"] >= accuracy:
            return {"epoch": int(line["epoch"]), "wall_s": None if wall is None else wall[index],
                    "cpu_s": None if cpu is None else cpu[index]}
    return None


def _finished(comparison: Comparison, runs: Path, method: str) -> list[list[dict]]:
    histories = [_history(runs / run_name(comparison, method, seed)) for seed in comparison.seeds]
    return [h for h in histories if max((r["epoch"] for r in h), default=0) == comparison.epochs]


def _mean(history: list[dict], key: str) -> float | None:
    values = [line[key] for line in history if key in line]
    return statistics.fmean(values) if values else None


def _spread(values: list) -> str:
    values = [v for v in values if v is not None]
    return mean_std(values) if values else "—"


def markdown(comparison: Comparison, runs: Path, rows: list[dict], notes: dict[str, list[str]],
             plot: str | None) -> str:
    seeds = ", ".join(str(s) for s in comparison.seeds)
    lines = [
        f"## {comparison.name}", "",
        (f"Budget {comparison.epochs} epochs per run, seeds {seeds}; nothing is pruned. A run's "
         f"result is the best-validation epoch among its last {comparison.candidates} epochs "
         f"(module `neuronwise.experiment.compare_training`). Mean ± sample std over the finished "
         f"runs; frozen % and backward FLOPs saved % are means over all epochs of a run, then over "
         f"runs; s/epoch: the training loop's mean time per epoch, wall and process CPU clocks "
         f"(machine load varies)."), "",
        ("| method | n | test error % | epoch | frozen %, mean | backward FLOPs saved % "
         "| wall s/epoch | CPU s/epoch |"), "|---|---|---|---|---|---|---|---|"]
    for method in comparison.methods:
        done = _finished(comparison, runs, method)
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            lines.append(f"| {method} | 0/{len(done)} | no finished run | — | — | — | — | — |")
            continue
        lines.append(
            f"| {method} | {len(mine)}/{len(done)} "
            f"| {_spread([float(r['test_error_percent']) for r in mine])} "
            f"| {_spread([float(r['epoch']) for r in mine])} "
            f"| {_spread([_mean(h, 'frozen_percent') or 0.0 for h in done])} "
            f"| {_spread([_mean(h, 'backward_saving_percent') or 0.0 for h in done])} "
            f"| {_spread([_mean(h, 'train_time_s') for h in done])} "
            f"| {_spread([_mean(h, 'train_cpu_time_s') for h in done])} |")
    if comparison.time_to_reference:
        lines += _time_table(comparison, runs, rows)
    waiting = [f"{m} {', '.join(n)}" for m, n in notes.items() if n]
    if waiting:
        lines += ["", "Not finished (not in the tables): " + "; ".join(waiting) + "."]
    if plot:
        lines += ["", f"![{comparison.name}: test error vs cumulative training time]({plot})"]
    return "\n".join(lines) + "\n"


def _time_table(comparison: Comparison, runs: Path, rows: list[dict]) -> list[str]:
    spec, goal = comparison.time_to_reference, reference_accuracy(comparison, rows)
    lines = ["", (f"Time to reference: the first epoch with test accuracy ≥ the mean of "
                  f"{spec['method']}'s results − {spec['margin']:g} points"
                  + (f" = {goal:.2f} %" if goal is not None else " (no finished run yet)")
                  + "; time = cumulative training loop + NEq probe pass (step) up to it, wall "
                  "clock and process CPU time (module docstring). A measurement on the test set, "
                  "not a selection. Means ± std over the runs that met it."), "",
             "| method | met | epochs | wall s | CPU s |", "|---|---|---|---|---|"]
    for method in comparison.methods:
        done = _finished(comparison, runs, method)
        hits = [first_at(h, goal) for h in done] if goal is not None else []
        hits = [h for h in hits if h is not None]
        lines.append(f"| {method} | {len(hits)}/{len(done)} "
                     f"| {_spread([float(h['epoch']) for h in hits])} "
                     f"| {_spread([h['wall_s'] for h in hits])} "
                     f"| {_spread([h['cpu_s'] for h in hits])} |")
    return lines


def plot_png(comparison: Comparison, runs: Path, goal: float | None) -> bytes | None:
    """Test error vs cumulative training time (CPU clock where recorded, else wall): per method
    the mean over finished runs at each epoch, with a ± std band; dashed: the reference target."""
    from .report import _pyplot, figure_png

    finished = {m: _finished(comparison, runs, m) for m in comparison.methods}
    if not any(finished.values()):
        return None
    every = [h for done in finished.values() for h in done]
    clock = "cpu" if all(cumulative_time(h, "cpu") for h in every) else "wall"
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    floor = 100.0
    for method, done in finished.items():
        if not done:
            continue
        series = []
        for history in done:
            ordered = sorted(history, key=lambda r: r["epoch"])
            series.append((cumulative_time(ordered, clock),
                           [100.0 - r["test_accuracy"] for r in ordered]))
        x = [statistics.fmean(column) for column in zip(*(s[0] for s in series))]
        errors = list(zip(*(s[1] for s in series)))
        y = [statistics.fmean(column) for column in errors]
        dy = [statistics.stdev(column) if len(column) > 1 else 0.0 for column in errors]
        (line,) = axis.plot(x, y, label=f"{method} (n={len(done)})")
        axis.fill_between(x, [a - b for a, b in zip(y, dy)], [a + b for a, b in zip(y, dy)],
                          alpha=0.15, color=line.get_color())
        floor = min(floor, *y)
    if goal is not None:
        axis.axhline(100.0 - goal, linestyle="--", color="black", linewidth=1,
                     label=f"reference − margin ({100.0 - goal:.2f} % error)")
    axis.set_xlabel(f"cumulative training + probe time, s ({clock} clock)")
    axis.set_ylabel("test error %")
    axis.set_ylim(floor - 0.5, floor + 4.0)  # the late epochs, where the methods differ
    axis.set_title(f"{comparison.name}: {comparison.epochs} epochs per run, mean ± std",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure_png(figure)


def write_records(comparison: Comparison, runs: Path, results: Path
                  ) -> tuple[Path, dict[str, list[str]]]:
    """:func:`.compare_report.write_records` for a training comparison: its CSV rows, then
    ``results/comparisons/NAME.md`` (and ``NAME.png`` once a run finished) and the index."""
    rows, notes = comparison_rows(comparison, runs)
    write_csv(results / "comparisons.csv", comparison.name, rows)
    folder = results / "comparisons"
    goal = reference_accuracy(comparison, rows) if comparison.time_to_reference else None
    png = plot_png(comparison, runs, goal)
    plot = None
    if png is not None:
        atomic_write_bytes(folder / f"{comparison.name}.png", png)
        plot = f"{comparison.name}.png"
    section = folder / f"{comparison.name}.md"
    atomic_write_text(section, markdown(comparison, runs, rows, notes, plot))
    _write_index(results)
    return section, notes
