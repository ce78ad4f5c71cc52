"""neuronwise compare with ``latency:``: neuron counts of the selected epochs, and the final models
simplified and timed, recorded once per run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuronwise.experiment.cli import main
from neuronwise.experiment.compare import load_comparison

RUN = """
data: {name: digits, val_fraction: 0.2, batch_size: 64, limit_train: 400}
model: {name: mlp, kwargs: {hidden: [16, 12]}}
optim: {name: sgd, lr: 0.1}
pruning: {schedule: iterative, granularity: neurons, fraction: 0.5, every: 1, sparsity: 0.75}
train: {epochs: 1, seed: 0}
"""


@pytest.fixture
def comparison(tmp_path: Path) -> Path:
    (tmp_path / "l1.yaml").write_text(RUN)
    (tmp_path / "cmp.yaml").write_text(f"""
name: tiny-structured
epochs: 4
seeds: [0, 1]
candidates: 1
targets: [60]
latency: {{batch: 4, repeats: 3}}
methods:
  l1: {{config: {tmp_path / 'l1.yaml'}}}
  l1-global: {{config: {tmp_path / 'l1.yaml'}, set: [pruning.neuron_ranking=l1-global]}}
""")
    return tmp_path / "cmp.yaml"


def _alive(weight: torch.Tensor) -> int:
    return int((weight != 0).any(dim=1).sum())


def test_latency_records_the_simplified_final_model_of_every_finished_run(tmp_path, comparison,
                                                                          capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["compare", str(comparison), "--runs", str(runs), "--results", str(results),
            "--threads", "1"]
    assert main(argv) == 0
    for method in ("l1", "l1-global"):
        for seed in (0, 1):
            run = runs / f"tiny-structured-{method}-s{seed}"
            record = json.loads((run / "latency.json").read_text())
            last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
            assert record["epoch"] == last["epoch"] == 4
            assert (record["batch"], record["repeats"], record["clock"]) == (4, 3, "cpu")
            assert record["speedup"] == pytest.approx(record["dense_ms"] / record["simplified_ms"])
            assert record["neurons_alive"] == last["neurons_alive"]
            # hand count of the simplified MLP: 64 inputs, hidden a1, a2 alive, 10 classes
            state = torch.load(run / "last.pt", weights_only=False)["model"]
            weights = [v for k, v in state.items() if k.endswith("weight")]
            a1, a2 = _alive(weights[0]), _alive(weights[1])
            assert (a1, a2) == ((4, 3) if method == "l1" else (a1, a2))
            assert record["params_simplified"] == 64 * a1 + a1 + a1 * a2 + a2 + a2 * 10 + 10
            assert record["params_dense"] == 64 * 16 + 16 + 16 * 12 + 12 + 12 * 10 + 10
    section = (results / "comparisons" / "tiny-structured.md").read_text()
    assert ("| target ≤ % | method | n | remaining % | neurons alive | validation error % "
            "| test error % |") in section
    assert "| l1 | 2/2 |" in section and "speed-up" in section
    assert "tiny-structured-latency.png" in section
    assert (results / "comparisons" / "tiny-structured-latency.png").stat().st_size > 0
    # 75 % of 16 and 12 hidden neurons dead (l1-layer): 4 + 3 + 10 classes alive at the end
    assert "| l1 | 2/2 | " in section and "| 17.0 ± 0.0 |" in section

    # Measured once: a second call keeps every record as it is.
    before = (runs / "tiny-structured-l1-s0" / "latency.json").read_bytes()
    capsys.readouterr()
    assert main(argv + ["--records-only"]) == 0
    assert (runs / "tiny-structured-l1-s0" / "latency.json").read_bytes() == before
    assert "simplified final model" not in capsys.readouterr().out


def test_unfinished_runs_are_not_timed_and_a_bad_setting_is_one_line(tmp_path, comparison,
                                                                       capsys):
    runs, results = tmp_path / "runs", tmp_path / "results"
    assert main(["compare", str(comparison), "--runs", str(runs), "--results", str(results),
                 "--set", "epochs=2", "--set", "seeds=[0]", "--only", "l1"]) == 0
    # finished at a budget of 2: timed at epoch 2, which a budget of 4 does not count
    assert json.loads((runs / "tiny-structured-l1-s0" / "latency.json").read_text())["epoch"] == 2
    assert main(["compare", str(comparison), "--runs", str(runs), "--results", str(results),
                 "--records-only"]) == 0
    section = (results / "comparisons" / "tiny-structured.md").read_text()
    assert "| l1 | 0/0 | not measured |" in section
    capsys.readouterr()
    assert main(["compare", str(comparison), "--records-only", "--set",
                 "latency={batch: 0, repeats: 3}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latency: expected {batch: N, repeats: N}" in err
    assert load_comparison(comparison, ["latency=null"]).latency is None
