"""``neuronwise report RUN``: a markdown summary, PNG plots, and a one-page offline HTML version.

Besides the entries every run has (loss, accuracy, sparsity, neurons), the report shows the
metrics that registered methods declare (``Metric``: plot, summary row), for those present in the
run's ``metrics.jsonl``.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from neuronwise.io import atomic_write_bytes, atomic_write_text

from . import methods
from .config import ConfigError
from .plots import png
from .plots import pyplot as _pyplot
from .rundir import RunDir, RunDirError

PLOTS = (
    ("loss.png", "Loss", ("train_loss", "val_loss", "test_loss")),
    ("accuracy.png", "Top-1 accuracy (%)", ("train_accuracy", "val_accuracy", "test_accuracy")),
    ("sparsity.png", "Remaining parameters (%, 'paper' convention)", ("remaining_percent_paper",)),
)


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout, 100 dpi); the figure is closed."""
    figure.tight_layout()
    return png(figure)


def _save(figure, axis, title: str, path: Path) -> None:
    axis.set_xlabel("epoch")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    atomic_write_bytes(path, figure_png(figure))


def _lines(series: dict[str, list[tuple]], title: str, path: Path, log: bool = False) -> bool:
    """One line per ``{label: [(epoch, value), ...]}``; False (no file) when there is none."""
    if not series:
        return False
    figure, axis = _pyplot().subplots(figsize=(6, 3.5))
    for label, points in series.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], label=label)
    if log:
        axis.set_yscale("log")
    _save(figure, axis, title, path)
    return True


def _plot(history: list[dict], keys: tuple[str, ...], title: str, path: Path) -> bool:
    series = {k: [(r["epoch"], r[k]) for r in history if k in r] for k in keys
              if any(k in r for r in history)}
    return _lines(series, title, path, log="remaining" in keys[0])


def _plot_lines(history: list[dict], key: str, title: str, path: Path) -> bool:
    """A ``{name: value}`` entry per epoch: one line per name (those of its first epoch)."""
    records = [r for r in history if key in r]
    names = records[0][key] if records else {}
    return _lines({name: [(r["epoch"], r[key][name]) for r in records] for name in names},
                  title, path)


def _plot_bands(history: list[dict], key: str, title: str, path: Path,
                reference: tuple[str, float] | None) -> bool:
    """Percentiles ``{"p0": ..., "p100": ...}`` per epoch: 10–90 % and 25–75 % bands, median,
    extremes, and an optional horizontal ``reference`` line ``(label, value)``."""
    records = [r for r in history if key in r]
    if not records:
        return False
    epochs = [r["epoch"] for r in records]
    at = lambda p: [r[key][f"p{p}"] for r in records]
    positive = [v for r in records for v in r[key].values() if v > 0]
    figure, axis = _pyplot().subplots(figsize=(6, 3.5))
    # Logarithmic above the smallest non-zero value, linear below: exact zeros stay visible.
    extra = [reference[1]] if reference and reference[1] else []
    axis.set_yscale("symlog", linthresh=min(positive + extra, default=1e-6))
    axis.fill_between(epochs, at(10), at(90), alpha=0.2, color="C0", label="10–90 %")
    axis.fill_between(epochs, at(25), at(75), alpha=0.4, color="C0", label="25–75 %")
    axis.plot(epochs, at(50), color="C0", label="median")
    axis.plot(epochs, at(0), ":", color="C0", linewidth=0.8, label="min, max")
    axis.plot(epochs, at(100), ":", color="C0", linewidth=0.8)
    if reference and reference[1]:
        axis.axhline(reference[1], color="C3", linestyle="--", label=reference[0])
    _save(figure, axis, title, path)
    return True


def _reference(run: RunDir, entry, metric) -> tuple[str, float] | None:
    """The metric's reference line, from the run's config section of the method declaring it."""
    if metric.reference is None:
        return None
    try:
        config = run.read_config()
    except ConfigError:
        return None
    if config.method != entry.name or config.section(entry.name) is None:
        return None
    return metric.reference(config.section(entry.name))


def _declared_plots(run: RunDir, history: list[dict]) -> list[tuple[str, str]]:
    """The plots of the metrics that registered methods declare, for those in the history."""
    plots = []
    for entry, metric in methods.declared_metrics():
        if metric.plot is None or not any(metric.key in r for r in history):
            continue
        path = run.path / metric.file
        if metric.plot == "line":
            drawn = _plot(history, (metric.key,), metric.description, path)
        elif metric.plot == "lines":
            drawn = _plot_lines(history, metric.key, metric.description, path)
        else:
            drawn = _plot_bands(history, metric.key, metric.description, path,
                                _reference(run, entry, metric))
        if drawn:
            plots.append((metric.file, metric.description))
    return plots


def _summary_row(history: list[dict], metric) -> tuple[str, str] | None:
    records = [r for r in history if metric.key in r]
    if not records or metric.summary is None:
        return None
    if metric.summary == "count":
        count = sum(1 for r in records if r[metric.key])
        return (metric.summary_label, str(count)) if count else None
    mean = sum(r[metric.key] for r in records) / len(records)
    if metric.summary == "mean":
        return metric.summary_label, f"{mean:.2f}{metric.unit}"
    train = sum(r["train_time_s"] for r in records) / len(records)
    return metric.summary_label, f"{mean:.3g} s ({100 * mean / train:.2f}%)"


def summarize(history: list[dict], best: dict | None = None) -> list[tuple[str, str]]:
    """The headline numbers of a run, each labelled with its convention."""
    last = history[-1]
    rows = [
        ("epochs", str(last["epoch"])),
        ("final test accuracy / error", (f"{last['test_accuracy']:.2f}% / "
                                        f"{100 - last['test_accuracy']:.2f}%")),
        ("remaining parameters ('paper': Linear+Conv2d weights+biases)",
         (f"{last['nonzero_paper']:,} of {last['params_paper']:,} "
         f"({last['remaining_percent_paper']:.3f}%)")),
        ("non-zero parameters ('all': every parameter)", f"{last['nonzero_all']:,}"),
        ("alive neurons (Linear rows / Conv2d channels with a non-zero weight)",
         f"{last['neurons_alive']} of {last['neurons_total']}"),
        ("mean training time per epoch", f"{sum(r['train_time_s'] for r in history) / len(history):.2f} s"),
    ]
    if best and best.get("epoch", 0) > 0:  # no validation split: no best epoch
        rows.append(("best validation accuracy (epoch)",
                     (f"{best['val_accuracy']:.2f}% ({best['epoch']}), "
                     f"test there {best.get('test_accuracy', float('nan')):.2f}%")))
    for _, metric in methods.declared_metrics():
        row = _summary_row(history, metric)
        if row is not None:
            rows.append(row)
    return rows


def compression_levels(history: list[dict]) -> list[dict]:
    """Per compression level (a distinct non-zero count), the epoch with the best validation
    accuracy and its test accuracy: the per-level rule of METHODS.md §8; without a validation
    split, the level's last epoch.

    A line's accuracies are measured before that epoch's callbacks zero weights and its counts
    after them, so line e measured the model of line e − 1's counts: epochs are grouped by that
    model, and each returned record (a copy) carries its counts (the first line keeps its own). A
    level left at the epoch it was reached was never measured and has no row.
    """
    best: dict[int, dict] = {}
    previous: dict | None = None
    for record in history:
        measured = dict(record)
        if previous is not None:
            for key in ("nonzero_paper", "remaining_percent_paper"):
                measured[key] = previous[key]
        previous = record
        level = measured["nonzero_paper"]
        # Without a validation split (NaN accuracy) a level is represented by its last epoch.
        later = math.isnan(measured["val_accuracy"])
        if level not in best or later or measured["val_accuracy"] > best[level]["val_accuracy"]:
            best[level] = measured
    return [best[level] for level in sorted(best, reverse=True)]


def levels_table(history: list[dict]) -> list[str]:
    """Markdown rows: remaining parameters, test error at the best-validation epoch of each level."""
    rows = ["| remaining params ('paper') | remaining % | compression | test error % | epoch |",
            "|---|---|---|---|---|"]
    for r in compression_levels(history):
        ratio = r["params_paper"] / max(r["nonzero_paper"], 1)
        rows.append(f"| {r['nonzero_paper']:,} | {r['remaining_percent_paper']:.3f} | "
                    f"{ratio:.1f}x | {100 - r['test_accuracy']:.2f} | {r['epoch']} |")
    return rows


def write_report(run_path: str | Path) -> Path:
    run = RunDir(run_path)
    if not run.path.is_dir():
        raise RunDirError(f"{run.path}: run directory not found")
    history = run.read_metrics()
    if not history:
        raise RunDirError(f"{run.metrics_path}: no finished epoch to report")
    best = None
    if run.last_path.exists():
        from .rundir import load_checkpoint

        best = load_checkpoint(run.last_path).get("best")
    config_text = run.config_path.read_text() if run.config_path.exists() else "(missing)"
    info = run.path / "run_info.json"
    plots = [(name, title) for name, title, keys in PLOTS
             if _plot(history, keys, title, run.path / name)]
    plots += _declared_plots(run, history)
    rows = summarize(history, best)
    lines = [f"# Report: {run.path.name}", ""]
    if info.exists():
        lines += ["Produced by (see run_info.json):", "", "```json", info.read_text().strip(), "```", ""]
    lines += ["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    validated = any(not math.isnan(r["val_accuracy"]) for r in history)
    lines += ["", "## Per compression level", "",
              ("Test error at the best-validation-accuracy epoch of each compression level "
               "(METHODS.md §8)." if validated else
               "Test error at the last epoch of each compression level (no validation split: "
               "data.val_fraction is 0, so no best epoch and no best.pt)."), ""] + levels_table(history)
    lines += [""] + [f"![{title}]({name})" for name, title in plots]
    lines += ["", "## Config", "", "```yaml", config_text.strip(), "```", ""]
    markdown = "\n".join(lines)
    atomic_write_text(run.path / "report.md", markdown)
    atomic_write_text(run.path / "report.html", _html(run.path, rows, plots, config_text))
    return run.path / "report.md"


def _html(folder: Path, rows, plots, config_text: str) -> str:
    """One self-contained page: plots embedded as data URIs, viewable offline."""
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    images = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / n).read_bytes()).decode()}"><figcaption>{html.escape(t)}'
        "</figcaption></figure>" for n, t in plots)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>neuronwise report: {html.escape(folder.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
        "td{border-bottom:1px solid #ddd;padding:4px 8px}img{max-width:100%}</style></head><body>"
        f"<h1>Report: {html.escape(folder.name)}</h1><table>{table}</table>{images}"
        f"<h2>Config</h2><pre>{html.escape(config_text)}</pre></body></html>"
    )
