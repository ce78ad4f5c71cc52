"""neuronwise compare, ``kind: training`` (NEq vs its baselines vs dense): selection among the last
epochs, time to the reference accuracy on two clocks, and frozen shares matched per epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from neuronwise.experiment.cli import main
from neuronwise.experiment.compare import load_comparison, select_last
from neuronwise.experiment.compare_report import check_csv, read_csv
from neuronwise.experiment.compare_training import (
    cumulative_time,
    first_at,
    reference_accuracy,
)
from neuronwise.experiment.methods.neq import NEqCallback


def _line(epoch, val, test, train_s=1.0, cpu_s=0.5, **extra):
    return {"epoch": epoch, "remaining_percent_paper": 100.0, "val_accuracy": val,
            "test_accuracy": test, "train_time_s": train_s, "train_cpu_time_s": cpu_s, **extra}


def test_select_last_takes_the_best_validation_among_the_last_epochs():
    history = [_line(1, 99.9, 99.9), _line(2, 90.0, 91.0), _line(3, 95.0, 94.0),
               _line(4, 95.0, 80.0), _line(5, 93.0, 93.5)]
    chosen = select_last(history, epochs=5, candidates=3)
    # Epoch 1 has the best validation but is not among epochs 3-5; 3 and 4 tie: the earlier wins.
    assert (chosen.epoch, chosen.target) == (3, None)
    assert chosen.test_error_percent == pytest.approx(6.0)
    assert select_last(history, epochs=5, candidates=1).epoch == 5
    assert select_last(history, epochs=6, candidates=2) is None  # epoch 6 is missing


def test_time_to_reference_counts_training_and_the_probe_pass_on_both_clocks():
    history = [_line(2, 0, 88.0, train_s=3.0, cpu_s=2.0, neq_time_s=0.5, neq_cpu_time_s=0.25),
               _line(1, 0, 80.0, train_s=2.0, cpu_s=1.0, neq_time_s=0.5, neq_cpu_time_s=0.25),
               _line(3, 0, 90.0, train_s=4.0, cpu_s=3.0, neq_time_s=1.0, neq_cpu_time_s=0.5)]
    assert cumulative_time(history, "wall") == [2.5, 6.0, 11.0]
    assert cumulative_time(history, "cpu") == [1.25, 3.5, 7.0]
    assert first_at(history, 88.0) == {"epoch": 2, "wall_s": 6.0, "cpu_s": 3.5}
    assert first_at(history, 90.5) is None
    dense = [_line(1, 0, 80.0, train_s=2.0, cpu_s=1.5)]  # no probe pass: the training loop only
    assert first_at(dense, 79.0) == {"epoch": 1, "wall_s": 2.0, "cpu_s": 1.5}
    older = [{k: v for k, v in line.items() if k != "train_cpu_time_s"} for line in history]
    assert cumulative_time(older, "cpu") is None  # records made before the CPU clock existed
    assert first_at(older, 80.0) == {"epoch": 1, "wall_s": 2.5, "cpu_s": None}


def test_reference_accuracy_is_the_mean_of_the_reference_rows_minus_the_margin(tmp_path):
    comparison = load_comparison(_comparison(tmp_path))
    rows = [{"method": "dense", "test_error_percent": "10.0"},
            {"method": "dense", "test_error_percent": "12.0"},
            {"method": "neq", "test_error_percent": "1.0"}]
    assert reference_accuracy(comparison, rows) == pytest.approx(100 - 11.0 - 0.3)
    assert reference_accuracy(comparison, rows[2:]) is None


BASE = """
data: {name: digits, val_fraction: 0.2, batch_size: 64, limit_train: 400}
model: {name: mlp}
optim: {name: sgd, lr: 0.1}
train: {epochs: 1, seed: 0}
"""


def _comparison(tmp_path: Path, extra: str = "") -> Path:
    neq = tmp_path / "neq.yaml"
    neq.write_text(BASE + "method: neq\nneq: {eps: 0.05, mu: 0.5, val_size: 0.05, "
                   "skip_frozen_grads: true}\n", encoding="utf-8")
    path = tmp_path / "cmp.yaml"
    path.write_text(f"""
name: tiny-neq
kind: training
epochs: 5
seeds: [0, 1]
candidates: 2
time_to_reference: {{method: dense, margin: 0.3}}
methods:
  dense: {{config: {neq}, set: [method=none]}}
  neq: {{config: {neq}}}
  random: {{config: {neq}, set: [neq.selection=random], match_frozen: neq}}
{extra}""", encoding="utf-8")
    return path


def _records(directory: Path) -> list[dict]:
    text = (directory / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def test_training_comparison_matches_frozen_shares_and_writes_checked_records(tmp_path, capsys):
    comparison = _comparison(tmp_path)
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["compare", str(comparison), "--runs", str(runs), "--results", str(results),
            "--threads", "1"]
    # The random baseline waits for the NEq run of its seed.
    assert main(argv + ["--only", "random", "--set", "seeds=[0]"]) == 0
    assert "compare: tiny-neq-random-s0 waits for tiny-neq-neq-s0 (not finished)" in (
        capsys.readouterr().out)
    assert not (runs / "tiny-neq-random-s0").exists()
    assert main(argv) == 0
    for seed in (0, 1):
        neq = _records(runs / f"tiny-neq-neq-s{seed}")
        random = _records(runs / f"tiny-neq-random-s{seed}")
        config = yaml.safe_load((runs / f"tiny-neq-random-s{seed}" / "config.yaml").read_text())
        shares = config["neq"]["trained_fractions"]
        assert shares == [pytest.approx(1 - r["frozen_percent"] / 100, abs=1e-6) for r in neq]
        assert any(r["frozen_percent"] > 0 for r in neq[1:]), "eps too small to test matching"
        weights = torch.load(runs / f"tiny-neq-random-s{seed}" / "last.pt",
                             weights_only=False)["model"]
        for mine, theirs in zip(random, neq):
            # Each layer freezes ⌊(1 − p)·C_l⌋ of its C_l neurons, p = NEq's trained share.
            for layer, percent in mine["frozen_per_layer"].items():
                neurons = weights[f"{layer}.weight"].shape[0]
                expected = math.floor((theirs["frozen_percent"] / 100) * neurons + 1e-6)
                assert percent == pytest.approx(100.0 * expected / neurons)
        assert random[0]["frozen_percent"] == neq[0]["frozen_percent"] == 0.0  # warm-up epoch
        assert all("train_cpu_time_s" in r and "neq_cpu_time_s" in r for r in neq)
    rows = read_csv(results / "comparisons.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted(
        (m, s) for m in ("dense", "neq", "random") for s in ("0", "1"))
    assert all(r["epoch"] in ("4", "5") and r["remaining_percent"] == "100.000000" for r in rows)
    assert check_csv(results / "comparisons.csv", runs) == []
    section = (results / "comparisons" / "tiny-neq.md").read_text()
    assert "| dense | 2/2 |" in section and "Time to reference" in section
    assert "| method | met | epochs | wall s | CPU s |" in section
    assert (results / "comparisons" / "tiny-neq.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    ("targets: [10]\n", "targets: not used with kind: training"),
    ("time_to_target: [10, 1]\n", "time_to_target: not used with kind: training"),
    ("kind: trainng\n", "kind: expected one of pruning, training"),
])
def test_a_bad_training_comparison_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    path = _comparison(tmp_path)
    text = path.read_text().replace("kind: training\n", "" if "kind" in extra else "kind: training\n")
    path.write_text(text + extra)
    assert main(["compare", str(path), "--records-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("override, message", [
    ("methods.random.match_frozen=random", "match_frozen: expected another method"),
    ("time_to_reference.method=lobster", "time_to_reference.method: expected one of dense"),
    ("time_to_reference={method: dense}", "expected {method: M, margin: D}"),
    ("candidates=6", "candidates: expected <= epochs (5)"),
])
def test_training_comparison_fields_are_checked(tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("{", r"\{").replace("}", r"\}")):
        load_comparison(_comparison(tmp_path), [override])


@pytest.mark.parametrize("kwargs, message", [
    ({"trained_fractions": [0.5, 1.5]}, "expected a non-empty list of numbers in"),
    ({"trained_fractions": []}, "expected a non-empty list"),
    ({"trained_fractions": [0.5], "trained_fraction": 0.5}, "set with trained_fraction"),
])
def test_neq_trained_fractions_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NEqCallback(val_size=0.1, selection="random", **kwargs)
