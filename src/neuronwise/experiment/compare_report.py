"""Records of comparisons: ``comparisons.csv``, its mean ± std tables and plots, and their check.

The CSV holds one row per (comparison, method, seed, target reached) with exactly the columns
:data:`COLUMNS`; ``run`` is the folder under the runs directory and ``epoch`` the line of its
metrics.jsonl whose numbers the row quotes (:func:`check_csv` verifies that they are found there).
The tables and plots are generated from the same rows: mean and sample standard deviation
(n − 1) over the seeds that reached a target.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path

from neuronwise.io import atomic_write_bytes, atomic_write_text

from .compare import REMAINING, Comparison, first_epoch_at, run_name, selections, targets_of
from .compare_latency import latency_png, latency_table, mean_std, read_latency

COLUMNS = ("comparison", "method", "seed", "run", "epoch", "epochs_budget", "remaining_percent",
           "test_error_percent")
# Numbers are written with 6 decimals; the check allows that rounding.
_TOLERANCE = 1e-6


def _history(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def comparison_rows(comparison: Comparison, runs: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """CSV rows of the finished runs, and per method the runs still missing or unfinished
    (``"s1 (40/100 epochs)"``)."""
    rows: list[dict] = []
    notes: dict[str, list[str]] = {m: [] for m in comparison.methods}
    for method in comparison.methods:
        for seed in comparison.seeds:
            name = run_name(comparison, method, seed)
            history = _history(runs / name)
            done = max((r["epoch"] for r in history), default=0)
            if done != comparison.epochs:
                notes[method].append(f"s{seed} ({done}/{comparison.epochs} epochs)")
                continue
            for chosen in selections(comparison, method, history):
                line = next(r for r in history if r["epoch"] == chosen.epoch)
                rows.append({
                    "comparison": comparison.name, "method": method, "seed": seed, "run": name,
                    "epoch": chosen.epoch, "epochs_budget": comparison.epochs,
                    "remaining_percent": f"{chosen.remaining_percent:.6f}",
                    "test_error_percent": f"{chosen.test_error_percent:.6f}",
                    "val_error_percent": 100.0 - chosen.val_accuracy,
                    "target": chosen.target, "neurons": line.get("neurons_alive"),
                })
    return rows, notes


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: expected the columns {','.join(COLUMNS)}, "
                             f"got {','.join(reader.fieldnames or [])}")
        return list(reader)


def write_csv(path: Path, comparison: str, rows: list[dict]) -> None:
    """Replace ``comparison``'s rows of the CSV at ``path`` by ``rows``, keeping the others."""
    kept = [r for r in read_csv(path) if r["comparison"] != comparison]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept + rows)
    atomic_write_text(path, buffer.getvalue())


def check_csv(path: Path, runs: Path) -> list[str]:
    """Every way the CSV disagrees with the run records (empty: each row is found at its epoch)."""
    problems = []
    for number, row in enumerate(read_csv(path), start=2):
        where = f"{path}:{number} ({row['run']}, epoch {row['epoch']})"
        lines = [r for r in _history(runs / row["run"]) if r["epoch"] == int(row["epoch"])]
        if not lines:
            problems.append(f"{where}: no such line in {runs / row['run'] / 'metrics.jsonl'}")
            continue
        line = lines[0]
        expected = {"remaining_percent": line[REMAINING],
                    "test_error_percent": 100.0 - line["test_accuracy"]}
        for key, value in expected.items():
            if abs(float(row[key]) - value) > _TOLERANCE:
                problems.append(f"{where}: {key} {row[key]} but the line gives {value:.6f}")
        last = max(r["epoch"] for r in _history(runs / row["run"]))
        if last != int(row["epochs_budget"]):
            problems.append(f"{where}: epochs_budget {row['epochs_budget']} but the run has {last}")
    return problems




def summary(comparison: Comparison, rows: list[dict]) -> dict:
    """{(target, method): {"seeds": [...], "remaining": [...], "error": [...], "val": [...]}} from
    the rows of :func:`comparison_rows` (which carry their ``target`` and validation error)."""
    table: dict = {}
    for row in rows:
        cell = table.setdefault((row["target"], row["method"]),
                                {"seeds": [], "remaining": [], "error": [], "val": [],
                                 "neurons": []})
        cell["seeds"].append(int(row["seed"]))
        if row.get("neurons") is not None:
            cell["neurons"].append(float(row["neurons"]))
        cell["remaining"].append(float(row["remaining_percent"]))
        cell["error"].append(float(row["test_error_percent"]))
        cell["val"].append(float(row["val_error_percent"]))
    return table


def time_to_target(comparison: Comparison, runs: Path) -> dict[str, list[int | None]]:
    """Per method, the epoch of :func:`first_epoch_at` of each finished run (None: not met)."""
    remaining, error = comparison.time_to_target
    result: dict[str, list[int | None]] = {}
    for method in comparison.methods:
        for seed in comparison.seeds:
            history = _history(runs / run_name(comparison, method, seed))
            if max((r["epoch"] for r in history), default=0) != comparison.epochs:
                continue
            line = first_epoch_at(history, remaining, error)
            result.setdefault(method, []).append(None if line is None else int(line["epoch"]))
    return result


def _time_table(comparison: Comparison, times: dict) -> list[str]:
    remaining, error = comparison.time_to_target
    title = (f"Time to target (first epoch with ≤ {remaining:g} % of the parameters at "
             f"≤ {error:g} % test error; a measurement on the test set, not a selection):")
    lines = ["", title, "",
             "| method | met | epochs (mean ± std over the runs that met it) |", "|---|---|---|"]
    for method in comparison.methods:
        epochs = [e for e in times.get(method, []) if e is not None]
        finished = len(times.get(method, []))
        spread = mean_std([float(e) for e in epochs]) if epochs else "—"
        lines.append(f"| {method} | {len(epochs)}/{finished} | {spread} |")
    return lines


def markdown(comparison: Comparison, rows: list[dict], notes: dict[str, list[str]],
             plot: str | None, time_rows: dict | None = None,
             latency: tuple[dict, str | None] | None = None) -> str:
    """The comparison's section: settings, one mean ± std table row per (target, method)."""
    table = summary(comparison, rows)
    targets = sorted({t for m in comparison.methods for t in targets_of(comparison, m)},
                     reverse=True)
    seeds = ", ".join(str(s) for s in comparison.seeds)
    lines = [
        f"## {comparison.name}", "",
        (f"Budget {comparison.epochs} epochs per run, seeds {seeds}; per target, the "
         f"best-validation epoch among the first {comparison.candidates} epochs at or below the "
         f"target (module `neuronwise.experiment.compare`). Mean ± sample std over the seeds that "
         f"reached the target; `n` = how many did, of the finished runs. The validation error "
         f"(at the same epochs) is what a choice between settings may use."), "",
        "| target ≤ % | method | n | remaining % | validation error % | test error % |",
        "|---|---|---|---|---|---|"]
    neurons = comparison.latency is not None  # structured: the selected epochs' alive neurons
    if neurons:
        lines[-2:] = [("| target ≤ % | method | n | remaining % | neurons alive | "
                       "validation error % | test error % |"), "|---|---|---|---|---|---|---|"]
    for target in targets:
        for method in comparison.methods:
            if target not in targets_of(comparison, method):
                continue
            finished = len(comparison.seeds) - len(notes[method])
            cell = table.get((target, method))
            empty = " — |" * (3 if neurons else 2)
            if finished == 0:
                lines.append(f"| {target:g} | {method} | 0/0 | no finished run |{empty}")
            elif cell is None:
                lines.append(f"| {target:g} | {method} | 0/{finished} | not reached |{empty}")
            else:
                alive = f" {mean_std(cell['neurons'], 1)} |" if neurons else ""
                lines.append(f"| {target:g} | {method} | {len(cell['seeds'])}/{finished} "
                             f"| {mean_std(cell['remaining'])} |{alive} "
                             f"{mean_std(cell['val'])} | {mean_std(cell['error'])} |")
    if comparison.time_to_target and time_rows is not None:
        lines += _time_table(comparison, time_rows)
    if latency is not None:
        finished = {m: len(comparison.seeds) - len(n) for m, n in notes.items()}
        lines += latency_table(comparison, latency[0], finished, latency[1])
    waiting = [f"{m} {', '.join(n)}" for m, n in notes.items() if n]
    if waiting:
        lines += ["", "Not finished (not in the table): " + "; ".join(waiting) + "."]
    if plot:
        lines += ["", f"![{comparison.name}: test error vs remaining parameters]({plot})"]
    return "\n".join(lines) + "\n"


def plot_png(comparison: Comparison, rows: list[dict]) -> bytes:
    """Test error vs remaining parameters (log x): per method the means over seeds at each target,
    with ± std bars on both axes and a ± std band on the error."""
    from .report import _pyplot, figure_png

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.8))
    table = summary(comparison, rows)
    for method in comparison.methods:
        cells = sorted((v for (t, m), v in table.items() if m == method),
                       key=lambda c: -statistics.fmean(c["remaining"]))
        if not cells:
            continue
        x = [statistics.fmean(c["remaining"]) for c in cells]
        y = [statistics.fmean(c["error"]) for c in cells]
        dx = [statistics.stdev(c["remaining"]) if len(c["remaining"]) > 1 else 0.0 for c in cells]
        dy = [statistics.stdev(c["error"]) if len(c["error"]) > 1 else 0.0 for c in cells]
        bars = axis.errorbar(x, y, xerr=dx, yerr=dy, marker="o", capsize=3, label=method)
        axis.fill_between(x, [a - b for a, b in zip(y, dy)], [a + b for a, b in zip(y, dy)],
                          alpha=0.15, color=bars[0].get_color())
    axis.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    axis.xaxis.set_major_formatter(ScalarFormatter())
    axis.xaxis.set_minor_formatter(ScalarFormatter())
    axis.set_xlabel("remaining parameters % ('paper' convention)")
    axis.set_ylabel("test error %")
    axis.set_title(f"{comparison.name}: {comparison.epochs} epochs per run\n"
                   f"mean ± std over the finished seeds (n in the table)", fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    return figure_png(figure)


def write_records(comparison: Comparison, runs: Path, results: Path
                  ) -> tuple[Path, dict[str, list[str]]]:
    """Rewrite this comparison's CSV rows, its section file and its plot under ``results``.

    Returns the section's path and the runs left out (unfinished), per method. The section is
    ``results/comparisons/NAME.md`` with ``NAME.png`` beside it; an index of all sections is
    ``results/comparisons.md``.
    """
    rows, notes = comparison_rows(comparison, runs)
    write_csv(results / "comparisons.csv", comparison.name, rows)
    folder = results / "comparisons"
    plot = None
    if rows:
        atomic_write_bytes(folder / f"{comparison.name}.png", plot_png(comparison, rows))
        plot = f"{comparison.name}.png"
    section = folder / f"{comparison.name}.md"
    times = time_to_target(comparison, runs) if comparison.time_to_target else None
    latency = None
    if comparison.latency is not None:
        found = read_latency(comparison, runs)
        latency_plot = None
        if found:
            latency_plot = f"{comparison.name}-latency.png"
            atomic_write_bytes(folder / latency_plot, latency_png(comparison, found))
        latency = (found, latency_plot)
    atomic_write_text(section, markdown(comparison, rows, notes, plot, times, latency))
    _write_index(results)
    return section, notes


def _write_index(results: Path) -> None:
    sections = sorted((results / "comparisons").glob("*.md"))
    text = ["# Comparisons", "",
            "Generated by `neuronwise compare` from `comparisons.csv` (do not edit by hand).", ""]
    text += [f"- [{s.stem}](comparisons/{s.name})" for s in sections]
    atomic_write_text(results / "comparisons.md", "\n".join(text) + "\n")



_QUOTE = re.compile(r"(<!-- generated from (\S+): do not edit -->\n)(.*?)(<!-- end of generated -->)",
                    re.DOTALL)


def refresh_quotes(document: Path) -> list[str]:
    """Replace each quoted block of ``document`` by the current text of the file it names.

    A block is ``<!-- generated from PATH: do not edit -->`` … ``<!-- end of generated -->``, PATH
    relative to the document (e.g. ``results/comparisons/lenet300-mnist.md`` in docs/RESULTS.md);
    the quoted section's own ``## `` title and relative links are adapted to the document's folder.
    Returns the quoted paths.
    """
    if not document.is_file():
        return []
    text = document.read_text(encoding="utf-8")
    quoted: list[str] = []

    def body(match: re.Match) -> str:
        source = document.parent / match.group(2)
        quoted.append(match.group(2))
        if not source.is_file():
            return match.group(0)
        lines = source.read_text(encoding="utf-8").splitlines()
        folder = Path(match.group(2)).parent.as_posix()
        content = "\n".join(f"#{line}" if line.startswith("## ") else line for line in lines)
        content = re.sub(r"\]\((?!https?:|/)([^)]+)\)", rf"]({folder}/\1)", content)
        return f"{match.group(1)}{content}\n{match.group(4)}"

    updated = _QUOTE.sub(body, text)
    if updated != text:
        atomic_write_text(document, updated)
    return quoted
