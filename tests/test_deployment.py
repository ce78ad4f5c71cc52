"""``neuronwise deploy RUN``: deployed model saved and reloadable, latencies and MACs reported."""

import json

import torch

import neuronwise as nw
from neuronwise.experiment.cli import main
from neuronwise.experiment.deployment import mac_counts


def test_deploy_command_saves_reports_and_reloads(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["quickstart", "--run-dir", str(run), "--set", "train.epochs=2",
                 "--set", "pruning.patience=0"]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "deployed"
    assert main(["deploy", str(run), "--batch-size", "4", "--export", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "deployed model saved" in out and "vs simplify alone" in out and "MACs" in out
    summary = json.loads((out_dir / "deploy.json").read_text())
    assert [row["batch"] for row in summary["latency"]] == [1, 4, 32, 256]
    for row in summary["latency"]:
        assert row["speedup_vs_dense"] == row["dense_ms"] / row["deployed_ms"]
    assert summary["max_abs_output_difference"] < 1e-4
    deployed = nw.load_deployed(out_dir / "deployed.pt")
    assert deployed(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert not (run / "deployed.pt").exists()


def test_deploy_command_rejects_a_bad_batch_size(tmp_path, capsys):
    assert main(["deploy", str(tmp_path), "--batch-size", "0"]) == 2
    assert "batch-size" in capsys.readouterr().err


def test_mac_counts_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 2], [0, 0, 0, 0], [0, 3, 0, 0]]))
        model[2].weight.fill_(1.0)
    counts = mac_counts(model, torch.zeros(1, 4))
    # dense 4·3 + 3·2; simplified drops the dead neuron: 4·2 + 2·2; non-zeros 3 + 6
    assert counts == {"dense": 18, "simplified": 12, "nonzero": 9}
