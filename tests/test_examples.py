"""Every script in examples/ runs, on a few batches, and prints sensible numbers.

On real MNIST when the data root has it; otherwise on the embedded digits data, so the examples
are executed in every environment.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def data_args(request) -> list[str]:
    try:
        root = request.getfixturevalue("real_data_root")
    except pytest.skip.Exception:
        return ["--dataset", "digits"]
    return ["--data-root", str(root)]


def _run(name: str, args: list[str], monkeypatch, capsys) -> list[str]:
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    return capsys.readouterr().out.strip().splitlines()


def test_every_example_is_short_and_tested():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["lobster.py", "neq.py", "psp_entropy.py", "serene.py"]
    for script in scripts:
        assert len((EXAMPLES / script).read_text().splitlines()) <= 60, script


def test_lobster_example_prunes(data_args, monkeypatch, capsys):
    lines = _run("lobster.py", [*data_args, "--epochs", "1", "--max-batches", "5",
                                "--patience", "0"], monkeypatch, capsys)
    assert len(lines) == 1
    remaining = float(re.search(r"remaining ([\d.]+)%", lines[0]).group(1))
    assert remaining < 100.0  # patience 0: a pruning after the epoch


def test_serene_example_simplifies(data_args, monkeypatch, capsys):
    lines = _run("serene.py", [*data_args, "--epochs", "1", "--max-batches", "5",
                               "--patience", "0"], monkeypatch, capsys)
    alive, total = map(int, re.search(r"(\d+)/(\d+) neurons alive", lines[0]).groups())
    assert 0 < alive <= total
    found = re.search(r"([\d,]+) parameters \(dense: ([\d,]+)\)", lines[1]).groups()
    small, dense = (int(n.replace(",", "")) for n in found)
    assert small <= dense


def test_neq_example_reports_frozen_neurons(data_args, monkeypatch, capsys):
    lines = _run("neq.py", [*data_args, "--epochs", "2", "--max-batches", "5", "--eps", "0.05"],
                 monkeypatch, capsys)
    assert len(lines) == 2
    for line in lines:
        frozen, saving = map(float, re.search(r"freezes ([\d.]+)%.*saving ([\d.]+)%", line).groups())
        assert 0 <= frozen <= 100 and 0 <= saving <= 100


def test_psp_entropy_example_prints_bits_per_layer(data_args, monkeypatch, capsys):
    lines = _run("psp_entropy.py", [*data_args, "--epochs", "1", "--max-batches", "5"],
                 monkeypatch, capsys)
    assert lines[-1].startswith("classifier: 10 units")
    for line in lines:
        mean = float(re.search(r"mean H ([\d.]+) bits", line).group(1))
        assert 10 * 0.00147 <= mean <= 10.0  # C classes: between C·h(1e-4) and C bits


def _effect(name: str, lines: list[str]) -> bool:
    """Whether an example's last epoch shows its method at work."""
    if name == "lobster.py":
        return float(re.search(r"remaining ([\d.]+)%", lines[-1]).group(1)) < 100.0
    if name == "serene.py":
        alive, total = map(int, re.search(r"(\d+)/(\d+) neurons alive", lines[-2]).groups())
        return alive < total
    frozen = float(re.search(r"freezes ([\d.]+)%", lines[-1]).group(1))
    return 0.0 < frozen < 100.0


@pytest.mark.parametrize("name", ["lobster.py", "serene.py", "neq.py"])
def test_every_method_example_shows_its_effect_with_its_defaults(name, monkeypatch, capsys):
    """With no arguments (the embedded digits, 20 epochs: seconds of CPU): LOBSTER prunes,
    SeReNe kills neurons, NEq freezes some neurons but not all."""
    lines = _run(name, [], monkeypatch, capsys)
    assert _effect(name, lines), lines[-2:]
