"""neuronwise compare: selection rule, records, and the check of comparisons.csv against the runs."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest

from neuronwise.experiment.cli import main
from neuronwise.experiment.compare import first_epoch_at, load_comparison, run_config, select
from neuronwise.experiment.compare_report import COLUMNS, check_csv, read_csv, refresh_quotes

ROOT = Path(__file__).resolve().parents[1]


def _line(epoch, remaining, val, test):
    return {"epoch": epoch, "remaining_percent_paper": remaining, "val_accuracy": val,
            "test_accuracy": test}


def test_select_takes_the_first_unpruned_epochs_below_the_target_and_the_best_validation():
    history = [
        _line(1, 100.0, 90.0, 90.0),
        _line(2, 40.0, 99.0, 99.0),   # pruned at its end: measured at 100 %, not a candidate
        _line(3, 40.0, 95.0, 94.0),
        _line(4, 30.0, 99.5, 99.5),   # pruned again: not a candidate
        _line(5, 30.0, 96.0, 95.5),
        _line(6, 30.0, 96.0, 91.0),   # ties epoch 5 on validation: the earlier one wins
        _line(7, 30.0, 99.9, 99.9),   # a 4th candidate, beyond candidates=3
    ]
    chosen = select(history, target=50.0, candidates=3)
    assert (chosen.epoch, chosen.remaining_percent) == (5, 30.0)
    assert chosen.test_error_percent == pytest.approx(4.5)
    assert select(history, target=50.0, candidates=4).epoch == 7
    assert select(history, target=50.0, candidates=5) is None  # only 4 candidates exist
    assert select(history, target=20.0, candidates=1) is None  # never reached
    # Before any pruning the first epoch is a candidate (r(0) = 100).
    assert select(history, target=100.0, candidates=1).epoch == 1


def test_time_to_target_is_the_first_unpruned_epoch_meeting_both_bounds():
    history = [
        _line(1, 100.0, 90.0, 99.0),
        _line(2, 5.0, 90.0, 99.5),   # pruned at its end: measured at 100 %
        _line(3, 5.0, 90.0, 97.0),   # 3 % error: above the bound
        _line(4, 5.0, 90.0, 98.5),
        _line(5, 5.0, 90.0, 99.0),
    ]
    assert first_epoch_at(history, remaining=5.0, error=1.5)["epoch"] == 4
    assert first_epoch_at(history, remaining=4.0, error=1.5) is None
    assert first_epoch_at(history, remaining=5.0, error=0.5) is None


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
data: {name: digits, val_fraction: 0.2, batch_size: 64, limit_train: 400}
model: {name: mlp}
optim: {name: sgd, lr: 0.1}
train: {epochs: 1, seed: 0}
"""


@pytest.fixture
def comparison(tmp_path: Path) -> Path:
    lobster = _write(tmp_path / "lobster.yaml", BASE + "method: lobster\nlobster: {lam: 1.0e-3}\n"
                     "pruning: {schedule: plateau, patience: 1, tolerance: 0.5}\n")
    iterative = _write(tmp_path / "iterative.yaml",
                       BASE + "pruning: {schedule: iterative, fraction: 0.5, every: 2}\n")
    return _write(tmp_path / "cmp.yaml", f"""
name: tiny
epochs: 6
seeds: [0, 1]
candidates: 1
targets: [100, 50]
time_to_target: [50, 100]
methods:
  lobster: {{config: {lobster}}}
  iterative: {{config: {iterative}, set: [pruning.sparsity=0.5]}}
  oneshot: {{config: {iterative}, set: [pruning.schedule=oneshot, pruning.start_epoch=2,
             pruning.sparsity=0.75], targets: [50]}}
""")


def test_compare_trains_every_run_and_writes_records_found_in_the_runs(tmp_path, comparison,
                                                                       capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    document = tmp_path / "RESULTS.md"  # beside the results folder, like docs/RESULTS.md
    document.write_text("# R\n\n<!-- generated from results/comparisons/tiny.md: do not edit -->\n"
                        "stale\n<!-- end of generated -->\nafter\n")
    argv = ["compare", str(comparison), "--runs", str(runs), "--results", str(results),
            "--threads", "1"]
    assert main(argv) == 0
    quoted = document.read_text()
    assert "stale" not in quoted and quoted.endswith("<!-- end of generated -->\nafter\n")
    assert "\n### tiny\n" in quoted and "| 50 | iterative | 2/2 |" in quoted
    assert "](results/comparisons/tiny.png)" in quoted
    names = sorted(p.name for p in runs.iterdir())
    assert names == sorted(f"tiny-{m}-s{s}" for m in ("lobster", "iterative", "oneshot")
                           for s in (0, 1))
    config = (runs / "tiny-iterative-s1" / "config.yaml").read_text()
    assert "seed: 1" in config and "epochs: 6" in config and "sparsity: 0.5" in config
    csv_path = results / "comparisons.csv"
    with open(csv_path, newline="") as handle:
        assert tuple(next(csv.reader(handle))) == COLUMNS
    rows = read_csv(csv_path)
    # Iterative: 50 % left after epoch 2, so candidates exist at both targets for both seeds;
    # one-shot only at its own target 50 (25 % left).
    iterative = [r for r in rows if r["method"] == "iterative"]
    assert len(iterative) == 4 and {r["epochs_budget"] for r in rows} == {"6"}
    oneshot = [r for r in rows if r["method"] == "oneshot"]
    assert len(oneshot) == 2 and all(float(r["remaining_percent"]) < 26 for r in oneshot)
    for row in rows:
        lines = (runs / row["run"] / "metrics.jsonl").read_text().splitlines()
        line = json.loads(lines[int(row["epoch"]) - 1])
        assert float(row["test_error_percent"]) == pytest.approx(100 - line["test_accuracy"],
                                                                 abs=1e-6)
    assert check_csv(csv_path, runs) == []
    section = (results / "comparisons" / "tiny.md").read_text()
    assert "| 50 | iterative | 2/2 |" in section and "±" in section
    # Every finished iterative run meets ≤ 50 % at ≤ 100 % error first at epoch 3 (pruned at 2).
    assert "| iterative | 2/2 | 3.00 ± 0.00 |" in section
    # The validation-error column: mean ± std of 100 − val_accuracy at the rows' epochs.
    val = [100 - json.loads((runs / r["run"] / "metrics.jsonl").read_text().splitlines()[
        int(r["epoch"]) - 1])["val_accuracy"] for r in oneshot]
    expected = f"{statistics.mean(val):.2f} ± {statistics.stdev(val):.2f}"
    assert re.search(rf"\| 50 \| oneshot \| 2/2 \| [^|]+ \| {re.escape(expected)} \|", section)
    assert (results / "comparisons" / "tiny.png").stat().st_size > 0
    assert "comparisons/tiny.md" in (results / "comparisons.md").read_text()

    # A second call resumes: every run is finished, nothing trains, the records are identical.
    before = csv_path.read_text()
    assert main(argv) == 0
    assert csv_path.read_text() == before

    # A tampered number is caught, naming the row.
    tampered = before.replace(rows[0]["test_error_percent"], "0.123456", 1)
    csv_path.write_text(tampered)
    problems = check_csv(csv_path, runs)
    assert len(problems) == 1 and "test_error_percent 0.123456" in problems[0]
    capsys.readouterr()
    assert main(argv + ["--records-only"]) == 0  # regenerated from the runs
    assert check_csv(csv_path, runs) == []


def test_unfinished_runs_are_left_out_of_the_records(tmp_path, comparison, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["compare", str(comparison), "--runs", str(runs), "--results", str(results),
                 "--set", "seeds=[0]", "--set", "epochs=2"]) == 0
    assert main(["compare", str(comparison), "--runs", str(runs), "--results", str(results),
                 "--records-only"]) == 0
    out = capsys.readouterr().out
    assert "compare: lobster: not finished: s0 (2/6 epochs), s1 (0/6 epochs)" in out
    section = (results / "comparisons" / "tiny.md").read_text()
    assert "| 50 | iterative | 0/0 | no finished run | — |" in section
    assert read_csv(results / "comparisons.csv") == []


def test_only_trains_the_named_methods(tmp_path, comparison, capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["compare", str(comparison), "--runs", str(runs), "--results", str(results),
            "--set", "seeds=[0]", "--set", "epochs=2"]
    assert main(argv + ["--only", "oneshot"]) == 0
    assert sorted(p.name for p in runs.iterdir()) == ["tiny-oneshot-s0"]
    capsys.readouterr()
    assert main(argv + ["--only", "lobstr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only lobstr: not a method" in err


def test_a_bad_comparison_is_one_line_and_exit_2(tmp_path, comparison, capsys):
    bad = _write(tmp_path / "bad.yaml", comparison.read_text().replace("candidates", "candidate"))
    assert main(["compare", str(bad), "--records-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'candidate'" in err
    bad.write_text(comparison.read_text().replace("pruning.sparsity=0.5", "pruning.sparsty=0.5"))
    assert main(["compare", str(bad), "--records-only"]) == 2
    assert "pruning.sparsty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seeds: expected a non-empty list"):
        load_comparison(comparison, ["seeds=[]"])


def test_the_recorded_comparisons_are_found_in_their_runs():
    """docs/results/comparisons.csv: every row's numbers at its epoch line of its run."""
    path = ROOT / "docs" / "results" / "comparisons.csv"
    if not path.is_file():
        pytest.skip("no docs/results/comparisons.csv yet")
    if not read_csv(path):
        pytest.skip("docs/results/comparisons.csv has no finished run yet")
    assert check_csv(path, ROOT / "docs" / "results" / "runs") == []


def test_results_md_quotes_the_generated_tables_as_they_are(tmp_path):
    """docs/RESULTS.md's generated blocks equal what refresh_quotes makes of the current files."""
    document = tmp_path / "RESULTS.md"
    original = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    document.write_text(original, encoding="utf-8")
    (tmp_path / "results").symlink_to(ROOT / "docs" / "results")
    quoted = refresh_quotes(document)
    if not quoted:
        pytest.skip("docs/RESULTS.md quotes no generated table yet")
    assert document.read_text(encoding="utf-8") == original, "rerun neuronwise compare"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "compare").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_comparisons_load_with_every_method_config(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # method configs are named relative to the repository
    comparison = load_comparison(path)
    assert len(comparison.seeds) >= 3 and comparison.methods
    for method in comparison.methods:
        config = run_config(comparison, method, comparison.seeds[-1])
        assert config.train.epochs == comparison.epochs
        assert config.name == f"{comparison.name}-{method}-s{comparison.seeds[-1]}"
        assert config.model.init_from is None  # every method starts from a random initialization
